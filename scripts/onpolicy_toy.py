#!/usr/bin/env python
"""The off-policy question, measured on the demo's toy task: importance weights and the preference learned when
Diffusion-DPO trains on the off-policy toy pairs (tiny.build_pickapic: drawn shapes, warm preferred) or on pairs the
model made itself (eval.make_pairs from the SFT base, labelled by the toy colour metric).

    python scripts/onpolicy_toy.py                         # the measurement of docs/onpolicy.md (minutes on 2 cores)
    python scripts/onpolicy_toy.py --quick --output_dir /tmp/toy   # every stage in seconds, numbers meaningless

Stages (the demo's model, data, base and settings: scripts/demo.py):
  1. build   tiny SD1.5-like model (VAE fitted), the two toy sets, the SFT base trained on random-label pairs.
  2. pairs   eval.make_pairs with the base: --pairs prompts (the four toy captions in turn), K candidates each,
             scorer `colour`, best-worst: at most --pairs on-policy pairs, as many as the off-policy set holds.
  3. train   Diffusion-DPO from the base (--unet_init, the demo's beta, lr, steps and batch) on each pair set, with
             --importance_weighting clip_mask and full, for each --train_seeds; the same seed gives both sets the
             same timesteps and noise draws.
  4. measure is_weight_mean / _min / _max / is_masked_fraction from every run's metrics.jsonl; the base's importance
             weight and eps-MSE by timestep on both sets (scripts/analyze_importance.py, the same pairs count);
             the trained models' images (eval.generate, --eval_seeds x the four captions) scored by the colour
             metric, win rate over the base on the same seeds (eval.compare.win_stats: bootstrap interval, sign test).
Writes <output_dir>/results.json, report.md, weights.png, by_timestep.png, preference.png and pairs.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATASETS = {"off": "off-policy (toy pairs)", "on": "on-policy (the base's own pairs)"}
MODES = ("clip_mask", "full")


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = sys.modules["demo"] = importlib.util.module_from_spec(spec)  # registered first: demo.py has a dataclass
    spec.loader.exec_module(demo)
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=str(REPO / "onpolicy_toy_output"))
    p.add_argument("--quick", action="store_true", help="every stage with a few steps (numbers meaningless)")
    p.add_argument("--train_seeds", type=int, nargs="+", default=None, help="train.py --seed of the runs (default 0 1 2)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="--importance_weighting of the runs")
    p.add_argument("--num_candidates", "-K", type=int, default=4, help="on-policy candidates per prompt")
    p.add_argument("--pairs", type=int, default=None, help="pairs of each set (default: the demo's 256)")
    p.add_argument("--pair_cfg", type=float, default=None,
                   help="guidance of the on-policy candidates (official formula; default: the demo's 3.0, as its "
                        "evaluation; 0 samples the conditional model itself, unguided)")
    p.add_argument("--pref_steps", type=int, default=None, help="Diffusion-DPO steps (default: the demo's 120)")
    p.add_argument("--eval_seeds", type=int, default=None, help="generation seeds per caption (default 12)")
    p.add_argument("--parallel", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_onpolicy_pairs(paths: dict, work: Path, s, k: int, cfg: float) -> Path:
    """eval.make_pairs from the SFT base: s.pairs prompts (the toy captions in turn), k candidates, colour, best-worst."""
    from eval import make_pairs
    from tiny import toy_captions

    prompts = work / "onpolicy_prompts.json"
    captions = toy_captions()
    prompts.write_text(json.dumps([{"prompt": captions[i % len(captions)]} for i in range(s.pairs)], indent=1))
    out = work / "data-on"
    make_pairs.main(["--prompts", str(prompts), "--output_dir", str(out), "--pretrain_path", str(paths["model"]),
                     "--unet_path", str(work / "base"), "--height", "32", "--width", "32",
                     "--steps", str(s.sample_steps), "--cfg", str(cfg), "--num_candidates", str(k),
                     "--seed", "100000", "--batch_size", "16", "--scorers", "colour", "--pair_rule", "best-worst",
                     "--device", "cpu"])
    reset_accelerate()
    return out


def run_argv(demo, paths: dict, work: Path, s, data: Path, name: str, mode: str, seed: int) -> list[str]:
    return demo.train_argv(paths["model"], data, work / name, seed, "--unet_init", str(work / "base"),
                           "--train_method", "diffusion-dpo", "--beta_dpo", str(s.beta),
                           "--train_batch_size", str(s.pref_batch), "--max_train_steps", str(s.pref_steps),
                           "--learning_rate", str(s.pref_lr), "--lr_warmup_steps", str(min(10, s.pref_steps // 10)),
                           "--importance_weighting", mode)


def analyse_by_timestep(paths: dict, work: Path, data: dict, pairs: int, bins: int) -> dict:
    """scripts/analyze_importance.py with the base on each pair set: mean log w and eps-MSE by timestep bin."""
    spec = importlib.util.spec_from_file_location("analyze_importance", REPO / "scripts" / "analyze_importance.py")
    analyze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(analyze)
    out = {}
    for d, folder in data.items():
        out[d] = analyze.main(["--pretrained_model_name_or_path", str(paths["model"]), "--unet_path", str(work / "base"),
                               "--dataset_name", str(folder), "--resolution", "32", "--max_pairs", str(pairs),
                               "--num_bins", str(bins), "--device", "cpu", "--output_dir", str(work / f"importance-{d}")])
    return out


def plot_by_timestep(rows: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colours = {"off": "tab:blue", "on": "tab:red"}
    for d, bins in rows.items():
        t = [r["mean_t"] for r in bins]
        for side, style in (("win", "-"), ("lose", "--")):
            axes[0].plot(t, [-r[f"mean_log_w_{side}"] for r in bins], style, color=colours[d], marker="o", markersize=3,
                         label=f"{DATASETS[d]}, {'winners' if side == 'win' else 'losers'}")
            axes[1].plot(t, [r[f"mean_eps_mse_{side}"] for r in bins], style, color=colours[d], marker="o",
                         markersize=3, label=f"{DATASETS[d]}, {'winners' if side == 'win' else 'losers'}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("-mean log w = KL(q || p_theta) / d")
    axes[1].set_ylabel("eps-MSE of the base's prediction")
    for ax in axes:
        ax.set_xlabel("timestep t (DDPM index)")
        ax.legend(fontsize=7)
    fig.suptitle("The SFT base on the two pair sets, by timestep (scripts/analyze_importance.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def weight_stats(metrics: list[dict]) -> dict:
    out = {}
    for key in ("is_weight_mean", "is_weight_min", "is_weight_max", "is_masked_fraction", "implicit_acc_accumulated",
                "train_loss"):
        values = np.array([m[key] for m in metrics if m.get(key) is not None], dtype=float)
        if len(values):
            out[key] = {"mean": float(values.mean()), "median": float(np.median(values)),
                        "p10": float(np.percentile(values, 10)), "min": float(values.min()), "n": int(len(values))}
    return out


def colour_eval(demo, paths: dict, work: Path, s, runs: list[str]) -> dict:
    """Images of the base and every run (the same seeds), their colour scores, and each run's win rate over the base."""
    from eval.compare import win_stats
    from eval.manifest import pair_items, read_manifest, score_items

    colour = demo.ColourScorer()
    manifests = {}
    for name in ["base"] + runs:
        with demo.into_log(work / "eval.log"):
            manifests[name] = demo.generate_images(paths, work / name / "unet.pth", work / "generations" / name, s)
        reset_accelerate()
    out = {}
    for name, manifest in manifests.items():
        scores = score_items(colour, read_manifest(manifest), 64)
        out[name] = {"colour": float(np.mean(scores)), "warm_fraction": float(np.mean(np.array(scores) > 0)),
                     "n": len(scores)}
        opponents = [("vs_base", "base")] + ([("vs_off_policy", "off" + name[2:])] if name.startswith("on-") else [])
        for key, other in opponents:
            if name == "base":
                continue
            pairs = pair_items(read_manifest(manifest, strict=False), read_manifest(manifests[other], strict=False))
            out[name][key] = win_stats(score_items(colour, pairs.a, 64), score_items(colour, pairs.b, 64),
                                       n_bootstrap=s.n_bootstrap)
    return out


