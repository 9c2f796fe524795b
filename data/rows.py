"""The rows of a preference dataset, for image and video families alike: reading a source (a hub dataset, a folder of
parquet/arrow files, WebDataset shards, a JSONL manifest of local videos), the labels and their filters, the caption
rule, and the reasons a row is skipped and counted. Turning rows into pairs: data/pairs.py (images), data/video.py."""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
from pathlib import Path

from families import FAMILIES

logger = logging.getLogger("train")


PAIR_COLUMNS = ("jpg_0", "jpg_1", "label_0")


def load_rows(args):
    """The raw dataset split named by --dataset_name / --train_data_dir: a hub id, a folder, files, a save_to_disk
    folder, or WebDataset shards. Streams (--streaming, and shards always) are `datasets.IterableDataset`s whose
    images stay undecoded bytes, so a resume can skip rows cheaply. A folder (and a hub id offline, through its
    snapshot in the Hugging Face cache) is read one split at a time: the other splits are never converted."""
    from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

    source = args.dataset_name or args.train_data_dir
    if FAMILIES[args.model_family].video and source.endswith(".jsonl"):  # a manifest of local video files
        return numeric_labels(load_manifest(source, args))
    data_dir = args.train_data_dir if args.dataset_name else None
    path = Path(source)
    shards = webdataset_shards(source, args.split)
    if not shards and args.dataset_name and not path.exists() and not any(ch in source for ch in "*?[") and hub_offline():
        path = dataset_snapshot(source)
        source = str(path)
    described = source
    if shards:
        described = f"{len(shards)} WebDataset shards ({shards[0]}{', ...' if len(shards) > 1 else ''})"
        dataset = load_dataset("webdataset", data_files={args.split: shards}, split=args.split, streaming=True,
                               cache_dir=args.cache_dir)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = load_from_disk(str(path))  # a save_to_disk folder
    elif path.is_file() or any(ch in source for ch in "*?["):
        builder = "arrow" if source.endswith(".arrow") else "parquet"
        files = sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]
        if not files:
            raise FileNotFoundError(f"--dataset_name {source}: no file matches")
        check_not_empty(files)
        described = f"{len(files)} {builder} files ({files[0]}{', ...' if len(files) > 1 else ''})"
        dataset = load_dataset(builder, data_files={args.split: files}, split=args.split, cache_dir=args.cache_dir,
                               streaming=args.streaming)
    elif path.is_dir():
        folder = path / data_dir if data_dir else path
        builder, files = split_files(folder, args.split)
        if files:
            check_not_empty(files)
            described = f"{source}: {len(files)} {builder} files of split {args.split} ({Path(files[0]).name}, ...)"
            dataset = load_dataset(builder, data_files={args.split: files}, split=args.split, cache_dir=args.cache_dir,
                                   streaming=args.streaming)
        else:  # a layout we do not recognise (a loading script, a README with configs): let datasets decide
            dataset = load_dataset(str(path), args.dataset_config_name, cache_dir=args.cache_dir, data_dir=data_dir,
                                   split=args.split, streaming=args.streaming)
    elif args.dataset_name:
        dataset = load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir, data_dir=data_dir,
                               streaming=args.streaming)
    else:
        raise FileNotFoundError(f"--train_data_dir {source}: no such folder")
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if args.split not in dataset:
            raise ValueError(f"{source} has no split {args.split!r} (it has {list(dataset)}); pass --split NAME")
        dataset = dataset[args.split]
    if args.streaming and not isinstance(dataset, IterableDataset):
        dataset = dataset.to_iterable_dataset()  # a save_to_disk folder is local already; stream it all the same
    if isinstance(dataset, IterableDataset):
        dataset = pickapic_columns(dataset.decode(False))
    args.resolved_dataset = described  # for the run's description (training_config.json)
    return numeric_labels(dataset) if "label_0" in (dataset.column_names or ()) else dataset


