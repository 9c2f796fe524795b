"""A synthetic preference dataset in the Pick-a-Pic v2 schema, with a preference a tiny model can learn.

Every pair shows the same shape for the same caption ("a red circle" style captions are avoided on purpose: the
caption names only the shape). The preferred image paints it in a warm colour, the rejected one in a cool colour, so
the preference is a visible attribute that `colour_score` measures. Like the real data, rows come with ties
(label 0.5), images of varied sizes and aspect ratios, either image position for the winner, and one corrupt image.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
ATTRIBUTE_COLOURS = {"preferred": (225, 60, 40), "rejected": (40, 70, 225)}
GENERATORS = ("dreamlike-art/dreamlike-photoreal-2.0", "stabilityai/stable-diffusion-xl-beta-v2-2-2", "runwayml/stable-diffusion-v1-5")


def toy_captions() -> list[str]:
    return [f"a {shape} on a plain background" for shape in SHAPES]


def draw_shape(shape: str, colour, size=(32, 32), rng: random.Random | None = None):
    """A PIL image of one filled shape; position and scale jitter with `rng`, the background is light grey."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    width, height = size
    image = Image.new("RGB", size, (200, 200, 200))
    draw = ImageDraw.Draw(image)
    side = min(width, height) * rng.uniform(0.5, 0.7)
    cx, cy = width / 2 + rng.uniform(-0.1, 0.1) * width, height / 2 + rng.uniform(-0.1, 0.1) * height
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    jitter = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in colour)
    if shape == "circle":
        draw.ellipse(box, fill=jitter)
    elif shape == "square":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=jitter)
    else:
        bar = side / 3
        draw.rectangle((box[0], cy - bar / 2, box[2], cy + bar / 2), fill=jitter)
        draw.rectangle((cx - bar / 2, box[1], cx + bar / 2, box[3]), fill=jitter)
    return image


def colour_score(image) -> float:
    """The toy attribute metric: mean red minus mean blue over the image, in [-1, 1]. Preferred images score > 0."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _rows(n_pairs: int, seed: int, tie_fraction: float, corrupt: int, sizes: tuple[int, int], label_noise: float = 0.0):
    rng = random.Random(seed)
    captions = toy_captions()
    rows = []
    for i in range(n_pairs):
        shape_index = i % len(SHAPES)
        size = (rng.randint(*sizes), rng.randint(*sizes))  # varied sizes and aspect ratios, like Pick-a-Pic
        preferred = draw_shape(SHAPES[shape_index], ATTRIBUTE_COLOURS["preferred"], size, rng)
        rejected = draw_shape(SHAPES[shape_index], ATTRIBUTE_COLOURS["rejected"], size, rng)
        is_tie = rng.random() < tie_fraction
        winner_first = rng.random() < 0.5
        images = (preferred, rejected) if winner_first else (rejected, preferred)
        label_0 = 0.5 if is_tie else (1.0 if winner_first else 0.0)
        if label_noise and not is_tie and rng.random() < label_noise:
            label_0 = 1.0 - label_0  # the label points at the cool image
        model_0, model_1 = rng.choice(GENERATORS), rng.choice(GENERATORS)
        rows.append({
            "are_different": True, "caption": captions[shape_index], "has_label": True,
            "jpg_0": _jpeg(images[0]), "jpg_1": _jpeg(images[1]), "label_0": label_0, "label_1": 1.0 - label_0,
            "model_0": model_0, "model_1": model_1, "ranking_id": i, "user_id": rng.randint(0, 99),
        })
    for i in range(min(corrupt, n_pairs)):
        # A truncated JPEG that PIL cannot decode, on a row that is not a tie, so the filter does not hide it.
        row = next(r for r in rows[i * 7 + 3 :] if r["label_0"] != 0.5)
        row["jpg_0"] = row["jpg_0"][:40]
    return rows


def build_pickapic(
    out_dir: str | os.PathLike, n_pairs: int = 64, seed: int = 0, tie_fraction: float = 0.1, corrupt: int = 1,
    sizes: tuple[int, int] = (28, 56), n_test: int = 8, label_noise: float = 0.0,
) -> Path:
    """Write `<out_dir>/data/{train,test_unique}-00000-of-00001.parquet` in the Pick-a-Pic v2 schema.

    `load_dataset(out_dir)` then finds both splits, as it does for a local copy of the real dataset.
    `label_noise`: fraction of the decided training pairs whose label prefers the cool image; at 0.5 the labels carry
    no preference, so SFT on the "winners" sees both colours equally often (the demo's base model).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (
        ("train", _rows(n_pairs, seed, tie_fraction, corrupt, sizes, label_noise)),
        ("test_unique", _rows(n_test, seed + 1, 0.0, 0, sizes)),
    ):
        pq.write_table(pa.Table.from_pylist(rows), data_dir / f"{split}-00000-of-00001.parquet")
    return Path(out_dir)


def build_pickapic_webdataset(
    out_dir: str | os.PathLike, n_pairs: int = 64, seed: int = 0, tie_fraction: float = 0.1, corrupt: int = 1,
    sizes: tuple[int, int] = (28, 56), n_test: int = 8, shard_size: int = 16,
) -> Path:
    """The rows of `build_pickapic` (same arguments, same rows) as WebDataset shards `<out_dir>/<split>-NNNNN.tar`.

    Each pair is one sample in the layout of the Pick-a-Pic v2 mirror (sayakpaul/pickapic_v2_webdataset):
    `<key>.jpg_0.jpg`, `<key>.jpg_1.jpg` (the encoded images), `<key>.label_0.txt`, `<key>.label_1.txt` ("1.0", "0.0"
    or "0.5") and `<key>.original_prompt.txt` (the caption), plus `<key>.model_0.txt` / `<key>.model_1.txt`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (
        ("train", _rows(n_pairs, seed, tie_fraction, corrupt, sizes)),
        ("test_unique", _rows(n_test, seed + 1, 0.0, 0, sizes)),
    ):
        for shard, start in enumerate(range(0, len(rows), shard_size)):
            with tarfile.open(out_dir / f"{split}-{shard:05d}.tar", "w") as tar:
                for index, row in enumerate(rows[start : start + shard_size], start):
                    fields = {
                        "jpg_0.jpg": row["jpg_0"], "jpg_1.jpg": row["jpg_1"],
                        "label_0.txt": str(row["label_0"]).encode(), "label_1.txt": str(row["label_1"]).encode(),
                        "original_prompt.txt": row["caption"].encode(),
                        "model_0.txt": row["model_0"].encode(), "model_1.txt": row["model_1"].encode(),
                    }
                    for field, data in fields.items():
                        member = tarfile.TarInfo(f"{index:06d}.{field}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
    return out_dir
