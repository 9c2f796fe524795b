#!/usr/bin/env python
"""The offline demo: Diffusion-DPO learns a toy preference, with and without the Diffusion-SDPO safeguard.

    bash scripts/demo.sh                   # creates .venv if needed, then runs this file (a few minutes on 2 cores)
    python scripts/demo.py [--quick] [--output_dir demo_output] [--beta 1000] [...]

Everything is built here, offline, on the CPU, with the project's own code:
  1. model  - the tiny SD1.5-like pipeline (tiny.build_sd15: 32 px, VAE factor 4, random weights); its VAE is then
              fitted to toy images for a few seconds, because a random VAE decodes every latent to noise.
  2. data   - two toy Pick-a-Pic sets (tiny.build_pickapic): one shape per caption; the preferred image is
              warm-coloured, the rejected one cool. The base set's labels are random (label_noise 0.5), so it teaches
              both colours.
  3. base   - train.py --train_method sft on the base set: generations become shapes, about half warm, half cool.
  4. train  - train.py Diffusion-DPO from the base, plain and with the safeguard (--use_winner_preserving), in parallel.
  5. eval   - eval.generate for the four captions x N seeds (the same seeds for every model, so images pair up);
              eval.score with the five tiny scorers and the toy attribute metric (tiny.colour_score, warm minus cool);
              eval.compare: each trained model against the base.
  6. report - <output_dir>/report.md with training_curves.png, figure1.png, win_rates.png, samples.png, results.json.

The five tiny scorers have random weights: they show that the evaluation pipeline runs, not image quality. The toy
metric is the one that measures the preference. See docs/demo.md for what to expect and the numbers we measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval.scorers import Scorer  # noqa: E402
from tiny import colour_score  # noqa: E402

RESOLUTION = 32  # pixels; with VAE factor 4 the UNet works on 8x8 latents, which keeps a CPU step cheap
VAE_FACTOR = 4
RUNS = {  # name -> (label, extra train.py arguments)
    "dpo": ("Diffusion-DPO", []),
    "sdpo": ("Diffusion-DPO + safeguard", ["--use_winner_preserving"]),
}
COLOUR = "Colour"  # the toy metric's name in tables and charts
MODEL_NAMES = {"base": "base (SFT)", **{run: label for run, (label, _) in RUNS.items()}}


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """Defaults: the full demo. `--quick` shrinks every loop to a smoke test (seconds, meaningless numbers)."""

    pairs: int = setting(256, "pairs in each toy set")
    vae_steps: int = setting(200, "autoencoder fitting steps (batch 16)")
    base_steps: int = setting(200, "SFT steps of the base model")
    base_batch: int = setting(16, "SFT batch size")
    base_lr: float = setting(1e-3, "SFT learning rate")
    pref_steps: int = setting(120, "Diffusion-DPO steps of each run")
    pref_batch: int = setting(8, "Diffusion-DPO pairs per step")
    pref_lr: float = setting(1e-4, "Diffusion-DPO learning rate")
    beta: float = setting(1000.0, "Diffusion-DPO beta at toy scale (5000 on SD1.5; see docs/demo.md)")
    mu: float = setting(0.9, "safeguard mu (the shipped SD1.5 Diffusion-DPO value)")
    seeds: int = setting(12, "generation seeds; every seed gives one image per caption")
    sample_steps: int = setting(20, "Euler steps of generation")
    cfg: float = setting(3.0, "guidance scale in the official formula eps_c + cfg (eps_c - eps_u)")
    n_bootstrap: int = setting(2000, "bootstrap resamples of the win-rate intervals")
    seed: int = setting(0, "train.py --seed of the three runs (the tiny model and data stay the same)")


QUICK = dict(pairs=16, vae_steps=2, base_steps=2, base_batch=4, pref_steps=3, pref_batch=2, seeds=1, sample_steps=2,
             n_bootstrap=100)


class DemoError(Exception):
    """A failure the user can act on; printed without a traceback."""


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(REPO / "demo_output"),
                        help="where the report goes (replaced if it exists; models, data and runs go to its work/); "
                             "default <repo>/demo_output")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test of every stage in seconds (numbers meaningless)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; tiny models run best on one, and the two runs train in "
                             "parallel; default 1")
    for f in fields(Settings):
        quick = f" (--quick: {QUICK[f.name]})" if f.name in QUICK else ""
        parser.add_argument(f"--{f.name}", type=type(f.default), default=None,
                            help=f"{f.metadata['help']}; default {f.default}{quick}")
    args = parser.parse_args(argv)
    settings = Settings(**QUICK) if args.quick else Settings()
    for f in fields(Settings):
        if getattr(args, f.name) is not None:
            setattr(settings, f.name, getattr(args, f.name))
    return args, settings


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Model and data


def fit_autoencoder(model_dir: Path, steps: int, seed: int = 0) -> dict:
    """Fit the tiny VAE to toy shapes in both colours (reconstruction + 1e-6 KL, as latent-diffusion VAEs), then set
    its scaling_factor to 1 / std of the latents, as Stable Diffusion's was chosen. Returns the fit's numbers."""
    import torchvision.transforms.functional as TF
    from diffusers import AutoencoderKL

    from tiny import ATTRIBUTE_COLOURS, SHAPES, draw_shape

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    rng, colours = random.Random(seed), list(ATTRIBUTE_COLOURS.values())
    images = torch.stack([
        TF.normalize(TF.to_tensor(draw_shape(SHAPES[i % len(SHAPES)], colours[i // len(SHAPES) % 2],
                                             (RESOLUTION, RESOLUTION), rng)), [0.5], [0.5])
        for i in range(512)
    ])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm_range(steps, "autoencoder"):
        batch = images[torch.randint(0, len(images), (16,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = (vae.decode(posterior.sample(generator)).sample - batch).pow(2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # reconstruction error and latent scale on 256 of the images
        check = images[:256]
        latents = vae.encode(check).latent_dist.sample(generator)
        mse = (vae.decode(latents).sample - check).pow(2).mean().item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(model_dir / "vae")
    return {"steps": steps, "reconstruction_mse": mse, "scaling_factor": float(1.0 / latents.std())}


def tqdm_range(n: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def build(work: Path, settings: Settings) -> dict:
    from tiny import build_pickapic, build_sd15, build_tiny_scorers, toy_captions

    model = build_sd15(work / "model", resolution=RESOLUTION, vae_factor=VAE_FACTOR)
    vae = fit_autoencoder(model, settings.vae_steps)
    say(f"autoencoder fitted: reconstruction MSE {vae['reconstruction_mse']:.4f} (images in [-1, 1])")
    base_data = build_pickapic(work / "data-base", n_pairs=settings.pairs, seed=0, tie_fraction=0.0, corrupt=0,
                               label_noise=0.5)
    pref_data = build_pickapic(work / "data-pref", n_pairs=settings.pairs, seed=1, tie_fraction=0.0, corrupt=0)
    prompts = work / "toy.json"  # the prompt-file format of prompts/*.json
    prompts.write_text(json.dumps([{"prompt": c, "gen_image_path": "", "raw_image_path": "", "metadata": {}}
                                   for c in toy_captions()], indent=1))
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.setLevel(logging.ERROR)  # open_clip warns, rightly, that the tiny scorer models are random
    try:
        scorers = build_tiny_scorers(work / "scorers")
    finally:
        root_logger.setLevel(level)
    scorer_config = work / "scorers" / "scorer_config.json"  # for the eval CLIs: --scorer_config FILE
    scorer_config.write_text(json.dumps(scorers, indent=1))
    return {"model": model, "base_data": base_data, "pref_data": pref_data, "prompts": prompts, "scorers": scorers,
            "scorer_config": scorer_config, "vae": vae}


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Training: train.main in child processes (one thread each, in parallel), progress read from their metrics.jsonl


def train_argv(model: Path, data: Path, output_dir: Path, seed: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output_dir),
            "--resolution", str(RESOLUTION), "--mixed_precision", "no", "--seed", str(seed), "--report_to", "none",
            "--checkpointing_steps", "1000000", "--resume_from_checkpoint", "none", *extra]


def base_argv(paths: dict, work: Path, s: Settings) -> list[str]:
    return train_argv(paths["model"], paths["base_data"], work / "base", s.seed, "--train_method", "sft",
                      "--train_batch_size", str(s.base_batch), "--max_train_steps", str(s.base_steps),
                      "--learning_rate", str(s.base_lr), "--lr_warmup_steps", str(min(20, s.base_steps // 10)),
                      "--save_pipeline")  # the pipeline folder gives --unet_init its unet/


def preference_argv(paths: dict, work: Path, s: Settings, run: str) -> list[str]:
    extra = RUNS[run][1] + (["--winner_preserving_mu", str(s.mu)] if "--use_winner_preserving" in RUNS[run][1] else [])
    return train_argv(paths["model"], paths["pref_data"], work / run, s.seed, "--unet_init", str(work / "base"),
                      "--train_method", "diffusion-dpo", "--beta_dpo", str(s.beta),
                      "--train_batch_size", str(s.pref_batch), "--max_train_steps", str(s.pref_steps),
                      "--learning_rate", str(s.pref_lr), "--lr_warmup_steps", str(min(10, s.pref_steps // 10)), *extra)


def _train_child(argv: list[str], log_path: str, threads: int) -> None:
    """Child process: train.main(argv) with its output in log_path (the parent shows progress bars instead)."""
    import traceback

    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        torch.set_num_threads(threads)
        try:
            import train

            train.main(argv)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        sys.stderr.flush()


def run_training(jobs: dict[str, list[str]], steps: int, threads: int) -> None:
    """Run train.main(argv) for every job at once (in parallel), each in its own process, with a progress bar each.

    Processes are forked where the OS allows it, so a child starts with the libraries this process already imported
    (seconds saved per run); elsewhere they are spawned. Each run's own console output goes to <output_dir>/train.log.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    import accelerate  # noqa: F401 - imported once here, inherited by the forked children

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    running = {}
    for name, argv in jobs.items():
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        output_dir.mkdir(parents=True, exist_ok=True)
        process = context.Process(target=_train_child, args=(argv, str(output_dir / "train.log"), threads), name=name)
        process.start()
        running[name] = (process, output_dir, tqdm(total=steps, desc=name, leave=True))
    try:
        while any(process.is_alive() for process, *_ in running.values()):
            time.sleep(0.5)
            for process, output_dir, bar in running.values():
                bar.update(logged_steps(output_dir) - bar.n)
    finally:
        for process, output_dir, bar in running.values():
            if process.is_alive():
                process.terminate()
            process.join()
            bar.update(logged_steps(output_dir) - bar.n)
            bar.close()
    for name, (process, output_dir, _) in running.items():
        if process.exitcode != 0:
            tail = "\n".join((output_dir / "train.log").read_text(errors="replace").splitlines()[-15:])
            raise DemoError(f"training run {name!r} failed (exit code {process.exitcode}); the end of "
                            f"{output_dir / 'train.log'}:\n{tail}")


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation: eval.generate, eval.score, eval.compare, and the toy metric as one more Scorer