def hub_offline() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def dataset_snapshot(repo_id: str) -> Path:
    """A dataset hub id, offline: its snapshot folder in the Hugging Face cache (as `hf download --repo-type dataset`
    lays it out), read from then on as a local folder. datasets' own offline mode looks only in its own cache."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception as error:  # noqa: BLE001 - any failure means: not in the cache
        raise FileNotFoundError(
            f"--dataset_name {repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
            f"(HF_HUB_OFFLINE=1). Download it once with network access (hf download --repo-type dataset {repo_id}), "
            f"or pass --dataset_name a local folder of parquet files ({type(error).__name__})") from None


DATA_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow"}


def split_files(folder: Path, split: str) -> tuple[str | None, list[str]]:
    """The parquet/arrow files of `split` in a dataset folder, by datasets' own naming conventions
    (data/train-00000-of-00001.parquet, train/*.parquet, ...), so only that split is loaded. ([] if none: then datasets
    decides, e.g. for a README that declares configs.)"""
    from datasets.data_files import DataFilesList, get_data_patterns

    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="ignore"), re.MULTILINE):
        return None, []
    try:
        patterns = {str(name): value for name, value in get_data_patterns(str(folder)).items()}
    except Exception:  # noqa: BLE001 - no recognisable data files
        return None, []
    if split not in patterns:
        if any(Path(p).suffix in DATA_EXTENSIONS for p in map(str, folder.rglob("*"))):
            raise ValueError(f"{folder} has no files for split {split!r} (it has {', '.join(patterns)}); pass --split NAME")
        return None, []
    files = sorted(str(f) for f in DataFilesList.from_patterns(patterns[split], base_path=str(folder)))
    builders = {DATA_EXTENSIONS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        return None, []
    return builders.pop(), files


def check_not_empty(files: list[str]):
    """datasets fails on a file with no rows with a generic message; name the file instead."""
    import pyarrow.parquet as pq

    empty = [f for f in files if f.endswith(".parquet") and pq.ParquetFile(f).metadata.num_rows == 0]
    if empty and len(empty) == len(files):
        raise ValueError(f"{empty[0]}{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}: the parquet file holds "
                         f"no rows; check the export that wrote it")
    if empty:
        logger.warning(f"{len(empty)} parquet files hold no rows and are left out, e.g. {empty[0]}")
        files[:] = [f for f in files if f not in empty]


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: 'pairs-{000..002}.tar' -> pairs-000.tar, pairs-001.tar, pairs-002.tar; {a,b} lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if re.fullmatch(r"\d+\.\.\d+", body):
        low, high = body.split("..")
        options = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def webdataset_shards(source: str, split: str) -> list[str]:
    """The .tar shards `source` names (a folder of shards, a glob, a {000..099} range, or URLs), else [].

    In a folder, shards named after splits (train-00000.tar, test_unique-00000.tar) are filtered by `split`;
    unnamed ones (00012.tar, as in the Pick-a-Pic v2 mirror) are all taken.
    """
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        tars = sorted(p for p in files if p.suffix == ".tar")
        if not tars or any(p.suffix in (".parquet", ".arrow") for p in files):
            return []
        named = [p for p in tars if re.match(rf"{re.escape(split)}(?![A-Za-z_])", p.name)]
        if not named and any(p.name[0].isalpha() for p in tars):
            raise ValueError(f"{source} has no shard for split {split!r} (its shards: {', '.join(p.name for p in tars[:4])}, ...); "
                             f"pass --split NAME")
        return [str(p) for p in named or tars]
    if not re.search(r"\.tar\b", source):
        return []
    shards = []
    for name in expand_braces(source):
        shards += [name] if "://" in name else sorted(glob.glob(name))
    if not shards:
        raise FileNotFoundError(f"--dataset_name {source}: no .tar shard matches (give a folder, a glob or a {{000..099}} range)")
    return shards


def pickapic_columns(rows):
    """Pick-a-Pic column names for WebDataset fields, which are named `<column>.<extension>` (the v2 mirror's shards hold
    jpg_0.jpg, jpg_1.jpg, label_0.txt, label_1.txt and original_prompt.txt): the extension is dropped, `original_prompt`
    is the caption when there is no `caption` field."""
    from datasets import Value

    if rows.column_names is None:
        raise ValueError("the streamed dataset does not declare its columns; train.py needs jpg_0, jpg_1, label_0 and a caption")
    renames = {name: name.split(".")[0] for name in rows.column_names if "." in name}
    names = {renames.get(name, name) for name in rows.column_names}
    if "caption" not in names and "original_prompt" in names:
        renames[next(k for k in rows.column_names if renames.get(k, k) == "original_prompt")] = "caption"
    rows = rows.rename_columns(renames) if renames else rows
    for name in ("label_0", "label_1", "caption"):
        if name in rows.column_names and rows.features[name] == Value("binary"):
            raise ValueError(f"the shards' {name} field is raw bytes: WebDataset decodes text by extension, so store it "
                             f"as <key>.{'original_prompt' if name == 'caption' else name}.txt")
    return rows  # label_0 becomes a number in numeric_labels, as for every source


def filter_rows(rows, args, is_main: bool):
    """Drop ties by label value (not by the dataset's name), optionally keep Dreamlike pairs, then subsample.

    A stream is filtered lazily as it is read; --max_train_samples then keeps its first N pairs (no random access)."""
    import numpy as np
    from datasets import IterableDataset

    columns = pair_columns(args)
    needed = list(columns) + [args.caption_column]
    if args.dreamlike_pairs_only:
        needed += ["model_0", "model_1"]
    if getattr(args, "pair_weight_column", None):
        needed.append(args.pair_weight_column)
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"the dataset has no column {', '.join(missing)} (it has {rows.column_names}); train.py needs the Pick-a-Pic "
            f"columns {', '.join(columns)} and a caption column (--caption_column)"
        )
    rows = rows.select_columns(needed)
    if isinstance(rows, IterableDataset):
        rows = rows.filter(LabelFilter(), input_columns="label_0")
        if args.dreamlike_pairs_only:
            rows = rows.filter(lambda a, b: "dream" in a and "dream" in b, input_columns=["model_0", "model_1"])
        if args.max_train_samples is not None:
            rows = rows.take(args.max_train_samples)
        if is_main:
            logger.info("Streaming: split decisions (label 0.5) are dropped as the rows are read")
        return rows
    labels = np.asarray(rows["label_0"], dtype=np.float64)  # None -> nan
    decided = np.flatnonzero((labels == 0) | (labels == 1))
    split_decisions = int((labels == 0.5).sum())
    invalid = labels[(labels != 0) & (labels != 1) & (labels != 0.5)]
    if is_main:
        logger.info(f"Eliminated {split_decisions}/{len(rows)} split decisions for Pick-a-pic")
        if len(invalid):
            logger.warning(f"Dropped {len(invalid)}/{len(rows)} rows whose label_0 is not 0, 0.5 or 1 "
                           f"(e.g. {', '.join(map(str, sorted(set(invalid.tolist()), key=str)[:5]))})")
    rows = rows.select(decided)
    if args.dreamlike_pairs_only:
        keep = [i for i, (a, b) in enumerate(zip(rows["model_0"], rows["model_1"])) if "dream" in a and "dream" in b]
        rows = rows.select(keep)
    if args.max_train_samples is not None:
        rows = rows.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(rows))))
    if len(rows) == 0:
        raise ValueError("no training pairs left after dropping ties and filtering; check the dataset and filters")
    return rows


def numeric_labels(rows):
    """label_0 as float64 for every source, once, where rows are loaded: some exports store "0.0"/"1.0" as text, and a
    text label compared with 0 would silently train the rejected image as the winner. Text that is not a number is
    refused."""
    from datasets import IterableDataset, Value

    if rows.features is not None and rows.features["label_0"] == Value("float64"):
        return rows
    if isinstance(rows, IterableDataset):
        features = rows.features.copy()
        features["label_0"] = Value("float64")
        return rows.map(lambda label: {"label_0": as_label(label)}, input_columns="label_0", features=features)
    try:
        return rows.cast_column("label_0", Value("float64"))
    except Exception:  # noqa: BLE001 - find the offending value for the message
        for value in rows["label_0"]:
            as_label(value)
        raise


def decode_image(value):
    """Pick-a-Pic stores encoded image bytes; datasets may hand them over as bytes, a dict or a PIL image."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        value = Image.open(value)
    value.load()
    return value.convert("RGB")


def as_label(value) -> float:
    """A label as a float (None -> nan, dropped with the invalid labels); text must be a number."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label_0 holds {value!r}, which is not a number; Pick-a-Pic labels are 0, 0.5 or 1 "
                         f"(fix the dataset's label_0 column)") from None


class LabelFilter:
    """Keeps decided pairs (label_0 0 or 1) of a stream; warns (once per process) about labels other than 0, 0.5, 1."""

    warned = False

    def __call__(self, label) -> bool:
        if label not in (0, 0.5, 1) and not LabelFilter.warned:
            LabelFilter.warned = True
            logger.warning(f"label_0 {label!r} is not 0, 0.5 or 1: such rows are dropped (warned once)")
        return label in (0, 1)


class UnusableCaption(ValueError):
    pass


# Why a data row is skipped (counted per reason in training_state.json's skipped_by_reason and the end summary).
SKIP_REASONS = ("undecodable image", "undecodable video", "video too short", "video too large", "unusable caption",
                "no preference signal", "bad in the latent cache")


def bad_row(rows, epoch: int, position: int, reason: str, error: Exception) -> tuple:
    """(row id, reason, message) of a skipped row. The id is the dataset's row index (a map-style dataset; `rows` is
    None for a stream: (epoch, stream position)), so that a bad row met again, as a stand-in for another row or in a
    later epoch, is counted once."""
    row_id = position % len(rows) if rows is not None else (epoch, position)
    reason = "unusable caption" if isinstance(error, UnusableCaption) else reason
    return row_id, reason, f"{type(error).__name__}: {error}"


def valid_caption(value) -> bool:
    """A caption is a string ("" included) or a non-empty list of strings (one is drawn per use)."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def pair_columns(args) -> tuple:
    """The pair columns rows need: jpg_0, jpg_1, label_0; for a video family mp4_0, mp4_1, label_0 (data/video.py)."""
    if FAMILIES[args.model_family].video:
        return video_columns(args)  # + an image-to-video conditioning column
    return PAIR_COLUMNS


VIDEO_COLUMNS = ("mp4_0", "mp4_1", "label_0")


def video_columns(args) -> tuple:
    """The pair columns: mp4_0, mp4_1, label_0, and --conditioning_image_column when image-to-video names one."""
    column = getattr(args, "conditioning_image_column", None)
    return VIDEO_COLUMNS + ((column,) if column else ())


def is_manifest(source: str) -> bool:
    return source.endswith(".jsonl")


def load_manifest(source: str, args):
    """A JSONL manifest of local video pairs as a datasets.Dataset with mp4_0/mp4_1 (absolute paths), label_0 and
    the caption column. Relative paths are resolved against the manifest's folder (not the working directory);
    absolute paths, `..` and symbolic links are followed as written: the manifest is the user's own list of local
    files, trusted as the command line is. label_0 may be a number or a numeric string on any line (cast per line to
    float). A line that is not JSON, lacks a field or holds one of the wrong type (a path that is not a string
    included) stops the run naming the line; a missing file is found when decoded (its row is skipped and counted)."""
    from datasets import Dataset

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset_name {source}: no such manifest file")
    image_column = getattr(args, "conditioning_image_column", None)  # image-to-video: a path beside the videos'
    needed = ("video_0", "video_1", "label_0", args.caption_column) + ((image_column,) if image_column else ())
    rows = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}, line {number}: not JSON ({error})") from None
            missing = [key for key in needed if key not in entry]
            if missing:
                raise ValueError(f"{source}, line {number}: no {', '.join(missing)}; a video manifest line needs "
                                 f"{', '.join(needed)}")
            rows.append(manifest_row(entry, path, number, args.caption_column, image_column))
    if not rows:
        raise ValueError(f"{source}: the manifest holds no pairs")
    args.resolved_dataset = f"{source} (JSONL manifest, {len(rows)} pairs)"
    dataset = Dataset.from_list(rows)
    return dataset.to_iterable_dataset() if args.streaming else dataset


def manifest_row(entry: dict, path: Path, number: int, caption_column: str, image_column: str | None = None) -> dict:
    """One manifest line as a row, label_0 a float; a field of the wrong type stops the run naming the line (Arrow
    would otherwise refuse the whole column without saying where)."""
    for key in ("video_0", "video_1") + ((image_column,) if image_column else ()):
        if not isinstance(entry[key], str) or not entry[key]:
            raise ValueError(f"{path}, line {number}: {key} is {entry[key]!r}, not a file path; give the video's path "
                             f"as a string")
    caption = entry[caption_column]
    if not (isinstance(caption, str) or (isinstance(caption, list) and all(isinstance(c, str) for c in caption))):
        raise ValueError(f"{path}, line {number}: {caption_column} is {caption!r}; give a string (or a list of strings)")
    try:  # as numeric_labels casts parquet labels: 1, "0", "0.5" and 1.0 may mix in one manifest
        label = as_label(entry["label_0"])
    except ValueError as error:
        raise ValueError(f"{path}, line {number}: {error}") from None
    folder = path.absolute().parent  # relative paths resolve here, whatever the working directory
    row = {"mp4_0": str(folder / entry["video_0"]), "mp4_1": str(folder / entry["video_1"]),
           "label_0": label, caption_column: caption}
    if image_column:  # image-to-video: the conditioning image's path, resolved as the videos' are
        row[image_column] = str(folder / entry[image_column])
    return row
