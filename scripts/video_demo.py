#!/usr/bin/env python
"""The offline video demo: a tiny Wan2.1-like model learns a toy colour preference on moving shapes with
Diffusion-DPO, plain, with the Diffusion-SDPO safeguard, and with the safeguard plus importance weighting.

    bash scripts/video_demo.sh             # creates .venv if needed, then runs this file (a few minutes on 2 cores)
    python scripts/video_demo.py [--quick] [--output_dir video_demo_output] [--importance_weighting full] [...]

The image demo's recipe (scripts/demo.py, whose helpers this file imports), for video, offline, on the CPU:
  1. model  - tiny.build_wan (32 x 32 px, 5 frames -> 2 x 4 x 4 latents); its VAE (AutoencoderKLWan, random weights,
              which decode every latent to noise) is fitted to toy clips for a while, and its per-channel
              latents_mean / latents_std set to those of the fitted latents (what Wan's training and pipeline read).
  2. data   - two toy video preference sets (tiny.build_video_pairs: the caption's shape drifting across the frame,
              the preferred clip warm, the rejected one cool). The base set's labels are random, so it teaches both.
  3. base   - train.py --train_method sft on the base set.
  4. train  - train.py Diffusion-DPO from the base: plain, with the safeguard, with the safeguard and
              --importance_weighting (clip_mask by default), in parallel.
  5. eval   - eval.generate (mp4) for the four captions x N seeds, the same seeds for every model; the toy metric is
              tiny.colour_score (mean red minus mean blue) averaged over every frame; win rates over the base.
  6. report - <output_dir>/report.md with strip_<model>.png (frames of each model's videos), error_curves.png
              (avg_win_diff_loss / avg_lose_diff_loss from each run's metrics.jsonl), results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import demo  # noqa: E402  (scripts/demo.py: the image demo; sets the offline environment variables)
from demo import DemoError, load_average, phase_means, percent, read_metrics, run_training, say  # noqa: E402
from demo import setting, tqdm_range  # noqa: E402

RESOLUTION = 32
FRAMES = 5  # wan takes 4k + 1 frames; its causal VAE makes 2 latent frames of them
RUN_LABELS = {"dpo": "Diffusion-DPO", "sdpo": "Diffusion-DPO + safeguard",
              "sdpo_is": "Diffusion-DPO + safeguard + importance"}
MODEL_NAMES = {"base": "base (SFT)", **RUN_LABELS}


@dataclass
class Settings:
    """Defaults: the full demo. `--quick` shrinks every loop to a smoke test (seconds, meaningless numbers)."""

    pairs: int = setting(128, "pairs in each toy video set")
    vae_steps: int = setting(300, "autoencoder fitting steps (batch 8 clips, lr 5e-3)")
    base_steps: int = setting(150, "SFT steps of the base model")
    base_batch: int = setting(8, "SFT batch size")
    base_lr: float = setting(1e-3, "SFT learning rate")
    pref_steps: int = setting(100, "Diffusion-DPO steps of each run")
    pref_batch: int = setting(4, "Diffusion-DPO pairs per step")
    pref_lr: float = setting(5e-4, "Diffusion-DPO learning rate")
    beta: float = setting(1000.0, "Diffusion-DPO beta (500 in the Wan launcher; raised here for a short toy run)")
    mu: float = setting(0.9, "safeguard mu")
    importance_weighting: str = setting("clip_mask", "the third run's --importance_weighting: clip_mask or full")
    seeds: int = setting(8, "generation seeds; every seed gives one video per caption")
    sample_steps: int = setting(20, "sampling steps of generation (the model's UniPC scheduler)")
    cfg: float = setting(3.0, "guidance scale")
    n_bootstrap: int = setting(2000, "bootstrap resamples of the win-rate intervals")
    seed: int = setting(0, "train.py --seed of the runs")


QUICK = dict(pairs=8, vae_steps=2, base_steps=2, base_batch=2, pref_steps=3, pref_batch=2, seeds=1, sample_steps=2,
             n_bootstrap=100)


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(REPO / "video_demo_output"),
                        help="where the report goes (replaced if it exists; models, data and runs go to its work/)")
    parser.add_argument("--quick", action="store_true", help="a smoke test of every stage (numbers meaningless)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process; default 1")
    for f in fields(Settings):
        quick = f" (--quick: {QUICK[f.name]})" if f.name in QUICK else ""
        kwargs = {"choices": ["clip_mask", "full"]} if f.name == "importance_weighting" else {}
        parser.add_argument(f"--{f.name}", type=type(f.default), default=None,
                            help=f"{f.metadata['help']}; default {f.default}{quick}", **kwargs)
    args = parser.parse_args(argv)
    settings = Settings(**QUICK) if args.quick else Settings()
    for f in fields(Settings):
        if getattr(args, f.name) is not None:
            setattr(settings, f.name, getattr(args, f.name))
    return args, settings


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Model and data


def toy_clips(n: int, seed: int) -> torch.Tensor:
    """n toy clips (both colours, every shape), (n, 3, F, H, W) in [-1, 1]."""
    from tiny import ATTRIBUTE_COLOURS, SHAPES
    from tiny.video import moving_shape

    rng, colours = random.Random(seed), list(ATTRIBUTE_COLOURS.values())
    clips = []
    for i in range(n):
        frames = moving_shape(SHAPES[i % len(SHAPES)], colours[i // len(SHAPES) % 2], (RESOLUTION, RESOLUTION),
                              FRAMES, rng)
        clips.append(np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in frames]))
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3) / 127.5 - 1.0


def fit_video_autoencoder(model_dir: Path, steps: int, seed: int = 0) -> dict:
    """Fit the tiny Wan VAE to toy clips (reconstruction + 1e-6 KL, as the image demo; lr 5e-3, since at 2e-3 and 150
    steps the colours did not survive a round trip), then set its latents_mean / latents_std to the per-channel
    statistics of the fitted latents. Returns the fit's numbers."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae")
    with torch.no_grad():  # start the posterior narrow (std e^-4): a random encoder's std 1 buries the mean in noise,
        z = vae.config.z_dim  # and train.py encodes with latent_dist.sample()
        vae.quant_conv.weight[z:] = 0.0
        vae.quant_conv.bias[z:] = -8.0
    clips = toy_clips(256, seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=5e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm_range(steps, "autoencoder"):
        batch = clips[torch.randint(0, len(clips), (8,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = (vae.decode(posterior.sample(generator)).sample - batch).pow(2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        check = clips[:64]
        latents = vae.encode(check).latent_dist.sample(generator)
        mse = (vae.decode(latents).sample - check).pow(2).mean().item()
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp(min=1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    vae.save_pretrained(model_dir / "vae")
    return {"steps": steps, "reconstruction_mse": mse}


def relabel(manifest: Path, name: str, seed: int) -> Path:
    """A copy of a JSONL manifest beside it with random labels (each pair's winner a coin flip)."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = manifest.parent / name
    out.write_text("".join(json.dumps(dict(row, label_0=float(rng.random() < 0.5))) + "\n" for row in rows))
    return out


def build(work: Path, s: Settings) -> dict:
    from tiny import build_video_pairs, build_wan, toy_captions

    model = build_wan(work / "model")
    vae = fit_video_autoencoder(model, s.vae_steps)
    say(f"video autoencoder fitted: reconstruction MSE {vae['reconstruction_mse']:.4f} (pixels in [-1, 1])")
    common = dict(n_pairs=s.pairs, tie_fraction=0.0, n_frames=FRAMES, sizes=(RESOLUTION, RESOLUTION), corrupt=False,
                  short=False, webdataset=False)
    base_data = relabel(build_video_pairs(work / "data-base", seed=0, **common)["manifest"], "random_labels.jsonl", 0)
    pref_data = build_video_pairs(work / "data-pref", seed=1, **common)["manifest"]
    prompts = work / "toy.json"
    prompts.write_text(json.dumps([{"prompt": c} for c in toy_captions()], indent=1))
    return {"model": model, "base_data": base_data, "pref_data": pref_data, "prompts": prompts, "vae": vae}


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Training (train.main in child processes, demo.run_training)


def train_argv(model: Path, data: Path, output_dir: Path, seed: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output_dir),
            "--resolution", str(RESOLUTION), "--num_frames", str(FRAMES), "--mixed_precision", "no", "--seed",
            str(seed), "--report_to", "none", "--checkpointing_steps", "1000000", "--resume_from_checkpoint", "none",
            *extra]


def run_extra(run: str, s: Settings) -> list[str]:
    extra = []
    if run in ("sdpo", "sdpo_is"):
        extra += ["--use_winner_preserving", "--winner_preserving_mu", str(s.mu)]
    if run == "sdpo_is":
        extra += ["--importance_weighting", s.importance_weighting]
    return extra


def commands(paths: dict, work: Path, s: Settings) -> dict[str, list[str]]:
    out = {"base": train_argv(paths["model"], paths["base_data"], work / "base", s.seed, "--train_method", "sft",
                              "--train_batch_size", str(s.base_batch), "--max_train_steps", str(s.base_steps),
                              "--learning_rate", str(s.base_lr), "--lr_warmup_steps", str(min(20, s.base_steps // 10)),
                              "--save_pipeline")}  # the pipeline folder gives --unet_init its transformer/
    for run in RUN_LABELS:
        out[run] = train_argv(paths["model"], paths["pref_data"], work / run, s.seed, "--unet_init", str(work / "base"),
                              "--train_method", "diffusion-dpo", "--beta_dpo", str(s.beta),
                              "--train_batch_size", str(s.pref_batch), "--max_train_steps", str(s.pref_steps),
                              "--learning_rate", str(s.pref_lr), "--lr_warmup_steps", str(min(10, s.pref_steps // 10)),
                              *run_extra(run, s))
    return out


def weights_file(run_dir: Path) -> Path:
    for name in ("transformer.safetensors", "transformer.pth"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise DemoError(f"no trained transformer in {run_dir}")


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation: eval.generate (mp4), the colour score averaged over frames, win rates over the base


def video_colour(path: str) -> tuple[float, list[float]]:
    from eval.video import read_frames
    from tiny import colour_score

    per_frame = [float(colour_score(frame)) for frame in read_frames(path)]
    return float(np.mean(per_frame)), per_frame


def generate_videos(paths: dict, weights: Path, out: Path, s: Settings) -> Path:
    from eval.generate import generate, parse_args as generate_args

    entries = []
    for seed in range(s.seeds):
        result = generate(generate_args([
            "--pretrain_path", str(paths["model"]), "--unet_path", str(weights), "--test_json", str(paths["prompts"]),
            "--output_path", str(out), "--height", str(RESOLUTION), "--width", str(RESOLUTION),
            "--num_frames", str(FRAMES), "--steps", str(s.sample_steps), "--cfg", str(s.cfg), "--seed", str(seed),
            "--batch_size", "4", "--no_zip",
        ]))
        entries += [dict(entry, metadata={"seed": seed}) for entry in json.loads(Path(result["manifest"]).read_text())]
    manifest = out / f"toy_{s.seeds}seeds.json"
    manifest.write_text(json.dumps(entries, indent=1))
    return manifest


def evaluate(paths: dict, work: Path, s: Settings) -> dict:
    from eval.compare import win_stats

    results = {"manifests": {}, "absolute": {}, "ab": {}}
    scores = {}
    for name in MODEL_NAMES:
        say(f"generating {s.seeds} seeds x 4 captions ({FRAMES} frames each) with {MODEL_NAMES[name]}")
        with demo.into_log(work / "eval.log"):
            manifest = generate_videos(paths, weights_file(work / name), work / "generations" / name, s)
        entries = json.loads(manifest.read_text())
        scores[name] = [video_colour(e["gen_image_path"])[0] for e in entries]
        results["manifests"][name] = str(manifest)
        results["absolute"][name] = {"n": len(entries), "colour": float(np.mean(scores[name])),
                                     "colour_sd": float(np.std(scores[name])),
                                     "warm_fraction": float(np.mean(np.array(scores[name]) > 0))}
    for run in RUN_LABELS:  # videos pair up by (caption, seed): every manifest lists them in the same order
        results["ab"][run] = win_stats(scores[run], scores["base"], n_bootstrap=s.n_bootstrap)
    results["colour_scores"] = scores
    return results


# ----------------------------------------------------------------------------------------------------------------
# 6. Figures and report


def plot_strip(manifest: str, title: str, path: Path, max_seeds: int = 3) -> None:
    """One row per video (caption x seed, the first `max_seeds` seeds), one column per frame."""
    import matplotlib.pyplot as plt

    from eval.video import read_frames

    entries = [e for e in json.loads(Path(manifest).read_text()) if e["metadata"]["seed"] < max_seeds]
    entries.sort(key=lambda e: (e["prompt"], e["metadata"]["seed"]))
    rows = []
    for e in entries:
        frames = [np.pad(np.asarray(f.convert("RGB")), ((1, 1), (1, 1), (0, 0)), constant_values=255)
                  for f in read_frames(e["gen_image_path"])]
        rows.append(np.concatenate(frames, axis=1))
    fig, ax = plt.subplots(figsize=(0.5 * rows[0].shape[1] / 16 + 1.5, 0.5 * len(rows) * rows[0].shape[0] / 16 + 0.8))
    ax.imshow(np.concatenate(rows, axis=0), interpolation="nearest")
    tile = rows[0].shape[0]
    ax.set_yticks([tile * (i + 0.5) for i in range(len(rows))],
                  [f"{e['prompt'].split()[1]} s{e['metadata']['seed']}" for e in entries], fontsize=7)
    ax.set_xticks([tile * (i + 0.5) for i in range(FRAMES)], [f"f{i}" for i in range(FRAMES)], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_error_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Winner's and loser's denoising error relative to the reference, one panel per run (the image demo's figure)."""
    demo.plot_figure1(runs, path, labels=RUN_LABELS,
                      title="Winner and loser error during training (thin: every step; thick: moving average)")


def importance_summary(metrics: list[dict]) -> dict:
    """The raw importance weights w logged by train.py over a run (is_weight_*, is_masked_fraction)."""
    return {"min": float(min(m["is_weight_min"] for m in metrics)),
            "max": float(max(m["is_weight_max"] for m in metrics)),
            "mean": float(np.mean([m["is_weight_mean"] for m in metrics])),
            "masked_fraction": float(np.mean([m["is_masked_fraction"] for m in metrics]))}


def ab_cell(res: dict) -> str:
    ci, p = res.get("win_rate_ci95"), res.get("sign_test_p_value")
    ci_text = f" [{percent(ci[0])}, {percent(ci[1])}]" if ci else ""
    return f"{percent(res['win_rate_a_over_b'])}{ci_text}, p = {'n/a' if p is None else f'{p:.2g}'}"


def verdict(results: dict, run: str) -> tuple[bool, str]:
    base, mine, ab = results["absolute"]["base"], results["absolute"][run], results["ab"][run]
    p = ab["sign_test_p_value"]
    learned = mine["colour"] > base["colour"] and ab["win_rate_a_over_b"] > 0.5 and p is not None and p < 0.05
    return learned, (f"{RUN_LABELS[run]}: colour {base['colour']:+.3f} (base) -> {mine['colour']:+.3f}; warm videos "
                     f"{percent(base['warm_fraction'])} -> {percent(mine['warm_fraction'])}; win rate over the base "
                     f"{ab_cell(ab)}. " + ("The preference was learned." if learned else
                                          "The preference was NOT learned (no significant gain over the base)."))


def write_report(out: Path, s: Settings, paths: dict, results: dict, curves: dict, verdicts: dict, timings: dict,
                 machine: dict, argvs: dict, quick: bool) -> None:
    absolute, ab = results["absolute"], results["ab"]
    lines = [
        "# Video demo report: a toy colour preference on moving shapes (tiny Wan2.1-like model)", "",
        *(["**Quick mode (`--quick`): a smoke test of every stage; the numbers below mean nothing.**", ""]
          if quick else []),
        f"Run on {machine['cpus']} CPU cores ({machine['threads']} torch thread per process; load average "
        f"{machine['load_before']} before, {machine['load_after']} after), torch {machine['torch']}, "
        f"{timings['total']:.0f} s in all. Regenerate with `bash scripts/video_demo.sh`.", "",
        "Every training pair shows the caption's shape drifting across the frame; the preferred clip paints it warm, "
        "the rejected one cool. The base model was fine-tuned (SFT) on pairs with random labels. `colour` = "
        "`tiny.colour_score` (mean red minus mean blue, > 0 is warm) averaged over the video's frames.", "",
        "## Was the preference learned?", "",
        "| model | colour (mean +- sd over videos) | warm videos | win rate over the base [95% CI], sign test |",
        "|---|---|---|---|",
    ]
    for name, a in absolute.items():
        cell = ab_cell(ab[name]) if name in ab else "-"
        lines.append(f"| {MODEL_NAMES[name]} | {a['colour']:+.3f} +- {a['colour_sd']:.3f} | "
                     f"{percent(a['warm_fraction'])} | {cell} |")
    lines += ["", f"{absolute['base']['n']} videos per model ({s.seeds} seeds x 4 captions, {FRAMES} frames of "
              f"{RESOLUTION} x {RESOLUTION}); the k-th video of every model starts from the same noise.", ""]
    lines += [f"- {verdicts[run][1]}" for run in RUN_LABELS]
    lines += ["", "## Frames", ""]
    lines += [f"{MODEL_NAMES[name]}:\n\n![{name}](strip_{name}.png)\n" for name in MODEL_NAMES]
    lines += ["## Winner and loser error", "",
              "| run | winner L - L_ref: first 10% / last 25% | loser L - L_ref: first 10% / last 25% | steps with "
              "winner > 0 | lambda (last 25%) |", "|---|---|---|---|---|"]
    for run, f in curves.items():
        w, l, lam = f["avg_win_diff_loss"], f["avg_lose_diff_loss"], f["avg_lose_l_scale"]
        lines.append(f"| {RUN_LABELS[run]} | {w['first']:+.4f} / {w['last']:+.4f} | {l['first']:+.4f} / "
                     f"{l['last']:+.4f} | {percent(w['fraction_above_zero'])} | {lam['last']:.3f} |")
    weights = importance_summary(read_metrics(out / "work" / "sdpo_is"))
    lines += ["", f"Importance weights of the third run (`--importance_weighting {s.importance_weighting}`): "
              f"w = p_theta/q "
              f"from {weights['min']:.4f} to {weights['max']:.4f} (mean {weights['mean']:.4f}); "
              f"{percent(weights['masked_fraction'])} of the pairs masked over the run."
              + (" No pair was masked, so this run's loss was the safeguard run's (same seed, same data)."
                 if s.importance_weighting == "clip_mask" and weights["masked_fraction"] == 0 else ""),
              "", "![error curves](error_curves.png)", "", "## Settings and commands", "",
              f"Model: `tiny.build_wan`, its VAE fitted for {paths['vae']['steps']} steps (reconstruction MSE "
              f"{paths['vae']['reconstruction_mse']:.4f}). Data: {s.pairs} pairs per set.", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in asdict(s).items()]
    lines += ["", "Training commands (`python train.py ...`, from the repository root):", ""]
    lines += [f"- {name}: `python train.py {' '.join(argv)}`" for name, argv in argvs.items()]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
              f"Models, data, runs (`metrics.jsonl`, `train.log`), videos and manifests are under `{out.name}/work/`.",
              ""]
    (out / "report.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> Path:
    args, s = parse_args(argv)
    torch.set_num_threads(args.threads)
    demo.quiet_libraries()
    out = Path(args.output_dir).resolve()
    if out.exists():
        if any(out.iterdir()) and not (out / "work").is_dir():
            raise DemoError(f"{out} exists and is not a demo output folder (no work/ inside); pass a new folder")
        shutil.rmtree(out)
    work = out / "work"
    work.mkdir(parents=True)
    machine = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "load_before": load_average()}
    timings, start = {}, time.time()
    last = start

    def lap(stage: str) -> None:
        nonlocal last
        timings[stage], last = time.time() - last, time.time()

    say(f"building the tiny Wan model, fitting its video autoencoder, building the toy video pairs under {work}")
    paths = build(work, s)
    lap("build")
    argvs = commands(paths, work, s)
    say(f"training the base model: SFT on both colours, {s.base_steps} steps")
    run_training({"base": argvs["base"]}, s.base_steps, args.threads)
    lap("base")
    say(f"training {', '.join(RUN_LABELS.values())} from the base, {s.pref_steps} steps each, in parallel")
    run_training({run: argvs[run] for run in RUN_LABELS}, s.pref_steps, args.threads)
    lap("preference")
    results = evaluate(paths, work, s)
    lap("evaluation")

    runs = {run: read_metrics(work / run) for run in RUN_LABELS}
    keys = ("avg_win_diff_loss", "avg_lose_diff_loss", "avg_lose_l_scale", "implicit_acc_accumulated")
    curves = {run: {key: phase_means(metrics, key) for key in keys} for run, metrics in runs.items()}
    verdicts = {run: verdict(results, run) for run in RUN_LABELS}
    for name, manifest in results["manifests"].items():
        plot_strip(manifest, MODEL_NAMES[name], out / f"strip_{name}.png")
    plot_error_curves(runs, out / "error_curves.png")
    lap("report")
    timings["total"] = time.time() - start
    machine["load_after"] = load_average()
    write_report(out, s, paths, results, curves, verdicts, timings, machine, argvs, args.quick)
    summary = {"settings": asdict(s), "quick": args.quick, "machine": machine, "timings_s": timings,
               "vae": paths["vae"], "absolute": results["absolute"], "ab": results["ab"], "curves": curves,
               "learned": {run: v[0] for run, v in verdicts.items()},
               "importance_weights": importance_summary(runs["sdpo_is"]), "manifests": results["manifests"]}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    for run in RUN_LABELS:
        say(verdicts[run][1])
    if args.quick:
        say("quick mode: every stage ran, but with a few steps each the numbers above mean nothing")
    say(f"done in {timings['total']:.0f} s: the report is {out / 'report.md'}")
    return out


if __name__ == "__main__":
    try:
        main()
    except DemoError as error:
        print(f"video demo: error: {error}", file=sys.stderr)
        sys.exit(1)
