"""Absolute scores of generated images: manifest(s) -> per-item scores, FinalResults lines and a summary table.

    python -m eval.score --json_path out/papv2_seed0_512x512_50s_7.5cfg.json [more manifests ...]
                         [--metrics pickscore hpsv2 aesthetics clip imagereward] [--device cuda] [--batch_size 32]
    python -m eval.score --gather_log out/joint_test_512.log      # the table of every FinalResults line in a log
    python -m eval.score --gather_scores out/*_scores.json --table_out out/joint_test_512_table

For each manifest and metric this prints the official line ``FinalResults <Metric> for <group> : <x.xxxx>`` (the
mean over all entries) and writes, next to the manifest, the official per-metric file (the manifest entries, each
with its score added under FIELDS[metric]) plus ``<stem>_scores.md`` / ``<stem>_scores.json`` (the gather_log table,
with n = prompts scored). Models are loaded one at a time, each once for all the manifests given.
See docs/eval-score-compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

from eval.manifest import (DEFAULT_FRAMES, ManifestError, check_images, group_name, is_video_item, read_json_list,
                           read_manifest, score_items)
from flag_ranges import check_ranges

# metric -> (official output-file suffix, per-item score field added to every manifest entry)
OUTPUTS = {
    "pickscore": ("_pickscore.json", "pick_score"),
    "hpsv2": ("_hpsv2score.json", "hpsv2_score"),
    "aesthetics": ("_aesscore.json", "aes_score"),
    "clip": ("_clipscore.json", "clip_score"),
    "imagereward": ("_image_reward_score.json", "image_reward_score"),  # official field name
    "temporal": ("_temporal_consistency.json", "temporal_consistency"),  # videos only
}
ALL_METRICS = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")  # image metrics, the official order
VIDEO_METRICS = ("temporal",)  # added by default when every manifest lists videos
TABLE_HEADER = ("Prompt", "Predictor", "Score", "n")  # gather_log.py's columns, plus n = prompts scored
GROUP_ORDER = ("papv2", "hpsv2", "partiprompts")  # the official table order
N_LINE = re.compile(r"^total len of test data : (\d+)|over (\d+) samples")


# --------------------------------------------------------------------------------------------- gather_log table
def final_results_rows(text: str) -> list[tuple[str, str, str, str]]:
    """(group, metric, score, n) of every line starting with 'FinalResults', in order; tokens 3, 1, 5 as gather_log.py.

    n comes from the last 'total len of test data : N' / '... over N samples' line before it ("-" if none). A
    (group, metric) met again, in a log that a re-run appended to, keeps its place and takes the newer values.
    """
    rows: dict[tuple[str, str], tuple[str, str, str, str]] = {}
    n = "-"
    for line in text.splitlines():
        line = line.strip()
        if match := N_LINE.search(line):
            n = match.group(1) or match.group(2)
        if line.startswith("FinalResults"):
            tokens = line.split(" ")
            if len(tokens) >= 6:
                rows[(tokens[3], tokens[1])] = (tokens[3], tokens[1], tokens[5], n)
    return list(rows.values())


def markdown_table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """The gather_log.py Markdown table, | Prompt | Predictor | Score |, with a column n (prompts scored)."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "| " + " | ".join(["---"] * len(TABLE_HEADER)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def write_table(rows: Sequence[tuple[str, str, str, str]], stem: Path, **extra) -> None:
    """Write the table as `<stem>.md` and `<stem>.json` ({**extra, table: [{prompt, predictor, score, n}]})."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".md").write_text(markdown_table(rows) + "\n", encoding="utf-8")
    table = [{"prompt": g, "predictor": m, "score": _number(s), "n": int(n) if n.isdigit() else None}
             for g, m, s, n in rows]
    stem.with_name(stem.name + ".json").write_text(json.dumps({**extra, "table": table}, indent=2), encoding="utf-8")


def gather_log(log_path: str | os.PathLike, write: bool = True) -> list[tuple[str, str, str, str]]:
    """Reproduce utils/gather_log.py: print the table of a log's FinalResults lines (and write it beside the log)."""
    log_path = Path(log_path)
    if not log_path.is_file():
        raise ManifestError(f"log file not found: {log_path}")
    rows = final_results_rows(log_path.read_text(encoding="utf-8", errors="replace"))
    print("\n\n")
    print(markdown_table(rows))
    if write:
        write_table(rows, log_path.with_name(log_path.stem + "_table"), log=str(log_path))
    return rows


