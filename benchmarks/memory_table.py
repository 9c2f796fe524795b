"""Training-state memory per GPU, per model family and strategy, computed from the real architectures on the meta device.

For each model the parameter counts come from its public config (the denoiser, the frozen text encoders and VAE,
instantiated on the meta device: nothing is allocated). Bytes per GPU, before activations:

- full fine-tune, DDP: policy fp32 weights (4 B/param) + fp32 gradients (4) + AdamW's two fp32 moments (8) + the
  frozen reference in bf16 (2), all replicated on every GPU;
- full fine-tune, FSDP on N GPUs (full shard): the policy's weights, gradients and moments divided by N; the
  reference whole on every GPU, as train.py holds it (a frozen copy outside FSDP; tests/test_fsdp.py checks this);
- LoRA: the base in bf16 (2 B/param), the reference is the same weights with the adapters off, adapters negligible;
- frozen text encoders and VAE in bf16 on every GPU, unless --latents_cache (then not loaded).

Activations depend on resolution, frames, batch and gradient checkpointing and are measured only on a GPU
(benchmarks/run_gpu.sh); the table says which combinations' fixed state fits 24, 40 and 80 GB, leaving room for them.

    python benchmarks/memory_table.py [--gpus 8] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import (CLIP_BIGG_TEXT, CLIP_L_TEXT, CLIP_VIT_H_VISION, FLUX_DEV_TRANSFORMER,  # noqa: E402
                               SD15_UNET, SD35_MEDIUM_TRANSFORMER, SDXL_UNET, T5_XXL, UMT5_XXL, VAE, VAE_16,
                               WAN22_TI2V_5B_TRANSFORMER, WAN22_VAE, WAN_1_3B_TRANSFORMER, WAN_14B_TRANSFORMER,
                               WAN_I2V_14B_TRANSFORMER)

COGVIDEOX_5B_TRANSFORMER = dict(  # THUDM/CogVideoX-5b transformer/config.json
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
)
IMAGE_MODELS = ("SD1.5", "SDXL", "SD3.5-medium", "FLUX.1-dev")
# Bytes per denoiser parameter of a full fine-tune: the policy's fp32 weights, gradients and AdamW's two moments, which
# FSDP shards; the frozen bf16 reference, which train.py keeps whole on every rank (under DDP and FSDP alike).
POLICY_BYTES, REFERENCE_BYTES = 16, 2
REFERENCE_SHARDED = False


def full_state_bytes(denoiser: int, shards: int = 1) -> float:
    return POLICY_BYTES * denoiser / shards + REFERENCE_BYTES * denoiser / (shards if REFERENCE_SHARDED else 1)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def models() -> dict:
    """{name: (denoiser parameters, frozen text-encoder + VAE parameters)}, built on the meta device."""
    from diffusers import (AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXTransformer3DModel,
                           FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, WanTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip_l = lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))  # noqa: E731
    clip_l_proj = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT))  # noqa: E731
    clip_g = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT))  # noqa: E731
    t5 = lambda: T5EncoderModel(T5Config(**T5_XXL))  # noqa: E731
    umt5 = lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL))  # noqa: E731
    specs = {
        "SD1.5": (lambda: UNet2DConditionModel(**SD15_UNET), [clip_l, lambda: AutoencoderKL(**VAE)]),
        "SDXL": (lambda: UNet2DConditionModel(**SDXL_UNET), [clip_l, clip_g, lambda: AutoencoderKL(**VAE)]),
        "SD3.5-medium": (lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
                         [clip_l_proj, clip_g, t5, lambda: AutoencoderKL(**VAE_16)]),
        "FLUX.1-dev": (lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER), [clip_l, t5, lambda: AutoencoderKL(**VAE_16)]),
        "Wan2.1-1.3B": (lambda: WanTransformer3DModel(**WAN_1_3B_TRANSFORMER),
                        [lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)), lambda: AutoencoderKLWan()]),
        "CogVideoX-5B": (lambda: CogVideoXTransformer3DModel(**COGVIDEOX_5B_TRANSFORMER),
                         [t5, lambda: AutoencoderKLCogVideoX()]),
        "Wan2.2-TI2V-5B": (lambda: WanTransformer3DModel(**WAN22_TI2V_5B_TRANSFORMER),
                           [umt5, lambda: AutoencoderKLWan(**WAN22_VAE)]),
        # --train_expert both: the two 14B experts are one trained denoiser (WanExperts), its reference a copy
        "Wan2.2-A14B, both experts": (lambda: torch.nn.ModuleList([WanTransformer3DModel(**WAN_14B_TRANSFORMER),
                                                                   WanTransformer3DModel(**WAN_14B_TRANSFORMER)]),
                                      [umt5, lambda: AutoencoderKLWan()]),
        # --train_expert high / low: one expert is loaded (the other is not used by its side's timesteps)
        "Wan2.2-A14B, one expert": (lambda: WanTransformer3DModel(**WAN_14B_TRANSFORMER), [umt5, lambda: AutoencoderKLWan()]),
        "Wan2.1-I2V-14B": (lambda: WanTransformer3DModel(**WAN_I2V_14B_TRANSFORMER),
                           [umt5, lambda: AutoencoderKLWan(),
                            lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_VISION))]),
    }
    counts = {}
    with torch.device("meta"):
        for name, (denoiser, frozen) in specs.items():
            counts[name] = (count(denoiser()), sum(count(make()) for make in frozen))
    return counts


def table(gpus: int) -> list[dict]:
    rows = []
    for name, (denoiser, frozen) in models().items():
        frozen_bytes = 2 * frozen
        strategies = {
            "DDP": full_state_bytes(denoiser),
            f"FSDP x{gpus}": full_state_bytes(denoiser, gpus),
            "LoRA": 2 * denoiser,
        }
        for strategy, state in strategies.items():
            for cached in (False, True) if name in IMAGE_MODELS else (False,):  # the cache is for the image families
                total = state + (0 if cached else frozen_bytes)
                rows.append({"model": name, "denoiser_params": denoiser, "frozen_params": frozen, "strategy": strategy,
                             "latents_cache": cached, "state_gb": state / 1e9, "frozen_gb": 0 if cached else frozen_bytes / 1e9,
                             "total_gb": total / 1e9,
                             "fits": [size for size in (24, 40, 80) if total / 1e9 <= 0.8 * size],
                             "fsdp_gpus_for_80gb": fsdp_gpus(denoiser, frozen_bytes, strategy == "LoRA")})
    return rows


def fsdp_gpus(denoiser: int, frozen_bytes: float, lora: bool, gpu_gb: float = 80, max_gpus: int = 64) -> int | None:
    """The fewest GPUs (a power of two) over which FSDP's full shard brings the fixed state within 80 % of `gpu_gb`:
    a full fine-tune shards the policy's 16 bytes per parameter and keeps the 2-byte reference whole on every GPU (as
    train.py does: full_state_bytes); LoRA under FSDP shards the base in fp32 (4 bytes per parameter: train.add_lora
    keeps one dtype for FSDP2; the reference is the base with the adapters off) and the adapters are negligible. The
    frozen text encoders and VAE stay whole on every GPU. None: not even `max_gpus`."""
    gpus = 1
    while gpus <= max_gpus:
        state = 4 * denoiser / gpus if lora else full_state_bytes(denoiser, gpus)
        if (state + frozen_bytes) / 1e9 <= 0.8 * gpu_gb:
            return gpus
        gpus *= 2
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the FSDP rows shard over.")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = table(args.gpus)
    if not args.markdown:
        for row in rows:
            print(json.dumps(row))
        return rows
    print("| model | denoiser params | strategy | text encoders + VAE | training state GB/GPU | + frozen GB | total GB | fixed state fits (<= 80 % of) |")
    print("|---|---|---|---|---|---|---|---|")
    sharded = {}
    for row in rows:
        frozen = "cached (not loaded)" if row["latents_cache"] else f"{row['frozen_params'] / 1e9:.2f} B in bf16"
        print(f"| {row['model']} | {row['denoiser_params'] / 1e9:.2f} B | {row['strategy']} | {frozen} | "
              f"{row['state_gb']:.1f} | {row['frozen_gb']:.1f} | {row['total_gb']:.1f} | "
              f"{', '.join(f'{s} GB' for s in row['fits']) or 'none'} |")
        if row["strategy"] in ("DDP", "LoRA") and not row["latents_cache"]:
            sharded.setdefault(row["model"], {})[row["strategy"]] = row["fsdp_gpus_for_80gb"]
    print("\nFewest GPUs for FSDP (full shard) to hold the fixed state within 80 % of 80 GB (before activations):\n")
    print("| model | full fine-tune | LoRA (base sharded in fp32) |")
    print("|---|---|---|")
    for model, gpus in sharded.items():
        print(f"| {model} | {gpus['DDP'] or '> 64'} | {gpus['LoRA'] or '> 64'} |")
    return rows


if __name__ == "__main__":
    main()
