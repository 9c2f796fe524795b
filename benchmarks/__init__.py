"""Benchmarks: training step (bench_train), data loading (bench_data), generation and scoring (bench_eval)."""
