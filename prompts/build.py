"""Build the three evaluation prompt files (papv2.json, hpsv2.json, partiprompts.json) from their public sources.

    python prompts/build.py                                   # all three, downloaded, into prompts/
    python prompts/build.py --from_dir /path/to/official/prompts    # copy a local set, validating it
    python prompts/build.py papv2 --pickapic /data/pickapic_v2      # one file, from a local Pick-a-Pic copy
    python prompts/build.py vbench --from_file VBench_full_info.json [--dimensions color scene] [--per_dimension]

Sources (see prompts/README.md):
* papv2        Pick-a-Pic v2 `test_unique` split, captions de-duplicated in order of first occurrence. `--pickapic` takes
               the hub id (default yuvalkirstain/pickapic_v2; removed from the hub in 2025, so usually a local copy or
               mirror: a folder with `**/test_unique*.parquet`, a parquet file, or a `save_to_disk` folder).
* hpsv2        HPDv2 benchmark prompts: anime, concept-art, paintings, photo (800 each, in that order), the files
               `benchmark/<style>.json` of the hub dataset zhwang/HPDv2 that the `hpsv2` package downloads.
               `--hpdv2` takes that dataset id or a local folder holding the four <style>.json files.
* partiprompts PartiPrompts (google-research/parti `PartiPrompts.tsv`, column `Prompt`, file order). `--parti` takes the
               hub dataset nateraw/parti-prompts (default; it ships PartiPrompts.tsv), a .tsv file or a folder with it.
* vbench       VBench's standard prompt suite, the `VBench_full_info.json` the vbench package ships (a list of
               {"prompt_en", "dimension": [...]}), given with `--from_file` (never downloaded: it is in the package and
               in github.com/Vchitect/VBench). Written as vbench.json (or, with --dimensions, the prompts of those
               dimensions; --per_dimension: one vbench-<dimension>.json each), every prompt listed
               --samples_per_prompt times (default 5, VBench's protocol): eval.generate gives a prompt's k-th copy the
               seed --seed + k, and eval/vbench.py lays the videos out as `<prompt>-<k>.mp4`. Not part of the default
               build (it is a video suite).

The files are written in the official JSON shapes and formatting (2-space indent; papv2 keeps non-ASCII characters,
the other two escape them), so rebuilding from the same data gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

EXPECTED_COUNTS = {"papv2": 487, "hpsv2": 3200, "partiprompts": 1632}
KEYS = {
    "papv2": ["prompt", "gen_image_path", "raw_image_path", "metadata"],
    "hpsv2": ["prompt", "gen_image_path", "raw_image_path", "metadata"],
    "partiprompts": ["prompt", "neg_prompt", "raw_image_path", "metadata"],
}
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
ENSURE_ASCII = {"papv2": False, "hpsv2": True, "partiprompts": True}  # as the official files are written


def entries(name: str, prompts: list[str]) -> list[dict]:
    """The official entry shape: {prompt, gen_image_path | neg_prompt: "", raw_image_path: "", metadata: {}}."""
    second = "neg_prompt" if name == "partiprompts" else "gen_image_path"
    return [{"prompt": p, second: "", "raw_image_path": "", "metadata": {}} for p in prompts]


def papv2_prompts(source: str = "yuvalkirstain/pickapic_v2") -> list[str]:
    """Captions of the Pick-a-Pic v2 `test_unique` split, exact duplicates dropped (first occurrence kept)."""
    path = Path(source)
    if (path / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        captions = load_from_disk(str(path))["test_unique"]["caption"]
    elif path.exists():
        import pyarrow.parquet as pq

        files = [path] if path.is_file() else sorted(path.glob("**/test_unique*.parquet"))
        if not files:
            raise SystemExit(f"error: no test_unique*.parquet file under {source}")
        captions = [c for f in files for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist()]
    else:
        from datasets import load_dataset

        data_files = {"test_unique": "data/test_unique-*.parquet"}  # only this split, not the 300+ GB train split
        captions = load_dataset(source, data_files=data_files, split="test_unique", columns=["caption"])["caption"]
    return list(dict.fromkeys(captions))


def hpsv2_prompts(source: str = "zhwang/HPDv2") -> list[str]:
    """The four HPDv2 benchmark style files, concatenated in the order anime, concept-art, paintings, photo."""
    prompts = []
    for style in HPS_STYLES:
        local = Path(source) / f"{style}.json"
        if Path(source).exists():
            if not local.is_file():
                raise SystemExit(f"error: {local} not found (expected {', '.join(s + '.json' for s in HPS_STYLES)})")
            file = local
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(source, f"{style}.json", subfolder="benchmark", repo_type="dataset")
        prompts += json.loads(Path(file).read_text(encoding="utf-8"))
    return prompts


def partiprompts_prompts(source: str = "nateraw/parti-prompts") -> list[str]:
    """The `Prompt` column of PartiPrompts.tsv, in file order."""
    path = Path(source)
    if path.is_dir():
        path = path / "PartiPrompts.tsv"
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "PartiPrompts.tsv", repo_type="dataset"))
    with open(path, newline="", encoding="utf-8") as f:
        return [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")]


VBENCH_SAMPLES = 5  # videos per prompt in VBench's standard evaluation (`<prompt>-0.mp4` ... `<prompt>-4.mp4`)


def vbench_suite(path: str | Path) -> list[tuple[str, list[str]]]:
    """(prompt, dimensions) of VBench_full_info.json, in file order; a prompt listed twice keeps its first place and
    the union of its dimensions."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (VBench_full_info.json: in the vbench package's folder, or "
                         "github.com/Vchitect/VBench)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SystemExit(f"error: {path} is not JSON ({e})") from None
    if not isinstance(data, list):
        raise SystemExit(f"error: {path} must be a JSON list of {{\"prompt_en\", \"dimension\": [...]}} objects")
    suite: dict[str, list[str]] = {}
    for i, entry in enumerate(data):
        prompt = entry.get("prompt_en") if isinstance(entry, dict) else None
        dims = entry.get("dimension") if isinstance(entry, dict) else None
        if isinstance(dims, str):
            dims = [dims]
        if not isinstance(prompt, str) or not prompt or not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
            raise SystemExit(f"error: {path} entry {i} lacks a string 'prompt_en' and a 'dimension' list")
        known = suite.setdefault(prompt, [])
        known += [d for d in dims if d not in known]
    return list(suite.items())


