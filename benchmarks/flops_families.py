"""FLOPs per preference pair of the flow families' training step (SD3.5-medium, FLUX.1-dev), on the meta device.

The step is train.compute_loss + backward with the family's real architecture (the `config.json` files of the public
repositories stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev, written out below) and random
weights that are never allocated: PyTorch's FlopCounterMode counts every matmul and convolution of the VAE encode, the
text encoders, the policy forward, the reference forward and the backward, as benchmarks/bench_train.py does for SD1.5
and SDXL. Batch 1 pair (2 images), 1024 px.

    python benchmarks/flops_families.py [--family sd35 flux] [--resolution 1024] [--gradient_checkpointing] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import families  # noqa: E402
import train  # noqa: E402
from benchmarks.models import (CLIP_BIGG_TEXT, CLIP_L_TEXT, FLUX_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER,  # noqa: E402
                               T5_XXL, VAE_16, WAN_1_3B_TRANSFORMER)

TEXT_TOKENS = {"sd35": (77, 77, 256), "flux": (77, 512)}


def build(name: str):
    """The family's models on the meta device: policy, reference, VAE, text encoders."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if name == "sd35":
            make = lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)  # noqa: E731
            encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT)),
                        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)), T5EncoderModel(T5Config(**T5_XXL))]
        else:
            make = lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)  # noqa: E731
            encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), T5EncoderModel(T5Config(**T5_XXL))]
        policy, reference, vae = make(), make(), AutoencoderKL(**VAE_16)
    return policy, reference, vae, encoders


