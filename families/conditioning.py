"""What the families' text side loads beside the encoders: the tokenizers, and SDXL's size-and-crop time ids."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def load_tokenizer(path: str, subfolder: str, revision):
    """A CLIP tokenizer. Offline, transformers returns a tokenizer with no vocabulary (only its special tokens) for a
    hub id it cannot fetch, instead of raising; training with it would silently see every caption as empty."""
    from transformers import CLIPTokenizer

    fix = (f"Download it once with network access (hf download {path}), or pass --pretrained_model_name_or_path a "
           f"local folder with {subfolder}/vocab.json and merges.txt (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}).")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=subfolder, revision=revision)
    except Exception as error:  # noqa: BLE001 - OSError when absent; tokenizers raises plain Exceptions on bad files
        if Path(path).is_dir():
            raise RuntimeError(f"cannot load the tokenizer in {Path(path) / subfolder}: {error}. Its vocab.json, "
                               f"merges.txt (and tokenizer.json) must be the original model's") from None
        raise RuntimeError(f"cannot load the tokenizer of {path} ({subfolder}/): {error}. {fix}") from None
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        folder = Path(path) / subfolder
        if Path(path).is_dir():
            vocab = folder / "vocab.json"
            problem = "is missing" if not vocab.is_file() else f"holds {vocab.stat().st_size} bytes"
            raise RuntimeError(f"the tokenizer in {folder} loaded with an empty vocabulary: {vocab} {problem}. A CLIP "
                               f"tokenizer needs vocab.json and merges.txt there; copy them from the original model.")
        raise RuntimeError(
            f"the tokenizer of {path} ({subfolder}/) loaded with an empty vocabulary: the model is neither a local "
            f"folder nor in the Hugging Face cache. {fix}"
        )
    return tokenizer


def sdxl_time_ids(batch_size: int, resolution: int, device, dtype) -> torch.Tensor:
    """(original size, crop top-left, target size) = (res, res, 0, 0, res, res) for every sample, as official (Q11)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype).repeat(batch_size, 1)
