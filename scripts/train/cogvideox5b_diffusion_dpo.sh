#!/usr/bin/env bash
# CogVideoX-5b + Diffusion-DPO with the winner-preserving safeguard, LoRA, on video preference pairs: the settings of
# scripts/train/cogvideox_diffusion_dpo.sh (each with its reason there) with the 5b model, its rotary embeddings, and
# beta 1800 (5000 E_t[abar_t] = 1761 on the 5b's schedule, rounded; derived, not tuned).
#
#   bash scripts/train/cogvideox5b_diffusion_dpo.sh --dataset_name DATA [extra train.py arguments]
#
# Writes output/cogvideox5b-diffusion-dpo/. Computed (not measured) to fit an 80 GB GPU with LoRA at 49 x 480 x 720;
# a full fine-tune needs sharding (configs/accelerate/fsdp_cogvideox.yaml; docs/video.md).
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE, CPU=1,
# SAFEGUARD=0 (no safeguard), VARIANT=cm (DPO-C&M) or VARIANT=is (importance-weighted).
set -euo pipefail

VIDEO_PAIRS=1  # no public default dataset: _launch.sh asks for --dataset_name
NAME=cogvideox5b-diffusion-dpo
ARGS=(
    --pretrained_model_name_or_path THUDM/CogVideoX-5b --model_family cogvideox
    --train_method diffusion-dpo --beta_dpo 1800
    --use_winner_preserving --winner_preserving_mu 0.9
    --use_lora --lora_rank 8 --learning_rate 1e-5
    --train_batch_size 1 --gradient_accumulation_steps 16 --gradient_checkpointing
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
