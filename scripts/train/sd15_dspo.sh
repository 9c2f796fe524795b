#!/usr/bin/env bash
# SD1.5 + DSPO with the winner-preserving safeguard (Diffusion-SDPO): the shipped settings of the official
# scripts/train/sd15_dspo.sh (SPEC Part B §5.1).
#
#   bash scripts/train/sd15_dspo.sh [extra train.py arguments]
#   e.g. --dataset_name /data/pickapic_v2 (a local copy), --max_train_steps 10, --output_dir DIR
#
# Writes output/sd15-dspo/ in the repository: checkpoint-500 ... checkpoint-2000/, the final UNet as
# unet.safetensors and unet.pth, metrics.jsonl and logs/ (tensorboard). Evaluate it with
#   bash scripts/eval/test_sd15.sh output/sd15-dspo/unet.pth
# Environment: NUM_PROCESSES, ACCELERATE_ARGS, CPU=1, SAFEGUARD=0, PYTHON, ACCELERATE (scripts/train/_launch.sh).
# Effective batch 8 x 32 x processes pairs (2048 on 8 GPUs, the paper's); --scale_lr multiplies the learning rate
# by the same factor.
set -euo pipefail

NAME=sd15-dspo
ARGS=(
    --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5
    --train_method dspo --beta_dpo 0.001
    --use_winner_preserving --winner_preserving_mu 0.2
    --learning_rate 1e-8 --scale_lr
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
