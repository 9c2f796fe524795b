#!/usr/bin/env python
"""Data loading throughput: decoded, transformed and collated pairs per second, per DataLoader worker.

    python benchmarks/bench_data.py --workers 0 1 2 --resolution 512 --json
    python benchmarks/bench_data.py --sdxl --resolution 1024 --workers 8 16    # on a many-core GPU host

The pipeline is train.py's: train.load_rows / filter_rows -> PairDataset (JPEG decode, resize, crop, flip,
caption dropout) -> train.EpochSampler -> train.Collate (CLIP tokenisation; two tokenizers with --sdxl) -> the
DataLoader with main()'s settings (pin_memory on CUDA, persistent workers). The data is the synthetic Pick-a-Pic
parquet of tiny.build_pickapic, with images of Pick-a-Pic-like sizes (--image_size; the real ones are 512-1024 px).

Throughput is measured over --batches batches after the first (worker start-up is reported apart as `first_batch_s`).
`epoch_restart_s` is the time to the first batch of the next epoch: with persistent workers the processes are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train  # noqa: E402
from benchmarks.common import command_line, common_fields, quiet_libraries  # noqa: E402
from data.pairs import PairDataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="--dataloader_num_workers values.")
    parser.add_argument("--batch", type=int, default=8, help="Pairs per batch (--train_batch_size).")
    parser.add_argument("--batches", type=int, default=8, help="Timed batches (after the first).")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--sdxl", action="store_true", help="Two tokenizers, as train.py --sdxl.")
    parser.add_argument("--pairs", type=int, default=96, help="Rows of the synthetic parquet.")
    parser.add_argument("--image_size", nargs=2, type=int, default=[512, 1024], metavar=("MIN", "MAX"),
                        help="Side lengths of the stored JPEGs (drawn per image).")
    parser.add_argument("--data", default=None, help="An existing Pick-a-Pic-style dataset instead of the synthetic one.")
    parser.add_argument("--no_persistent", action="store_true", help="Compare: workers restarted every epoch.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    needed = (args.batches + 1) * args.batch
    if args.data is None and args.pairs < needed:
        parser.error(f"--pairs {args.pairs} is fewer than the {needed} pairs that --batches + 1 batches need")
    return args


def dataloader(args, dataset, tokenizers, workers: int, persistent: bool):
    """train.main's DataLoader (same sampler, collate and worker settings)."""
    sampler = train.EpochSampler(len(dataset), seed=0, shuffle=True)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch, drop_last=True, collate_fn=train.Collate(tokenizers),
        num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    return loader, sampler


def measure(args, dataset, tokenizers, workers: int) -> dict:
    loader, sampler = dataloader(args, dataset, tokenizers, workers, persistent=not args.no_persistent)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    elapsed = time.perf_counter() - start
    del batches
    sampler.epoch = 1
    start = time.perf_counter()
    next(iter(loader))  # a new epoch
    restart = time.perf_counter() - start
    pairs_per_s = args.batches * args.batch / elapsed
    return {"workers": workers, "batch": args.batch, "resolution": args.resolution, "sdxl": args.sdxl,
            "pairs_per_s": round(pairs_per_s, 3), "pairs_per_s_per_worker": round(pairs_per_s / max(workers, 1), 3),
            "first_batch_s": round(first, 4), "epoch_restart_s": round(restart, 4),
            "persistent_workers": not args.no_persistent and workers > 0, "pin_memory": torch.cuda.is_available()}


def run(args) -> list[dict]:
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:  # the parquet, its arrow cache, the tokenizer
        return measure_all(args, Path(folder))


def measure_all(args, folder: Path) -> list[dict]:
    from tiny import build_clip_tokenizer, build_pickapic

    data = args.data
    if data is None:
        data = build_pickapic(folder / "pickapic", n_pairs=args.pairs, sizes=tuple(args.image_size), corrupt=0)
    targs = train.parse_args(["--pretrained_model_name_or_path", "<none>", "--dataset_name", str(data),
                              "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
                              "--cache_dir", str(folder / "cache")] + (["--sdxl"] if args.sdxl else []))
    dataset = PairDataset(train.filter_rows(train.load_rows(targs), targs, is_main=False), targs)
    tokenizer = build_clip_tokenizer(folder / "tokenizer")
    tokenizers = [tokenizer, tokenizer] if args.sdxl else [tokenizer]
    common = common_fields("cpu", args.command)
    records = []
    for workers in args.workers:
        record = {**measure(args, dataset, tokenizers, workers), "image_size": args.image_size, **common}
        records.append(record)
        if not args.json:
            print(f"workers={workers:2d}  {record['pairs_per_s']:8.2f} pairs/s  ({record['pairs_per_s_per_worker']:.2f} "
                  f"per worker)  first batch {record['first_batch_s']:.2f} s  next epoch {record['epoch_restart_s']:.2f} s",
                  file=sys.stderr, flush=True)
    return records


def main(argv=None):
    args = parse_args(argv)
    args.command = command_line("bench_data.py", argv)
    records = run(args)
    print(json.dumps(records, indent=1) if args.json else "\n".join(
        f"| {r['workers']} | {r['resolution']} | {r['pairs_per_s']} | {r['pairs_per_s_per_worker']} | "
        f"{r['first_batch_s']} | {r['epoch_restart_s']} |" for r in records))
    return records


if __name__ == "__main__":
    main()
