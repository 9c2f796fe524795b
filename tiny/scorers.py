"""Tiny random-weight stand-ins for the five scorer backbones, saved in the layouts the real loaders read.

    kwargs = build_tiny_scorers("work/tiny-scorers")
    scorer = load_scorer("hpsv2", **kwargs["hpsv2"])     # offline, seconds

Same model families and file formats as the real weights, only small: a CLIPModel + processor folder (PickScore,
and the aesthetics backbone), an OpenCLIP model config registered from a .json file with a plain weights file
(CLIP score) and an HPS-style ``{"state_dict": ...}`` checkpoint (HPSv2), an aesthetics MLP whose input size is the
tiny projection width, and an ImageReward checkpoint in the ORIGINAL key layout with its med_config.json and a small
BERT vocabulary, so the key-map load path runs.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import torch

from tiny.diffusion import build_clip_tokenizer

OPEN_CLIP_CONFIG = {  # the ViT-H-14 config's shape, scaled down (GELU, no QuickGELU)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
IR_VISION_HEADS = 4
CLIP_PROJECTION_DIM = 16  # tiny CLIPModel projection width = the tiny aesthetics MLP input size


def _hf_clip(out_dir: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A CLIPModel folder with a 32-pixel CLIP image processor and the real CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=CLIP_PROJECTION_DIM,
    )
    CLIPModel(config).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out_dir / file.name)
    return out_dir


def _open_clip(out_dir: Path, seed: int) -> tuple[Path, Path, Path]:
    """(config .json, CLIP-score weights file, HPS-style checkpoint) for a tiny OpenCLIP model."""
    import open_clip

    arch_file = out_dir / "tiny-openclip-vit.json"
    arch_file.write_text(json.dumps(OPEN_CLIP_CONFIG, indent=1))
    open_clip.add_model_config(arch_file)
    torch.manual_seed(seed)
    clip_file = out_dir / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model(arch_file.stem).state_dict(), clip_file)
    torch.manual_seed(seed + 1)
    hps_file = out_dir / "HPS_v2_compressed.pt"
    torch.save({"state_dict": open_clip.create_model(arch_file.stem).state_dict()}, hps_file)
    return arch_file, clip_file, hps_file


def _imagereward(out_dir: Path, seed: int) -> Path:
    """ImageReward.pt (original key names, every tensor random) + med_config.json + tokenizer/vocab.txt."""
    from transformers import BlipVisionConfig

    from eval.imagereward import ImageRewardModel, text_config_from_med, to_original_state_dict

    letters = list(string.ascii_lowercase + string.digits)
    words = "a photo of an the cat dog red blue green yellow astronaut riding horse painting portrait".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + words
    vocab += list(string.punctuation)
    (out_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")

    med_config = {  # BLIP med_config.json fields; +2 for the [DEC] and [ENC] tokens BLIP adds
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
        "encoder_width": 32, "add_cross_attention": True,
    }
    (out_dir / "med_config.json").write_text(json.dumps(med_config, indent=1))

    vision = BlipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=IR_VISION_HEADS, image_size=224, patch_size=16, layer_norm_eps=1e-6)
    model = ImageRewardModel(vision, text_config_from_med(med_config, encoder_width=32))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():  # randomise everything, so a mis-mapped key changes the score
        noise = 0.1 * torch.randn(value.shape, generator=generator)
        state[name] = noise + 1 if "norm" in name.lower() and name.endswith("weight") else noise
    state = to_original_state_dict(state)
    state.update({  # present in the released file, unused for scoring
        "blip.vision_proj.weight": torch.randn(16, 32, generator=generator), "blip.vision_proj.bias": torch.zeros(16),
        "blip.text_proj.weight": torch.randn(16, 32, generator=generator), "blip.text_proj.bias": torch.zeros(16),
        "blip.text_encoder.embeddings.position_ids": torch.arange(40).expand(1, -1),
    })
    torch.save(state, out_dir / "ImageReward.pt")
    return out_dir


def build_tiny_scorers(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, dict]:
    """Write tiny scorer weights under ``out_dir``; return ``{metric: kwargs for load_scorer(metric, **kwargs)}``."""
    from eval.imagereward import MLPHead

    out_dir = Path(out_dir)
    for sub in ("tokenizer", "pickscore", "aesthetics", "open_clip", "imagereward"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(out_dir / "tokenizer")
    pickscore = _hf_clip(out_dir / "pickscore", out_dir / "tokenizer", seed)
    aesthetics = _hf_clip(out_dir / "aesthetics", out_dir / "tokenizer", seed + 1)
    torch.manual_seed(seed + 2)
    mlp_file = out_dir / "aesthetics" / "aesthetics-mlp.pth"
    torch.save(MLPHead(CLIP_PROJECTION_DIM).state_dict(), mlp_file)
    arch_file, clip_file, hps_file = _open_clip(out_dir / "open_clip", seed + 3)
    imagereward = _imagereward(out_dir / "imagereward", seed + 5)
    return {
        "pickscore": {"model_path": str(pickscore), "processor_path": str(pickscore)},
        "hpsv2": {"model_path": str(hps_file), "arch": str(arch_file)},
        "aesthetics": {"model_path": str(aesthetics), "mlp_path": str(mlp_file)},
        "clip": {"model_path": str(clip_file), "arch": str(arch_file)},
        "imagereward": {"model_path": str(imagereward), "tokenizer": str(imagereward / "tokenizer"),
                        "vision_heads": IR_VISION_HEADS},
    }
