"""ImageReward-v1.0 rebuilt on transformers' BLIP modules, loading the released `ImageReward.pt` unchanged.

The `image-reward` package (THUDM) cannot be imported with transformers >= 4.56, so this module re-creates its
scoring path from the same parts:

* image: torchvision ``Resize(224, BICUBIC)`` (shorter side), ``CenterCrop(224)``, RGB, ``ToTensor``, CLIP mean/std;
* ``visual_encoder``: BLIP's ViT (``vit='large'``: width 1024, 24 blocks, 16 heads, patch 16, LayerNorm eps 1e-6)
  = ``BlipVisionModel``;
* ``text_encoder``: BLIP's BERT with cross-attention to all image tokens = ``BlipTextModel`` run *bidirectionally*;
  text tokenised by ``bert-base-uncased`` (+ ``[DEC]``, ``[ENC]``) with ``padding="max_length", max_length=35``;
* ``mlp``: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the [CLS] state; the score is
  ``(mlp(cls) - 0.16717362830052426) / 1.0333394966054072``.

The checkpoint keeps its original key names; :data:`KEY_MAP` translates them explicitly (both directions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

REWARD_MEAN = 0.16717362830052426  # ImageReward.ImageReward.mean / .std, fixed in the package
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (original key prefix, our key prefix); "{n}" is a block index. Applied to the first matching row.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "visual_encoder.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "visual_encoder.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "visual_encoder.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{n}.norm1.", "visual_encoder.encoder.layers.{n}.layer_norm1."),
    ("blip.visual_encoder.blocks.{n}.norm2.", "visual_encoder.encoder.layers.{n}.layer_norm2."),
    ("blip.visual_encoder.blocks.{n}.attn.qkv.", "visual_encoder.encoder.layers.{n}.self_attn.qkv."),  # fused q,k,v
    ("blip.visual_encoder.blocks.{n}.attn.proj.", "visual_encoder.encoder.layers.{n}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{n}.mlp.fc1.", "visual_encoder.encoder.layers.{n}.mlp.fc1."),
    ("blip.visual_encoder.blocks.{n}.mlp.fc2.", "visual_encoder.encoder.layers.{n}.mlp.fc2."),
    ("blip.visual_encoder.norm.", "visual_encoder.post_layernorm."),
    ("blip.text_encoder.", "text_encoder."),  # BlipTextModel's names equal BLIP's med.py names one for one
    ("mlp.layers.", "mlp.layers."),
)
# In the checkpoint but not used to score: BLIP's contrastive projections, and a buffer transformers rebuilds.
UNUSED_ORIGINAL_KEYS = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _rename(key: str, reverse: bool = False) -> str | None:
    for original, ours in KEY_MAP:
        src, dst = (ours, original) if reverse else (original, ours)
        pattern = "^" + re.escape(src).replace(re.escape("{n}"), r"(\d+)")
        match = re.match(pattern, key)
        if match:
            return dst.replace("{n}", match.group(1) if match.groups() else "") + key[match.end():]
    return None


def map_original_key(key: str) -> str | None:
    """Our parameter name for an original ImageReward key; None for the documented unused keys."""
    if key.startswith(UNUSED_ORIGINAL_KEYS):
        return None
    mapped = _rename(key)
    if mapped is None:
        raise KeyError(f"ImageReward checkpoint key {key!r} has no mapping; is this an ImageReward-v1.0 file?")
    return mapped


def from_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original `ImageReward.pt` layout -> :class:`ImageRewardModel` state dict (unused keys dropped)."""
    return {new: value for key, value in state_dict.items() if (new := map_original_key(key)) is not None}


def to_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`ImageRewardModel` state dict -> original key layout (used to write tiny test checkpoints)."""
    out = {}
    for key, value in state_dict.items():
        original = _rename(key, reverse=True)
        if original is None:
            raise KeyError(f"parameter {key!r} has no original ImageReward name")
        out[original] = value
    return out


class MLPHead(nn.Module):
    """The 5-layer head shared by ImageReward (`ImageReward.MLP`) and the LAION aesthetic predictor.

    ``layers``: Linear(d,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1),
    Linear(64,16), Linear(16,1) -- no activations; the indices match both released state dicts.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "layers.") -> MLPHead:
        """Build with the input size read from the weights and load them strictly."""
        head = cls(state_dict[prefix + "0.weight"].shape[1])
        head.layers.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return head.eval()