def pair_colours(dataset: Path) -> dict:
    """Colour score of the preferred and rejected image of every pair of a parquet dataset folder."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from tiny import colour_score

    win, lose = [], []
    for f in sorted((dataset / "data").glob("train-*.parquet")):
        for row in pq.read_table(f, columns=["jpg_0", "jpg_1", "label_0"]).to_pylist():
            if row["label_0"] not in (0.0, 1.0):
                continue
            a, b = (colour_score(Image.open(io.BytesIO(row[c]))) for c in ("jpg_0", "jpg_1"))
            (win if row["label_0"] == 1.0 else lose).append(a)
            (lose if row["label_0"] == 1.0 else win).append(b)
    return {"pairs": len(win), "winner_colour": float(np.mean(win)), "loser_colour": float(np.mean(lose)),
            "winner_warm": float(np.mean(np.array(win) > 0)), "loser_warm": float(np.mean(np.array(lose) > 0))}


# ---------------------------------------------------------------------------------------------------------- figures


def plot_weights(runs: dict, seeds: list[int], modes: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = [("is_weight_mean", "mean w of the step's pairs"), ("is_weight_min", "min w of the step's pairs")]
    fig, axes = plt.subplots(len(modes), 3, figsize=(15, 3.6 * len(modes)), squeeze=False)
    colours = {"off": "tab:blue", "on": "tab:red"}
    for row, mode in enumerate(modes):
        for col, (key, title) in enumerate(keys):
            ax = axes[row, col]
            values = {d: np.concatenate([[m[key] for m in runs[f"{d}-{mode}-s{seed}"]] for seed in seeds])
                      for d in DATASETS}
            low = min(v.min() for v in values.values())
            bins = np.linspace(low, 1.0, 40)
            for d, v in values.items():
                ax.hist(v, bins=bins, alpha=0.55, color=colours[d], label=f"{DATASETS[d]}: median {np.median(v):.4f}")
            ax.set_yscale("log")
            ax.set_title(f"{mode}: {title}", fontsize=10)
            ax.set_xlabel("importance weight w (per optimizer step)")
            ax.legend(fontsize=7)
        ax = axes[row, 2]  # paired by step: same seed, same timesteps and noise
        off = np.concatenate([[m["is_weight_mean"] for m in runs[f"off-{mode}-s{seed}"]] for seed in seeds])
        on = np.concatenate([[m["is_weight_mean"] for m in runs[f"on-{mode}-s{seed}"]] for seed in seeds])
        lo = min(off.min(), on.min())
        ax.scatter(off, on, s=6, alpha=0.5, color="black")
        ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("off-policy run: is_weight_mean")
        ax.set_ylabel("on-policy run: is_weight_mean")
        ax.set_title(f"{mode}: the same step (same timesteps) of both runs", fontsize=10)
    fig.suptitle("Importance weights logged during Diffusion-DPO training (metrics.jsonl), all seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_preference(evals: dict, seeds: list[int], modes: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels, rates, errs, colour_means, colours = [], [], [], [], []
    for mode in modes:
        for d in DATASETS:
            for seed in seeds:
                name = f"{d}-{mode}-s{seed}"
                res = evals[name]["vs_base"]
                lo, hi = res["win_rate_ci95"] or [res["win_rate_a_over_b"]] * 2
                labels.append(f"{d}\n{mode}\ns{seed}")
                rates.append(100 * res["win_rate_a_over_b"])
                errs.append([100 * (res["win_rate_a_over_b"] - lo), 100 * (hi - res["win_rate_a_over_b"])])
                colour_means.append(evals[name]["colour"])
                colours.append("tab:blue" if d == "off" else "tab:red")
    x = np.arange(len(labels))
    axes[0].bar(x, rates, yerr=np.array(errs).T.clip(min=0), color=colours, capsize=2, alpha=0.8)
    axes[0].axhline(50, color="grey", linestyle="--", linewidth=1)
    axes[0].set_xticks(x, labels, fontsize=6)
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("colour win rate over the base (%)")
    axes[0].set_title("preference learned (blue: off-policy pairs, red: on-policy)", fontsize=10)
    axes[1].bar(x, colour_means, color=colours, alpha=0.8)
    axes[1].axhline(evals["base"]["colour"], color="black", linestyle="--", linewidth=1, label="base")
    axes[1].set_xticks(x, labels, fontsize=6)
    axes[1].set_ylabel("mean colour score (warm > 0)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pairs(datasets: dict[str, Path], path: Path, n: int = 8) -> None:
    """The first n pairs of each set, winner above loser."""
    import io

    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    from PIL import Image

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 1.6), squeeze=False)
    for ax, (d, folder) in zip(axes[0], datasets.items()):
        files = sorted((folder / "data").glob("train-*.parquet"))
        rows = [r for r in pq.read_table(files[0]).to_pylist() if r["label_0"] in (0.0, 1.0)][:n]
        columns = []
        for r in rows:
            images = [np.asarray(Image.open(io.BytesIO(r[c])).convert("RGB").resize((32, 32))) for c in ("jpg_0", "jpg_1")]
            if r["label_0"] == 0.0:
                images.reverse()
            columns.append(np.pad(np.concatenate(images, axis=0), ((1, 1), (1, 1), (0, 0)), constant_values=255))
        ax.imshow(np.concatenate(columns, axis=1), interpolation="nearest")
        ax.set_title(DATASETS[d], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([16, 48], ["preferred", "rejected"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    demo = load_demo()
    torch.set_num_threads(args.threads)
    demo.quiet_libraries()
    s = demo.Settings(**demo.QUICK) if args.quick else demo.Settings()
    for name in ("pairs", "pref_steps"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.eval_seeds is not None:
        s.seeds = args.eval_seeds
    seeds = args.train_seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.output_dir).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started, timings = time.time(), {}

    demo.say(f"building the toy task under {work}")
    paths = demo.build(work, s)
    demo.run_training({"base": demo.base_argv(paths, work, s)}, s.base_steps, args.threads)
    timings["build_and_base"] = time.time() - started

    demo.say(f"on-policy pairs: {s.pairs} prompts x {args.num_candidates} candidates from the base, colour, best-worst")
    t = time.time()
    pair_cfg = s.cfg if args.pair_cfg is None else args.pair_cfg
    onpolicy = make_onpolicy_pairs(paths, work, s, args.num_candidates, pair_cfg)
    timings["make_pairs"] = time.time() - t
    data = {"off": paths["pref_data"], "on": onpolicy}

    jobs = {f"{d}-{mode}-s{seed}": run_argv(demo, paths, work, s, data[d], f"{d}-{mode}-s{seed}", mode, seed)
            for mode in args.modes for seed in seeds for d in DATASETS}
    names = list(jobs)
    t = time.time()
    for start in range(0, len(names), args.parallel):
        batch = names[start : start + args.parallel]
        demo.say(f"training {', '.join(batch)} ({start + len(batch)} of {len(names)} runs)")
        demo.run_training({name: jobs[name] for name in batch}, s.pref_steps, args.threads)
    timings["training"] = time.time() - t
    runs = {name: demo.read_metrics(work / name) for name in names}

    demo.say("the base's importance weight by timestep on both pair sets")
    t = time.time()
    by_timestep = analyse_by_timestep(paths, work, data, min(128, s.pairs), 4 if args.quick else 20)
    timings["by_timestep"] = time.time() - t
    demo.say(f"generating {s.seeds} seeds x 4 captions with the base and each run, scoring colour")
    t = time.time()
    evals = colour_eval(demo, paths, work, s, names)
    timings["evaluation"] = time.time() - t

    results = {
        "settings": {**{k: v for k, v in vars(s).items()}, "num_candidates": args.num_candidates, "pair_cfg": pair_cfg,
                     "train_seeds": seeds,
                     "modes": args.modes, "quick": args.quick},
        "pair_sets": {d: pair_colours(Path(data[d])) for d in DATASETS},
        "make_pairs_summary": json.loads((onpolicy / "summary.json").read_text()),
        "weights": {name: weight_stats(metrics) for name, metrics in runs.items()},
        "pooled": {f"{d}-{mode}": weight_stats([m for seed in seeds for m in runs[f"{d}-{mode}-s{seed}"]])
                   for mode in args.modes for d in DATASETS},
        "paired_steps": {},
        "by_timestep": by_timestep,
        "evaluation": evals,
        "commands": {name: "python train.py " + " ".join(argv) for name, argv in jobs.items()},
    }
    for mode in args.modes:
        off = np.concatenate([[m["is_weight_mean"] for m in runs[f"off-{mode}-s{seed}"]] for seed in seeds])
        on = np.concatenate([[m["is_weight_mean"] for m in runs[f"on-{mode}-s{seed}"]] for seed in seeds])
        results["paired_steps"][mode] = {"steps": int(len(off)), "on_higher_fraction": float(np.mean(on > off)),
                                         "mean_log_ratio": float(np.mean(np.log(on) - np.log(off)))}
    plot_weights(runs, seeds, args.modes, out / "weights.png")
    plot_preference(evals, seeds, args.modes, out / "preference.png")
    plot_by_timestep(by_timestep, out / "by_timestep.png")
    plot_pairs({d: Path(data[d]) for d in DATASETS}, out / "pairs.png")
    timings["total"] = time.time() - started
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results)
    demo.say(f"done in {timings['total']:.0f} s: {out / 'report.md'}")
    return results


def win_cell(v: dict) -> str:
    ci = v["win_rate_ci95"] or [float("nan")] * 2
    p = v["sign_test_p_value"]
    return (f"{100 * v['win_rate_a_over_b']:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}], "
            f"p = {'n/a' if p is None else f'{p:.2g}'}")


def write_report(out: Path, results: dict) -> None:
    lines = ["# Off-policy vs on-policy pairs on the toy task", ""]
    if results["settings"]["quick"]:
        lines += ["**Quick mode: the numbers mean nothing.**", ""]
    st = results["settings"]
    lines += [f"On-policy pairs: {st['pairs']} prompts x {st['num_candidates']} candidates of the SFT base, "
              f"{st['sample_steps']} Euler steps, cfg {st['pair_cfg']:g} (official formula), colour, best-worst. "
              f"Diffusion-DPO: beta {st['beta']:g}, {st['pref_steps']} steps x {st['pref_batch']} pairs, lr "
              f"{st['pref_lr']:g}, importance weighting {', '.join(st['modes'])}, train seeds "
              f"{', '.join(map(str, st['train_seeds']))}.", ""]
    lines += ["| pair set | pairs | winner colour (warm %) | loser colour (warm %) |", "|---|---|---|---|"]
    for d, p in results["pair_sets"].items():
        lines.append(f"| {DATASETS[d]} | {p['pairs']} | {p['winner_colour']:+.3f} ({100 * p['winner_warm']:.0f}%) | "
                     f"{p['loser_colour']:+.3f} ({100 * p['loser_warm']:.0f}%) |")
    lines += ["", "| run (all seeds pooled) | is_weight_mean: mean / median / p10 | is_weight_min: mean / p10 | "
              "is_masked_fraction (mean) | implicit acc (mean) |", "|---|---|---|---|---|"]
    for name, w in results["pooled"].items():
        masked = w.get("is_masked_fraction", {}).get("mean", float("nan"))
        lines.append(f"| {name} | {w['is_weight_mean']['mean']:.4f} / {w['is_weight_mean']['median']:.4f} / "
                     f"{w['is_weight_mean']['p10']:.4f} | {w['is_weight_min']['mean']:.4f} / "
                     f"{w['is_weight_min']['p10']:.4f} | {masked:.3f} | {w['implicit_acc_accumulated']['mean']:.3f} |")
    lines += ["", "| mode | steps compared | on-policy w higher at the same step | mean log(w_on / w_off) |",
              "|---|---|---|---|"]
    for mode, p in results["paired_steps"].items():
        lines.append(f"| {mode} | {p['steps']} | {100 * p['on_higher_fraction']:.1f}% | {p['mean_log_ratio']:+.5f} |")
    lines += ["", "The SFT base by timestep (mean over winners; pairs as in training):", "",
              "| t | " + " | ".join(f"{r['t_low']}-{r['t_high']}" for r in results["by_timestep"]["off"]) + " |",
              "|---|" + "---|" * len(results["by_timestep"]["off"])]
    for d, bins in results["by_timestep"].items():
        lines.append(f"| {d}: mean w | " + " | ".join(f"{r['mean_w_win']:.4f}" for r in bins) + " |")
        lines.append(f"| {d}: eps-MSE | " + " | ".join(f"{r['mean_eps_mse_win']:.3f}" for r in bins) + " |")
        lines.append(f"| {d}: masked at 0.9 | " + " | ".join(f"{r['masked_fraction']:.2f}" for r in bins) + " |")
    ev = results["evaluation"]
    lines += ["", f"Base: colour {ev['base']['colour']:+.3f}, warm {100 * ev['base']['warm_fraction']:.0f}% "
              f"({ev['base']['n']} images).", "",
              "| run | colour | warm | colour win rate over the base [95% CI], p | on-policy run over the "
              "off-policy run with the same mode and seed [95% CI], p |", "|---|---|---|---|---|"]
    for name, e in ev.items():
        if name == "base":
            continue
        v = e["vs_base"]
        lines.append(f"| {name} | {e['colour']:+.3f} | {100 * e['warm_fraction']:.0f}% | {win_cell(v)} | "
                     f"{win_cell(e['vs_off_policy']) if 'vs_off_policy' in e else '-'} |")
    lines += ["", "![weights](weights.png)", "", "![by timestep](by_timestep.png)", "",
              "![preference](preference.png)", "", "![pairs](pairs.png)", "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()), ""]
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
