#!/usr/bin/env python
"""Training-state memory of full fine-tuning vs LoRA, counted on the real SD1.5 and SDXL UNet architectures.

The UNets are built on the meta device (no weights, no memory) from the public config.json values, then prepared
exactly as train.py prepares them: full fine-tuning = fp32 policy + AdamW + a frozen reference UNet in the mixed
precision dtype; LoRA = train.add_lora (base frozen in that dtype, fp32 adapters) + AdamW, and no reference UNet
(train.adapters_disabled). One AdamW step on zero gradients materialises the optimizer state, and every tensor the
run would hold (weights, gradients, AdamW moments) is summed. Activations are not included: they are the same
forward passes in both cases (LoRA adds r-wide intermediate products only).

    python scripts/lora_memory.py                      # bf16, rank 4, diffusers' default target modules
    python scripts/lora_memory.py --lora_rank 64 --mixed_precision fp16
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

UNETS = {  # unet/config.json of stable-diffusion-v1-5/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
    "SD1.5": dict(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "SDXL": dict(
        sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}


def meta_unet(config: dict, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return torch.nn.Module.to(UNet2DConditionModel(**config), dtype=dtype)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def training_state(unet, reference=None) -> dict:
    """Bytes of weights, gradients and AdamW moments after one optimizer step (as train.py builds its optimizer)."""
    params = [p for _, p in train.trainable_parameters(unet)]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-8, foreach=False)
    optimizer.step()
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    return {
        "trainable parameters": sum(p.numel() for p in params),
        "weights": nbytes(unet.parameters()) + (nbytes(reference.parameters()) if reference is not None else 0),
        "gradients": nbytes(p.grad for p in params),
        "AdamW moments": nbytes(moments),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixed_precision", choices=["bf16", "fp16", "no"], default="bf16")
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--lora_target_modules", default="to_k,to_q,to_v,to_out.0")
    options = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[options.mixed_precision]
    lora_args = argparse.Namespace(lora_rank=options.lora_rank, lora_alpha=options.lora_rank, seed=0,
                                   lora_target_modules=options.lora_target_modules)
    gib = 2**30
    print("| UNet | training | trainable params | weights | gradients | AdamW moments | total (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, config in UNETS.items():
        full = training_state(meta_unet(config), reference=meta_unet(config, dtype))
        lora_unet = meta_unet(config)
        train.add_lora(lora_unet, lora_args, dtype)
        lora = training_state(lora_unet)
        for label, state in ((f"full + reference UNet ({options.mixed_precision})", full),
                             (f"LoRA r={options.lora_rank}, reference = adapters off", lora)):
            total = state["weights"] + state["gradients"] + state["AdamW moments"]
            print(f"| {name} | {label} | {state['trainable parameters']:,} | {state['weights'] / gib:.2f} | "
                  f"{state['gradients'] / gib:.3f} | {state['AdamW moments'] / gib:.3f} | {total / gib:.2f} |")
            if label.startswith("LoRA"):
                saved = full_total - total
                print(f"| {name} | **saved by LoRA** | | | | | **{saved / gib:.2f} ({saved / full_total:.0%})** |")
            else:
                full_total = total


if __name__ == "__main__":
    main()