def vbench_entries(suite: list[tuple[str, list[str]]], dimensions: list[str] | None, samples: int) -> list[dict]:
    """Our prompt-file entries for the suite's prompts of `dimensions` (all: None), each listed `samples` times in a
    row, with {"dimension": [...], "sample": k} as metadata."""
    chosen = [(p, d) for p, d in suite if dimensions is None or set(d) & set(dimensions)]
    return [{"prompt": p, "gen_image_path": "", "raw_image_path": "", "metadata": {"dimension": d, "sample": k}}
            for p, d in chosen for k in range(samples)]


def build_vbench(args) -> list[Path]:
    """The vbench prompt file(s) (see the module docstring)."""
    if not args.from_file:
        raise SystemExit("error: vbench needs --from_file VBench_full_info.json (it ships with the vbench package: "
                         "python -c \"import vbench, os; print(os.path.dirname(vbench.__file__))\", or "
                         "github.com/Vchitect/VBench)")
    if args.samples_per_prompt < 1:
        raise SystemExit("error: --samples_per_prompt must be >= 1")
    suite = vbench_suite(args.from_file)
    present = sorted({d for _, dims in suite for d in dims})
    unknown = sorted(set(args.dimensions or []) - set(present))
    if unknown:
        raise SystemExit(f"error: dimension(s) {unknown} are not in {args.from_file}; it has: {', '.join(present)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.per_dimension:
        files = [(f"vbench-{d.replace('_', '-')}", [d]) for d in (args.dimensions or present)]
    else:
        name = "vbench" if not args.dimensions else "vbench-" + "-".join(d.replace("_", "-") for d in args.dimensions)
        files = [(name, args.dimensions)]
    written = []
    for name, dims in files:
        target = out_dir / f"{name}.json"
        if target.exists() and not args.force:
            print(f"{target} exists, kept (--force to rebuild)")
            continue
        items = vbench_entries(suite, dims, args.samples_per_prompt)
        target.write_text(json.dumps(items, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"{target}: {len(items) // args.samples_per_prompt} prompts x {args.samples_per_prompt} samples")
        written.append(target)
    return written


def problems(name: str, items) -> list[str]:
    """What makes `items` differ from the official file's shape and size (empty if nothing)."""
    if not isinstance(items, list):
        return [f"{name}: not a JSON list"]
    found = []
    if len(items) != EXPECTED_COUNTS[name]:
        found.append(f"{name}: {len(items)} entries, the official file has {EXPECTED_COUNTS[name]}")
    bad = [i for i, x in enumerate(items) if not isinstance(x, dict) or list(x) != KEYS[name] or not isinstance(x["prompt"], str)]
    if bad:
        found.append(f"{name}: {len(bad)} entries (first: #{bad[0]}) lack the keys {KEYS[name]} or a string prompt")
    return found


def write(name: str, items: list[dict], out_dir: Path) -> Path:
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(items, indent=2, ensure_ascii=ENSURE_ASCII[name]), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="papv2, hpsv2 and/or partiprompts (default: all three), or vbench (with --from_file)")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="default: this prompts/ folder")
    p.add_argument("--from_dir", default=None, help="copy <name>.json from this folder instead, after validating it")
    p.add_argument("--pickapic", default="yuvalkirstain/pickapic_v2", help="papv2 source (hub id or local copy)")
    p.add_argument("--hpdv2", default="zhwang/HPDv2", help="hpsv2 source (hub dataset id or folder of <style>.json)")
    p.add_argument("--parti", default="nateraw/parti-prompts", help="partiprompts source (hub dataset id, .tsv or folder)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--from_file", default=None, help="vbench: the VBench_full_info.json to read")
    p.add_argument("--dimensions", nargs="+", default=None, metavar="DIM",
                   help="vbench: only the prompts of these VBench dimensions (e.g. subject_consistency color)")
    p.add_argument("--per_dimension", action="store_true",
                   help="vbench: one file per dimension (vbench-<dimension>.json), of --dimensions or all")
    p.add_argument("--samples_per_prompt", type=int, default=VBENCH_SAMPLES,
                   help=f"vbench: copies of each prompt, i.e. videos per prompt (default {VBENCH_SAMPLES}, VBench's)")
    args = p.parse_args(argv)
    if "vbench" in args.names:
        if set(args.names) != {"vbench"}:
            p.error("build vbench on its own (it takes --from_file)")
        build_vbench(args)
        return
    unknown = set(args.names) - set(EXPECTED_COUNTS)
    if unknown:
        p.error(f"unknown prompt file(s) {sorted(unknown)}; choose from {list(EXPECTED_COUNTS)}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {"papv2": lambda: papv2_prompts(args.pickapic), "hpsv2": lambda: hpsv2_prompts(args.hpdv2),
                "partiprompts": lambda: partiprompts_prompts(args.parti)}
    for name in args.names or list(EXPECTED_COUNTS):
        target = out_dir / f"{name}.json"
        if target.exists() and not args.force:
            print(f"{target} exists, kept (--force to rebuild)")
            continue
        if args.from_dir is not None:
            source = Path(args.from_dir) / f"{name}.json"
            if not source.is_file():
                raise SystemExit(f"error: {source} not found")
            found = problems(name, json.loads(source.read_text(encoding="utf-8")))
            if found:
                raise SystemExit("error: " + "; ".join(found))
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
            print(f"{target}: copied from {source} ({EXPECTED_COUNTS[name]} entries)")
            continue
        try:
            items = entries(name, builders[name]())
        except Exception as e:  # offline, removed repo, unreadable file: say which flag takes a local copy
            flag = {"papv2": "--pickapic", "hpsv2": "--hpdv2", "partiprompts": "--parti"}[name]
            raise SystemExit(f"error: cannot build {name} ({e.__class__.__name__}: {e}).\n"
                             f"Pass a local copy with {flag} PATH, or copy the official files with --from_dir DIR.") from e
        for problem in problems(name, items):
            print(f"warning: {problem}; check the source (or use --from_dir with the official files)", file=sys.stderr)
        print(f"{write(name, items, out_dir)}: {len(items)} entries")


if __name__ == "__main__":
    main()
