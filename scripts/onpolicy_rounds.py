#!/usr/bin/env python
"""On-policy rounds: make pairs with the model itself -> train on them -> evaluate, N times, each round starting from
the previous round's weights; one table at the end with every round's A/B against round 0. No human label anywhere.

    python scripts/onpolicy_rounds.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts my_prompts.json --eval_prompts heldout.json --rounds 3 --output_dir output/onpolicy \\
        --scorers pickscore hpsv2=0.5 --num_candidates 4 \\
        -- --train_method diffusion-dpo --beta_dpo 5000 --use_winner_preserving --winner_preserving_mu 0.9 \\
           --train_batch_size 8 --gradient_accumulation_steps 32 --learning_rate 1e-8 --scale_lr \\
           --max_train_steps 200 --lr_warmup_steps 50 --mixed_precision bf16
    # several GPUs: --launcher "accelerate launch --multi_gpu --num_processes 8"

Round r (1..N), under <output_dir>/round_<r>/:
  pairs/  python -m eval.make_pairs with round r-1's model (round 0: the base, or --init) on --prompts; candidate
          seeds start at --pair_seed + (r-1) * n_prompts * K, so no round reuses another's noise.
  train/  train.py (the arguments after `--`) on pairs/, with --save_pipeline and, from round 2 on (round 1 with
          --init), --unet_init <round r-1's train/>: policy AND reference start from round r-1's weights. With
          --use_lora the adapter is first fused into round r-1's denoiser (round_<r-1>/fused/), and the new adapter
          trains on top of it.
  eval/   python -m eval.generate on --eval_prompts with the same seeds every round (--eval_seeds S: seeds 0..S-1,
          one manifest), scored by eval.score (and the toy metric colour), and compare_vs_round_0/ (eval.compare:
          win rates, bootstrap intervals, sign tests) against round 0's images of the same prompts and seeds.
round_0/eval/ holds the starting model's images. At the end: <output_dir>/rounds.md and rounds.json.

Every step resumes: run the same command again (eval.make_pairs, train.py and eval.generate resume by themselves;
finished steps are skipped). --launcher: `python` (default: each step in its own process with this interpreter),
`accelerate launch ...` (make pairs, training and generation on several GPUs), or `inprocess` (every step in this
process: tiny CPU runs and the tests). Scoring and comparing run in this process (--score_device). See
docs/onpolicy.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eval.make_pairs import METRICS, TOY_METRICS, mix_label, parse_mix  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"
# settings that decide what a finished round holds: a rerun with other values would mix two experiments
FIXED = ("pretrained_model_name_or_path", "init", "prompts", "eval_prompts", "num_candidates", "scorers",
         "pair_rule", "margin", "pair_seed", "eval_seeds", "height", "width", "steps", "cfg", "train_args")


class RoundsError(Exception):
    """A problem the user can fix; printed without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="scripts/onpolicy_rounds.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after `--` go to train.py.")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="base model (a diffusers pipeline)")
    p.add_argument("--init", default=None,
                   help="round 0's model if not the base: a train.py output / pipeline / denoiser folder, a weights "
                        "file (unet.pth, .safetensors) or a LoRA output folder")
    p.add_argument("--prompts", required=True, help="training prompts (eval.generate's prompt-file format)")
    p.add_argument("--eval_prompts", required=True, help="held-out prompts for the evaluation")
    p.add_argument("--rounds", type=int, default=1, help="rounds of make pairs -> train -> evaluate (default 1)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_candidates", "-K", type=int, default=4)
    p.add_argument("--scorers", nargs="+", default=["pickscore"], metavar="METRIC[=WEIGHT]",
                   help="eval.make_pairs' scorer mix (z-scored per metric, then weighted)")
    p.add_argument("--scorer_config", default=None, help="metric -> eval.scorers.load_scorer kwargs (JSON file)")
    p.add_argument("--pair_rule", choices=("best-worst", "margin"), default="best-worst")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--pair_seed", type=int, default=10_000, help="first candidate seed of round 1")
    p.add_argument("--eval_metrics", nargs="+", default=None, metavar="METRIC",
                   help=f"metrics of the evaluation (default: those of --scorers); any of "
                        f"{', '.join(METRICS + TOY_METRICS)}")
    p.add_argument("--eval_seeds", type=int, default=1,
                   help="seeds per held-out prompt (1: the official protocol, seed 0 for every prompt)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (pairs and evaluation)")
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=4, help="images per sampling forward pass")
    p.add_argument("--score_batch_size", type=int, default=32)
    p.add_argument("--score_device", default=None, help="device of the evaluation scorers (default: cuda if any)")
    p.add_argument("--n_bootstrap", type=int, default=2000, help="bootstrap resamples of the win-rate intervals")
    p.add_argument("--launcher", default="python",
                   help="'python' (a process per step), 'inprocess', or a command such as 'accelerate launch "
                        "--num_processes 8'")
    args = p.parse_args(argv)
    args.train_args = train_args
    if args.rounds < 1 or args.eval_seeds < 1 or args.num_candidates < 2:
        p.error("--rounds and --eval_seeds must be >= 1, --num_candidates >= 2")
    args.mix = parse_mix(args.scorers)
    args.eval_metrics = args.eval_metrics or list(args.mix)
    unknown = [m for m in args.eval_metrics if m not in METRICS + TOY_METRICS]
    if unknown:
        p.error(f"--eval_metrics: unknown {unknown}; choose from {', '.join(METRICS + TOY_METRICS)}")
    for flag in ("--pretrained_model_name_or_path", "--dataset_name", "--output_dir", "--unet_init"):
        if flag in train_args:
            p.error(f"{flag} after `--` is set by the rounds themselves; remove it")
    return args


