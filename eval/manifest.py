"""Manifest reading, A/B pairing, image loading and the one scoring loop shared by `eval.score` and `eval.compare`.

A manifest (written by the generation scripts, SPEC §4.1) is a JSON list, in prompt order, of
``{"prompt", "gen_image_path", "raw_image_path", "metadata"}``. ``gen_image_path`` may be a list (the first
non-empty string is used) and may be relative to the directory the generator ran in; `resolve_image` finds it.
A manifest of videos (gen_image_path an .mp4 etc.) is scored per video (`score_video_items`): image metrics averaged
over evenly sampled frames, video metrics (temporal consistency) on all frames.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm


class ManifestError(Exception):
    """A problem with the user's inputs (manifest, image files); the CLIs print it without a traceback."""


@dataclass
class Item:
    """One usable manifest entry."""

    index: int  # position in the manifest list
    prompt: str
    image: str  # gen_image_path as written in the manifest (after list -> first non-empty)
    path: Path | None = None  # resolved file on disk, None when not found


def group_name(manifest_path: str | os.PathLike) -> str:
    """The prompt set a manifest belongs to: the prompt file's stem that eval.generate's run name starts with
    (`<prompt file stem>_seed<seed>_...`: prompts_vid_seed0_... -> prompts_vid), else, as the official scripts, the
    file name up to the first '_' ('papv2', 'hpsv2', ...). The official names give the same group either way."""
    stem = Path(manifest_path).stem
    match = re.match(r"(.+?)_seed\d+_", stem)
    return match.group(1) if match else stem.split("_")[0]


def read_json_list(path: str | os.PathLike) -> list:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ManifestError(f"manifest {path} must be a JSON list of entries, got {type(data).__name__}")
    return data


def _image_field(entry) -> str | None:
    """gen_image_path as a string (a list gives its first non-empty string), None when unusable (official rule)."""
    if not isinstance(entry, dict):
        return None
    image = entry.get("gen_image_path")
    if isinstance(image, list):
        image = next((p for p in image if isinstance(p, str) and p), "")
    return image if isinstance(image, str) else None


def resolve_image(image: str, manifest_path: str | os.PathLike) -> Path | None:
    """Find an image file named in a manifest; None when no candidate exists.

    Tried in order: the path itself (relative paths from the current directory, as the official scripts do); relative
    to the manifest's directory; and ``<manifest dir>/<parent folder name>/<file name>`` -- where the generator puts
    images -- which also finds result folders that were moved or copied from another machine.
    """
    if not image:
        return None
    path, mdir = Path(image), Path(manifest_path).parent
    candidates = [path]
    if not path.is_absolute():
        candidates.append(mdir / path)
    if path.parent.name:
        candidates.append(mdir / path.parent.name / path.name)
    return next((c for c in candidates if c.is_file()), None)


def read_manifest(manifest_path: str | os.PathLike, strict: bool = True) -> list[Item]:
    """Usable entries of a manifest, with image paths resolved.

    strict=True (absolute scoring): every entry must have a string prompt and gen_image_path, otherwise a
    ManifestError names the bad entries. strict=False (A/B): such entries are skipped, as officially, with a warning.
    """
    items, bad = [], []
    for i, entry in enumerate(read_json_list(manifest_path)):
        image = _image_field(entry)
        prompt = entry.get("prompt") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or image is None:
            bad.append(i)
            continue
        items.append(Item(i, prompt, image, resolve_image(image, manifest_path)))
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
        msg = f"{manifest_path}: {len(bad)} entries without a string 'prompt' and 'gen_image_path' (indices {shown})"
        if strict:
            raise ManifestError(msg)
        print(f"[WARN] {msg}; skipped.")
    return items


def missing_report(items: Sequence[Item], manifest_path: str | os.PathLike) -> str | None:
    """A message listing every image of `items` that was not found, None when all exist."""
    missing = [it for it in items if it.path is None]
    if not missing:
        return None
    lines = "\n".join(f"  entry {it.index}: {it.image!r}" for it in missing)
    return f"{len(missing)} of {len(items)} images listed in {manifest_path} were not found:\n{lines}"


def check_images(*checks: tuple[Sequence[Item], str | os.PathLike]) -> None:
    """check_images((items, manifest), ...): raise one ManifestError listing every missing image of every manifest."""
    reports = [r for items, path in checks if (r := missing_report(items, path))]
    if reports:
        raise ManifestError(
            "\n".join(reports) + f"\n(relative paths are tried from the current directory {os.getcwd()}, then from "
            "the manifest's directory)"
        )


def load_image(item: Item) -> Image.Image:
    """The decoded image in the file's own mode. The official scorers get `Image.open(path)` and convert to RGB at
    different points (PickScore/Aesthetics before the processor, OpenCLIP/ImageReward after resizing, which for RGBA
    and LA premultiplies alpha), so each scorer converts; converting here changed transparent images' scores.
    Modes no scorer reads (16-bit, float) are converted to RGB here, as before."""
    from eval.scorers import SUPPORTED_MODES

    try:
        with Image.open(item.path) as img:
            img.load()
            return img if img.mode in SUPPORTED_MODES else img.convert("RGB")
    except Exception as exc:  # PIL raises several types for truncated/corrupt files
        raise ManifestError(f"cannot read image {item.path} (manifest entry {item.index}): {exc}") from None


DEFAULT_FRAMES = 8  # frames sampled per video for the image metrics (--frames); our choice, not a published protocol


