"""Reading a latent cache (latent_cache.py builds it): the settings and file fingerprints a cache depends on and
their checks, the index and shards, the dataset of cached pairs and its collate. What a cache holds and how it is
used: latent_cache.py's docstring."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

import checkpoints
from data.rows import webdataset_shards

logger = logging.getLogger("train")
INDEX = "index.json"
BUILDING = "settings.json"  # written when a build starts: a resumed build must be of the same settings
FORMAT = 2  # 2: models and data keyed on their files (format 1 keyed them on path names)
CACHEABLE_FAMILIES = ("sd", "sdxl", "sd3", "flux")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# What a cache depends on: a run whose values differ would read other pairs, crops, flips or encodings.
CACHE_SETTINGS = ("model_family", "pretrained_model_name_or_path", "revision", "pretrained_vae_model_name_or_path",
                  "dataset_name", "dataset_config_name", "train_data_dir", "split", "caption_column",
                  "max_train_samples", "dreamlike_pairs_only", "resolution", "random_crop", "no_hflip")


# Settings that name files: compared by what the files hold, not by how they were named (a relative path, a copy).
LOCATIONS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "dataset_name", "train_data_dir")
# What of a model folder the cache depends on: the VAE and the text encoders with their tokenizers (not the denoiser)
ENCODER_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def visible_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def local_source(location: str, revision=None, repo_type="model") -> Path | None:
    """A local file or folder, or a hub id's snapshot in the Hugging Face cache; None when neither is on disk."""
    if Path(location).exists():
        return Path(location)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, revision=revision, repo_type=repo_type, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache: keyed on the id and revision as given
        return None


def model_fingerprint(location: str, revision, parts=ENCODER_PARTS) -> str:
    """sha256 over eval.generate's file digests (whole files up to 64 MiB, else their size and four 1 MiB samples) of
    the files the cache's encoders are loaded from: a rebuilt model differs, a moved or copied one matches."""
    import hashlib

    from eval.generate import file_digest

    path = local_source(location, revision)
    if path is None:
        return f"hub:{location}@{revision}"
    if path.is_file():
        return f"sha256:{file_digest(path)}"
    folders = [path] if parts is None else [path / part for part in parts if (path / part).is_dir()]
    files = [f for folder in folders for f in visible_files(folder)]
    lines = "".join(f"{f.relative_to(path).as_posix()} {file_digest(f)}\n" for f in files)
    return f"sha256:{hashlib.sha256(lines.encode()).hexdigest()[:16]} ({len(files)} files)"


def data_fingerprint(location: str) -> str:
    """The data files' names (relative), sizes and modification times: instant for a dataset of any size; a dataset
    rewritten in place differs. A copy made without keeping times (cp without -p) differs too: the cache is refused."""
    import glob
    import hashlib

    if any(ch in location for ch in "*?["):
        files, root = [Path(f) for f in sorted(glob.glob(location))], Path(location).parent
    else:
        path = local_source(location, repo_type="dataset")
        if path is None:
            return f"hub:{location}"
        files, root = ([path], path.parent) if path.is_file() else (visible_files(path), path)
    lines = "".join(f"{f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name} {f.stat().st_size} "
                    f"{f.stat().st_mtime_ns}\n" for f in files)
    return f"files:{hashlib.sha256(lines.encode()).hexdigest()[:16]} ({len(files)} files)"


def settings_of(args) -> dict:
    """What the cache depends on: the settings, with the model, VAE and data locations replaced by fingerprints of
    their files (None stays None)."""
    values = {name: getattr(args, name) for name in CACHE_SETTINGS}
    if args.max_train_samples is not None:  # the subsample is drawn with the seed
        values["seed"] = args.seed
    model, vae = args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path
    values["pretrained_model_name_or_path"] = model_fingerprint(model, args.revision)
    if vae:
        values["pretrained_vae_model_name_or_path"] = model_fingerprint(vae, None, parts=None)
    for name in ("dataset_name", "train_data_dir"):
        if values[name]:
            values[name] = data_fingerprint(values[name])
    if args.dataset_name and args.train_data_dir:  # a subfolder of the dataset: its files are in dataset_name's
        values["train_data_dir"] = args.train_data_dir
    return values


def sources_of(args) -> dict:
    """The locations as given, absolute where local: named in the messages, not compared."""
    return {name: str(Path(getattr(args, name)).absolute()) if Path(getattr(args, name)).exists() else getattr(args, name)
            for name in LOCATIONS if getattr(args, name)}


def setting_differences(stored: dict, wanted: dict, stored_sources: dict, sources: dict) -> list[str]:
    differences = []
    for name, value in wanted.items():
        if stored.get(name) == value:
            continue
        if name in LOCATIONS and stored.get(name) and value:
            differences.append(f"--{name}: its files differ from those the cache was made from "
                               f"({stored_sources.get(name)}: {stored[name]}; now {sources.get(name)}: {value})")
        else:
            differences.append(f"--{name}: {stored.get(name)!r} in the cache, {value!r} now")
    return differences


