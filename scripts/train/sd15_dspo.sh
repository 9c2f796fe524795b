#!/usr/bin/env bash
# SD1.5 + DSPO with the winner-preserving safeguard (Diffusion-SDPO): the shipped settings of the official
# scripts/train/sd15_dspo.sh (SPEC Part B §5.1).
#
#   bash scripts/train/sd15_dspo.sh [extra train.py arguments]
#   e.g. --dataset_name /data/pickapic_v2 (a local copy), --max_train_steps 10, --output_dir DIR
#
# Writes output/sd15-dspo/ in the repository: checkpoint-500 ... checkpoint-2000/, the final UNet as
# unet.safetensors and unet.pth (with --use_lora the adapter, pytorch_lora_weights.safetensors), metrics.jsonl,
# training_config.json, README.md (model card) and logs/ (tensorboard). Evaluate it with
#   bash scripts/eval/test_sd15.sh output/sd15-dspo/unet.pth   (with --use_lora: output/sd15-dspo)
# Effective batch 8 x 32 x processes pairs (2048 on 8 GPUs, the paper's); --scale_lr multiplies the learning rate
# by the same factor. With --use_lora the shipped learning rate and --scale_lr give way to --learning_rate 1e-5
# --lora_rank 8, diffusers' LoRA Diffusion-DPO recipe (source and details: scripts/train/_launch.sh).
# A failed run ends with one line, `error: <cause> (exit status N)`, and exits with that status.
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE,
# CPU=1 (on the CPU with smoke-test settings: batch 1, 4 steps, small images, ...; arguments override them),
# SAFEGUARD=0 (no safeguard, into output/sd15-dspo-no-safeguard/).
set -euo pipefail

NAME=sd15-dspo
ARGS=(
    --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5
    --train_method dspo --beta_dpo 0.001
    --use_winner_preserving --winner_preserving_mu 0.2
    --learning_rate 1e-8 --scale_lr
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
