"""A/B comparison of two generation runs: per-prompt win rates of model A over model B for each metric.

    python -m eval.compare --json_a A.json --json_b B.json [--label_a A] [--label_b B] [--outdir DIR]
                           [--metrics ...] [--device cuda] [--batch_size 64] [--ties_as_loss_for_a]
    python -m eval.compare --summarize DIR      # the summary of the pair_*.json files already in DIR

Pairs are formed as officially (eval.manifest.pair_items); A wins a pair if its score is strictly higher, equal
scores tie. Writes pair_<metric>.json per metric, then summary.json, summary.md and win_rates.png (SPEC §4.4).
Beyond the official output: a two-sided sign-test p-value (ties excluded) and a bootstrap 95% interval of each win
rate (pairs resampled, seeded). See docs/eval-score-compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from eval.manifest import DEFAULT_FRAMES, ManifestError, check_images, pair_items, read_manifest, score_items

# metric -> (name in console/summary, file); dict order = the official summary order. The names are the scorers'
# (eval.scorers `metric`, eval.score's FinalResults lines), one naming everywhere; the official summary_vs_scores.py
# printed CLIP and Aesthetics for CLIPScore and AesScore.
PAIR_FILES = {
    "pickscore": ("PickScore", "pair_pickscore.json"),
    "hpsv2": ("HPSv2", "pair_hpsv2.json"),
    "clip": ("CLIPScore", "pair_clip.json"),
    "aesthetics": ("AesScore", "pair_aesthetics.json"),
    "imagereward": ("ImageReward", "pair_imagereward.json"),
    "temporal": ("TemporalConsistency", "pair_temporal.json"),  # videos only
}
RUN_ORDER = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")  # the order test_vs.sh runs them
SEP = "|--------------|----------|----------|--------------|------------------|------|"


def default_label(manifest_path: str | os.PathLike) -> str:
    """Official default label: the last three components of the manifest path as given."""
    return "/".join(str(manifest_path).split("/")[-3:])


def run_dir(root: str | os.PathLike, label_a: str, label_b: str) -> Path:
    """`<root>/<LA>_vs_<LB>_<MMDD-HHMMSS>` (as test_vs.sh; '/' in labels becomes '-')."""
    name = f"{label_a}_vs_{label_b}_{time.strftime('%m%d-%H%M%S')}".replace("/", "-")
    return Path(root) / name


# ---------------------------------------------------------------------------------------------------- statistics
def sign_test_p(wins_a: int, wins_b: int) -> float | None:
    """Two-sided exact sign test of P(A beats B) = 1/2 over the non-tied pairs; None when every pair tied."""
    if wins_a + wins_b == 0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(wins_a, wins_a + wins_b, 0.5, alternative="two-sided").pvalue)


def bootstrap_ci(credits: Sequence[float], n_resamples: int = 10000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of per-pair credits (1 win, 0.5 or 0 tie, 0 loss).

    Resample b draws n pair indices with numpy.random.default_rng(seed).integers(0, n, n), in order;
    the bounds are numpy.percentile (linear) at (1-level)/2 and (1+level)/2 of the resampled win rates.
    """
    credits = np.asarray(credits, dtype=np.float64)
    n = len(credits)
    rng = np.random.default_rng(seed)
    rows = max(1, 4_000_000 // n)  # bound memory: at most ~4M indices at once
    rates = np.concatenate([
        credits[rng.integers(0, n, size=(min(rows, n_resamples - start), n))].mean(axis=1)
        for start in range(0, n_resamples, rows)
    ])
    lo, hi = np.percentile(rates, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def win_stats(scores_a: Sequence[float], scores_b: Sequence[float], ties_as_loss_for_a: bool = False,
              n_bootstrap: int = 10000, seed: int = 0) -> dict:
    """Official counts and win rate, plus the sign test and the bootstrap interval."""
    n = len(scores_a)
    wins_a = sum(a > b for a, b in zip(scores_a, scores_b))
    wins_b = sum(b > a for a, b in zip(scores_a, scores_b))
    ties = n - wins_a - wins_b
    tie_credit = 0.0 if ties_as_loss_for_a else 0.5
    credits = [1.0 if a > b else 0.0 if b > a else tie_credit for a, b in zip(scores_a, scores_b)]
    return {
        "total_pairs": n,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": ties,
        "win_rate_a_over_b": (wins_a + tie_credit * ties) / n,
        "mean_score_a": sum(scores_a) / n,
        "mean_score_b": sum(scores_b) / n,
        "ties_policy": "loss_for_a" if ties_as_loss_for_a else "half",
        "sign_test_p_value": sign_test_p(wins_a, wins_b),
        "win_rate_ci95": list(bootstrap_ci(credits, n_bootstrap, seed)) if n_bootstrap > 0 else None,
        "bootstrap_resamples": n_bootstrap,
        "bootstrap_seed": seed,
    }


# ------------------------------------------------------------------------------------------------------ A vs B
def print_metric(metric: str, res: dict) -> None:
    """The official console block of one metric, plus one line with the added statistics."""
    la, lb, p, ci = res["model_a"], res["model_b"], res["sign_test_p_value"], res["win_rate_ci95"]
    print("=" * 60)
    print(f"Total pairs: {res['total_pairs']}")
    print(f"Model A: {la}")
    print(f"Model B: {lb}")
    print(f"Mean {metric} -> {la}: {res['mean_score_a']:.6f} | {lb}: {res['mean_score_b']:.6f}")
    print(f"Wins -> {la}: {res['wins_a']} | {lb}: {res['wins_b']} | ties: {res['ties']}")
    ties = "0" if res["ties_policy"] == "loss_for_a" else "0.5"
    print(f"Win rate {la} over {lb} (ties={ties}): {100.0 * res['win_rate_a_over_b']:.2f}%")
    ci = f"[{100 * ci[0]:.2f}%, {100 * ci[1]:.2f}%]" if ci else "not computed"
    print(f"Bootstrap 95% CI: {ci} | sign test p = {_p(p)}")
    print("=" * 60)


def _p(p: float | None) -> str:
    return "n/a (all ties)" if p is None else f"{p:.3g}"


def compare_manifests(
    json_a: str | os.PathLike,
    json_b: str | os.PathLike,
    scorers: Iterable,
    label_a: str | None = None,
    label_b: str | None = None,
    outdir: str | os.PathLike | None = None,
    batch_size: int = 64,
    ties_as_loss_for_a: bool = False,
    n_bootstrap: int = 10000,
    seed: int = 0,
    frames: int = DEFAULT_FRAMES,
) -> dict:
    """Compare two manifests with each scorer, write pair_<metric>.json per scorer, then summarize `outdir`.

    `scorers`: any iterable of eval.scorers.Scorer (a generator loading them one by one keeps one model in memory).
    `outdir` defaults to output/vs_eval/<LA>_vs_<LB>_<MMDD-HHMMSS>. Returns the summary dict (summary.json).
    """
    label_a = label_a or default_label(json_a)
    label_b = label_b or default_label(json_b)
    pairs = pair_items(read_manifest(json_a, strict=False), read_manifest(json_b, strict=False), str(json_a), str(json_b))
    for msg in pairs.messages:
        print(msg)
    check_images((pairs.a, json_a), (pairs.b, json_b))  # before any model is loaded
    outdir = Path(outdir) if outdir else run_dir("output/vs_eval", label_a, label_b)
    outdir.mkdir(parents=True, exist_ok=True)
    prompts = [it.prompt for it in pairs.a]  # index fallback: A's prompts, as officially

    for scorer in scorers:
        metric, fname = PAIR_FILES[scorer.name]
        print(f">>> Running {metric}")
        scores_a = score_items(scorer, pairs.a, batch_size, desc=f"{metric} A", frames=frames)
        scores_b = score_items(scorer, pairs.b, batch_size, desc=f"{metric} B", frames=frames)
        del scorer  # let a generator's next model replace this one instead of sitting beside it
        res = {"model_a": label_a, "model_b": label_b}
        res.update(win_stats(scores_a, scores_b, ties_as_loss_for_a, n_bootstrap, seed))
        res.update(json_a=str(json_a), json_b=str(json_b), pairing=pairs.by, dropped=pairs.dropped,
                   unmatched_a=pairs.unmatched_a, unmatched_b=pairs.unmatched_b)
        res["results"] = [
            {"pair_index": i, "prompt": p, "image_a": ia.image, "image_b": ib.image, "score_a": sa, "score_b": sb,
             "winner": label_a if sa > sb else label_b if sb > sa else "tie"}
            for i, (p, ia, ib, sa, sb) in enumerate(zip(prompts, pairs.a, pairs.b, scores_a, scores_b))
        ]
        print_metric(metric, res)
        (outdir / fname).write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"Saved detailed results to: {outdir / fname}")
    return summarize(outdir)


# ------------------------------------------------------------------------------------------------------ summary
def summary_text(summary: dict, extras: list[dict]) -> str:
    """The official summary_vs_scores.py block, then a table of the added statistics."""
    pair, rows, avg = summary["pair"], summary["metrics"], summary["averages"]
    width = max([12] + [len(r["metric"]) for r in rows])  # TemporalConsistency is wider than the official 12
    sep = "|" + "-" * (width + 2) + SEP[15:]
    out = ["", "========== SUMMARY ==========",
           f"Pair: {pair['model_a']}  vs  {pair['model_b']}   (ties policy: {pair['ties_policy']})", "",
           f"| {'Metric':<{width}} |  A mean  |  B mean  |  A win rate  | Wins/Ties/Losses |   n  |", sep]
    for r in rows:
        losses = r["total_pairs"] - r["wins_a"] - r["ties"]
        out.append(f"| {r['metric']:<{width}} | {r['mean_a']:.6f} | {r['mean_b']:.6f} | "
                   f"{100.0 * r['win_rate_a_over_b']:>6.2f}%     | {r['wins_a']}/{r['ties']}/{losses}         | "
                   f"{r['total_pairs']:>4} |")
    out += [sep, f"| {'Average':<{width}} | {'-':>8} | {'-':>8} | {100.0 * avg['macro_win_rate_a_over_b']:>6.2f}%     | "
                 f"{'-':<18} | {'-':>4} |", ""]
    out.append(f"Macro avg win rate (unweighted across {len(rows)} metrics): {100.0 * avg['macro_win_rate_a_over_b']:.2f}%")
    if avg["micro_win_rate_a_over_b"] is not None:
        out.append(f"Micro avg win rate (weighted by #pairs):         {100.0 * avg['micro_win_rate_a_over_b']:.2f}%")
    out += ["================================", ""]
    if any(extras):  # pair files written by this module (official ones have no statistics)
        out += ["Paired statistics (bootstrap 95% CI of the win rate, resampling pairs; two-sided sign test, "
                "ties excluded):", "", "| Metric | A win rate | 95% CI | sign-test p | n |", "| --- | --- | --- | --- | --- |"]
        for r, e in zip(rows, extras):
            ci = e.get("win_rate_ci95")
            ci = f"[{100 * ci[0]:.2f}%, {100 * ci[1]:.2f}%]" if ci else "-"
            out.append(f"| {r['metric']} | {100 * r['win_rate_a_over_b']:.2f}% | {ci} | "
                       f"{_p(e.get('sign_test_p_value')) if 'sign_test_p_value' in e else '-'} | {r['total_pairs']} |")
        out.append("")
    return "\n".join(out)


def plot_win_rates(summary: dict, extras: list[dict], path: Path) -> None:
    """Bar chart of A's win rate per metric with the bootstrap 95% intervals (where known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["metrics"]
    rates = np.array([100 * r["win_rate_a_over_b"] for r in rows])
    cis = [e.get("win_rate_ci95") or [r["win_rate_a_over_b"]] * 2 for r, e in zip(rows, extras)]
    yerr = np.array([[rate - 100 * lo, 100 * hi - rate] for rate, (lo, hi) in zip(rates, cis)]).T.clip(min=0)
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 4))
    x = np.arange(len(rows))
    ax.bar(x, rates, yerr=yerr, capsize=5, color="#9ebce3")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    for xi, rate, e in zip(x, rates, extras):
        label = f"{rate:.1f}%" + (f"\np={_p(e['sign_test_p_value'])}" if "sign_test_p_value" in e else "")
        ax.text(xi, 2, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["metric"] for r in rows])
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate of A over B (%)")
    pair = summary["pair"]
    ax.set_title(f"A: {pair['model_a']}\nB: {pair['model_b']}   (ties: {pair['ties_policy']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(outdir: str | os.PathLike, plot: bool = True) -> dict:
    """summary_vs_scores.py over the pair_*.json files present in `outdir` (official ones too), in the official
    order; prints the table and writes summary.json (official format), summary.md and win_rates.png."""
    outdir = Path(outdir)
    rows, extras, pair = [], [], None
    for metric, fname in PAIR_FILES.values():
        path = outdir / fname
        if not path.is_file():
            continue
        d = json.loads(path.read_text(encoding="utf-8"))
        info = {"model_a": d["model_a"], "model_b": d["model_b"], "ties_policy": d.get("ties_policy", "")}
        if pair is None:
            pair = info
        elif info != pair:
            print(f"[WARN] {path} compares {info}, not {pair}")
        rows.append({"metric": metric, "mean_a": d["mean_score_a"], "mean_b": d["mean_score_b"],
                     "win_rate_a_over_b": d["win_rate_a_over_b"], "wins_a": d["wins_a"], "wins_b": d["wins_b"],
                     "ties": d["ties"], "total_pairs": d["total_pairs"]})
        extras.append({k: d[k] for k in ("sign_test_p_value", "win_rate_ci95") if k in d})
    if not rows:
        raise ManifestError(f"no pair_*.json files in {outdir}: nothing to summarize")
    expected = len(PAIR_FILES) - (0 if (outdir / PAIR_FILES["temporal"][1]).is_file() else 1)  # temporal: videos
    if len(rows) < expected:
        print(f"[WARN] summarizing {len(rows)} of {expected} metrics: {', '.join(r['metric'] for r in rows)}")

    total = sum(r["total_pairs"] for r in rows)
    summary = {
        "pair": pair,
        "metrics": rows,
        "averages": {
            "macro_win_rate_a_over_b": sum(r["win_rate_a_over_b"] for r in rows) / len(rows),
            "micro_win_rate_a_over_b": (sum(r["win_rate_a_over_b"] * r["total_pairs"] for r in rows) / total
                                        if total > 0 else None),
        },
    }
    text = summary_text(summary, extras)
    print(text)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    (outdir / "summary.md").write_text(text.strip() + "\n", encoding="utf-8")
    if plot:
        plot_win_rates(summary, extras, outdir / "win_rates.png")
    print(f"Saved summary JSON -> {outdir / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------------------------------------- CLI
COMPARE_RANGES = {"n_bootstrap": ">= 0", "seed": ">= 0"}  # with eval.score's SCORER_RANGES (flag_ranges.py)


def main(argv: Sequence[str] | None = None) -> None:
    from eval.score import SCORER_RANGES, add_scorer_args, iter_scorers, scorer_kwargs
    from flag_ranges import check_ranges

    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json_a", help="manifest of model A")
    parser.add_argument("--json_b", help="manifest of model B")
    parser.add_argument("--label_a", default=None, help="name of model A (default: last 3 components of --json_a)")
    parser.add_argument("--label_b", default=None, help="name of model B (default: last 3 components of --json_b)")
    parser.add_argument("--outdir", default=None,
                        help="directory for the outputs (default: output/vs_eval/<LA>_vs_<LB>_<MMDD-HHMMSS>)")
    parser.add_argument("--ties_as_half", action="store_true", help="count a tie as half a win for A (the default)")
    parser.add_argument("--ties_as_loss_for_a", action="store_true", help="count a tie as a loss for A")
    parser.add_argument("--n_bootstrap", type=int, default=10000,
                        help="bootstrap resamples for the 95%% interval of each win rate (0: no interval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--summarize", default=None, metavar="DIR",
                        help="only summarize the pair_*.json files in DIR (utils/summary_vs_scores.py)")
    add_scorer_args(parser, batch_size=64)
    args = parser.parse_args(argv)
    check_ranges(parser, args, {**SCORER_RANGES, **COMPARE_RANGES})
    try:
        if args.summarize:
            summarize(args.summarize)
            return
        if not (args.json_a and args.json_b):
            parser.error("give --json_a and --json_b (or --summarize DIR)")
        from eval.score import default_metrics

        args.metrics = args.metrics or default_metrics([args.json_a, args.json_b], RUN_ORDER)
        compare_manifests(args.json_a, args.json_b, iter_scorers(scorer_kwargs(args)), args.label_a, args.label_b,
                          args.outdir, args.batch_size, args.ties_as_loss_for_a, args.n_bootstrap, args.seed,
                          frames=args.frames)
    except ManifestError as exc:
        sys.exit(f"error: {exc}")
    except OSError as exc:  # eval.scorers.WeightsUnavailable: offline without the weights, one line
        from eval.scorers import WeightsUnavailable

        if not isinstance(exc, WeightsUnavailable):
            raise
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