def vision_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], num_heads: int | None = None):
    """`BlipVisionConfig` of the ViT whose original-layout parameter shapes are given.

    Everything is read from the shapes except the head count, which shapes cannot tell: by default width // 64
    (BLIP's ViT-B and ViT-L both use 64-wide heads, e.g. 16 heads for ImageReward's ViT-L).
    """
    from transformers import BlipVisionConfig

    p = "blip.visual_encoder."
    width = shapes[p + "cls_token"][-1]
    patch = shapes[p + "patch_embed.proj.weight"][-1]
    grid = round((shapes[p + "pos_embed"][1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(p + "blocks."))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=shapes[p + "blocks.0.mlp.fc1.weight"][0], num_hidden_layers=depth,
        num_attention_heads=num_heads or width // 64, image_size=grid * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT: exact GELU, LayerNorm eps 1e-6 (the config default is 1e-5)
    )


def text_config_from_med(med_config: Mapping, encoder_width: int):
    """`BlipTextConfig` from BLIP's `med_config.json`; ``encoder_width`` = the ViT width, as BLIP sets it."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med_config["intermediate_size"], num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], hidden_act=med_config["hidden_act"],
        layer_norm_eps=med_config["layer_norm_eps"], pad_token_id=med_config.get("pad_token_id", 0),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True,  # transformers only builds the cross-attention layers for decoders; forward passes False
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # unused here, and may exceed a tiny vocabulary
    )


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + MLP head; ``forward`` returns the normalised reward."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = MLPHead(text_config.hidden_size)

    def encode(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds, text_cls): the ViT tokens and the text encoder's [CLS] state attending to them."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state  # not pooler_output
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask, is_decoder=False,  # bidirectional self-attention, as in BLIP's encoder
        )
        return image_embeds, text.last_hidden_state[:, 0, :].float()

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        _, cls = self.encode(pixel_values, input_ids, attention_mask)
        return ((self.mlp(cls) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def build_model(shapes: Mapping[str, tuple[int, ...]], med_config: Mapping, vision_heads: int | None = None,
                device: str | torch.device | None = None) -> ImageRewardModel:
    """Model whose parameters fit a checkpoint with these original-layout shapes (``device="meta"``: no memory)."""
    vision = vision_config_from_shapes(shapes, vision_heads)
    text = text_config_from_med(med_config, encoder_width=vision.hidden_size)
    with torch.device(device or "cpu"):
        return ImageRewardModel(vision, text)


def load_model(checkpoint: str | Path, med_config: str | Path | Mapping, vision_heads: int | None = None,
               device: str | torch.device = "cpu") -> ImageRewardModel:
    """Load an original-layout ImageReward checkpoint (``weights_only=True``) strictly, through :data:`KEY_MAP`."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if not isinstance(med_config, Mapping):
        med_config = json.loads(Path(med_config).read_text())
    model = build_model({k: tuple(v.shape) for k, v in state.items()}, med_config, vision_heads, device="meta")
    model.load_state_dict(from_original_state_dict(state), strict=True, assign=True)
    embeddings = model.text_encoder.embeddings  # its position_ids buffer is not in state dicts: rebuild it
    embeddings.position_ids = torch.arange(embeddings.position_embeddings.num_embeddings).expand(1, -1)
    return model.to(device).eval()


def image_transform(size: int = 224):
    """ImageReward's preprocessing (BLIP `_transform`): resize shorter side (bicubic), centre crop, RGB, CLIP norm."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([
        Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
        lambda image: image.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN, CLIP_STD),
    ])


def load_tokenizer(path: str | Path = "bert-base-uncased"):
    """BLIP's tokenizer: BERT uncased plus ``[DEC]`` (bos) and ``[ENC]`` (ids 30522, 30523 in the real vocab)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