def is_video_item(item: Item) -> bool:
    from eval.video import is_video

    return is_video(item.path or item.image)


def load_frames(item: Item, frames: int | None = None) -> list[Image.Image]:
    """A video's frames (PIL RGB): `frames` of them spread evenly over the video (first and last included), or all
    of them with frames=None."""
    from eval.video import read_frames, sample_indices

    try:
        decoded = read_frames(item.path)
    except ValueError as exc:
        raise ManifestError(f"{exc} (manifest entry {item.index})") from None
    if frames is None:
        return decoded
    return [decoded[i] for i in sample_indices(len(decoded), frames)]


def score_video_items(scorer, items: Sequence[Item], frames: int, desc: str = "") -> list[float]:
    """Videos: a scorer with `score_videos` (temporal consistency) gets every frame of each video; any image scorer
    scores `frames` evenly sampled frames of each video, each as an image with the video's prompt, through its
    `score` interface, and the video's score is their mean."""
    scores: list[float] = []
    with tqdm(total=len(items), desc=desc or scorer.name, unit="video") as bar:
        for item in items:
            if hasattr(scorer, "score_videos"):
                scores.append(float(scorer.score_videos([load_frames(item)])[0]))
            else:
                sampled = load_frames(item, frames)
                per_frame = scorer.score([item.prompt] * len(sampled), sampled)
                if len(per_frame) != len(sampled):
                    raise RuntimeError(f"scorer {scorer.name} returned {len(per_frame)} scores for {len(sampled)} frames")
                scores.append(sum(float(s) for s in per_frame) / len(per_frame))
            bar.update(1)
    return scores


def score_items(scorer, items: Sequence[Item], batch_size: int, desc: str = "",
                frames: int = DEFAULT_FRAMES) -> list[float]:
    """The scoring loop: load `batch_size` images at a time and score (prompt, image) pairs with `scorer`. Videos
    (an .mp4 etc. as gen_image_path) are scored by `score_video_items` (`frames` frames each); a manifest mixing
    images and videos is refused."""
    kinds = {is_video_item(it) for it in items}
    if len(kinds) > 1:
        raise ManifestError("the manifest mixes images and videos: score them as separate manifests")
    if kinds == {True}:
        if frames < 1:
            raise ManifestError("--frames must be >= 1")
        return score_video_items(scorer, items, frames, desc)
    if hasattr(scorer, "score_videos"):
        raise ManifestError(f"{scorer.metric} scores videos (consecutive frames), and these manifest entries are "
                            "images: drop it from --metrics")
    scores: list[float] = []
    with tqdm(total=len(items), desc=desc or scorer.name, unit="img") as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            out = scorer.score([it.prompt for it in batch], [load_image(it) for it in batch])
            if len(out) != len(batch):
                raise RuntimeError(f"scorer {scorer.name} returned {len(out)} scores for {len(batch)} images")
            scores.extend(float(s) for s in out)
            bar.update(len(batch))
    return scores


@dataclass
class Pairing:
    """Result of `pair_items`: aligned A/B items and what was left out."""

    a: list[Item]
    b: list[Item]
    by: str  # "prompt" or "index"
    dropped: int = 0  # surplus duplicates of common prompts (official "dropped")
    unmatched_a: int = 0  # items of A whose prompt does not occur in B
    unmatched_b: int = 0
    messages: list[str] = field(default_factory=list)


def pair_items(items_a: Sequence[Item], items_b: Sequence[Item], name_a: str = "A", name_b: str = "B") -> Pairing:
    """Official pairing: group by exact prompt, walk the sorted common prompts, pair the k-th occurrence in A with
    the k-th in B; surplus occurrences are dropped. With no common prompt, pair by list index (equal lengths only)."""
    if not items_a or not items_b:
        empty = name_a if not items_a else name_b
        raise ManifestError(f"no usable entries in {empty}: nothing to compare")
    group_a, group_b = defaultdict(list), defaultdict(list)
    for it in items_a:
        group_a[it.prompt].append(it)
    for it in items_b:
        group_b[it.prompt].append(it)
    common = sorted(group_a.keys() & group_b.keys())

    if not common:
        if len(items_a) != len(items_b):
            raise ManifestError(
                f"{name_a} and {name_b} share no prompt and have different lengths ({len(items_a)} vs "
                f"{len(items_b)}): they are not results for the same prompt file, refusing to pair them"
            )
        msg = "[WARN] No exact prompt matches. Falling back to index-wise pairing."
        return Pairing(list(items_a), list(items_b), "index", messages=[msg])

    pairs = Pairing([], [], "prompt")
    for prompt in common:
        la, lb = group_a[prompt], group_b[prompt]
        k = min(len(la), len(lb))
        pairs.a += la[:k]
        pairs.b += lb[:k]
        pairs.dropped += abs(len(la) - len(lb))
    pairs.unmatched_a = sum(len(v) for p, v in group_a.items() if p not in group_b)
    pairs.unmatched_b = sum(len(v) for p, v in group_b.items() if p not in group_a)
    if pairs.dropped:
        pairs.messages.append(
            f"[INFO] Aligned on {len(pairs.a)} pairs; dropped {pairs.dropped} surplus items of duplicated prompts."
        )
    if pairs.unmatched_a or pairs.unmatched_b:
        pairs.messages.append(
            f"[WARN] Prompts present in only one manifest were skipped: {pairs.unmatched_a} items of {name_a}, "
            f"{pairs.unmatched_b} items of {name_b}."
        )
    return pairs