# ------------------------------------------------------------------------------------------------------- running


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_step(args, what: str, argv: list[str], log: Path) -> None:
    """One step: `eval.make_pairs`, `train.py` or `eval.generate`, in this process or through the launcher."""
    line = " ".join(shlex.quote(a) for a in argv)
    with open(log, "a") as f:
        f.write(f"{what} {line}\n")
    print(f"[rounds] {what} {line}", flush=True)
    if args.launcher == "inprocess":
        try:
            if what == "train.py":
                import train

                train.main(argv)
            elif what == "eval.make_pairs":
                from eval import make_pairs

                make_pairs.main(argv)
            else:
                from eval import generate

                generate.main(argv)
        except SystemExit as e:
            if e.code not in (None, 0):
                raise RoundsError(f"{what} failed: {e.code}") from None
        finally:
            reset_accelerate()
            gc.collect()
        return
    launcher = [sys.executable] if args.launcher == "python" else shlex.split(args.launcher)
    target = [str(REPO / "train.py")] if what == "train.py" else ["-m", what]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run(launcher + target + argv, env=env)
    if done.returncode != 0:
        raise RoundsError(f"{what} failed (exit status {done.returncode}); command: {' '.join(launcher + target)} {line}")


def sampling_flags(args) -> list[str]:
    flags = ["--batch_size", str(args.batch_size)]
    for name in ("height", "width", "steps", "cfg"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    return flags


def family_of(base: str) -> str:
    from eval.generate import resolve_family

    return resolve_family(argparse.Namespace(model_family=None, sdxl=False, pretrain_path=base))


def denoiser_of(family: str) -> str:
    from eval.generate import FAMILY_DEFAULTS

    return FAMILY_DEFAULTS[family].denoiser


def trainable_init(args, model: str | None, folder: Path) -> str | None:
    """A folder that train.py --unet_init reads (<folder>/unet or /transformer, a diffusers model) for `model`
    (None: the base). A pipeline or train.py --save_pipeline folder without a LoRA adapter is used as it is; a
    weights file is loaded into the base denoiser, and a LoRA adapter fused into its denoiser, then saved."""
    if model is None:
        return None
    family = family_of(args.pretrained_model_name_or_path)
    denoiser = denoiser_of(family)
    path = Path(model)
    if (path / denoiser / "config.json").is_file() and not (path / LORA_FILE).is_file():
        return str(path)
    target = folder / denoiser
    if (target / "config.json").is_file():
        return str(folder)
    import torch

    import diffusers
    from eval import generate

    ns = argparse.Namespace(unet_path=str(path), lora_path=None, model_family=family, sdxl=family == "sdxl",
                            pretrain_path=args.pretrained_model_name_or_path)
    weights = generate.weights_of(ns)
    if family in generate.FLOW_FAMILIES:
        module = generate.load_transformer(ns, torch.float32)
    else:
        module = generate.load_unet(ns)
    if weights.lora is not None:  # fuse the adapter into the denoiser it was trained on
        pipeline_class = getattr(diffusers, generate.FAMILY_DEFAULTS[family].pipeline)
        pipe = pipeline_class.from_pretrained(args.pretrained_model_name_or_path, **{denoiser: module})
        adapter = Path(weights.lora)
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        module = getattr(pipe, denoiser)
        del pipe
    tmp = folder / f".{denoiser}.tmp"
    module.save_pretrained(tmp)
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    print(f"[rounds] {model} saved as a diffusers {denoiser} in {target} (train.py --unet_init reads it)")
    return str(folder)


def with_resolution(args, train_args: list[str]) -> list[str]:
    """train.py at the sampling size unless the training arguments name a resolution."""
    if "--resolution" in train_args or args.height is None:
        return list(train_args)
    return list(train_args) + ["--resolution", str(args.height)]


def count_prompts(path: str) -> int:
    return len(json.loads(Path(path).read_text(encoding="utf-8")))


def eval_manifest(args, model: str | None, out: Path, log: Path) -> Path:
    """eval.generate for each seed 0..S-1 on the held-out prompts; one manifest (seed in each entry's metadata)."""
    from eval.generate import parse_args as generate_args, resolve_args, run_name

    manifests = []
    for seed in range(args.eval_seeds):
        argv = ["--pretrain_path", args.pretrained_model_name_or_path, "--test_json", args.eval_prompts,
                "--output_path", str(out), "--seed", str(seed), "--no_zip", *sampling_flags(args)]
        argv += ["--unet_path", model] if model else []
        resolved = resolve_args(generate_args(argv))
        manifest = out / f"{run_name(resolved)}.json"
        record = out / run_name(resolved) / "run.json"
        done = manifest.is_file() and (json.loads(record.read_text()) if record.is_file() else {}).get("complete")
        if not done:
            run_step(args, "eval.generate", argv, log)
        manifests.append(manifest)
    if len(manifests) == 1:
        return manifests[0]
    entries = []
    for seed, manifest in enumerate(manifests):
        entries += [dict(e, metadata={**(e.get("metadata") or {}), "seed": seed})
                    for e in json.loads(manifest.read_text(encoding="utf-8"))]
    merged = out / f"{Path(args.eval_prompts).stem}_{args.eval_seeds}seeds.json"
    merged.write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")
    return merged


# ---------------------------------------------------------------------------------------------------- evaluation


def load_eval_scorers(args) -> list:
    from eval.make_pairs import load_pair_scorer, scorer_settings

    ns = argparse.Namespace(score_batch_size=args.score_batch_size, scorer_config=args.scorer_config,
                            **{f"{name}_path": None for name in METRICS})
    device = args.score_device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    settings = scorer_settings(ns, {m: 1.0 for m in args.eval_metrics}, device)
    return [load_pair_scorer(name, settings[name]) for name in args.eval_metrics]


def evaluate(args, scorers: list, manifest: Path, base_manifest: Path, round_dir: Path, r: int) -> dict:
    """eval.score of this round's images; for r >= 1 eval.compare against round 0 (the toy metric, which eval.score
    and eval.compare do not know, through the same functions: score_items, pair_items, win_stats)."""
    from eval.compare import PAIR_FILES, compare_manifests, win_stats
    from eval.manifest import pair_items, read_manifest, score_items
    from eval.score import score_manifests

    official = [s for s in scorers if s.name in METRICS]
    toy = [s for s in scorers if s.name not in METRICS]
    means = {}
    if official:
        means.update(score_manifests([manifest], official, batch_size=args.score_batch_size)[0]["means"])
    items = read_manifest(manifest)
    for scorer in toy:
        scores = score_items(scorer, items, args.score_batch_size, desc=scorer.metric)
        means[scorer.metric] = sum(scores) / len(scores)
    result = {"means": means, "n": len(items), "ab": {}}
    if r == 0:
        return result
    outdir = round_dir / "compare_vs_round_0"
    if official:
        compare_manifests(manifest, base_manifest, official, f"round_{r}", "round_0", outdir,
                          batch_size=args.score_batch_size, n_bootstrap=args.n_bootstrap)
        for scorer in official:
            name, fname = PAIR_FILES[scorer.name]
            result["ab"][scorer.metric] = json.loads((outdir / fname).read_text())
    if toy:
        outdir.mkdir(parents=True, exist_ok=True)
        pairs = pair_items(read_manifest(manifest, strict=False), read_manifest(base_manifest, strict=False))
        for scorer in toy:
            stats = win_stats(score_items(scorer, pairs.a, args.score_batch_size),
                              score_items(scorer, pairs.b, args.score_batch_size), n_bootstrap=args.n_bootstrap)
            res = {"model_a": f"round_{r}", "model_b": "round_0", **stats}
            (outdir / f"pair_{scorer.name}.json").write_text(json.dumps(res, indent=2))
            result["ab"][scorer.metric] = res
    return result


def train_summary(train_dir: Path) -> dict:
    """Mean loss and implicit accuracy over the last quarter of the logged steps (metrics.jsonl)."""
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = records[len(records) - max(1, len(records) // 4):]
    out = {"steps": records[-1]["step"] if records else 0}
    for key in ("train_loss", "implicit_acc_accumulated", "is_weight_mean"):
        values = [m[key] for m in last if m.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out


def table(rows: list[dict], metrics: list[str]) -> str:
    head = ["round", "model", "pairs (ties dropped)", "train loss / implicit acc (last 25%)"]
    head += [f"{m}: mean" for m in metrics] + [f"{m}: win rate vs round 0 [95% CI], p" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        pairs = f"{row['pairs']} ({row['ties_dropped']})" if row.get("pairs") is not None else "-"
        t = row.get("train") or {}
        train = (f"{t['train_loss']:.4g} / {t.get('implicit_acc_accumulated', float('nan')):.2f}"
                 if "train_loss" in t else "-")
        cells = [str(row["round"]), row["model"], pairs, train]
        cells += [f"{row['means'][m]:.4f}" if m in row["means"] else "-" for m in metrics]
        for m in metrics:
            ab = row["ab"].get(m)
            if ab is None:
                cells.append("-")
                continue
            ci = ab.get("win_rate_ci95")
            p = ab.get("sign_test_p_value")
            cells.append(f"{100 * ab['win_rate_a_over_b']:.1f}%"
                         + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
                         + f", p = {'n/a' if p is None else f'{p:.2g}'}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ main


def check_config(args, out: Path) -> None:
    config = {k: getattr(args, k) for k in FIXED}
    path = out / "rounds_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: was {old.get(k)!r}, now {config[k]!r}" for k in FIXED if old.get(k) != config[k]]
        if changed:
            raise RoundsError(f"{out} holds rounds made with other settings:\n  " + "\n  ".join(changed)
                              + "\nUse another --output_dir (more --rounds may be added to the same folder).")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))


def run_rounds(args) -> dict:
    out = Path(args.output_dir)
    check_config(args, out)
    log = out / "commands.log"
    n_prompts = count_prompts(args.prompts)
    lora = "--use_lora" in args.train_args

    # round 0: the starting model's held-out images
    model = args.init
    manifests = {0: eval_manifest(args, model, out / "round_0" / "eval", log)}
    rows_meta = {0: {"round": 0, "model": model or f"base ({args.pretrained_model_name_or_path})"}}
    init = trainable_init(args, model, out / "round_0" / "init") if model else None
    for r in range(1, args.rounds + 1):
        round_dir = out / f"round_{r}"
        pairs, train_dir = round_dir / "pairs", round_dir / "train"
        seed = args.pair_seed + (r - 1) * n_prompts * args.num_candidates
        summary_file = pairs / "summary.json"
        record = pairs / "run.json"
        if not (summary_file.is_file() and record.is_file() and json.loads(record.read_text()).get("complete")):
            argv = ["--prompts", args.prompts, "--output_dir", str(pairs), "--pretrain_path",
                    args.pretrained_model_name_or_path, "--num_candidates", str(args.num_candidates),
                    "--seed", str(seed), "--scorers", *args.scorers, "--pair_rule", args.pair_rule,
                    "--margin", str(args.margin), "--score_batch_size", str(args.score_batch_size),
                    *sampling_flags(args)]
            argv += ["--unet_path", model] if model else []
            argv += ["--scorer_config", args.scorer_config] if args.scorer_config else []
            run_step(args, "eval.make_pairs", argv, log)
        pair_summary = json.loads(summary_file.read_text())
        if pair_summary["pairs"] == 0:
            raise RoundsError(f"round {r}: {pairs} holds no pair (every candidate pair tied or fell within the "
                              "margin); lower --margin or raise --num_candidates")
        if not (train_dir / "model_index.json").is_file():  # --save_pipeline writes it last, after the weights
            argv = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--dataset_name", str(pairs),
                    "--output_dir", str(train_dir), "--save_pipeline", *with_resolution(args, args.train_args)]
            argv += ["--unet_init", init] if init else []
            run_step(args, "train.py", argv, log)
        model = str(train_dir)
        manifests[r] = eval_manifest(args, model, round_dir / "eval", log)
        rows_meta[r] = {"round": r, "model": model, "pairs": pair_summary["pairs"],
                        "ties_dropped": pair_summary["ties_dropped"], "train": train_summary(train_dir)}
        if r < args.rounds:  # the next round trains from this one's weights
            init = str(train_dir) if not lora else trainable_init(args, model, round_dir / "fused")

    print("[rounds] scoring and comparing every round with round 0", flush=True)
    scorers = load_eval_scorers(args)
    metric_names = [scorer.metric for scorer in scorers]
    rows = []
    for r in range(args.rounds + 1):
        result = evaluate(args, scorers, manifests[r], manifests[0], out / f"round_{r}", r)
        rows.append({**rows_meta[r], "manifest": str(manifests[r]), **result})
    text = table(rows, metric_names)
    header = [f"# On-policy rounds: {args.rounds} round(s) from {rows[0]['model']}", "",
              f"Pairs: {args.num_candidates} candidates per prompt of {args.prompts} ({n_prompts} prompts), scored by "
              f"{mix_label(args.mix)} (z-scored per metric), {args.pair_rule}"
              + (f" with margin {args.margin:g}" if args.margin else "") + f". Evaluation: {args.eval_prompts}, "
              f"{args.eval_seeds} seed(s) per prompt, {rows[0]['n']} images per round; A/B against round 0 on the "
              f"same prompts and seeds (eval.compare; ties count half). train.py arguments: "
              f"`{' '.join(args.train_args)}`.", ""]
    (out / "rounds.md").write_text("\n".join(header) + text + "\n")
    result = {"rounds": rows, "metrics": metric_names, "settings": {k: getattr(args, k) for k in FIXED}}
    (out / "rounds.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n" + text + f"\n\n[rounds] table: {out / 'rounds.md'} and {out / 'rounds.json'}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return run_rounds(args)
    except RoundsError as e:
        raise SystemExit(f"onpolicy_rounds: error: {e}")


if __name__ == "__main__":
    main()
