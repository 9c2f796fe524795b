"""Evaluation: image generation for the prompt sets, the five scorers, A/B comparison."""
