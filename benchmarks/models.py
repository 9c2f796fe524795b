"""The models the benchmarks time: `tiny` (CPU-sized) and the real SD1.5 / SDXL architectures with random weights.

The architectures are the `config.json` files of the public model repositories (stable-diffusion-v1-5/
stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/),
written out here so that no weights are needed. Parameter counts match the released models (SD1.5 UNet 859,520,964;
SDXL UNet 2,567,463,684), which tests/test_benchmarks.py checks on the meta device.

    bench = build("sd15", device="cuda", weight_dtype=torch.bfloat16)
    bench.unet, bench.ref_unet, bench.vae, bench.text_encoders, bench.tokenizers, bench.alphas_cumprod
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass

import torch

CONFIGS = ("tiny", "sd15", "sdxl")
RESOLUTION = {"tiny": 32, "sd15": 512, "sdxl": 1024}  # pixels; latents are 64x64 (SD1.5) and 128x128 (SDXL)

# The DDPM training schedule of both SD1.5 and SDXL (scheduler/scheduler_config.json).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu",
)
VAE = dict(  # the same architecture in SD1.5, SDXL and madebyollin/sdxl-vae-fp16-fix; 8x compression
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu",
)
CLIP_L_TEXT = dict(  # openai/clip-vit-large-patch14 text tower: SD1.5's text encoder and SDXL's first one
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
CLIP_BIGG_TEXT = dict(  # OpenCLIP ViT-bigG/14 text tower with projection: SDXL's second text encoder
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


@dataclass
class BenchModels:
    name: str
    sdxl: bool
    resolution: int
    unet: torch.nn.Module
    ref_unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    alphas_cumprod: torch.Tensor


def _tokenizers(sdxl: bool) -> list:
    """The real CLIP BPE tokenizer (tiny.build_clip_tokenizer writes OpenAI's vocabulary), once per text encoder."""
    from tiny import build_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as folder:
        tokenizer = build_clip_tokenizer(folder)  # held in memory once built
    return [tokenizer, copy.deepcopy(tokenizer)] if sdxl else [tokenizer]


def _real_architecture(name: str, device, weight_dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sdxl = name == "sdxl"
    with torch.device(device):  # random init directly on the device (fast on GPU; "meta" allocates nothing)
        unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET))
        vae = AutoencoderKL(**VAE, sample_size=RESOLUTION[name], scaling_factor=0.13025 if sdxl else 0.18215)
        text_encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))]
        if sdxl:
            text_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)))
    return unet, _cast(vae, weight_dtype), [_cast(e, weight_dtype) for e in text_encoders]


def _cast(module, dtype=None, device=None):
    """torch's own .to(): diffusers' override warns about fp32-kept modules even when a model has none."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def _tiny(device, weight_dtype, sdxl: bool):
    """The tiny pipelines of tests/ and the demo, written to a temporary folder and loaded as train.py loads them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tiny import build_sd15, build_sdxl

    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as folder:  # loaded into memory, then removed
        (build_sdxl if sdxl else build_sd15)(folder)
        unet = _cast(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), device=device)
        vae = _cast(AutoencoderKL.from_pretrained(folder, subfolder="vae"), weight_dtype, device)
        text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=weight_dtype).to(device)]
        if sdxl:
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=weight_dtype).to(device))
    return unet, vae, text_encoders


def build(name: str, device="cpu", weight_dtype=torch.float32, reference: bool = True,
          sdxl_tiny: bool = False) -> BenchModels:
    """Policy UNet (fp32 master weights), frozen reference copy, VAE and text encoders in `weight_dtype`, as train.py.

    `name` in CONFIGS; `tiny` is SD1.5-like unless `sdxl_tiny`. On device "meta" nothing is allocated (FLOP counts).
    """
    from diffusers import DDPMScheduler

    if name not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {name!r}")
    sdxl = name == "sdxl" or (name == "tiny" and sdxl_tiny)
    if name == "tiny":
        unet, vae, text_encoders = _tiny(device, weight_dtype, sdxl)
    else:
        unet, vae, text_encoders = _real_architecture(name, device, weight_dtype)
    ref_unet = _cast(copy.deepcopy(unet), weight_dtype) if reference else None
    for module in [vae, *text_encoders] + ([ref_unet] if ref_unet is not None else []):
        module.requires_grad_(False)
        module.eval()
    unet.train()
    alphas_cumprod = DDPMScheduler(**SCHEDULE).alphas_cumprod.to(device)
    return BenchModels(name, sdxl, RESOLUTION[name], unet, ref_unet, vae, text_encoders,
                       _tokenizers(sdxl), alphas_cumprod)


SD35_MEDIUM_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


FLUX_DEV_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


VAE_16 = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)  # SD3 and FLUX VAEs


T5_XXL = dict(  # google/t5-v1_1-xxl encoder, text_encoder_3 (SD3) and text_encoder_2 (FLUX)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, is_encoder_decoder=False,
)


WAN_1_3B_TRANSFORMER = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6,
)


UMT5_XXL = dict(T5_XXL, vocab_size=256384)  # Wan's text encoder (google/umt5-xxl encoder)
# Wan2.2 and I2V (issue 22), as far as I know from diffusers' scripts/convert_wan_to_diffusers.py (not read here):
WAN_14B_TRANSFORMER = dict(WAN_1_3B_TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # each A14B expert
WAN22_TI2V_5B_TRANSFORMER = dict(WAN_1_3B_TRANSFORMER, num_attention_heads=24, ffn_dim=14336, in_channels=48,
                                 out_channels=48)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
WAN_I2V_14B_TRANSFORMER = dict(WAN_14B_TRANSFORMER, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
CLIP_VIT_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         image_size=224, patch_size=14, projection_dim=1024)  # Wan2.1-I2V's image_encoder
