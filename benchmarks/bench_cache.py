"""What --latents_cache saves: the training step's time with and without the VAE encode and text encoders, and the
cache's disk size per 1,000 pairs.

Time: train.compute_loss + backward on a batch of pixels and token ids (the VAE and text encoders run) against the
same step on a batch of cached moments and text outputs (they do not), on the tiny SD1.5-like model (`--model tiny`,
CPU) or a local model folder. Disk: computed from the shapes a cache stores (both images, both flips, moments =
mean and log-variance, text outputs per caption), in float16, and measured on the tiny cache.

    python benchmarks/bench_cache.py [--model DIR] [--steps 20] [--batch 2] [--resolution 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import families  # noqa: E402
import latent_cache  # noqa: E402
import train  # noqa: E402
from data.pairs import PairDataset

# (latent channels, VAE factor, text outputs per caption as (tokens, width) plus pooled widths), from the real configs
SHAPES = {
    "SD1.5": (4, 8, [(77, 768)], []),
    "SDXL": (4, 8, [(77, 2048)], [1280]),
    "SD3.5": (16, 8, [(77 + 256, 4096)], [2048]),
    "FLUX.1": (16, 8, [(512, 4096)], [768]),
}


def disk_per_thousand(name: str, resolution: int, flips: int = 2, bytes_per_value: int = 2) -> float:
    channels, factor, texts, pooled = SHAPES[name]
    latent = 2 * channels * (resolution // factor) ** 2  # mean and log-variance
    per_pair = 2 * flips * latent + sum(t * w for t, w in texts) + sum(pooled)
    return 1000 * per_pair * bytes_per_value / 1e9


def time_steps(args_list, batch, models, family, noise, steps: int, latent_config=None) -> float:
    unet, reference, vae, encoders = models
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss, *_ = train.compute_loss(args_list, batch, unet, reference, vae, encoders, family, noise, torch.float32,
                                      latent_config=latent_config)
        loss.backward()
        unet.zero_grad(set_to_none=True)
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built here) or an SD-family model folder.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = options.model
        if model == "tiny":
            from tiny import build_pickapic, build_sd15

            model = build_sd15(work / "model")
        from tiny import build_pickapic

        data = build_pickapic(work / "data", n_pairs=32)
        argv_train = ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--resolution",
                      str(options.resolution), "--train_batch_size", str(options.batch), "--mixed_precision", "no",
                      "--output_dir", str(work / "out"), "--report_to", "none", "--seed", "0"]
        latent_cache.main(argv_train + ["--latents_cache", str(work / "cache"), "--latents_cache_shard_size", "16"])
        args = train.parse_args(argv_train)
        cached_args = train.parse_args(argv_train + ["--latents_cache", str(work / "cache")])
        family = families.make_family(args)
        tokenizers, encoders = family.load_text(torch.float32)
        noise, vae = family.load_noise(), family.load_vae(torch.float32)
        unet, reference = family.load_denoiser(str(model)), family.load_denoiser(str(model))
        pairs = PairDataset(train.filter_rows(train.load_rows(args), args, True), args)
        cache = latent_cache.LatentCache(work / "cache", cached_args)
        cached = latent_cache.CachedPairDataset(cache, cached_args)
        keys = [(0, 0, i) for i in range(options.batch)]
        pixel_batch = train.Collate(tokenizers, family.max_lengths())([pairs[k] for k in keys])
        cache_batch = latent_cache.collate([cached[k] for k in keys])
        from types import SimpleNamespace

        on_the_fly = time_steps(args, pixel_batch, (unet, reference, vae, encoders), family, noise, options.steps)
        from_cache = time_steps(cached_args, cache_batch, (unet, reference, None, []), family, noise, options.steps,
                                SimpleNamespace(**cache.index["latent"]))
        measured = sum(f.stat().st_size for f in (work / "cache").iterdir()) / len(cache) * 1000 / 1e9
    record = {"model": options.model, "resolution": options.resolution, "batch": options.batch,
              "step_ms_on_the_fly": on_the_fly * 1e3, "step_ms_from_cache": from_cache * 1e3,
              "speedup": on_the_fly / from_cache, "tiny_cache_gb_per_1000_pairs_float16": measured,
              "gb_per_1000_pairs_float16": {f"{name} {size}px": disk_per_thousand(name, size)
                                            for name in SHAPES for size in (512, 1024)}}
    print(json.dumps(record) if options.json else "\n".join(f"{k}: {v}" for k, v in record.items()))
    return record


if __name__ == "__main__":
    main()
