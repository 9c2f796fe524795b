#!/usr/bin/env bash
# Wan2.1-I2V-14B-480P + Diffusion-DPO with the winner-preserving safeguard, LoRA, on image-to-video preference pairs:
# both videos of a pair continue one image, their shared first frame, which conditions the model as
# WanImageToVideoPipeline does (image latents with their mask, the CLIP image embedding); pairs whose first frames
# differ are refused. A starting point, not a tuned recipe.
#
#   bash scripts/train/wan_i2v_diffusion_dpo.sh --dataset_name DATA [extra train.py arguments]
#
# Settings, each with its reason:
#   81 frames at 480 x 832: the Wan-AI/Wan2.1-I2V-14B-480P-Diffusers model card's example (its 480p model).
#   Memory (benchmarks/memory_table.py): LoRA holds 16.4 B parameters in bf16, 45.7 GB with the frozen UMT5, VAE and
#     CLIP ViT-H on one 80 GB GPU before activations (not measured: no GPU lent); a full fine-tune needs FSDP over
#     at least 16 GPUs (configs/accelerate/fsdp_wan.yaml; the reference stays whole on every GPU).
#   beta 500: as the Wan2.1 launcher (shift 3.0, beta_flow = 5000 E[(1 - s)^2] = 566, rounded down); the I2V-480P
#     model's scheduler config decides the shift (derived, not tuned).
#   LoRA rank 8, learning rate 1e-5, mu 0.9, batch 1 pair per GPU x 16 accumulation steps, gradient checkpointing,
#     bf16: as the Wan2.1 launcher (scripts/train/wan_diffusion_dpo.sh, each setting's source there).
# Writes output/wan-i2v-diffusion-dpo/ (pytorch_lora_weights.safetensors, checkpoints, metrics.jsonl, README.md);
# load it with WanImageToVideoPipeline and pipe.load_lora_weights(...).
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE, CPU=1,
# SAFEGUARD=0 (no safeguard), VARIANT=cm (DPO-C&M) or VARIANT=is (importance-weighted).
set -euo pipefail

VIDEO_PAIRS=1  # no public default dataset: _launch.sh asks for --dataset_name
NAME=wan-i2v-diffusion-dpo
ARGS=(
    --pretrained_model_name_or_path Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --model_family wan_i2v
    --train_method diffusion-dpo --beta_dpo 500
    --use_winner_preserving --winner_preserving_mu 0.9
    --use_lora --lora_rank 8 --learning_rate 1e-5
    --train_batch_size 1 --gradient_accumulation_steps 16 --gradient_checkpointing
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
