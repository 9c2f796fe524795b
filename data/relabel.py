"""On-policy relabelling (--choice_model): a scorer from eval.scorers decides which image of each pair wins."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_choice_model(args, device):
    """The --choice_model scorer (eval.scorers, any of the five metrics), with --choice_model_path/_config options."""
    from eval.scorers import load_scorer

    options = {}
    if args.choice_model_config:
        text = args.choice_model_config
        if Path(text).is_file():
            text = Path(text).read_text()
        try:
            options = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--choice_model_config is neither a JSON object nor a .json file: {error}") from error
        if not isinstance(options, dict):
            raise ValueError(f"--choice_model_config must be a JSON object of load_scorer options, got {text!r}")
    if args.choice_model_path:
        options["model_path"] = args.choice_model_path
    return load_scorer(args.choice_model, device=args.choice_model_device or device,
                       batch_size=args.choice_model_batch_size, **options)


def relabel_pairs(scorer, batch, pixels):
    """AI feedback (the official --choice_model, fixed: any scorer, any batch size). The pairs come in dataset order
    (jpg_0, jpg_1) with their decoded images; a pair is swapped where the scorer ranks jpg_1 above jpg_0, so the
    preferred image goes first and ties keep the dataset order. Returns the pixels and, per pair, whether the scorer's
    winner differs from the human one (label_0)."""
    scores = scorer.score([prompt for prompt in batch["prompts"] for _ in range(2)],
                          [image for pair in batch["images"] for image in pair])
    scores = torch.tensor(scores, dtype=torch.float64).view(-1, 2)
    swap = (scores[:, 1] > scores[:, 0]).to(pixels.device)
    swapped = torch.cat([pixels[:, 3:], pixels[:, :3]], dim=1)
    pixels = torch.where(swap.view(-1, 1, 1, 1), swapped, pixels)
    return pixels, swap != (batch["label_0"].to(pixels.device) == 0)