class ColourScorer(Scorer):
    """The toy attribute metric tiny.colour_score (mean red minus mean blue, in [-1, 1]) as an eval.scorers.Scorer."""

    name, metric = "colour", COLOUR

    def _score_batch(self, prompts, images):
        return torch.tensor([colour_score(image) for image in images])


def generate_images(paths: dict, unet: Path, out: Path, s: Settings) -> Path:
    """eval.generate once per seed (the official protocol uses one seed for all prompts), then one manifest with every
    seed's entries in seed order, so that the k-th image of a caption pairs with the k-th of another model."""
    from eval.generate import generate, parse_args as generate_args

    entries = []
    for seed in range(s.seeds):
        result = generate(generate_args([
            "--pretrain_path", str(paths["model"]), "--unet_path", str(unet), "--test_json", str(paths["prompts"]),
            "--output_path", str(out), "--height", str(RESOLUTION), "--width", str(RESOLUTION),
            "--steps", str(s.sample_steps), "--cfg", str(s.cfg), "--seed", str(seed), "--batch_size", "4", "--no_zip",
        ]))
        entries += [dict(entry, metadata={"seed": seed}) for entry in json.loads(Path(result["manifest"]).read_text())]
    manifest = out / f"toy_{s.seeds}seeds.json"  # group "toy"
    manifest.write_text(json.dumps(entries, indent=1))
    return manifest


