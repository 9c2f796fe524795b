"""Preference pairs made by the model itself (on-policy pairs, AI feedback): a prompt file -> K candidates per prompt
-> scores -> pairs in train.py's schema, with no human label.

    python -m eval.make_pairs --prompts prompts/papv2.json --output_dir pairs/sd15-r1 \\
        --pretrain_path stable-diffusion-v1-5/stable-diffusion-v1-5 [--unet_path output/sd15-dpo | --lora_path A] \\
        --num_candidates 4 --scorers pickscore hpsv2=0.5 --pair_rule best-worst
    accelerate launch -m eval.make_pairs ...            # several GPUs: the prompts are sharded across ranks
    python train.py --dataset_name pairs/sd15-r1 ...    # the output folder is a dataset as it is

Steps, each resumable after a kill (run the same command again):
  1. generate: candidate k of prompt i is sampled with eval.generate's own loading and sampler (every family it
     supports, its defaults and flags) from the initial noise of seed `--seed + i*K + k`, i.e. the image
     `python -m eval.generate --seed <that seed>` gives for that prompt. Written as
     `<output_dir>/candidates/<i>/<k>.png` (prompt in EXIF, atomic; videos: `<k>.mp4`, below), then
     `candidates.json` (prompt, seeds).
  2. score: each metric of the mix scores every candidate, one scorer in memory at a time (`scores.json` per prompt;
     a metric is scored again only when its scorer changes).
  3. pair (rank 0, after every rank is done): each metric is z-scored over all candidates of the run (population
     standard deviation; a metric that is constant scores 0), the z-scores are mixed with the weights of --scorers,
     and each prompt's candidates are paired: `best-worst` (the highest against the lowest mixed score) or `margin`
     (every two candidates whose gap exceeds --margin). A gap of at most --margin (or a tie, |gap| <= 1e-9) drops
     the pair. In a pair the lower candidate index is image 0, and label_0 is 1 when it scored higher, else 0.
     --drop_gap_percentile P drops the P% of the kept pairs with the smallest gaps and --gap_weight_power ALPHA
     weighs each pair gap^ALPHA / mean (VideoDPO's filter and reweighting; train.py --pair_weight_column pair_weight).
     Written atomically as `<output_dir>/data/train-0000s-of-0000N.parquet` (and, with --webdataset,
     `<output_dir>/webdataset/train-0000s.tar`), then `summary.json` and `gaps.png`. A rebuild owns the folder: an
     earlier build's output that this one does not write (webdataset/ without --webdataset) is removed, and named.

--real_winner (SPIN-Diffusion's real-versus-generated pairs): every entry of the prompt file names its real image
("image": a path relative to the file); each candidate of a prompt is paired against it, the real image as image 0
and winner. No scorer is loaded (step 2 is skipped), --num_candidates may be 1.

Every pair row holds train.py's columns (jpg_0, jpg_1: encoded images; label_0, label_1; caption) and its provenance:
model, scorer_mix, pair_rule, seed_0/seed_1, score_0/score_1 (mixed), <metric>_0/<metric>_1 (raw scores),
prompt_index, candidate_0/candidate_1, score_gap (|score_0 - score_1|), pair_weight; with --real_winner also
real_image (candidate_0 and seed_0 are -1: the real image). Metrics: the five of eval.scorers (pickscore, hpsv2,
aesthetics, clip, imagereward; weights from --scorer_config / --<metric>_path as in eval.score) and `colour`, the toy
metric of the demo (tiny.colour_score: mean red minus mean blue). See docs/onpolicy.md.

Video families (wan, cogvideox, wan22, wan22_a14b, wan_i2v; eval.generate's --num_frames, --fps, --negative_prompt,
--guidance_scale_2, --boundary_ratio, --conditioning_image and their defaults): candidate k of prompt i is
`<output_dir>/candidates/<i>/<k>.mp4` (eval.video.write_mp4: atomic, the prompt in the container's metadata), the
video `python -m eval.generate --seed <that seed>` gives. Scored as eval.score scores videos: an image metric is the
mean over --frames evenly sampled frames (default 8), and `temporal` (consecutive frames' CLIP consistency; videos
only) is allowed in the mix. Rows hold train.py's video columns mp4_0 / mp4_1 (the mp4 files' bytes; WebDataset
<key>.mp4_0.mp4 / .mp4_1.mp4) and the same provenance; --real_winner reads each entry's real "video" (real_video in
the provenance). Image-to-video (an "image" per entry or --conditioning_image, as for eval.generate) adds the
conditioning image's bytes as column conditioning_image: train.py --conditioning_image_column conditioning_image.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not __package__:  # run as a file: the repository root holds eval/, families/ and tiny/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distributed import process_state  # noqa: E402
from eval import generate as gen  # noqa: E402
from eval.scorers import ALIASES, METRICS, VIDEO_METRICS, Scorer  # noqa: E402
from eval.manifest import DEFAULT_FRAMES  # noqa: E402
from eval.score import SCORER_RANGES  # noqa: E402
from flag_ranges import check_ranges  # noqa: E402

TOY_METRICS = ("colour",)
PAIR_RULES = ("best-worst", "margin")
REAL_RULE = "real-vs-generated"  # --real_winner: the prompt file's real image against each candidate, no scorer
TIE_EPS = 1e-9  # |mixed-score gap| at or below this is a tie (float rounding of equal scores)
RUN_RECORD = "run.json"
CANDIDATES = "candidates"
CANDIDATE_RECORD = "candidates.json"
SCORES = "scores.json"
DATA = "data"
WEBDATASET = "webdataset"
GAPS_PNG = "gaps.png"
CONDITIONING_COLUMN = "conditioning_image"  # image-to-video pairs: the image both candidates were made from


class MakePairsError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ------------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.make_pairs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", "--test_json", dest="prompts", required=True,
                   help="prompt file in eval.generate's format (a JSON list of {prompt, ...}: prompts/*.json)")
    p.add_argument("--output_dir", required=True,
                   help="the pairs dataset folder (data/train-*.parquet) and its candidates, record and summary")
    p.add_argument("--num_candidates", "-K", type=int, default=4, help="candidates per prompt, >= 2 (default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="candidate k of prompt i starts from the noise of seed + i*K + k (eval.generate's noise)")
    p.add_argument("--max_prompts", type=int, default=None,
                   help="only the first N prompts; a later run without it adds the others (the pairs are rebuilt)")
    gen.add_model_args(p)
    gen.add_sampling_args(p)
    gen.add_video_args(p)  # eval.generate's video flags (--num_frames, --fps, ...): video families only
    p.add_argument("--scorers", nargs="+", default=["pickscore"], metavar="METRIC[=WEIGHT]",
                   help=f"the scorer or weighted mix of scorers, e.g. `pickscore hpsv2=0.5` (weight 1 if omitted); "
                        f"metrics: {', '.join(METRICS + TOY_METRICS)}, and for videos {', '.join(VIDEO_METRICS)} "
                        "(consecutive frames' consistency). Each metric is z-scored over all candidates before mixing")
    p.add_argument("--scorer_config", default=None,
                   help="JSON file or inline JSON: metric -> eval.scorers.load_scorer kwargs (as eval.score)")
    for name in METRICS + VIDEO_METRICS:
        p.add_argument(f"--{name}_path", default=None, help=f"model location for {name} (default: official"
                       + ("; temporal: --clip_path's model)" if name == "temporal" else ")"))
    p.add_argument("--score_batch_size", type=int, default=32, help="images per scorer forward pass")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help=f"videos: frames sampled evenly per video for the image metrics, whose scores are averaged, as "
                        f"eval.score does (default {DEFAULT_FRAMES}); temporal uses every frame")
    p.add_argument("--score_device", default=None, help="scorer device (default: this rank's generation device)")
    p.add_argument("--pair_rule", choices=PAIR_RULES, default="best-worst",
                   help="best-worst: one pair per prompt, highest vs lowest mixed score; margin: every two "
                        "candidates whose gap exceeds --margin")
    p.add_argument("--margin", type=float, default=0.0,
                   help="drop pairs whose mixed-score gap (in z units) is at most this (default 0: ties only)")
    p.add_argument("--drop_gap_percentile", type=float, default=0.0, metavar="P",
                   help="drop the P%% of the kept pairs with the smallest score gaps (VideoDPO's filter; default 0)")
    p.add_argument("--gap_weight_power", type=float, default=0.0, metavar="ALPHA",
                   help="pair_weight column = gap^ALPHA / mean over the kept pairs of gap^ALPHA (mean 1); 0 (default): "
                        "every weight 1, 1: proportional to the gap (VideoDPO's reweighting). train.py uses it with "
                        "--pair_weight_column pair_weight")
    p.add_argument("--real_winner", action="store_true",
                   help="real-versus-generated pairs (SPIN-Diffusion): each prompt's real image (the prompt file's "
                        "\"image\", a path relative to the file; video families: its \"video\") is the winner against "
                        "each of its candidates; no "
                        "scorer is loaded and --scorers, --pair_rule, --margin are unused. K may be 1")
    p.add_argument("--shard_size", type=int, default=1000, help="pairs per parquet / WebDataset shard")
    p.add_argument("--webdataset", action="store_true",
                   help="also write WebDataset shards <output_dir>/webdataset/train-*.tar (train.py's layout)")
    p.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg",
                   help="encoding of jpg_0/jpg_1: jpeg (Pick-a-Pic's, --jpeg_quality) or png (lossless); video pairs "
                        "hold the candidates' mp4 files as they are")
    p.add_argument("--jpeg_quality", type=int, default=95)
    args = p.parse_args(argv)
    check_ranges(p, args, MAKE_PAIRS_RANGES)
    return args


# Numeric flags and their ranges, checked at parse time (flag_ranges.py; tests/test_flag_ranges.py).
MAKE_PAIRS_RANGES = {**gen.SAMPLING_RANGES, **gen.VIDEO_RANGES, "frames": SCORER_RANGES["frames"], "num_candidates": ">= 1",
                     "seed": ">= 0", "max_prompts": ">= 1", "score_batch_size": ">= 1", "margin": ">= 0", "shard_size": ">= 1", "jpeg_quality": "[1, 100]",
                     "drop_gap_percentile": "[0, 100)", "gap_weight_power": "finite"}  # K >= 2 unless --real_winner


def parse_mix(specs: list[str], video: bool = False) -> dict[str, float]:
    """`["pickscore", "hpsv2=0.5"]` -> {"pickscore": 1.0, "hpsv2": 0.5}; aliases (hps, aes) resolved; `temporal`
    (consecutive frames' consistency) only for videos."""
    mix: dict[str, float] = {}
    known = METRICS + TOY_METRICS + (VIDEO_METRICS if video else ())
    for spec in specs:
        name, _, weight = spec.partition("=")
        name = ALIASES.get(name.strip().lower(), name.strip().lower())
        if name in VIDEO_METRICS and not video:
            raise MakePairsError(f"--scorers {spec}: {name} scores videos (consecutive frames), and this model makes "
                                 f"images: drop it")
        if name not in known:
            raise MakePairsError(f"--scorers {spec}: unknown metric {name!r}; choose from {', '.join(known)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise MakePairsError(f"--scorers {spec}: the weight {weight!r} is not a number") from None
        if not math.isfinite(value) or value == 0:
            raise MakePairsError(f"--scorers {spec}: the weight must be a finite non-zero number")
        if name in mix:
            raise MakePairsError(f"--scorers names {name} twice")
        mix[name] = value
    if not mix:
        raise MakePairsError("--scorers needs at least one metric")
    return mix


def mix_label(mix: dict[str, float]) -> str:
    return ",".join(f"{name}={weight:g}" for name, weight in mix.items())


# ------------------------------------------------------------------------------------------------ score arithmetic


def zscores(values) -> tuple[list[float], float, float]:
    """(z-scores, mean, population standard deviation) of a list of scores; all 0 when the scores are constant."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std <= 1e-12 * max(1.0, abs(mean)):
        return [0.0] * len(values), mean, std
    return [(v - mean) / std for v in values], mean, std


def mix_scores(raw: dict[str, list[float]], mix: dict[str, float]) -> tuple[list[float], dict]:
    """Mixed score of every candidate: sum over metrics of weight x z-score, each metric z-scored over all the
    candidates given (`raw`: metric -> one score per candidate, same order). Returns (mixed, {metric: {mean, std,
    weight}})."""
    lengths = {len(raw[name]) for name in mix}
    if len(lengths) != 1:
        raise ValueError(f"every metric needs one score per candidate; got lengths {sorted(lengths)}")
    n = lengths.pop()
    mixed, stats = [0.0] * n, {}
    for name, weight in mix.items():
        z, mean, std = zscores(raw[name])
        stats[name] = {"mean": mean, "std": std, "weight": weight}
        mixed = [m + weight * v for m, v in zip(mixed, z)]
    return mixed, stats


@dataclass(frozen=True)
class Decision:
    """One considered pair of a prompt's candidates a < b: kept (label_0 1.0 if a scored higher, 0.0 if b did),
    or dropped as a tie or for a gap within the margin."""

    a: int
    b: int
    gap: float  # score[a] - score[b]
    kept: bool
    reason: str  # "pair", "tie" or "margin"

    @property
    def label_0(self) -> float:
        return 1.0 if self.gap > 0 else 0.0


def decide(a: int, b: int, gap: float, margin: float) -> Decision:
    if abs(gap) <= TIE_EPS:
        return Decision(a, b, gap, False, "tie")
    if abs(gap) <= margin:
        return Decision(a, b, gap, False, "margin")
    return Decision(a, b, gap, True, "pair")


def pair_candidates(scores: list[float], rule: str, margin: float = 0.0) -> list[Decision]:
    """The pairs considered among one prompt's candidates (their mixed scores), kept or dropped.

    best-worst: the first highest against the first lowest candidate (one decision); margin: every a < b."""
    if rule == "best-worst":
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))
        worst = min(range(len(scores)), key=lambda k: (scores[k], k))
        if best == worst:  # every candidate has the same score
            worst = next(k for k in range(len(scores)) if k != best)
        a, b = sorted((best, worst))
        return [decide(a, b, scores[a] - scores[b], margin)]
    if rule == "margin":
        return [decide(a, b, scores[a] - scores[b], margin)
                for a in range(len(scores)) for b in range(a + 1, len(scores))]
    raise ValueError(f"unknown pair rule {rule!r}; choose from {', '.join(PAIR_RULES)}")


def filter_and_weight_by_gap(gaps: list[float], drop_percentile: float = 0.0, power: float = 0.0):
    """VideoDPO's filter and reweighting of pairs by their score gap (|gap| of each kept pair, in order).

    The floor(n * P / 100) pairs with the smallest gaps are dropped (the first of equal gaps first), as VideoDPO's
    select_pairs drops its lowest filter_ratio; each remaining pair weighs gap^power / mean(gap^power) over the
    remaining pairs, so the weights average 1 and the loss keeps its scale (power 0: every weight exactly 1).
    Returns (keep, weight), one entry per pair (weight 0.0 where dropped)."""
    n = len(gaps)
    n_drop = math.floor(n * drop_percentile / 100 + 1e-9)  # 1e-9: 10 pairs x 30% is 3, not 2.9999
    dropped = set(sorted(range(n), key=lambda j: (gaps[j], j))[:n_drop])
    keep = [j not in dropped for j in range(n)]
    powered = [gaps[j] ** power for j in range(n) if keep[j]]
    mean = sum(powered) / len(powered) if powered else 1.0
    if power != 0 and not mean > 0:
        raise MakePairsError("--gap_weight_power: every kept pair has a zero score gap, so no weight can be formed")
    weights = [(gaps[j] ** power / mean if power != 0 else 1.0) if keep[j] else 0.0 for j in range(n)]
    return keep, weights


# ------------------------------------------------------------------------------------------------------- scorers


class ColourScorer(Scorer):
    """The demo's toy metric tiny.colour_score (mean red minus mean blue, in [-1, 1]) as an eval.scorers.Scorer."""

    name, metric = "colour", "Colour"

    def _score_batch(self, prompts, images):
        from tiny import colour_score

        return torch.tensor([colour_score(image) for image in images])


def scorer_settings(args: argparse.Namespace, mix: dict[str, float], device: str) -> dict[str, dict]:
    """load_scorer kwargs per metric of the mix, as eval.score builds them (--scorer_config, --<metric>_path)."""
    from eval.manifest import ManifestError
    from eval.score import scorer_kwargs

    official = [name for name in mix if name in METRICS + VIDEO_METRICS]
    ns = argparse.Namespace(metrics=official, device=device, batch_size=args.score_batch_size,
                            scorer_config=args.scorer_config,
                            **{f"{name}_path": getattr(args, f"{name}_path", None) for name in METRICS + VIDEO_METRICS})
    try:
        kwargs = scorer_kwargs(ns)
    except ManifestError as e:
        raise MakePairsError(str(e)) from None
    for name in mix:
        kwargs.setdefault(name, {"device": device, "batch_size": args.score_batch_size})
    return {name: kwargs[name] for name in mix}


def scorer_id(name: str, kwargs: dict) -> str:
    """What decides a metric's scores (not the device or batch size): a changed scorer is scored again on resume."""
    if name in TOY_METRICS:
        return f"{name}: tiny.colour_score"
    where = {k: str(v) for k, v in sorted(kwargs.items()) if k not in ("device", "batch_size")}
    return f"{name}: {json.dumps(where, sort_keys=True)}"


def load_pair_scorer(name: str, kwargs: dict) -> Scorer:
    if name == "colour":
        return ColourScorer(device=kwargs["device"], batch_size=kwargs["batch_size"])
    from eval.scorers import load_scorer

    return load_scorer(name, **kwargs)


# ------------------------------------------------------------------------------------------------------- media


class ImageMedia:
    """How an image candidate is stored, scored and encoded into a pair (VideoMedia: the same for videos)."""

    kind = "image"
    columns = ("jpg_0", "jpg_1")
    real_key = "image"  # --real_winner: the prompt-file entry's key naming the real sample
    conditioning = None  # image-to-video only

    def __init__(self, image_format: str = "jpeg", quality: int = 95):
        self.format, self.quality = image_format, quality
        self.extension = "jpg" if image_format == "jpeg" else "png"

    @staticmethod
    def file_name(k: int) -> str:
        return f"{k}.png"

    @staticmethod
    def save(array: torch.Tensor, prompt: str, path: Path) -> None:
        gen.save_png(array, prompt, path)

    @staticmethod
    def is_done(path: Path, prompt: str) -> bool:
        return gen.prompt_matches(gen.stored_prompt(path), prompt)

    def encode(self, path: Path) -> bytes:
        """The bytes that go into jpg_0/jpg_1: the PNG file itself (lossless) or a JPEG of it (a --real_winner image
        in another format is converted to the chosen one)."""
        if self.format == "png" and path.suffix.lower() == ".png":
            return path.read_bytes()
        from PIL import Image

        buffer = io.BytesIO()
        with Image.open(path) as image:
            if self.format == "png":
                image.convert("RGB").save(buffer, format="PNG")
            else:
                image.convert("RGB").save(buffer, format="JPEG", quality=self.quality)
        return buffer.getvalue()

    @staticmethod
    def score(scorer: Scorer, prompts: list[str], paths: list[Path]) -> list[float]:
        return scorer.score(prompts, paths)

    @staticmethod
    def extra_fields(row: dict) -> dict:
        return {}

    @staticmethod
    def scoring(name: str) -> str:
        return ""


class VideoMedia:
    """A video candidate in train.py's video schema (data/video.py): saved as <k>.mp4 by eval.video.write_mp4 (atomic,
    the prompt in the container's metadata, as eval.generate writes its videos), put into columns mp4_0/mp4_1 as the
    file's bytes (WebDataset fields <key>.mp4_0.mp4 / .mp4_1.mp4), scored as eval.score scores videos."""

    kind = "video"
    columns = ("mp4_0", "mp4_1")
    extension = format = "mp4"
    real_key = "video"

    def __init__(self, fps: float, frames: int):
        self.fps, self.frames = fps, frames
        self.conditioning: list[Path] | None = None  # image-to-video: each prompt's conditioning image

    def extra_fields(self, row: dict) -> dict[str, tuple[str, bytes]]:
        """Image-to-video: the prompt's conditioning image (its file's bytes) in column CONDITIONING_COLUMN, which
        train.py reads with --conditioning_image_column conditioning_image: {column: (extension, bytes)}."""
        if self.conditioning is None:
            return {}
        path = self.conditioning[row["prompt_index"]]
        return {CONDITIONING_COLUMN: (path.suffix.lstrip(".").lower() or "png", path.read_bytes())}

    @staticmethod
    def file_name(k: int) -> str:
        return f"{k}.mp4"

    def save(self, frames: torch.Tensor, prompt: str, path: Path) -> None:
        from eval.video import write_mp4

        write_mp4(frames, path, self.fps, prompt)

    @staticmethod
    def is_done(path: Path, prompt: str) -> bool:
        from eval.video import stored_video_prompt

        return gen.prompt_matches(stored_video_prompt(path), prompt)

    @staticmethod
    def encode(path: Path) -> bytes:
        """The mp4 itself (a --real_winner video too, in its own container: train.py decodes any PyAV reads)."""
        return path.read_bytes()

    def scoring(self, name: str) -> str:
        """How a metric reads a video, part of its scorer id: another --frames scores the image metrics again."""
        return "; every frame" if name in VIDEO_METRICS else f"; mean of {self.frames} evenly sampled frames"

    def score(self, scorer: Scorer, prompts: list[str], paths: list[Path]) -> list[float]:
        """eval.score's video scoring (eval.manifest.score_video_items): an image metric averaged over --frames
        evenly sampled frames, temporal over every frame."""
        from eval.manifest import Item, ManifestError, score_video_items

        items = [Item(index=j, prompt=prompt, image=str(path), path=Path(path))
                 for j, (prompt, path) in enumerate(zip(prompts, paths))]
        try:
            return score_video_items(scorer, items, self.frames, desc=scorer.name)
        except ManifestError as e:
            raise MakePairsError(f"{e}: delete it and run the same command again to make it afresh") from None


def media_of(args: argparse.Namespace, g: argparse.Namespace) -> ImageMedia | VideoMedia:
    """The candidates' media: videos for a video family (eval.generate's resolved --fps), else images."""
    if g.model_family in gen.VIDEO_FAMILIES:
        return VideoMedia(g.fps, args.frames)
    return ImageMedia(args.image_format, args.jpeg_quality)


# ---------------------------------------------------------------------------------------------------- run record


def write_json(path: Path, data) -> None:
    gen.write_json(path, data)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def candidate_seed(seed: int, index: int, k: int, num_candidates: int) -> int:
    return seed + index * num_candidates + k


def generation_args(args: argparse.Namespace) -> argparse.Namespace:
    """eval.generate's resolved namespace for these model and sampling flags (family, defaults, weights)."""
    keys = ("unet_path", "pretrain_path", "sdxl", "model_family", "vae_path", "lora_path", "height", "width", "steps",
            "cfg", "guidance_formula", "batch_size", "dtype", "device", "num_frames", "fps", "negative_prompt",
            "guidance_scale_2", "boundary_ratio", "conditioning_image")
    ns = argparse.Namespace(**{k: getattr(args, k) for k in keys}, test_json=args.prompts,
                            output_path=args.output_dir, seed=args.seed, max_prompts=args.max_prompts, zip=False,
                            print_weights=False)
    return gen.resolve_args(ns)


def check_same_run(out: Path, fingerprint: dict) -> None:
    """Refuse to resume a folder whose candidates another model, prompt file, sampling setting or seed made."""
    record = read_json(out / RUN_RECORD)
    if not isinstance(record, dict) or not (out / CANDIDATES).is_dir():
        return
    differences = gen.fingerprint_differences(record.get("fingerprint") or {}, fingerprint)
    if differences:
        raise MakePairsError(
            f"{out} holds the candidates of another run:\n  " + "\n  ".join(differences)
            + f"\nWrite this run to another --output_dir, or delete {out / CANDIDATES} to make it afresh.")


# ------------------------------------------------------------------------------------------------------------ main


def make_pairs(args: argparse.Namespace) -> dict:
    """Generate, score and pair (see the module docstring). Returns the summary (rank 0) or {"rank": r} elsewhere."""
    started = time.time()
    g = generation_args(args)
    video = g.model_family in gen.VIDEO_FAMILIES
    mix = {} if args.real_winner else parse_mix(args.scorers, video)  # real-vs-generated pairs need no scorer
    if args.num_candidates < (1 if args.real_winner else 2):
        raise MakePairsError("--num_candidates must be at least 2 (a pair needs two candidates; 1 with --real_winner)")
    if args.margin < 0 or args.shard_size < 1 or not 1 <= args.jpeg_quality <= 100:
        raise MakePairsError("--margin must be >= 0, --shard_size >= 1 and --jpeg_quality in 1..100")
    if args.score_batch_size < 1:
        raise MakePairsError("--score_batch_size must be >= 1")
    if not video and args.frames != DEFAULT_FRAMES:
        raise MakePairsError(f"--frames samples the frames of videos, and --model_family {g.model_family} makes images")
    if video and (args.image_format != "jpeg" or args.jpeg_quality != 95):
        raise MakePairsError("--image_format / --jpeg_quality encode images; video pairs hold the candidates' mp4 "
                             "files as they are: drop them")
    media = media_of(args, g)
    # several processes and no GPU (accelerate launch --multi_gpu on a CPU machine): gloo on the CPU, as train.py
    state = process_state()
    device = torch.device(state.device if g.device == "auto" else g.device)
    dtype = gen.DTYPES[g.dtype] if g.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    all_items = gen.load_prompts(args.prompts)
    n = len(all_items) if args.max_prompts is None else min(args.max_prompts, len(all_items))
    if n < 1:
        raise MakePairsError(f"{args.prompts} holds no prompt")
    items, K = all_items[:n], args.num_candidates
    if getattr(g, "image_to_video", False):  # the conditioning images go into the pairs (CONDITIONING_COLUMN)
        media.conditioning = [Path(path) for path in gen.image_paths(g, items)]
    real_images = real_image_paths(items, args.prompts, media.real_key) if args.real_winner else None
    out = Path(args.output_dir)
    fingerprint = gen.run_fingerprint(g, all_items, dtype)
    fingerprint["candidates"] = {"num_candidates": K, "seed_rule": "seed + index * num_candidates + k",
                                 "media": media.kind}
    check_same_run(out, fingerprint)
    model = g.weights.describe(g.pretrain_path)
    record = {"model": model, "family": g.model_family, "fingerprint": fingerprint, "prompts": args.prompts,
              "n_prompts": n, "total_prompts": len(all_items), "complete": False,
              "paths": {"unet_path": g.unet_path, "lora_path": g.weights.lora, "pretrain_path": g.pretrain_path,
                        "vae_path": g.vae_path}}
    if state.is_main_process:
        (out / CANDIDATES).mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_RECORD, record)
        print(f"make_pairs: {n} prompts x {K} candidates from {model}; "
              + (f"{REAL_RULE} pairs" if args.real_winner else f"scorers {mix_label(mix)}; {args.pair_rule}"))
    state.wait_for_everyone()
    mine = list(range(state.process_index, n, state.num_processes))
    generate_candidates(g, items, mine, K, args.seed, out, media, device, dtype, state.is_main_process)
    if not args.real_winner:
        score_device = args.score_device or str(device)
        score_candidates(items, mine, K, out, mix, scorer_settings(args, mix, score_device), media,
                         state.is_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {"rank": state.process_index}
    if args.real_winner:
        summary = write_real_pairs(args, items, real_images, K, out, media, model)
    else:
        summary = write_pairs(args, items, K, out, mix, media, model)
    summary["seconds"] = round(time.time() - started, 1)
    write_json(out / "summary.json", summary)
    write_json(out / RUN_RECORD, {**record, "complete": n == len(all_items), "summary": "summary.json"})
    print(f"make_pairs: {summary['pairs']} pairs from {n} prompts ({summary['ties_dropped']} ties, "
          f"{summary['below_margin']} gaps within the margin and {summary['below_gap_percentile']} below the gap "
          f"percentile dropped) in {out / DATA}; summary {out / 'summary.json'}")
    if n < len(all_items):
        print(f"Partial run: {n} of {len(all_items)} prompts (--max_prompts). Run again without it to add the others.")
    return summary


def real_image_paths(items: list[dict], prompts_file: str, key: str = "image") -> list[Path]:
    """--real_winner: each prompt's real sample, the entry's "image" (video families: "video"; a path, relative to
    the prompt file's folder)."""
    paths = []
    for i, item in enumerate(items):
        image = item.get(key)
        if not isinstance(image, str) or not image:
            raise MakePairsError(f"--real_winner: entry {i} of {prompts_file} has no \"{key}\" (the real {key}'s path, "
                                 f"relative to the prompt file): add one to every entry, or drop --real_winner")
        path = Path(prompts_file).resolve().parent / image
        if not path.is_file():
            raise MakePairsError(f"--real_winner: entry {i} of {prompts_file} names the {key} {path}, which does "
                                 f"not exist")
        paths.append(path)
    return paths


def prompt_dir(out: Path, index: int) -> Path:
    return out / CANDIDATES / f"{index:06d}"


def generate_candidates(g, items, mine, K, seed, out: Path, media: ImageMedia | VideoMedia, device, dtype, is_main: bool) -> None:
    """Step 1: every missing candidate image of this rank's prompts, batched across prompts; each prompt's
    candidates.json once its K images exist."""
    from tqdm.auto import tqdm

    jobs, remaining = [], {}
    for i in mine:
        folder = prompt_dir(out, i)
        missing = [k for k in range(K) if not media.is_done(folder / media.file_name(k), items[i]["prompt"])]
        jobs += [(i, k) for k in missing]
        remaining[i] = len(missing)

    def finish(i: int) -> None:
        seeds = [candidate_seed(seed, i, k, K) for k in range(K)]
        write_json(prompt_dir(out, i) / CANDIDATE_RECORD,
                   {"index": i, "prompt": items[i]["prompt"], "seeds": seeds,
                    "files": [media.file_name(k) for k in range(K)]})

    for i in mine:
        if remaining[i] == 0 and read_json(prompt_dir(out, i) / CANDIDATE_RECORD) is None:
            finish(i)
    if is_main:
        print(f"make_pairs: {len(mine) * K - len(jobs)} of {len(mine) * K} candidates of rank 0 already made")
    if not jobs:
        return
    models, uncond = gen.load_sampler(g, device, dtype)
    progress = tqdm(total=len(jobs), desc="candidates", disable=not is_main)
    for start in range(0, len(jobs), g.batch_size):
        batch = jobs[start : start + g.batch_size]
        conditioning = gen.conditioning_images(g, [items[i] for i, _ in batch])  # image-to-video, else None
        images = gen.sample(models, [items[i]["prompt"] for i, _ in batch], uncond, g,
                            seeds=[candidate_seed(seed, i, k, K) for i, k in batch], images=conditioning)
        for (i, k), image in zip(batch, images):
            folder = prompt_dir(out, i)
            folder.mkdir(parents=True, exist_ok=True)
            media.save(image, items[i]["prompt"], folder / media.file_name(k))
            remaining[i] -= 1
            if remaining[i] == 0:
                finish(i)
        progress.update(len(batch))
    progress.close()
    del models, uncond
    free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_candidates(items, mine, K, out: Path, mix: dict, settings: dict, media: ImageMedia | VideoMedia, is_main: bool) -> None:
    """Step 2: each metric of the mix over this rank's candidates, one scorer loaded at a time; a prompt's
    scores.json gains the metric (with the scorer that made it) after each chunk."""
    from tqdm.auto import tqdm

    for name in mix:
        sid = scorer_id(name, settings[name]) + media.scoring(name)
        todo = [i for i in mine if ((read_json(prompt_dir(out, i) / SCORES) or {}).get(name) or {}).get("scorer") != sid]
        if not todo:
            continue
        scorer = load_pair_scorer(name, settings[name])
        chunk = max(1, (4 * settings[name]["batch_size"]) // K)  # prompts per scoring call
        progress = tqdm(total=len(todo) * K, desc=f"scoring {name}", disable=not is_main)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            prompts = [items[i]["prompt"] for i in part for _ in range(K)]
            paths = [prompt_dir(out, i) / media.file_name(k) for i in part for k in range(K)]
            scores = media.score(scorer, prompts, paths)
            for j, i in enumerate(part):
                path = prompt_dir(out, i) / SCORES
                record = read_json(path) or {}
                record[name] = {"scorer": sid, "scores": scores[j * K : (j + 1) * K]}
                write_json(path, record)
            progress.update(len(part) * K)
        progress.close()
        del scorer
        free_memory()


def read_candidates(items, K, out: Path, mix: dict) -> list[dict]:
    """Every prompt's candidates.json and scores.json, checked complete (rank 0, after the barrier)."""
    records, missing = [], []
    for i, item in enumerate(items):
        folder = prompt_dir(out, i)
        candidates, scores = read_json(folder / CANDIDATE_RECORD), read_json(folder / SCORES) or {}
        if (not candidates or candidates.get("prompt") != item["prompt"] or len(candidates.get("seeds", [])) != K
                or any(len((scores.get(name) or {}).get("scores") or []) != K for name in mix)):
            missing.append(i)
            continue
        records.append({"index": i, "prompt": item["prompt"], "seeds": candidates["seeds"],
                        "files": [folder / f for f in candidates["files"]],
                        "raw": {name: scores[name]["scores"] for name in mix}})
    if missing:
        raise MakePairsError(f"{len(missing)} prompts have no complete candidates or scores after generation (e.g. "
                             f"{prompt_dir(out, missing[0])}); run the same command again to resume")
    return records


def write_pairs(args, items, K, out: Path, mix: dict, media: ImageMedia | VideoMedia, model: str) -> dict:
    """Step 3: z-score and mix over all candidates, pair each prompt, write the shards atomically, summarise."""
    records = read_candidates(items, K, out, mix)
    raw = {name: [s for r in records for s in r["raw"][name]] for name in mix}
    mixed, stats = mix_scores(raw, mix)
    label = mix_label(mix)
    decisions, pairs = [], []
    for j, r in enumerate(records):
        scores = mixed[j * K : (j + 1) * K]
        for d in pair_candidates(scores, args.pair_rule, args.margin):
            decisions.append(d)
            if not d.kept:
                continue
            a, b = d.a, d.b
            row = {"caption": r["prompt"], "label_0": d.label_0, "label_1": 1.0 - d.label_0,
                   "model": model, "scorer_mix": label, "pair_rule": args.pair_rule,
                   "seed_0": r["seeds"][a], "seed_1": r["seeds"][b], "score_0": scores[a], "score_1": scores[b],
                   "prompt_index": r["index"], "candidate_0": a, "candidate_1": b}
            for name in mix:
                row[f"{name}_0"], row[f"{name}_1"] = r["raw"][name][a], r["raw"][name][b]
            pairs.append((row, r["files"][a], r["files"][b]))
    # VideoDPO's filter and reweighting by the gap; the gap and the weight go into the pair's provenance
    keep, weights = filter_and_weight_by_gap([abs(d.gap) for d in decisions if d.kept], args.drop_gap_percentile,
                                             args.gap_weight_power)
    kept_decisions = iter([j for j, d in enumerate(decisions) if d.kept])
    for (row, _, _), kept_pair, weight in zip(pairs, keep, weights):
        j = next(kept_decisions)
        row["score_gap"], row["pair_weight"] = abs(decisions[j].gap), weight
        if not kept_pair:
            decisions[j] = Decision(decisions[j].a, decisions[j].b, decisions[j].gap, False, "gap_percentile")
    pairs = [pair for pair, kept_pair in zip(pairs, keep) if kept_pair]
    removed = remove_stale_outputs(out, {DATA, GAPS_PNG} | ({WEBDATASET} if args.webdataset else set()))
    shards = write_parquet_shards(pairs, out, media, args.shard_size)
    wds = write_webdataset_shards(pairs, out, media, args.shard_size) if args.webdataset else []
    kept = [abs(d.gap) for d in decisions if d.kept]
    plot_gaps(decisions, args.margin, args.pair_rule, out / GAPS_PNG)
    with_pair = len({row["prompt_index"] for row, _, _ in pairs})
    return {
        "pairs": len(pairs), "ties_dropped": sum(d.reason == "tie" for d in decisions),
        "below_margin": sum(d.reason == "margin" for d in decisions), "pairs_considered": len(decisions),
        "below_gap_percentile": sum(d.reason == "gap_percentile" for d in decisions),
        "drop_gap_percentile": args.drop_gap_percentile, "gap_weight_power": args.gap_weight_power,
        "stale_outputs_removed": removed,
        "prompts": len(records), "prompts_without_pair": len(records) - with_pair, "num_candidates": K,
        "pair_rule": args.pair_rule, "margin": args.margin, "scorer_mix": label, "z_stats": stats,
        "label_0_fraction": (sum(row["label_0"] for row, _, _ in pairs) / len(pairs)) if pairs else None,
        "gap_kept": ({"min": min(kept), "mean": sum(kept) / len(kept), "max": max(kept)} if kept else None),
        "model": model, "media": media.kind, "image_format": media.format, "dataset": str(out),
        "parquet_shards": shards, "webdataset_shards": wds, "gaps_png": str(out / GAPS_PNG),
        "train_command": train_command(out, media) + (" --pair_weight_column pair_weight" if args.gap_weight_power != 0
                                                      else ""),
    }


def write_real_pairs(args, items, real_images: list[Path], K, out: Path, media: ImageMedia | VideoMedia, model: str) -> dict:
    """--real_winner (SPIN-Diffusion's pairs): each prompt's real image is image 0 and the winner (label_0 1) against
    each of its K candidates; no score, so every pair_weight is 1 and nothing is dropped."""
    records = read_candidates(items, K, out, {})
    pairs = []
    for r in records:
        real = real_images[r["index"]]
        for k in range(K):
            row = {"caption": r["prompt"], "label_0": 1.0, "label_1": 0.0, "model": model, "scorer_mix": "none",
                   "pair_rule": REAL_RULE, f"real_{media.real_key}": str(real), "seed_0": -1, "seed_1": r["seeds"][k],
                   "prompt_index": r["index"], "candidate_0": -1, "candidate_1": k, "pair_weight": 1.0}
            pairs.append((row, real, r["files"][k]))
    removed = remove_stale_outputs(out, {DATA} | ({WEBDATASET} if args.webdataset else set()))
    shards = write_parquet_shards(pairs, out, media, args.shard_size)
    wds = write_webdataset_shards(pairs, out, media, args.shard_size) if args.webdataset else []
    return {
        "pairs": len(pairs), "ties_dropped": 0, "below_margin": 0, "below_gap_percentile": 0,
        "pairs_considered": len(pairs), "prompts": len(records), "prompts_without_pair": 0, "num_candidates": K,
        "pair_rule": REAL_RULE, "scorer_mix": "none", "label_0_fraction": 1.0 if pairs else None,
        "stale_outputs_removed": removed, "model": model, "media": media.kind, "image_format": media.format,
        "dataset": str(out), "parquet_shards": shards, "webdataset_shards": wds,
        "train_command": train_command(out, media),
    }


def train_command(out: Path, media: ImageMedia | VideoMedia) -> str:
    """How train.py reads the pairs: as they are; image-to-video pairs name their conditioning image column."""
    conditioning = f" --conditioning_image_column {CONDITIONING_COLUMN}" if media.conditioning is not None else ""
    return f"python train.py --dataset_name {out}{conditioning} ..."


def remove_stale_outputs(out: Path, written: set[str]) -> list[str]:
    """A rebuild owns the folder: an output of an earlier build that this one does not write (webdataset/ without
    --webdataset, gaps.png in a --real_winner build) would hold other pairs beside the new data/, so it is removed,
    before the new shards are written, and named."""
    removed = []
    for name in (WEBDATASET, GAPS_PNG):
        if name in written:
            continue
        for leftover in (out / f".{name}.tmp", out / f".{name}.old"):  # a killed earlier build's half-written shards
            shutil.rmtree(leftover, ignore_errors=True)
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
        print(f"make_pairs: removed {path}, an earlier build's output that this build does not write")
    return removed


def shard_slices(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)] or [(0, 0)]


def replace_folder(tmp: Path, final: Path) -> None:
    """Put a fully written folder in place of `final`: rename the old one aside, rename the new one in, delete the
    old. A kill in between leaves the old folder or none, never a mix (the next run rewrites it)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def fresh_tmp(out: Path, name: str) -> Path:
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_parquet_shards(pairs, out: Path, media: ImageMedia | VideoMedia, shard_size: int) -> list[str]:
    """`data/train-0000s-of-0000N.parquet` (the layout train.py's split_files reads), written as a whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = fresh_tmp(out, DATA)
    slices = shard_slices(len(pairs), shard_size)
    names = []
    for s, (start, end) in enumerate(slices):
        rows = [{**row, media.columns[0]: media.encode(file_0), media.columns[1]: media.encode(file_1),
                 **{column: data for column, (_, data) in media.extra_fields(row).items()}}
                for row, file_0, file_1 in pairs[start:end]]
        name = f"train-{s:05d}-of-{len(slices):05d}.parquet"
        table = pa.Table.from_pylist(rows) if rows else pa.table({
            "caption": pa.array([], pa.string()), media.columns[0]: pa.array([], pa.binary()),
            media.columns[1]: pa.array([], pa.binary()), "label_0": pa.array([], pa.float64())})
        pq.write_table(table, tmp / name)
        names.append(f"{DATA}/{name}")
    replace_folder(tmp, out / DATA)
    return names


def write_webdataset_shards(pairs, out: Path, media: ImageMedia | VideoMedia, shard_size: int) -> list[str]:
    """`webdataset/train-0000s.tar`, one sample per pair: <key>.jpg_0.<ext>, <key>.jpg_1.<ext>, <key>.label_0.txt,
    <key>.label_1.txt, <key>.original_prompt.txt (the Pick-a-Pic v2 mirror's layout) and <key>.provenance.json."""
    tmp = fresh_tmp(out, WEBDATASET)
    names = []
    for s, (start, end) in enumerate(shard_slices(len(pairs), shard_size)):
        if start == end:
            break
        name = f"train-{s:05d}.tar"
        with tarfile.open(tmp / name, "w") as tar:
            for row, file_0, file_1 in pairs[start:end]:
                key = f"{row['prompt_index']:06d}_{row['candidate_0']}_{row['candidate_1']}"
                provenance = {k: v for k, v in row.items() if k not in ("caption", "label_0", "label_1")}
                fields = {f"{media.columns[0]}.{media.extension}": media.encode(file_0),
                          f"{media.columns[1]}.{media.extension}": media.encode(file_1),
                          "label_0.txt": str(row["label_0"]).encode(), "label_1.txt": str(row["label_1"]).encode(),
                          "original_prompt.txt": row["caption"].encode("utf-8"),
                          "pair_weight.txt": str(row["pair_weight"]).encode(),  # train.py --pair_weight_column
                          "provenance.json": json.dumps(provenance, ensure_ascii=False).encode("utf-8")}
                fields.update({f"{column}.{ext}": data for column, (ext, data) in media.extra_fields(row).items()})
                for field, data in fields.items():
                    member = tarfile.TarInfo(f"{key}.{field}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        names.append(f"{WEBDATASET}/{name}")
    replace_folder(tmp, out / WEBDATASET)
    return names


def plot_gaps(decisions: list[Decision], margin: float, rule: str, path: Path) -> None:
    """Histogram of the mixed-score gaps |score_a - score_b| of the pairs considered: kept, and dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [abs(d.gap) for d in decisions if d.kept]
    dropped = [abs(d.gap) for d in decisions if not d.kept]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = kept + dropped
    bins = 30 if values and max(values) > 0 else 1
    ax.hist([kept, dropped], bins=bins, stacked=True, color=["tab:blue", "tab:grey"],
            label=[f"kept ({len(kept)})", f"dropped: tie or within the margin ({len(dropped)})"])
    if margin > 0:
        ax.axvline(margin, color="tab:red", linestyle="--", linewidth=1, label=f"margin {margin:g}")
    ax.set_xlabel("mixed-score gap (z units)")
    ax.set_ylabel("pairs")
    ax.set_title(f"score gaps of the pairs considered ({rule})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict | None:
    try:
        return make_pairs(parse_args(argv))
    except (MakePairsError, gen.GenerateError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