def check_cacheable(args):
    if args.model_family not in CACHEABLE_FAMILIES:
        raise ValueError(f"--latents_cache is for the image families ({', '.join(CACHEABLE_FAMILIES)}), not {args.model_family}")
    if args.random_crop:
        raise ValueError("--latents_cache holds center crops: random crops differ every epoch and cannot be cached; "
                         "drop --random_crop")
    if args.choice_model:
        raise ValueError("--choice_model scores the decoded images, which a cached run does not decode; drop one of them")
    if args.streaming or webdataset_shards(args.dataset_name or args.train_data_dir or "", args.split):
        raise ValueError("--latents_cache needs random access to the rows: use a parquet/arrow source without --streaming")


# ---------------------------------------------------------------------------------------------------------------
# Reading


class LatentCache:
    """The index and shards of a cache folder, read with safetensors' memory-mapped slices (one handle per shard and
    process, opened when first needed, so DataLoader workers open their own)."""

    def __init__(self, folder, args=None):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"--latents_cache {folder}: no {INDEX} (make the cache first: python latent_cache.py "
                                    f"<the run's arguments> --latents_cache {folder})")
        self.index = json.loads(path.read_text())
        if self.index.get("format") == 1:
            raise ValueError(f"--latents_cache {folder} was made before caches were keyed on the model's and the data's "
                             f"files (format 1, path names only), so it cannot be checked against them: make it again "
                             f"(python latent_cache.py <the run's arguments> --latents_cache NEW_FOLDER)")
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown cache format {self.index.get('format')!r}")
        if args is not None:
            differences = setting_differences(self.index["settings"], settings_of(args), self.index.get("sources", {}),
                                              sources_of(args))
            if differences:
                raise ValueError(f"--latents_cache {folder} was made with other settings: {'; '.join(differences)}. "
                                 f"Make a cache for these settings (another folder) or use the cache's")
        for name in [shard_name(n) for n in range(len(self.index["shards"]))] + ["empty.safetensors"]:
            shard = self.folder / name  # checked whole now (headers only), not found broken mid-run
            problem = checkpoints.safetensors_problem(shard) if shard.is_file() else "is missing"
            if problem:
                raise ValueError(f"--latents_cache {folder}: {shard} {problem}. Delete it and run latent_cache.py "
                                 f"again with the run's arguments: it encodes only the missing shards")
        self.labels, self.bad = self.index["label_0"], self.index["bad"]
        self.handles = {}

    def __len__(self):
        return len(self.labels)

    def shard_of(self, row: int):
        for number, (start, stop) in enumerate(self.index["shards"]):
            if start <= row < stop:
                return number, row - start
        raise IndexError(row)

    def handle(self, name: str):
        from safetensors import safe_open

        if name not in self.handles:
            self.handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self.handles[name]

    def moments(self, row: int, image: int, flip: bool) -> torch.Tensor:
        number, offset = self.shard_of(row)
        return self.handle(shard_name(number)).get_slice("moments")[offset, image, int(flip)]

    def conditioning(self, row: int | None) -> dict:
        """The text encoders' outputs for the row's caption, or for "" (row None)."""
        if row is None:
            handle, offset = self.handle("empty.safetensors"), 0
        else:
            number, offset = self.shard_of(row)
            handle = self.handle(shard_name(number))
        return {key.removeprefix("text."): handle.get_slice(key)[offset] for key in handle.keys() if key.startswith("text.")}

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "handles": {}}


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


class CachedPairDataset(torch.utils.data.Dataset):
    """data.pairs.PairDataset's examples from a cache: the same key -> (row, caption dropout, flips) choices, moments and text
    embeddings instead of pixels and captions. Winner first, as PairDataset puts it."""

    def __init__(self, cache: LatentCache, args):
        self.cache, self.hflip = cache, not args.no_hflip
        self.proportion_empty_prompts = args.proportion_empty_prompts
        self.winner_only = args.train_method == "sft"

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, key):
        seed, epoch, index = key
        n = len(self.cache)
        rng = random.Random(f"{seed}-{epoch}-{index}")  # the draws of PairDataset.example, in its order
        bad_rows = []
        for attempt in range(n):
            row = (index + attempt) % n
            if not self.cache.bad[row]:
                break
            bad_rows.append((row, "bad in the latent cache", "the row was marked bad when the cache was built"))
        else:
            raise RuntimeError(f"no usable row from row {index} on in the cache")
        images = [0, 1] if self.cache.labels[row] != 0 else [1, 0]  # winner first
        dropped = rng.random() < self.proportion_empty_prompts
        if self.winner_only:
            images = images[:1]
        moments = torch.stack([self.cache.moments(row, image, self.hflip and rng.random() < 0.5) for image in images])
        return {"moments": moments, "conditioning": self.cache.conditioning(None if dropped else row),
                "skipped": int(attempt > 0), "bad_rows": bad_rows}


def collate(examples):
    return {"moments": torch.stack([e["moments"] for e in examples]),
            "conditioning": {k: torch.stack([e["conditioning"][k] for e in examples]) for k in examples[0]["conditioning"]},
            "skipped": torch.tensor(sum(e["skipped"] for e in examples)),
            "bad_rows": [bad for e in examples for bad in e["bad_rows"]]}


def latents_from_moments(family, moments: torch.Tensor, latent_config) -> torch.Tensor:
    """The posterior sample of cached moments, drawn as `vae.encode(x).latent_dist.sample()` draws it, normalised."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return family.normalise_latents(DiagonalGaussianDistribution(moments).sample().float(), latent_config)

