"""VBench as an optional runner: lay the generated videos out as VBench expects, run it in its own virtual
environment, and read its per-dimension results back into our summary table.

    bash scripts/eval/setup_vbench.sh                         # once: .venv-vbench with the vbench package (online)
    python -m eval.vbench run --json_path out/vbench_seed0_480x832_50s_5.0cfg.json \
        --dimensions subject_consistency motion_smoothness [--device cuda]
    python -m eval.vbench layout --json_path MANIFEST --videos_dir DIR    # only the file layout
    python -m eval.vbench read --results DIR/<name>_eval_results.json --json_path MANIFEST   # only the table

Why a second environment: the vbench package pins an old transformers and numpy<2, which this project's evaluation
cannot run on; so it is installed in `.venv-vbench` (scripts/eval/setup_vbench.sh) and called as a subprocess.

File naming (read from vbench/__init__.py, `VBench.build_full_info_json`, mode "vbench_standard"): for every prompt
of VBench_full_info.json that belongs to a chosen dimension, VBench looks in one folder for
`<prompt_en>-<i>.mp4` with i = 0..4 (five samples per prompt; a missing one is a warning, "unfair evaluation"),
the prompt verbatim. `layout` links (or copies) the k-th manifest entry of each prompt to `<prompt>-<k>.mp4`, so a
prompt file built by `prompts/build.py vbench` (each prompt five times; eval.generate seeds its k-th copy with
--seed + k) gives VBench's five samples. Mode "custom_input" (`--mode custom_input`) is for other prompts: VBench reads
the prompt from the file name there too, and supports only the six dimensions that need no extra information.

Results (VBench.evaluate): `<output>/<name>_eval_results.json`, {dimension: [mean score, [{"video_path",
"video_results"}, ...]]}. `read` turns it into the rows `| vbench | <dimension> | <mean> | <videos> |` of eval.score's
table, written as `<manifest stem>_vbench_scores.md/.json` (the `_scores.json` format: `eval.score --gather_scores`
joins it with the other metrics' tables). The scores are VBench's raw per-dimension means, not its leaderboard's
normalised ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from eval.manifest import ManifestError, check_images, group_name, read_manifest

VBENCH_VENV = ".venv-vbench"
VBENCH_SAMPLES = 5  # VBench looks for <prompt>-0 ... <prompt>-4
# VBench's 16 dimensions (VBench.build_full_dimension_list) and the 6 it accepts in custom_input mode
DIMENSIONS = ("subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality", "object_class",
              "multiple_objects", "color", "spatial_relationship", "scene", "temporal_style", "overall_consistency",
              "human_action", "temporal_flickering", "motion_smoothness", "dynamic_degree", "appearance_style")
CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                     "aesthetic_quality", "imaging_quality")
MAX_NAME_BYTES = 255  # a file name, on the usual file systems

# run inside .venv-vbench: VBench's own API, as its CLI (vbench/cli/evaluate.py) calls it
RUNNER = """
import json, os, sys
import vbench
from vbench import VBench
videos, output, name, device, mode, full_info = sys.argv[1:7]
dimensions = json.loads(sys.argv[7])
full_info = full_info or os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
VBench(device, full_info, output).evaluate(videos_path=videos, name=name, dimension_list=dimensions, mode=mode)
"""


def vbench_name(prompt: str, index: int, suffix: str = ".mp4") -> str:
    """VBench's standard file name of a prompt's index-th sample: `<prompt>-<index>.mp4`."""
    return f"{prompt}-{index}{suffix}"


def layout(manifest: str | os.PathLike, videos_dir: str | os.PathLike, copy: bool = False) -> dict:
    """Link (or copy) every video of `manifest` into `videos_dir` as `<prompt>-<k>.mp4`, k = its occurrence among
    the entries of that prompt. Returns {"videos_dir", "files", "prompts", "short": [prompts with < 5 samples],
    "extra": [prompts with > 5]}. A prompt that cannot be a file name ('/', too long) is an error naming it."""
    items = read_manifest(manifest, strict=True)
    if not items:
        raise ManifestError(f"manifest {manifest} has no entries")
    check_images((items, manifest))
    videos_dir = Path(videos_dir)
    videos_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = defaultdict(int)
    files = []
    for item in items:
        k = seen[item.prompt]
        seen[item.prompt] += 1
        name = vbench_name(item.prompt, k, item.path.suffix)
        if "/" in item.prompt or "\0" in item.prompt or len(name.encode()) > MAX_NAME_BYTES:
            raise ManifestError(f"manifest entry {item.index}: the prompt {item.prompt[:80]!r} cannot be a file name "
                                f"(VBench names videos <prompt>-<k>.mp4): it holds '/' or is over {MAX_NAME_BYTES} "
                                "bytes")
        target = videos_dir / name
        if target.is_symlink() or target.exists():
            target.unlink()
        if copy:
            shutil.copyfile(item.path, target)
        else:
            os.symlink(os.path.abspath(item.path), target)
        files.append(target)
    short = sorted(p for p, n in seen.items() if n < VBENCH_SAMPLES)
    extra = sorted(p for p, n in seen.items() if n > VBENCH_SAMPLES)
    if short:
        print(f"[WARN] {len(short)} prompts have fewer than {VBENCH_SAMPLES} videos (e.g. {short[0]!r}): VBench's "
              "standard mode expects 5 per prompt (prompts/build.py vbench --samples_per_prompt 5)")
    if extra:
        print(f"[WARN] {len(extra)} prompts have more than {VBENCH_SAMPLES} videos: VBench reads only -0 to -4")
    return {"videos_dir": videos_dir, "files": files, "prompts": len(seen), "short": short, "extra": extra}


def read_results(results: str | os.PathLike) -> list[tuple[str, float, int | None]]:
    """(dimension, mean score, videos scored) of a VBench `<name>_eval_results.json`, in the file's order."""
    path = Path(results)
    if not path.is_file():
        raise ManifestError(f"VBench results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ManifestError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ManifestError(f"{path} is not a VBench results file ({{dimension: [score, [per-video results]]}})")
    rows = []
    for dimension, value in data.items():
        per_video = None
        if isinstance(value, (list, tuple)) and value:
            value, per_video = value[0], (value[1] if len(value) > 1 else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{path}: dimension {dimension!r} has no numeric score ({str(value)[:80]})")
        rows.append((dimension, float(value), len(per_video) if isinstance(per_video, list) else None))
    return rows


def write_summary(rows: list[tuple[str, float, int | None]], manifest: str | os.PathLike | None,
                  results: str | os.PathLike, out_stem: str | os.PathLike | None = None) -> Path:
    """The rows as eval.score's table (| Prompt | Predictor | Score | n |, predictor `VBench:<dimension>`), written
    as `<stem>.md` / `<stem>.json` in the `_scores.json` format; stem: `<manifest stem>_vbench_scores` beside the
    manifest (or beside the results file)."""
    from eval.score import markdown_table, write_table

    group = group_name(manifest) if manifest else "vbench"
    table = [(group, f"VBench:{dim}", f"{score:.4f}", str(n) if n is not None else "-") for dim, score, n in rows]
    if out_stem is None:
        base = Path(manifest) if manifest else Path(results)
        out_stem = base.parent / (base.stem + "_vbench_scores")
    counts = [n for _, _, n in rows if n is not None]
    write_table(table, Path(out_stem), manifest=str(manifest) if manifest else None, group=group,
                total=max(counts) if counts else None, results=str(results),
                means={f"VBench:{dim}": score for dim, score, _ in rows})
    print(markdown_table(table))
    return Path(out_stem)


def vbench_python(path: str | None) -> str:
    python = Path(path) if path else Path(__file__).resolve().parent.parent / VBENCH_VENV / "bin" / "python"
    if not python.is_file():
        raise ManifestError(f"no VBench environment at {python}: create it with `bash scripts/eval/setup_vbench.sh` "
                            "(needs internet), or pass --vbench_python")
    return str(python)


def run(args: argparse.Namespace) -> Path:
    """layout -> VBench.evaluate in its environment -> read its results into our table."""
    dimensions = args.dimensions or list(CUSTOM_DIMENSIONS if args.mode == "custom_input" else DIMENSIONS)
    unknown = sorted(set(dimensions) - set(DIMENSIONS))
    if unknown:
        raise ManifestError(f"unknown VBench dimension(s) {unknown}; VBench has: {', '.join(DIMENSIONS)}")
    if args.mode == "custom_input" and set(dimensions) - set(CUSTOM_DIMENSIONS):
        raise ManifestError(f"custom_input mode supports only {', '.join(CUSTOM_DIMENSIONS)}")
    python = vbench_python(args.vbench_python)
    manifest = Path(args.json_path)
    videos_dir = Path(args.videos_dir or manifest.parent / f"{manifest.stem}_vbench" / "videos")
    output = Path(args.output_dir or videos_dir.parent / "results")
    layout(manifest, videos_dir, copy=args.copy)
    name = args.name or manifest.stem
    command = [python, "-c", RUNNER, str(videos_dir), str(output), name, args.device, args.mode,
               args.full_info or "", json.dumps(dimensions)]
    print(f">>> VBench ({args.mode}) on {videos_dir}: {', '.join(dimensions)}")
    done = subprocess.run(command)
    if done.returncode != 0:
        raise ManifestError(f"VBench exited with status {done.returncode} (its output is above)")
    results = output / f"{name}_eval_results.json"
    return write_summary(read_results(results), manifest, results, args.table_out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.vbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="layout, VBench in .venv-vbench, then the summary table")
    p_lay = sub.add_parser("layout", help="only lay the manifest's videos out as <prompt>-<k>.mp4")
    p_read = sub.add_parser("read", help="only read a VBench results JSON into the summary table")
    for p in (p_run, p_lay):
        p.add_argument("--json_path", required=True, help="video manifest written by eval.generate")
        p.add_argument("--videos_dir", default=None,
                       help="folder for the VBench-named videos (default: <manifest stem>_vbench/videos beside it)")
        p.add_argument("--copy", action="store_true", help="copy the videos instead of symlinking them")
    p_run.add_argument("--dimensions", nargs="+", default=None, metavar="DIM",
                       help="VBench dimensions (default: all 16; custom_input: its 6)")
    p_run.add_argument("--mode", choices=("vbench_standard", "custom_input"), default="vbench_standard")
    p_run.add_argument("--device", default="cuda")
    p_run.add_argument("--output_dir", default=None, help="VBench's output folder (default: <videos_dir>/../results)")
    p_run.add_argument("--name", default=None, help="VBench run name (default: the manifest stem)")
    p_run.add_argument("--full_info", default=None, help="VBench_full_info.json (default: the one in the package)")
    p_run.add_argument("--vbench_python", default=None, help=f"python of the VBench environment (default {VBENCH_VENV})")
    p_read.add_argument("--results", required=True, help="VBench's <name>_eval_results.json")
    p_read.add_argument("--json_path", default=None, help="the manifest it scored (names the group and the table)")
    for p in (p_run, p_read):
        p.add_argument("--table_out", default=None, metavar="STEM",
                       help="write the table as STEM.md / STEM.json (default: <manifest stem>_vbench_scores)")
    args = parser.parse_args(argv)
    try:
        if args.command == "layout":
            done = layout(args.json_path, args.videos_dir or Path(args.json_path).with_suffix("").as_posix()
                          + "_vbench/videos", args.copy)
            print(f"{len(done['files'])} videos of {done['prompts']} prompts in {done['videos_dir']}")
        elif args.command == "read":
            write_summary(read_results(args.results), args.json_path, args.results, args.table_out)
        else:
            run(args)
    except ManifestError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