@contextlib.contextmanager
def into_log(log_file: Path):
    """Send eval's console output (official result lines, progress bars) to a log file, keeping the demo's readable."""
    with open(log_file, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def evaluate(paths: dict, work: Path, s: Settings, log_file: Path) -> dict:
    """Generate, score and compare; eval's own console output goes to `log_file`. Returns the numbers for the report."""
    from eval.compare import PAIR_FILES, compare_manifests, win_stats
    from eval.manifest import pair_items, read_manifest, score_items
    from eval.score import score_manifests
    from eval.scorers import load_scorer

    # unet.pth: the file train.py writes and scripts/eval/test_sd15.sh takes (the released checkpoints' format)
    models = {name: work / name / "unet.pth" for name in MODEL_NAMES}
    manifests = {}
    for name, unet in models.items():
        say(f"generating {s.seeds} seeds x 4 captions with {MODEL_NAMES[name]} ({unet.relative_to(work)})")
        with into_log(log_file):
            manifests[name] = generate_images(paths, unet, work / "generations" / name, s)

    say("scoring with the five tiny scorers and the toy colour metric, then A/B against the base")
    scorers = [load_scorer(metric, **kwargs) for metric, kwargs in paths["scorers"].items()]
    colour = ColourScorer()
    results = {"manifests": {k: str(v) for k, v in manifests.items()}, "absolute": {}, "ab": {}}
    with into_log(log_file):
        scored = score_manifests(list(manifests.values()), scorers, batch_size=64)
        for name, res in zip(manifests, scored):
            items = read_manifest(manifests[name])
            colour_scores = score_items(colour, items, 64, desc=f"{COLOUR} {name}")
            results["absolute"][name] = {
                "n": res["total"], COLOUR: float(np.mean(colour_scores)), "colour_sd": float(np.std(colour_scores)),
                "warm_fraction": float(np.mean(np.array(colour_scores) > 0)), "colour_scores": colour_scores,
                **res["means"],
            }
        for run in RUNS:
            outdir = work / "compare" / f"{run}_vs_base"
            summary = compare_manifests(manifests[run], manifests["base"], scorers, run, "base", outdir,
                                        n_bootstrap=s.n_bootstrap)
            pairs = pair_items(read_manifest(manifests[run], strict=False),
                               read_manifest(manifests["base"], strict=False))
            colour_ab = win_stats(score_items(colour, pairs.a, 64), score_items(colour, pairs.b, 64),
                                  n_bootstrap=s.n_bootstrap)
            pair_file = outdir / "pair_colour.json"
            pair_file.write_text(json.dumps({"model_a": run, "model_b": "base", **colour_ab}, indent=2))
            per_metric = {COLOUR: colour_ab}
            for metric, fname in (PAIR_FILES[key] for key in paths["scorers"]):  # one file per tiny metric
                pair = json.loads((outdir / fname).read_text())
                per_metric[metric] = {k: pair[k] for k in colour_ab if k in pair}
            results["ab"][run] = {"dir": str(outdir), "metrics": per_metric,
                                  "macro_win_rate_tiny": summary["averages"]["macro_win_rate_a_over_b"]}
    return results


# ----------------------------------------------------------------------------------------------------------------
# 6. Figures and report


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    values = np.asarray(values, dtype=float)
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def phase_means(metrics: list[dict], key: str) -> dict:
    """Mean of a logged metric over the first 10% and the last 25% of the steps, and the fraction of steps above 0."""
    values = np.array([m[key] for m in metrics], dtype=float)
    n = len(values)
    first, last = values[: max(1, n // 10)], values[n - max(1, n // 4):]
    return {"first": float(first.mean()), "last": float(last.mean()), "max": float(values.max()),
            "fraction_above_zero": float((values > 0).mean())}


def plot_training_curves(runs: dict[str, list[dict]], base: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    window = max(1, len(next(iter(runs.values()))) // 15)
    panels = [("train_loss", "Diffusion-DPO loss"), ("implicit_acc_accumulated", "implicit accuracy"),
              ("avg_lose_l_scale", "safeguard lambda (loser-gradient scale)"),
              ("avg_win_diff_loss", "winner error - reference (avg_win_diff_loss)"),
              ("avg_lose_diff_loss", "loser error - reference (avg_lose_diff_loss)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    ax = axes[0, 0]
    steps = [m["step"] for m in base]
    ax.plot(steps, [m["train_loss"] for m in base], color="grey", alpha=0.3)
    ax.plot(steps, smooth([m["train_loss"] for m in base], max(1, len(base) // 15)), color="black")
    ax.set_title("base model: SFT loss (epsilon MSE)")
    for ax, (key, title) in zip(axes.flat[1:], panels):
        for (run, metrics), colour in zip(runs.items(), ("tab:red", "tab:blue")):
            steps, values = [m["step"] for m in metrics], [m[key] for m in metrics]
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color=colour, label=RUNS[run][0])
        if "diff" in key:
            ax.axhline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
    fig.suptitle("Training curves (thin: every step, last micro-batch; thick: moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_figure1(runs: dict[str, list[dict]], path: Path, labels: dict[str, str] | None = None,
                 title: str = "Figure 1 at toy scale: does the winner's error rise?") -> None:
    """The paper's Figure 1 at toy scale: winner's and loser's error relative to the reference, runs side by side
    (`labels`: run -> panel title, by default the image demo's)."""
    import matplotlib.pyplot as plt

    labels = labels or {run: RUNS[run][0] for run in runs}

    window = max(1, len(next(iter(runs.values()))) // 15)
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), sharey=True)
    for ax, (run, metrics) in zip(np.atleast_1d(axes), runs.items()):
        steps = [m["step"] for m in metrics]
        for key, label, colour in (("avg_win_diff_loss", "winner", "tab:green"),
                                   ("avg_lose_diff_loss", "loser", "tab:purple")):
            values = [m[key] for m in metrics]
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color=colour, label=f"{label}: L - L_ref")
        ax.axhline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(labels[run])
        ax.set_xlabel("optimizer step")
        ax.legend()
    np.atleast_1d(axes)[0].set_ylabel("denoising error relative to the reference")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_win_rates(ab: dict, path: Path) -> None:
    """Win rate over the base per metric, one bar per trained model, with bootstrap 95% intervals."""
    import matplotlib.pyplot as plt

    metrics = list(next(iter(ab.values()))["metrics"])
    x = np.arange(len(metrics))
    width = 0.8 / len(ab)
    fig, ax = plt.subplots(figsize=(1.4 * len(metrics) + 2, 4.2))
    for i, ((run, res), colour) in enumerate(zip(ab.items(), ("tab:red", "tab:blue"))):
        rates = np.array([100 * res["metrics"][m]["win_rate_a_over_b"] for m in metrics])
        cis = [res["metrics"][m].get("win_rate_ci95") or [res["metrics"][m]["win_rate_a_over_b"]] * 2 for m in metrics]
        err = np.array([[r - 100 * lo, 100 * hi - r] for r, (lo, hi) in zip(rates, cis)]).T.clip(min=0)
        ax.bar(x + (i - (len(ab) - 1) / 2) * width, rates, width, yerr=err, capsize=3, color=colour, alpha=0.8,
               label=f"{RUNS[run][0]} vs base")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{m}\n(toy metric)" if m == COLOUR else f"{m}\n(tiny, random)" for m in metrics], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate over the base (%)")
    ax.set_title("A/B against the base model (bars: bootstrap 95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(manifests: dict[str, str], path: Path, max_seeds: int = 6) -> None:
    """One panel per model: a row per caption, a column per seed (every panel's column k starts from the same noise)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from tiny import SHAPES

    fig, axes = plt.subplots(1, len(manifests), figsize=(3.4 * len(manifests), 3.0), squeeze=False)
    for ax, (name, manifest) in zip(axes[0], manifests.items()):
        entries = [e for e in json.loads(Path(manifest).read_text()) if e["metadata"]["seed"] < max_seeds]
        captions = list(dict.fromkeys(e["prompt"] for e in entries))
        rows = []
        for caption in captions:
            tiles = [np.asarray(Image.open(e["gen_image_path"]).convert("RGB"))
                     for e in entries if e["prompt"] == caption]
            framed = [np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in tiles]
            rows.append(np.concatenate(framed, axis=1))
        ax.imshow(np.concatenate(rows, axis=0), interpolation="nearest")
        ax.set_title(MODEL_NAMES[name], fontsize=9)
        ax.set_xticks([])
        tile = rows[0].shape[0]
        ax.set_yticks([tile * (i + 0.5) for i in range(len(captions))],
                      [next((s for s in SHAPES if s in c), c) for c in captions], fontsize=8)
        ax.set_xlabel(f"seeds 0-{len(rows[0][0]) // (RESOLUTION + 2) - 1}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def ab_cell(res: dict) -> str:
    ci = res.get("win_rate_ci95")
    p = res.get("sign_test_p_value")
    ci_text = f" [{percent(ci[0])}, {percent(ci[1])}]" if ci else ""
    p_text = "n/a" if p is None else f"{p:.2g}"
    return f"{percent(res['win_rate_a_over_b'])}{ci_text}, p = {p_text}"


def verdicts(results: dict, figure1: dict) -> dict:
    """Plain-words conclusions, computed from the numbers (never written in advance)."""
    base = results["absolute"]["base"]
    out = {}
    for run in RUNS:
        mine, ab = results["absolute"][run], results["ab"][run]["metrics"][COLOUR]
        p_value = ab["sign_test_p_value"]
        significant = p_value is not None and p_value < 0.05
        learned = mine[COLOUR] > base[COLOUR] and ab["win_rate_a_over_b"] > 0.5 and significant
        out[f"{run}_learned"] = learned
        out[f"{run}_preference"] = (
            f"{RUNS[run][0]}: colour score {base[COLOUR]:+.3f} (base) -> {mine[COLOUR]:+.3f}; warm images "
            f"{percent(base['warm_fraction'])} -> {percent(mine['warm_fraction'])}; colour win rate over the base "
            f"{ab_cell(ab)}. " + ("The preference was learned." if learned else
                                 "The preference was NOT learned (no significant gain over the base).")
        )
    dpo, sdpo = figure1["dpo"], figure1["sdpo"]
    rose = dpo["avg_win_diff_loss"]["last"] > 0
    along = dpo["avg_lose_diff_loss"]["last"] > dpo["avg_win_diff_loss"]["last"]
    kept = sdpo["avg_win_diff_loss"]["last"] <= 0
    out["figure1_dpo_winner_rose"], out["figure1_safeguard_winner_at_or_below_zero"] = rose, kept
    out["figure1"] = (
        f"Plain Diffusion-DPO: over the last quarter of training the winner's error relative to the reference averaged "
        f"{dpo['avg_win_diff_loss']['last']:+.4f} and the loser's {dpo['avg_lose_diff_loss']['last']:+.4f} - "
        + ("the winner's error rose" + (" along with the loser's (which rose more)." if along else ".") if rose else
           "the winner's error did NOT rise.")
        + f" With the safeguard: winner {sdpo['avg_win_diff_loss']['last']:+.4f}, loser "
        f"{sdpo['avg_lose_diff_loss']['last']:+.4f} - "
        + ("the winner's error stayed at or below zero" if kept else "the winner's error did NOT stay at or below zero")
        + f" ({percent(sdpo['avg_win_diff_loss']['fraction_above_zero'])} of the steps logged a value above zero, "
          f"against {percent(dpo['avg_win_diff_loss']['fraction_above_zero'])} without the safeguard)."
    )
    return out


def write_report(out: Path, s: Settings, paths: dict, results: dict, figure1: dict, verdict: dict,
                 timings: dict, machine: dict, commands: dict, quick: bool) -> None:
    absolute, ab = results["absolute"], results["ab"]
    names = MODEL_NAMES
    tiny_metrics = ["PickScore", "HPSv2", "AesScore", "CLIPScore", "ImageReward"]
    lines = [
        "# Demo report: a toy colour preference, Diffusion-DPO with and without the safeguard", "",
        *(["**Quick mode (`--quick`): a smoke test of every stage with a few steps each; the numbers below mean "
           "nothing.**", ""] if quick else []),
        f"Run on {machine['cpus']} CPU cores ({machine['threads']} torch thread per process; load average "
        f"{machine['load_before']} before, {machine['load_after']} after), torch {machine['torch']}, "
        f"{timings['total']:.0f} s in all. Settings below; regenerate with `bash scripts/demo.sh`.", "",
        "The task: one shape per caption (\"a circle on a plain background\", ...). In every training pair the "
        "preferred image paints the shape in a warm colour, the rejected one in a cool colour. The base model was "
        "fine-tuned (SFT) on pairs with random labels, so it paints both; Diffusion-DPO should move it to warm "
        "colours. "
        "`Colour` = mean red minus mean blue of an image (`tiny.colour_score`, > 0 is warm).", "",
        "## Was the preference learned?", "",
        "| model | colour score (mean +- sd) | warm images | colour win rate over the base [95% CI], sign test |",
        "|---|---|---|---|",
    ]
    for name, a in absolute.items():
        cell = ab_cell(ab[name]["metrics"][COLOUR]) if name in ab else "-"
        lines.append(f"| {names[name]} | {a[COLOUR]:+.3f} +- {a['colour_sd']:.3f} | {percent(a['warm_fraction'])} "
                     f"| {cell} |")
    n = absolute["base"]["n"]
    lines += ["", f"{n} images per model ({s.seeds} seeds x 4 captions; a seed's four images share their noise, so "
              "they are not independent samples).", ""]
    lines += [f"- {verdict[f'{run}_preference']}" for run in RUNS]
    lines += ["", "## Figure 1 at toy scale", "",
              "The paper's Figure 1: under plain Diffusion-DPO the winner's denoising error relative to the reference "
              "(`avg_win_diff_loss`) rises during training along with the loser's; with the safeguard the winner's "
              "stays at or below zero.", "",
              "| run | winner L - L_ref: first 10% / last 25% of steps | loser L - L_ref: first 10% / last 25% | "
              "steps with winner > 0 | lambda (mean of last 25%) |", "|---|---|---|---|---|"]
    for run, f in figure1.items():
        w, l, lam = f["avg_win_diff_loss"], f["avg_lose_diff_loss"], f["avg_lose_l_scale"]
        lines.append(f"| {RUNS[run][0]} | {w['first']:+.4f} / {w['last']:+.4f} | {l['first']:+.4f} / {l['last']:+.4f} "
                     f"| {percent(w['fraction_above_zero'])} | {lam['last']:.3f} |")
    lines += ["", verdict["figure1"], "", "![Figure 1 at toy scale](figure1.png)", "",
              "## Training curves", "", "![training curves](training_curves.png)", "",
              "## A/B against the base, every metric", "",
              "The five official metrics run here on tiny random-weight stand-ins (`tiny.build_tiny_scorers`): they "
              "show that generation, scoring and comparison run end to end, not image quality. Only `Colour` "
              "measures the preference.", "",
              "| metric | " + " | ".join(f"{RUNS[r][0]} vs base" for r in ab) + " |", "|---|" + "---|" * len(ab)]
    for metric in next(iter(ab.values()))["metrics"]:
        lines.append(f"| {metric} | " + " | ".join(ab_cell(ab[r]["metrics"][metric]) for r in ab) + " |")
    lines += ["", "![win rates](win_rates.png)", "",
              "Absolute means (eval.score `FinalResults` values; tiny scorers):", "",
              "| model | " + " | ".join(tiny_metrics) + " |", "|---|" + "---|" * len(tiny_metrics)]
    for name, a in absolute.items():
        lines.append(f"| {names[name]} | " + " | ".join(f"{a[m]:.4f}" for m in tiny_metrics) + " |")
    lines += ["", "## Samples", "", "![samples](samples.png)", "",
              "## Settings and commands", "",
              f"Model: `tiny.build_sd15` at {RESOLUTION} px with VAE factor {VAE_FACTOR} ({RESOLUTION // VAE_FACTOR}x"
              f"{RESOLUTION // VAE_FACTOR} latents); its VAE fitted for {paths['vae']['steps']} steps (reconstruction "
              f"MSE {paths['vae']['reconstruction_mse']:.4f}). Data: {s.pairs} pairs per set.", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in asdict(s).items()]
    lines += ["", "Training commands (`python train.py ...`, from the repository root):", ""]
    for name, argv in commands.items():
        lines += [f"- {name}: `python train.py {' '.join(argv)}`"]
    work, runs = out / "work", list(RUNS)
    manifest = lambda name: work / "generations" / name / f"toy_{s.seeds}seeds.json"  # noqa: E731
    lines += ["", "The same evaluation with the project's scripts, on a trained model's `unet.pth` (the official eval "
              "protocol's script, pointed at the tiny model and the toy prompts), and as an A/B run:", "", "```bash",
              f"PRETRAIN={paths['model']} SIZE={RESOLUTION} STEP={s.sample_steps} CFG={s.cfg} PROMPTS_DIR={work} "
              f"PROMPT_GROUPS=toy SCORE_ARGS=\"--scorer_config {paths['scorer_config']}\" \\",
              f"  bash scripts/eval/test_sd15.sh {work / runs[0] / 'unet.pth'}",
              f"bash scripts/eval/test_vs.sh --json_a {manifest(runs[0])} --json_b {manifest('base')} "
              f"--label_a {runs[0]} --label_b base --scorer_config {paths['scorer_config']}", "```"]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
              f"Everything else (models, data, runs with their `metrics.jsonl` and `train.log`, images, manifests, "
              f"eval outputs, `eval.log`) is under `{out.name}/work/`.", ""]
    (out / "report.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    import matplotlib

    matplotlib.use("Agg")
    for module in ("transformers", "diffusers", "datasets"):
        library = __import__(module)
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def main(argv=None) -> Path:
    args, s = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    out = Path(args.output_dir).resolve()
    if out.exists():
        if any(out.iterdir()) and not (out / "work").is_dir():
            raise DemoError(f"{out} exists and is not a demo output folder (no work/ inside); the demo replaces its "
                            f"output folder, so pass a new or a previous demo's --output_dir")
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

    say(f"building the tiny model, its autoencoder and the toy data under {work}")
    paths = build(work, s)
    lap("build")
    commands = {"base": base_argv(paths, work, s), **{run: preference_argv(paths, work, s, run) for run in RUNS}}
    say(f"training the base model: SFT on both colours, {s.base_steps} steps")
    run_training({"base": commands["base"]}, s.base_steps, args.threads)
    lap("base")
    say(f"training {' and '.join(RUNS[r][0] for r in RUNS)} from the base, {s.pref_steps} steps each, in parallel")
    run_training({run: commands[run] for run in RUNS}, s.pref_steps, args.threads)
    lap("preference")
    results = evaluate(paths, work, s, work / "eval.log")
    lap("evaluation")

    runs = {run: read_metrics(work / run) for run in RUNS}
    keys = ("avg_win_diff_loss", "avg_lose_diff_loss", "avg_lose_l_scale", "implicit_acc_accumulated")
    figure1 = {run: {key: phase_means(metrics, key) for key in keys} for run, metrics in runs.items()}
    verdict = verdicts(results, figure1)
    plot_training_curves(runs, read_metrics(work / "base"), out / "training_curves.png")
    plot_figure1(runs, out / "figure1.png")
    plot_win_rates(results["ab"], out / "win_rates.png")
    plot_samples(results["manifests"], out / "samples.png")
    lap("report")
    timings["total"] = time.time() - start
    machine["load_after"] = load_average()
    write_report(out, s, paths, results, figure1, verdict, timings, machine, commands, args.quick)
    summary = {"settings": asdict(s), "quick": args.quick, "machine": machine, "timings_s": timings,
               "verdicts": verdict, "figure1": figure1, "vae": paths["vae"],
               "absolute": {name: {k: v for k, v in numbers.items() if k != "colour_scores"}
                            for name, numbers in results["absolute"].items()},
               "ab": results["ab"]}
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    print()
    for run in RUNS:
        say(verdict[f"{run}_preference"])
    say(verdict["figure1"])
    if args.quick:
        say("quick mode: every stage ran, but with a few steps each the numbers above mean nothing")
    say(f"done in {timings['total']:.0f} s: the report is {out / 'report.md'}")
    return out


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    try:
        main()
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(1)
