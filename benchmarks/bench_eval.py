#!/usr/bin/env python
"""Evaluation throughput: generation (images per second) and each scorer (images per second).

    python benchmarks/bench_eval.py --generate tiny --scorers all --json                 # CPU, tiny models
    python benchmarks/bench_eval.py --generate sd15 sdxl --gen_batch 1 8 --scorers none   # GPU, real architectures
    python benchmarks/bench_eval.py --generate none --scorers all --scorer_weights official --device cuda

Generation times eval.generate.sample (text encoding, --steps Euler steps with classifier-free guidance, VAE decode;
PNG writing excluded) for a batch of prompts, on `tiny`, on the real SD1.5/SDXL architectures with random weights
(speed does not depend on the weights), or on a real pipeline folder (--pretrain_path). Scoring times
Scorer.score (preprocessing included) from eval.scorers; `--scorer_weights tiny` uses tiny.build_tiny_scorers,
`official` the official hub weights (they must be in the Hugging Face cache).
Each figure is the median of --repeats timed calls after one untimed call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import command_line, common_fields, quiet_libraries, timed  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a watercolor painting of a fox in a snowy forest",
           "a red sports car parked in front of a modern glass building at dusk", "a bowl of ramen, studio lighting"]


def parse_args(argv=None):
    from eval.scorers import METRICS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generate", nargs="+", default=["tiny"], choices=["tiny", "sd15", "sdxl", "none"],
                        help="Generation configs to time ('none' to skip).")
    parser.add_argument("--pretrain_path", default=None, help="Time this pipeline folder instead (SD1.5 or SDXL).")
    parser.add_argument("--gen_batch", nargs="+", type=int, default=[1, 4], help="Prompts per sample() call.")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps (official: 50).")
    parser.add_argument("--size", type=int, default=None, help="Image side; default 32 tiny, 512 sd15, 1024 sdxl.")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="UNet/text encoder precision; default as eval.generate (bf16 on CUDA, fp32 on CPU).")
    parser.add_argument("--scorers", nargs="+", default=["all"], help=f"{', '.join(METRICS)}, all or none.")
    parser.add_argument("--scorer_weights", choices=["tiny", "official"], default="tiny")
    parser.add_argument("--score_images", type=int, default=32, help="Images per Scorer.score call.")
    parser.add_argument("--score_batch", type=int, default=32, help="Scorer batch size (official: 32; ImageReward 1).")
    parser.add_argument("--image_size", type=int, default=512, help="Side of the images that are scored.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.generate = [c for c in args.generate if c != "none"]
    args.scorers = [] if args.scorers == ["none"] else list(METRICS) if args.scorers == ["all"] else args.scorers
    for name in args.scorers:
        if name not in METRICS:
            parser.error(f"--scorers {name}: choose from {', '.join(METRICS)}, all or none")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Generation


def generation_models(config: str, device, dtype, folder: Path, pretrain_path=None):
    """eval.generate.Models for `config`: loaded by eval.generate itself from a pipeline folder (tiny, or
    --pretrain_path), or assembled from the real architectures with random weights (benchmarks/models.py)."""
    from diffusers import EulerDiscreteScheduler

    from benchmarks.models import SCHEDULE, build
    from eval import generate

    if pretrain_path or config == "tiny":
        if not pretrain_path:
            from tiny import build_sd15

            pretrain_path = str(build_sd15(folder / "tiny-sd15"))
        prompt_file = folder / "prompts.json"  # resolve_args wants one
        prompt_file.write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
        gargs = generate.parse_args(["--pretrain_path", pretrain_path, "--output_path", str(prompt_file.parent),
                                     "--test_json", str(prompt_file)])
        return generate.load_models(generate.resolve_args(gargs), torch.device(device), dtype)
    models = build(config, device, torch.float32, reference=False)  # VAE in fp32, as eval.generate
    spacing = dict(timestep_spacing="leading", steps_offset=1) if models.sdxl else {}  # the repos' scheduler configs
    scheduler = EulerDiscreteScheduler(**SCHEDULE, **spacing)
    return generate.Models(models.unet.to(dtype).eval().requires_grad_(False), models.vae, scheduler, models.tokenizers,
                           [e.to(dtype) for e in models.text_encoders], models.sdxl, torch.device(device), dtype)


def bench_generation(args, config: str, folder: Path) -> list[dict]:
    from eval import generate

    device = torch.device(args.device)
    dtype = generate.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    models = generation_models(config, device, dtype, folder, args.pretrain_path)
    size = args.size or {"tiny": 32, "sd15": 512, "sdxl": 1024}[config]
    gargs = generate.parse_args(["--steps", str(args.steps), "--height", str(size), "--width", str(size),
                                 "--cfg", "7.5", "--guidance_formula", "official"])  # the SD protocol (resolve_args sets it)
    uncond = generate.encode(models, [""])
    records = []
    for batch in args.gen_batch:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        seconds = statistics.median(timed(lambda: generate.sample(models, prompts, uncond, gargs), device,
                                          args.repeats, warmup=1))
        records.append({"bench": "generate", "config": args.pretrain_path or config, "batch": batch, "size": size,
                        "steps": args.steps, "dtype": str(dtype).replace("torch.", ""), "seconds": round(seconds, 4),
                        "images_per_s": round(batch / seconds, 4)})
    return records


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def score_images(n: int, size: int):
    from tiny import ATTRIBUTE_COLOURS, SHAPES, draw_shape
    import random

    rng = random.Random(0)
    colours = list(ATTRIBUTE_COLOURS.values())
    return [draw_shape(SHAPES[i % len(SHAPES)], colours[i % 2], (size, size), rng) for i in range(n)]


def bench_scorers(args, folder: Path) -> list[dict]:
    from eval.scorers import load_scorer

    kwargs = {name: {} for name in args.scorers}
    if args.scorer_weights == "tiny":
        from tiny import build_tiny_scorers

        kwargs = build_tiny_scorers(folder / "scorers")
    images = score_images(args.score_images, args.image_size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    records = []
    for name in args.scorers:
        batch = 1 if name == "imagereward" else args.score_batch  # the official ImageReward scores one at a time
        scorer = load_scorer(name, device=args.device, batch_size=batch, **kwargs[name])
        seconds = statistics.median(timed(lambda: scorer.score(prompts, images), args.device, args.repeats, warmup=1))
        records.append({"bench": "score", "scorer": name, "weights": args.scorer_weights, "batch": batch,
                        "images": len(images), "image_size": args.image_size, "seconds": round(seconds, 4),
                        "images_per_s": round(len(images) / seconds, 3)})
        del scorer
    return records


def main(argv=None):
    args = parse_args(argv)
    command = command_line("bench_eval.py", argv)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = common_fields(args.device, command)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as folder:  # tiny pipeline and scorers, prompt file
        for config in args.generate:
            records += bench_generation(args, config, Path(folder))
        records += bench_scorers(args, Path(folder)) if args.scorers else []
    records = [{**r, **common} for r in records]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        for r in records:
            what = f"generate {r['config']} batch={r['batch']} {r['size']}px {r['steps']} steps" if r["bench"] == "generate" \
                else f"score {r['scorer']} ({r['weights']}) batch={r['batch']} {r['image_size']}px"
            print(f"{what}: {r['images_per_s']} images/s")
    return records


if __name__ == "__main__":
    main()