def read_scores_file(path: Path) -> dict:
    if not path.is_file():
        raise ManifestError(f"score file not found: {path} (scoring writes <manifest stem>_scores.json beside the manifest)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not a score file written by eval.score: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("table"), list):
        raise ManifestError(f"{path} is not a score file written by eval.score (no 'table' list)")
    return data


def gather_scores(score_files: Sequence[str | os.PathLike], table_out: str | os.PathLike | None = None):
    """The table of several `<stem>_scores.json` files, papv2, hpsv2, partiprompts first, with n = prompts scored.

    The eval scripts print this instead of the table of their log, so that re-running one prompt set keeps the
    other sets' rows. Partial runs (--max_prompts) and scores older than their manifest are pointed out.
    """
    if not score_files:
        raise ManifestError("no score files to gather: score the manifests first (python -m eval.score --json_path ...)")
    results = [(Path(p), read_scores_file(Path(p))) for p in score_files]
    rank = {group: i for i, group in enumerate(GROUP_ORDER)}
    results.sort(key=lambda r: rank.get(r[1].get("group"), len(GROUP_ORDER)))
    rows = []
    for path, data in results:
        n = data.get("total")
        for row in data["table"]:
            score = row.get("score")
            score = f"{score:.4f}" if isinstance(score, float) else str(score)
            rows.append((str(row.get("prompt")), str(row.get("predictor")), score, str(n if n is not None else "-")))
        if data.get("prompts_total") and n is not None and n < data["prompts_total"]:
            print(f"[WARN] {data.get('group')}: {n} of {data['prompts_total']} prompts scored (a --max_prompts run). "
                  "Generate again without --max_prompts to complete it, then score it.")
        manifest = Path(str(data.get("manifest", "")))
        if manifest.is_file() and n is not None and len(read_json_list(manifest)) != n:
            print(f"[WARN] {path} covers {n} entries but {manifest} now lists {len(read_json_list(manifest))}: "
                  "score it again")
    print("\n\n")
    print(markdown_table(rows))
    if table_out is not None:
        write_table(rows, Path(table_out), scores=[str(p) for p, _ in results])
    return rows


# ------------------------------------------------------------------------------------------------------- scoring
def prompts_in_run(manifest_path: Path) -> int | None:
    """How many prompts the manifest's prompt file holds, from the run record eval.generate keeps beside the images
    (None: no record, e.g. an official run)."""
    record = manifest_path.parent / manifest_path.stem / "run.json"
    try:
        return int(json.loads(record.read_text(encoding="utf-8"))["total_prompts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def score_manifests(
    manifest_paths: Sequence[str | os.PathLike],
    scorers: Iterable,
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    frames: int = DEFAULT_FRAMES,
) -> list[dict]:
    """Score every manifest with every scorer; print the official lines and write the output files.

    `scorers` is any iterable of eval.scorers.Scorer; a generator that loads them one by one keeps only one model
    in memory. Output files go next to each manifest unless `output_dir` is given. Videos get each image metric
    averaged over `frames` evenly sampled frames, and "temporal" scores them (eval.manifest.score_video_items). Returns, per manifest,
    {manifest, group, total, means: {Metric: mean}, scores: {name: [per-item scores]}}.
    """
    manifests = [(Path(path), read_manifest(path, strict=True)) for path in manifest_paths]
    for path, items in manifests:  # check every input before any model is loaded
        if not items:
            raise ManifestError(f"manifest {path} has no entries")
    check_images(*[(items, path) for path, items in manifests])

    results = [
        {"manifest": str(p), "group": group_name(p), "total": len(items), "prompts_total": prompts_in_run(p),
         "means": {}, "scores": {}}
        for p, items in manifests
    ]
    for res in results:
        if res["prompts_total"] and res["total"] < res["prompts_total"]:
            print(f"[WARN] {res['manifest']} lists {res['total']} of the {res['prompts_total']} prompts of its prompt "
                  "file (a --max_prompts run): these are not the full set's scores. Generate again without "
                  "--max_prompts to complete it.")
    for scorer in scorers:
        suffix, field = OUTPUTS[scorer.name]
        for (path, items), res in zip(manifests, results):
            scores = score_items(scorer, items, batch_size, desc=f"{scorer.metric} {res['group']}", frames=frames)
            mean = sum(scores) / len(scores)
            res["scores"][scorer.name], res["means"][scorer.metric] = scores, mean
            print(f"Total {scorer.metric} score: {mean}  over {len(scores)} samples  [{path}]")
            entries = read_json_list(path)
            for item, score in zip(items, scores):
                entries[item.index][field] = score
            out = Path(output_dir or path.parent) / (path.stem + suffix)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(entries, indent=2, ensure_ascii=False), encoding="utf-8")
        del scorer  # let a generator's next model replace this one instead of sitting beside it

    for (path, _), res in zip(manifests, results):
        print(f"total len of test data : {res['total']}")
        rows = []
        for metric, mean in res["means"].items():
            print(f"FinalResults {metric} for {res['group']} : {mean:.4f}")
            rows.append((res["group"], metric, f"{mean:.4f}", str(res["total"])))
        print("\n\n")
        print(markdown_table(rows))
        stem = Path(output_dir or path.parent) / (path.stem + "_scores")
        write_table(rows, stem, manifest=str(path), group=res["group"], total=res["total"],
                    prompts_total=res["prompts_total"], means=res["means"])
    return results


def score_manifest(manifest_path: str | os.PathLike, scorers: Iterable, **kwargs) -> dict:
    """`score_manifests` for one manifest."""
    return score_manifests([manifest_path], scorers, **kwargs)[0]


# ---------------------------------------------------------------------------------------- CLI scorer options
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Numeric flags and their ranges, checked at parse time (flag_ranges.py; tests/test_flag_ranges.py).
SCORER_RANGES = {"frames": ">= 1", "batch_size": ">= 1"}


def add_scorer_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Options shared by eval.score and eval.compare: which metrics, where their models are, device, batch size."""
    parser.add_argument("--metrics", nargs="+", choices=ALL_METRICS + VIDEO_METRICS, default=None, metavar="METRIC",
                        help=f"metrics to compute, in this order: any of {', '.join(ALL_METRICS + VIDEO_METRICS)} "
                             "(default: the five image metrics, and temporal when the manifests list videos)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"videos: frames sampled evenly per video for the image metrics, whose scores are "
                             f"averaged (default {DEFAULT_FRAMES}); temporal uses every frame")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=batch_size, help=f"images per forward (default {batch_size})")
    for name in ALL_METRICS + VIDEO_METRICS:
        default = " (default: --clip_path's model, the CLIP score image tower)" if name == "temporal" else \
            " (default: official)"
        parser.add_argument(f"--{name}_path", default=None, help=f"model location for {name}{default}")
    parser.add_argument("--scorer_config", default=None,
                        help="JSON file or inline JSON mapping metric -> extra eval.scorers.load_scorer kwargs")


def default_metrics(manifest_paths: Sequence[str | os.PathLike], image_metrics: Sequence[str] = ALL_METRICS) -> list:
    """The image metrics, plus temporal consistency when every manifest lists videos."""
    videos = all(is_video_item(it) for path in manifest_paths if path for it in read_manifest(path, strict=False))
    return list(image_metrics) + (list(VIDEO_METRICS) if videos else [])


def scorer_kwargs(args: argparse.Namespace) -> dict[str, dict]:
    """load_scorer kwargs per metric: device/batch size, updated by --scorer_config, then by --<metric>_path. The
    temporal scorer is the CLIP score model's image tower: without its own settings it takes clip's."""
    config = {}
    if args.scorer_config:
        text = args.scorer_config
        if os.path.isfile(text):
            text = Path(text).read_text(encoding="utf-8")
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"--scorer_config is neither a JSON file nor valid JSON: {exc}") from None
        unknown = set(config) - set(ALL_METRICS + VIDEO_METRICS)
        if not isinstance(config, dict) or unknown:
            raise ManifestError(f"--scorer_config must map metric names {ALL_METRICS} to kwargs; unknown: {unknown}")
    kwargs = {}
    for name in args.metrics:
        source = "clip" if name == "temporal" and name not in config and not args.temporal_path else name
        kw = {"device": args.device or default_device(), "batch_size": args.batch_size, **config.get(source, {})}
        if getattr(args, f"{source}_path"):
            kw["model_path"] = getattr(args, f"{source}_path")
        kwargs[name] = kw
    return kwargs


def iter_scorers(kwargs: dict[str, dict]):
    """Load the scorers lazily, one per iteration, so that only one model is in memory at a time."""
    from eval.scorers import load_scorer

    for name, kw in kwargs.items():
        print(f">>> Loading {name} scorer")
        yield load_scorer(name, **kw)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json_path", nargs="+", help="manifest(s) written by the generation script")
    parser.add_argument("--output_dir", default=None, help="where to write the output files (default: beside each manifest)")
    parser.add_argument("--gather_log", default=None, metavar="LOG",
                        help="only print the table of the FinalResults lines in LOG (utils/gather_log.py); writes "
                             "<LOG stem>_table.md/.json beside it")
    parser.add_argument("--gather_scores", nargs="*", default=None, metavar="SCORES_JSON",
                        help="only print the table of these <manifest stem>_scores.json files (what scoring writes), "
                             "e.g. every prompt set of a run folder")
    parser.add_argument("--table_out", default=None, metavar="STEM",
                        help="with --gather_scores: also write the table as STEM.md and STEM.json")
    add_scorer_args(parser, batch_size=32)
    args = parser.parse_args(argv)
    check_ranges(parser, args, SCORER_RANGES)
    if not args.gather_log and args.gather_scores is None and not args.json_path:
        parser.error("give --json_path MANIFEST [...], --gather_log LOG or --gather_scores SCORES_JSON [...]")
    try:
        if args.gather_log:
            gather_log(args.gather_log)
        elif args.gather_scores is not None:
            gather_scores(args.gather_scores, args.table_out)
        else:
            args.metrics = args.metrics or default_metrics(args.json_path)
            kwargs = scorer_kwargs(args)
            score_manifests(args.json_path, iter_scorers(kwargs), batch_size=args.batch_size, output_dir=args.output_dir,
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