def flops_per_pair(name: str, resolution: int, gradient_checkpointing: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    family_name = "sd3" if name == "sd35" else "flux"
    args = train.parse_args(["--pretrained_model_name_or_path", f"<random {name}>", "--dataset_name", "<none>",
                             "--model_family", family_name, "--resolution", str(resolution), "--train_batch_size", "1",
                             "--use_winner_preserving", "--winner_preserving_mu", "0.9", "--mixed_precision", "no"])
    policy, reference, vae, encoders = build(name)
    if gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    family = families.make_family(args)
    family.guidance_embeds = name == "flux"
    noise = families.FlowNoise(FlowMatchEulerDiscreteScheduler(shift=3.0), args).to("meta")
    batch = {"pixel_values": torch.empty(1, 6, resolution, resolution, device="meta")}
    for i, length in enumerate(TEXT_TOKENS[name]):
        batch["input_ids" if i == 0 else f"input_ids_{i + 1}"] = torch.zeros(1, length, dtype=torch.long, device="meta")
    parameters = {"denoiser": sum(p.numel() for p in policy.parameters()),
                  "text_encoders": sum(p.numel() for e in encoders for p in e.parameters()),
                  "vae": sum(p.numel() for p in vae.parameters())}

    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    def step():
        loss, *_ = train.compute_loss(args, batch, policy, reference, vae, encoders, family, noise, torch.float32)
        loss.backward()

    total = count(step)
    latents = torch.empty(2, 16, resolution // 8, resolution // 8, device="meta")
    encode = count(lambda: vae.encoder(torch.empty(2, 3, resolution, resolution, device="meta")))
    text = count(lambda: family.encode_prompts(batch, encoders))
    with torch.no_grad():
        conditioning = family.encode_prompts(batch, encoders)
    conditioning = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in conditioning.items()}
    inputs = family.model_inputs(conditioning, latents, torch.float32)
    forward = count(lambda: family.predict(reference, latents, torch.zeros(2, device="meta"), inputs))
    return {"family": name, "resolution": resolution, "gradient_checkpointing": gradient_checkpointing,
            "parameters": parameters, "tflop_per_pair": total / 1e12,
            "parts_tflop": {"vae_encode": encode / 1e12, "text_encoders": text / 1e12, "policy_forward": forward / 1e12,
                            "reference_forward": forward / 1e12,
                            "backward_and_loss": (total - encode - text - 2 * forward) / 1e12}}


COGVIDEOX_2B_TRANSFORMER = dict(  # THUDM/CogVideoX-2b transformer/config.json
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False,
)
VIDEO = {"wan": ("wan", (480, 832), 81), "cogvideox2b": ("cogvideox", (480, 720), 49),  # the pipelines' defaults
         # Wan2.2 (issue 22), the model cards' sizes: TI2V-5B 121 x 704 x 1280; A14B 81 x 720 x 1280, where a pair
         # meets one 14B expert (winner and loser share the timestep, routed at the boundary), so its FLOPs are one
         # expert's whichever side the timestep falls on
         "wan22_ti2v": ("wan22", (704, 1280), 121), "wan22_a14b": ("wan22_a14b", (720, 1280), 81)}


def video_flops_per_pair(name: str) -> dict:
    """FLOPs per pair of a video family's step (Wan2.1-1.3B, CogVideoX-2B) at the pipeline's default frames and size."""
    from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler, WanTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from benchmarks.models import WAN22_TI2V_5B_TRANSFORMER, WAN22_VAE, WAN_14B_TRANSFORMER

    family_name, (height, width), frames = VIDEO[name]
    args = train.parse_args(["--pretrained_model_name_or_path", f"<random {name}>", "--dataset_name", "<none>",
                             "--model_family", family_name, "--video_size", str(height), str(width), "--num_frames",
                             str(frames), "--train_batch_size", "1", "--use_winner_preserving", "--winner_preserving_mu",
                             "0.9", "--mixed_precision", "no"])
    family = families.make_family(args)
    with torch.device("meta"):
        if family_name in ("wan", "wan22", "wan22_a14b"):
            config = {"wan": WAN_1_3B_TRANSFORMER, "wan22": WAN22_TI2V_5B_TRANSFORMER,
                      "wan22_a14b": WAN_14B_TRANSFORMER}[family_name]
            make = lambda: WanTransformer3DModel(**config)  # noqa: E731
            vae = AutoencoderKLWan(**(WAN22_VAE if family_name == "wan22" else {}))
            encoders = [UMT5EncoderModel(UMT5Config(**dict(T5_XXL, vocab_size=256384)))]
            noise = families.FlowNoise(FlowMatchEulerDiscreteScheduler(shift=3.0), args)
            family.patch_size = (1, 2, 2)  # wan22: read from the transformer in load_denoiser
            # the padding mask needs the ids' values, which meta tensors lack; it does not change the matmuls' FLOPs
            family.encode_prompts = lambda batch, enc: {"prompt_embeds": enc[0](batch["input_ids"]).last_hidden_state}
        else:
            make = lambda: CogVideoXTransformer3DModel(**COGVIDEOX_2B_TRANSFORMER)  # noqa: E731
            vae, encoders = AutoencoderKLCogVideoX(), [T5EncoderModel(T5Config(**T5_XXL))]
            noise = families.DDPMNoise(CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                              timestep_spacing="trailing"))
        policy, reference = make(), make()
    if family_name == "cogvideox":
        family.transformer_config, family.vae_config, family.rotary_cache = policy.config, vae.config, {}
    noise.to("meta")
    batch = {"pixel_values": torch.empty(1, 6, frames, height, width, device="meta"),
             "input_ids": torch.zeros(1, family.text_length, dtype=torch.long, device="meta")}

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss, *_ = train.compute_loss(args, batch, policy, reference, vae, encoders, family, noise, torch.float32)
        loss.backward()
    return {"family": name, "frames": frames, "size": [height, width],
            "denoiser_params": sum(p.numel() for p in policy.parameters()), "tflop_per_pair": counter.get_total_flops() / 1e12}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=["sd35", "flux"], choices=["sd35", "flux", *VIDEO])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="One JSON record per family instead of a table.")
    args = parser.parse_args(argv)
    records = [video_flops_per_pair(name) if name in VIDEO else flops_per_pair(name, args.resolution,
                                                                               args.gradient_checkpointing)
               for name in args.family]
    for record in records:
        if args.json or record["family"] in VIDEO:
            print(json.dumps(record))
        else:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in record["parts_tflop"].items())
            print(f"{record['family']}: {record['tflop_per_pair']:.1f} TFLOP per pair at {record['resolution']} px "
                  f"({parts}); denoiser {record['parameters']['denoiser'] / 1e9:.2f} B parameters")
    return records


if __name__ == "__main__":
    main()
