#!/usr/bin/env python
"""Mean importance weight of a model's reverse step by timestep: the analysis figure of SDPO (arXiv:2505.21893),
in our interpretation (docs/importance.md).

For preference pairs of a dataset and timesteps drawn in equal-width bins, noises winner and loser with shared noise
and timestep (as train.py does) and computes the per-element log importance weight
log w = -KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) / d = -c_t mean((eps_hat - eps)^2) of each image.

    python scripts/analyze_importance.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name yuvalkirstain/pickapic_v2 --split validation_unique --max_pairs 256 --output_dir output/importance-sd15
    # a trained UNet: --unet_path output/sd15-dpo (or .../unet.safetensors, .../unet.pth, a diffusers unet folder)

Writes importance.csv, importance.json (the arguments and one row per bin) and importance.png to --output_dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402  (the repository root: the data pipeline and the importance weight are train.py's own)
from eval.generate import GenerateError  # noqa: E402
from data.pairs import PairDataset
from families.conditioning import load_tokenizer, sdxl_time_ids
from families.noise import importance_log_weight_coefficients


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Base diffusers model: hub id or folder.")
    parser.add_argument("--unet_path", type=str, default=None,
                        help="The UNet to analyse instead of the base one: a .safetensors/.pth state dict, a train.py "
                             "output or checkpoint folder (unet.safetensors or unet.pth), or a diffusers UNet folder.")
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None, help="Another VAE (as in train.py).")
    parser.add_argument("--sdxl", action="store_true", help="The base model is SDXL.")
    parser.add_argument("--dataset_name", type=str, default=None, help="As in train.py: hub id, folder or files.")
    parser.add_argument("--train_data_dir", type=str, default=None, help="As in train.py.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--split", type=str, default="train")
    parser.add_argument("--caption_column", type=str, default="caption")
    parser.add_argument("--max_pairs", type=int, default=256, help="Pairs to analyse (a seeded random subset).")
    parser.add_argument("--resolution", type=int, default=None, help="Default 512, or 1024 with --sdxl.")
    parser.add_argument("--num_bins", type=int, default=20, help="Equal-width timestep bins; every pair is noised once per bin.")
    parser.add_argument("--timestep_range", type=int, nargs=2, default=[0, 999], metavar=("LO", "HI"))
    parser.add_argument("--is_mask_below", type=float, default=0.9,
                        help="Report the fraction of pairs whose weight is below this (train.py's clip_mask threshold).")
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per UNet call (the UNet sees twice this).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda if available), cuda, cuda:1, cpu, ...")
    parser.add_argument("--mixed_precision", type=str, default="auto", choices=["auto", "no", "fp16", "bf16"],
                        help="UNet and text encoders' precision (the VAE stays fp32); auto: fp16 on GPU, fp32 on CPU.")
    parser.add_argument("--output_dir", type=str, required=True)
    args = parser.parse_args(argv)
    low, high = args.timestep_range
    if not 0 <= low <= high:
        parser.error(f"--timestep_range LO HI needs 0 <= LO <= HI, got {low} {high}")
    if not 1 <= args.num_bins <= high - low + 1:
        parser.error(f"--num_bins must be in [1, {high - low + 1}] (the number of timesteps in the range)")
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("give --dataset_name or --train_data_dir (as for train.py)")
    return args


def data_args(args) -> argparse.Namespace:
    """train.py's arguments for its data pipeline: pairs, center crop, no flip, no caption dropout."""
    argv = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--split", args.split,
            "--caption_column", args.caption_column, "--max_train_samples", str(args.max_pairs), "--seed", str(args.seed),
            "--no_hflip", "--proportion_empty_prompts", "0"]
    for name in ("dataset_name", "train_data_dir", "dataset_config_name", "cache_dir", "resolution"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return train.parse_args(argv + (["--sdxl"] if args.sdxl else []))


def analyse(args) -> list[dict]:
    """One row per timestep bin: counts, mean c_t, and the mean, standard error and exp of log w for winners and losers."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from eval.generate import load_models
    from families import FAMILIES

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precision = args.mixed_precision if args.mixed_precision != "auto" else ("fp16" if device.type == "cuda" else "no")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    base = args.pretrained_model_name_or_path
    load_tokenizer(base, "tokenizer", None)  # names the fix when the model is neither local nor cached
    # eval.generate's loader: the same --unet_path forms and errors; frozen, UNet and text encoders in dtype, VAE fp32
    models = load_models(argparse.Namespace(pretrain_path=base, unet_path=args.unet_path, sdxl=args.sdxl, lora_path=None,
                                            vae_path=args.pretrained_vae_model_name_or_path), device, dtype)
    unet, vae, encoders = models.unet, models.vae, models.text_encoders
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")  # the training schedule, not Euler's
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{base}: prediction_type {scheduler.config.prediction_type!r}; only 'epsilon' is supported")
    if args.timestep_range[1] >= scheduler.config.num_train_timesteps:
        raise ValueError(f"--timestep_range: HI must be at most {scheduler.config.num_train_timesteps - 1}")
    coefficients = importance_log_weight_coefficients(scheduler).to(device)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    targs = data_args(args)
    dataset = PairDataset(train.filter_rows(train.load_rows(targs), targs, is_main=True), targs)
    loader = torch.utils.data.DataLoader(dataset, sampler=train.EpochSampler(len(dataset), args.seed, shuffle=False),
                                         batch_size=args.batch_size, collate_fn=train.Collate(models.tokenizers))
    low, high = args.timestep_range
    edges = [low + round(i * (high - low + 1) / args.num_bins) for i in range(args.num_bins + 1)]
    generator = torch.Generator().manual_seed(args.seed)
    log_w = {"win": [[] for _ in range(args.num_bins)], "lose": [[] for _ in range(args.num_bins)]}
    steps = [[] for _ in range(args.num_bins)]

    with torch.inference_mode(), tqdm(total=len(dataset) * args.num_bins, desc="pairs x bins", unit="pair") as progress:
        for batch in loader:
            pixels = batch["pixel_values"].to(device, torch.float32)
            pixels = torch.cat(pixels.chunk(2, dim=1))  # winners first, then losers
            latents = vae.encode(pixels).latent_dist.sample(generator=generator).float() * vae.config.scaling_factor
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            conditioning = FAMILIES["sdxl" if args.sdxl else "sd"](targs).encode_prompts(batch, encoders)
            prompt_embeds, pooled = conditioning["prompt_embeds"], conditioning.get("pooled")
            cond = prompt_embeds.repeat(2, 1, 1).to(dtype)
            added = None
            if args.sdxl:
                added = {"text_embeds": pooled.repeat(2, 1).to(dtype),
                         "time_ids": sdxl_time_ids(len(latents), targs.resolution, device, dtype)}
            pairs = len(latents) // 2
            for b in range(args.num_bins):
                timesteps = torch.randint(edges[b], edges[b + 1], (pairs,), generator=generator).repeat(2).to(device)
                noise = torch.randn(pairs, *latents.shape[1:], generator=generator).repeat(2, 1, 1, 1).to(device)
                abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
                noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
                eps_hat = unet(noisy.to(dtype), timesteps, cond, added_cond_kwargs=added).sample.float()
                win, lose = train.log_importance_weight(eps_hat, noise, timesteps, coefficients).cpu().double().chunk(2)
                log_w["win"][b].append(win)
                log_w["lose"][b].append(lose)
                steps[b].append(timesteps[:pairs].cpu())
                progress.update(pairs)

    cpu_coefficients = coefficients.cpu().double()
    rows = []
    for b in range(args.num_bins):
        t = torch.cat(steps[b])
        row = {"t_low": edges[b], "t_high": edges[b + 1] - 1, "count": len(t), "mean_t": t.double().mean().item(),
               "mean_c_t": cpu_coefficients[t].mean().item()}
        for who in ("win", "lose"):
            values = torch.cat(log_w[who][b])
            row[f"mean_log_w_{who}"] = values.mean().item()
            row[f"sem_log_w_{who}"] = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")
            row[f"mean_w_{who}"] = values.exp().mean().item()
            row[f"mean_eps_mse_{who}"] = (-values / cpu_coefficients[t]).mean().item()
        pair = 0.5 * (torch.cat(log_w["win"][b]) + torch.cat(log_w["lose"][b]))
        row["mean_w_pair"] = pair.exp().mean().item()
        row["masked_fraction"] = (pair.exp() < args.is_mask_below).double().mean().item()
        rows.append(row)
    return rows


def plot(rows, args, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [row["mean_t"] for row in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for who, colour in (("win", "tab:red"), ("lose", "tab:blue")):
        label = "winners" if who == "win" else "losers"
        top.plot(centres, [row[f"mean_w_{who}"] for row in rows], "o-", color=colour, label=label, ms=3)
        bottom.errorbar(centres, [-row[f"mean_log_w_{who}"] for row in rows], yerr=[row[f"sem_log_w_{who}"] for row in rows],
                        fmt="o-", color=colour, label=label, ms=3, capsize=2)
    top.axhline(args.is_mask_below, color="grey", ls="--", lw=1, label=f"clip_mask threshold {args.is_mask_below}")
    top.set_ylabel("mean w = mean exp(log w)")
    top.legend(fontsize=8)
    top.set_title(f"Importance weight by timestep: {Path(args.unet_path or args.pretrained_model_name_or_path).name}", fontsize=10)
    bottom.set_yscale("log")
    bottom.set_ylabel("-mean log w = KL(q || p_theta) / d")
    bottom.set_xlabel("timestep t (DDPM index; 0 = least noise)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = analyse(args)
    with open(output_dir / "importance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "importance.json").write_text(json.dumps({"args": vars(args), "bins": rows}, indent=2))
    plot(rows, args, output_dir / "importance.png")
    print(f"{'t':>9} {'mean w (win)':>13} {'mean w (lose)':>14} {'mean log w (win)':>17} {'masked':>7}")
    for row in rows:
        print(f"{row['t_low']:>4}-{row['t_high']:<4} {row['mean_w_win']:>13.4f} {row['mean_w_lose']:>14.4f} "
              f"{row['mean_log_w_win']:>17.4g} {row['masked_fraction']:>7.2f}")
    print(f"wrote {output_dir / 'importance.csv'}, importance.json and importance.png")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, GenerateError) as error:
        print(f"analyze_importance.py: error: {error}", file=sys.stderr)
        sys.exit(1)
