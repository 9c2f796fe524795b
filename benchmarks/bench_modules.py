#!/usr/bin/env python
"""A/B timings of the frozen modules' forwards, on the step's shapes (2B images), interleaved call by call:

* the reference UNet and the VAE encode under torch.no_grad vs torch.inference_mode (why train.compute_loss runs the
  reference under inference_mode: same values, no autograd bookkeeping);
* the reference UNet with PyTorch scaled-dot-product attention (diffusers' default AttnProcessor2_0) vs diffusers'
  classic attention (AttnProcessor: explicit softmax(QK^T)V).

    python benchmarks/bench_modules.py --config tiny --batch 2 --repeats 100 --threads 1
    python benchmarks/bench_modules.py --config sd15 --batch 8 --precision bf16          # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import command_line, common_fields, interleaved, quiet_libraries  # noqa: E402


def main(argv=None):
    from benchmarks.models import RESOLUTION, build

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--batch", type=int, default=2, help="Pairs (the modules see 2x this).")
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--repeats", type=int, default=50, help="Timed calls of each, per round.")
    parser.add_argument("--rounds", type=int, default=1, help="Independent measurements (one record each).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision, torch.float32)
    models = build(args.config, args.device, dtype)
    n, side = 2 * args.batch, RESOLUTION[args.config]
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(n, 3, side, side, generator=generator) * 2 - 1).to(args.device, dtype)
    noisy = torch.randn(n, 4, side // factor, side // factor, generator=generator).to(args.device, dtype)
    timesteps = torch.randint(0, 1000, (n,), generator=generator).to(args.device)
    width = models.unet.config.cross_attention_dim
    cond = torch.randn(n, 77, width, generator=generator).to(args.device, dtype)
    added = None
    if models.sdxl:
        pooled = models.text_encoders[-1].config.projection_dim
        added = {"text_embeds": torch.randn(n, pooled, generator=generator).to(args.device, dtype),
                 "time_ids": torch.tensor([side, side, 0, 0, side, side], device=args.device, dtype=dtype).repeat(n, 1)}

    def under(mode, fn):
        def call():
            with mode():
                return fn()
        return call

    from diffusers.models.attention_processor import AttnProcessor

    classic_unet = copy.deepcopy(models.ref_unet)
    classic_unet.set_attn_processor(AttnProcessor())
    reference = lambda unet=models.ref_unet: unet(noisy, timesteps, cond, added_cond_kwargs=added).sample  # noqa: E731
    vae = lambda: models.vae.encode(pixels).latent_dist.mean  # noqa: E731
    calls = {("reference_forward", "no_grad"): under(torch.no_grad, reference),  # (part, A), then (part, B)
             ("reference_forward", "inference_mode"): under(torch.inference_mode, reference),
             ("vae_encode", "no_grad"): under(torch.no_grad, vae),
             ("vae_encode", "inference_mode"): under(torch.inference_mode, vae),
             ("reference_attention", "classic"): under(torch.inference_mode, lambda: reference(classic_unet)),
             ("reference_attention", "sdpa"): under(torch.inference_mode, reference)}
    outputs = {key: call() for key, call in calls.items()}
    records = []
    for round_ in range(args.rounds):
        common = common_fields(args.device, command_line("bench_modules.py", argv))
        times = interleaved(calls, args.device, args.repeats, warmup=3)
        for part in ("reference_forward", "vae_encode", "reference_attention"):
            (a, a_out), (b, b_out) = [(mode, outputs[p, mode]) for p, mode in calls if p == part]
            a_s, b_s = statistics.median(times[part, a]), statistics.median(times[part, b])
            records.append({"config": args.config, "part": part, "round": round_, "batch": args.batch,
                            "precision": args.precision, "a": a, "b": b, "a_s": round(a_s, 6), "b_s": round(b_s, 6),
                            "speedup": round(a_s / b_s, 4),
                            "max_abs_diff": float((a_out.float() - b_out.float()).abs().max()), **common})
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        for r in records:
            print(f"{r['config']} {r['part']}: {r['a']} {1e3 * r['a_s']:.2f} ms, {r['b']} {1e3 * r['b_s']:.2f} ms, "
                  f"speed-up of {r['b']} {r['speedup']:.3f} (max |difference| {r['max_abs_diff']:.2g})")
    return records


if __name__ == "__main__":
    main()
