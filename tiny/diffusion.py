"""Tiny SD1.5-, SD2.x-, SDXL-, SD3.5- and FLUX.1-like pipelines in the diffusers folder layouts, built offline with
random weights.

Real values (scheduler configs, VAE scaling/shift factors, which classes sit in which subfolder) are copied from the
public repos' JSON files; sizes are tiny. Where a value is not known for certain, a comment says so.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import torch

# Both real pipelines use the same DDPM training schedule (scaled-linear 0.00085 -> 0.012, 1000 steps).
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49408 tokens), built from the vocabulary file that open_clip ships.

    OpenAI's CLIP vocabulary is: the 256 byte symbols, the same with an end-of-word marker, one symbol per merge
    (the first 48894 merges of the BPE file), then the start and end tokens. That is what `openai/clip-vit-*`
    tokenizers hold, so token ids here equal the real ones. `pad_token`: SD2.x's tokenizer pads with "!" (id 0).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=model_max_length,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _text_encoder(hidden: int, with_projection: bool, seed: int, hidden_act: str = "quick_gelu", pad_token_id=49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id, hidden_act=hidden_act,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(seed: int, scaling_factor: float, factor: int = 2, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # n down blocks compress 2^(n-1)x; two by default (the real VAE: 8x; code reads the factor from the config).
    blocks = int(math.log2(factor)) + 1
    if 2 ** (blocks - 1) != factor:
        raise ValueError(f"vae_factor must be a power of two, got {factor}")
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32, 32, 32)[:blocks],
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor,
        **extra,
    )


def _unet(seed: int, sample_size: int, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, **extra,
    )


def build_sd15(out_dir: str | os.PathLike, resolution: int = 32, seed: int = 0, vae_factor: int = 2) -> Path:
    """A tiny StableDiffusionPipeline folder. Like the real SD1.5 repo, its scheduler/ holds a PNDM config.

    `vae_factor` (a power of two) is the VAE's spatial compression: latents are resolution / vae_factor pixels wide.
    """
    return _build_sd(out_dir, resolution, seed, vae_factor, family="sd15")


def build_sd2v(out_dir: str | os.PathLike, resolution: int = 32, seed: int = 0, vae_factor: int = 2) -> Path:
    """A tiny SD2.1-768-like StableDiffusionPipeline folder: build_sd15's layout, but a v-prediction model.

    As in stabilityai/stable-diffusion-2-1: scheduler/ holds a DDIM config with `prediction_type: "v_prediction"`
    (and no `timestep_spacing` or `rescale_betas_zero_snr` keys: that config predates them, so diffusers' defaults
    apply, "leading" and False); the tokenizer pads with "!" (id 0, as OpenCLIP pads with zeros); the text encoder
    (OpenCLIP ViT-H's text tower there) uses "gelu"; the UNet uses linear projections in its transformer blocks and
    upcasts attention to float32. Only the sizes are tiny.
    """
    return _build_sd(out_dir, resolution, seed, vae_factor, family="sd2v")


def _build_sd(out_dir, resolution: int, seed: int, vae_factor: int, family: str) -> Path:
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    out_dir = Path(out_dir)
    vae = _vae(seed + 1, scaling_factor=0.18215, factor=vae_factor)
    if family == "sd15":
        tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
        text_encoder = _text_encoder(32, with_projection=False, seed=seed + 2)
        unet_extra = {}
        scheduler = PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
        # The real SD1.5 repo's scheduler config predates `timestep_spacing`, so Euler falls back to "linspace" there.
        absent_keys = ("timestep_spacing",)
    elif family == "sd2v":
        tokenizer = build_clip_tokenizer(out_dir / "tokenizer", pad_token="!")
        text_encoder = _text_encoder(32, False, seed + 2, hidden_act="gelu", pad_token_id=tokenizer.pad_token_id)
        unet_extra = dict(use_linear_projection=True, upcast_attention=True)  # as SD2.1's unet/config.json
        scheduler = DDIMScheduler(
            **_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"
        )
        # The real SD2.1 scheduler config (written by an early diffusers) has neither key: the loaded scheduler gets
        # diffusers' defaults, timestep_spacing "leading" and rescale_betas_zero_snr False.
        absent_keys = ("timestep_spacing", "rescale_betas_zero_snr")
    else:
        raise ValueError(f"unknown family {family!r}")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(seed + 3, resolution // vae_factor, cross_attention_dim=32, **unet_extra),
        scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    config_path = out_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    for key in absent_keys:
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir


def build_sdxl(out_dir: str | os.PathLike, resolution: int = 32, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline folder: two text encoders (the second with projection), text_time embedding.

    Its scheduler/ holds an Euler config with "leading" spacing and steps_offset 1, as the real SDXL base repo does.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    text_encoder, text_encoder_2 = _text_encoder(32, False, seed + 2), _text_encoder(48, True, seed + 4)
    time_embed_dim = 8
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 1, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer"),
        tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2"),
        unet=_unet(
            seed + 3, resolution // 2, cross_attention_dim=32 + 48,  # penultimate states of both encoders, concatenated
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + 48,  # six time ids + pooled text embedding
        ),
        scheduler=EulerDiscreteScheduler(
            **_SCHEDULE, timestep_spacing="leading", steps_offset=1, interpolation_type="linear", use_karras_sigmas=False
        ),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir)
    return out_dir
