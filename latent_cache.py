"""Cached latents and text embeddings: encode a preference dataset once, then train without the VAE and text encoders.

    python latent_cache.py <the train.py arguments of the run> --latents_cache DIR     # encode (resumable, multi-GPU)
    accelerate launch train.py <the same arguments> --latents_cache DIR               # train from the cache

The cache holds, for every pair the run would read (the rows after train.py's filters, in their order), the VAE
posterior moments (mean and log-variance) of both images, unflipped and flipped when --no_hflip is not given, and the
text encoders' outputs for the caption; plus the outputs for "" (caption dropout) and each row's label and whether it
is unusable (undecodable image, bad caption). Training draws everything random as on the fly: the same (seed, epoch,
index)-keyed choices of caption dropout and flips, and the posterior sample from the same global generator, so a
run from the cache and one that encodes on the fly see the same pairs, flips and noise; their losses differ only by
the rounding of the stored moments (--latents_cache_dtype; float32 stores them exactly). Random crops differ every
epoch and cannot be cached: --random_crop is refused. Files: DIR/index.json and DIR/shard-NNNNN.safetensors, each
written under a temporary name and renamed, so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

import checkpoints
from arguments import parse_args
from data.latent_cache import (BUILDING, DTYPES, FORMAT, INDEX, LatentCache, CachedPairDataset, collate,  # noqa: F401
                               latents_from_moments, settings_of, shard_name, sources_of, setting_differences,
                               check_cacheable)
from data.pairs import Collate, decode_image
from data.rows import filter_rows, load_rows
from distributed import process_state
from families import make_family

logger = logging.getLogger("train")

# ---------------------------------------------------------------------------------------------------------------
# Writing


def encode_rows(rows, start: int, stop: int, family, vae, text_encoders, tokenizers, args, dtype, device):
    """Moments (n, 2 images, flips, 2C, h, w), text outputs, labels and unusable flags of rows[start:stop]."""
    import torchvision.transforms.functional as TF

    flips = (False, True) if not args.no_hflip else (False,)
    pixels, captions, labels, bad = [], [], [], []
    for i in range(start, stop):
        row = rows[i]
        labels.append(float(row["label_0"]))
        try:
            caption = row[args.caption_column]
            if not isinstance(caption, str):
                raise ValueError(f"caption {caption!r} is not one string")
            images = [decode_image(row["jpg_0"]), decode_image(row["jpg_1"])]
        except Exception:  # noqa: BLE001 - an unusable row, as in training: flagged, skipped there
            bad.append(True)
            pixels.append(None)
            captions.append("")
            continue
        bad.append(False)
        captions.append(caption)
        crops = []
        for image in images:
            image = TF.center_crop(TF.resize(image, args.resolution, interpolation=TF.InterpolationMode.BILINEAR),
                                   [args.resolution, args.resolution])
            for flip in flips:
                crops.append(TF.normalize(TF.to_tensor(TF.hflip(image) if flip else image), [0.5], [0.5]))
        pixels.append(torch.stack(crops))
    good = [p for p in pixels if p is not None]
    moments, shape = None, None
    if good:
        with torch.inference_mode():
            batch = torch.cat(good).to(device, vae.dtype)
            encoded = vae.encode(batch).latent_dist.parameters.to(dtype).cpu()
        encoded = encoded.view(len(good), 2, len(flips), *encoded.shape[1:])
        shape = encoded.shape[1:]
    text = encode_captions(captions, family, text_encoders, tokenizers, device, dtype)
    if shape is not None:
        moments = torch.zeros(stop - start, *shape, dtype=dtype)
        moments[[i for i, b in enumerate(bad) if not b]] = encoded
    return moments, text, labels, bad


def encode_captions(captions, family, text_encoders, tokenizers, device, dtype) -> dict:
    batch = Collate(tokenizers, family.max_lengths())(
        [{"pixel_values": torch.zeros(1), "caption": c, "skipped": 0} for c in captions])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.inference_mode():
        return {k: v.to(dtype).cpu().contiguous() for k, v in family.encode_prompts(batch, text_encoders).items()}


def build(args, shard_size: int, dtype_name: str):
    """Encode the run's rows into args.latents_cache: the shards this process owns (shard s on rank s mod world),
    skipping shards already written; rank 0 then writes the index."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    state = process_state()
    check_cacheable(args)
    folder = Path(args.latents_cache)
    folder.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    with state.main_process_first():  # shards already there must be of these settings before a build resumes on them
        building = folder / BUILDING
        if building.is_file():
            earlier = json.loads(building.read_text())
            differences = setting_differences(earlier["settings"], settings, earlier["sources"], sources_of(args))
            if differences:
                raise ValueError(f"--latents_cache {folder} holds shards made with other settings: {'; '.join(differences)}. "
                                 f"Build into a new folder (or empty this one)")
        elif state.is_main_process:
            if any(folder.glob("shard-*.safetensors")):
                raise ValueError(f"--latents_cache {folder} holds shards of an unknown build (no {BUILDING}): build into "
                                 f"a new folder (or empty this one)")
            checkpoints.write_json_atomic(building, {"settings": settings, "sources": sources_of(args)})
    dtype = DTYPES[dtype_name]
    weight_dtype = torch.float32 if state.device.type == "cpu" else torch.bfloat16
    family = make_family(args)
    tokenizers, text_encoders = family.load_text(weight_dtype)
    vae = family.load_vae(torch.float32)  # the moments in fp32 before they are stored in `dtype`
    for module in (vae, *text_encoders):
        module.requires_grad_(False).eval().to(state.device)
    with state.main_process_first():
        rows = filter_rows(load_rows(args), args, state.is_main_process)
    starts = list(range(0, len(rows), shard_size))
    mine = [s for s in range(len(starts)) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if not (folder / shard_name(s)).exists()]
    if state.is_main_process and len(todo) < len(mine):
        logger.info(f"{len(mine) - len(todo)} of this process's {len(mine)} shards are already in {folder}: resuming")
    for number in tqdm(todo, desc="shards", disable=not state.is_local_main_process):
        start, stop = starts[number], min(starts[number] + shard_size, len(rows))
        moments, text, labels, bad = encode_rows(rows, start, stop, family, vae, text_encoders, tokenizers, args,
                                                 dtype, state.device)
        tensors = {f"text.{k}": v for k, v in text.items()}
        if moments is None:
            raise RuntimeError(f"rows {start}..{stop - 1}: no image could be decoded in the whole shard")
        tensors.update(moments=moments, label_0=torch.tensor(labels, dtype=torch.float64),
                       bad=torch.tensor(bad, dtype=torch.bool))
        tmp = folder / f".{shard_name(number)}.tmp"
        save_file(tensors, str(tmp))
        checkpoints.umask_mode(tmp)
        os.replace(tmp, folder / shard_name(number))
    state.wait_for_everyone()
    if state.is_main_process:
        from safetensors import safe_open

        empty = encode_captions([""], family, text_encoders, tokenizers, state.device, dtype)
        save_file({f"text.{k}": v for k, v in empty.items()}, str(folder / ".empty.tmp"))
        os.replace(folder / ".empty.tmp", folder / "empty.safetensors")
        labels, bad = [], []
        for number in range(len(starts)):
            with safe_open(str(folder / shard_name(number)), framework="pt") as handle:
                labels += handle.get_tensor("label_0").tolist()
                bad += handle.get_tensor("bad").tolist()
        vae_config = vae.config
        index = {"format": FORMAT, "settings": settings, "sources": sources_of(args), "dtype": dtype_name,
                 "latent": {"scaling_factor": vae_config.scaling_factor,
                            "shift_factor": getattr(vae_config, "shift_factor", None)},
                 "shards": [[s, min(s + shard_size, len(rows))] for s in starts], "label_0": labels, "bad": bad}
        checkpoints.write_json_atomic(folder / INDEX, index)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        logger.info(f"Cached {len(rows)} pairs ({sum(bad)} unusable) in {folder}: {checkpoints.gigabytes(size)} on disk, "
                    f"{size / max(len(rows), 1) / 1e6 * 1000:.1f} MB per 1,000 pairs")
        print(f"{folder}: {len(rows)} pairs, {size / 1e9:.3f} GB")
    state.wait_for_everyone()
    return folder


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = {"--latents_cache_shard_size": "256", "--latents_cache_dtype": "float16"}
    for flag in list(extra):
        if flag in argv:
            i = argv.index(flag)
            extra[flag] = argv[i + 1]
            del argv[i:i + 2]
    if extra["--latents_cache_dtype"] not in DTYPES:
        raise SystemExit(f"--latents_cache_dtype must be one of {', '.join(DTYPES)}")
    if not extra["--latents_cache_shard_size"].isdigit() or int(extra["--latents_cache_shard_size"]) < 1:
        raise SystemExit(f"--latents_cache_shard_size must be an integer >= 1, got {extra['--latents_cache_shard_size']}")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(argv)
    if not args.latents_cache:
        raise SystemExit("give --latents_cache DIR: the folder to write the cache into")
    return build(args, int(extra["--latents_cache_shard_size"]), extra["--latents_cache_dtype"])


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"latent_cache.py: error: {error}", file=sys.stderr)
        sys.exit(1)
