#!/usr/bin/env bash
# Wan2.2-T2V-A14B + Diffusion-DPO with the winner-preserving safeguard, LoRA on both experts in one run (each pair's
# timestep routed to the high-noise `transformer` or the low-noise `transformer_2` at the model's boundary_ratio,
# 0.875), on video preference pairs. --train_expert high / low trains one expert on its side of the boundary;
# --pretrained_model_name_or_path Wan-AI/Wan2.2-I2V-A14B-Diffusers --conditioning_image first_frame trains the
# image-to-video model on pairs made from one image. A starting point, not a tuned recipe.
#
#   bash scripts/train/wan22_a14b_diffusion_dpo.sh --dataset_name DATA [extra train.py arguments]
#
# Settings, each with its reason:
#   81 frames at 480 x 832 (the family's default): the A14B models' 480p setting (Wan2.2's own sizes are 480p and 720p; its model card's
#     example is 720 x 1280: give --video_size 720 1280 for it, about 3.6x the tokens).
#   Memory (benchmarks/memory_table.py, fixed state before activations, 80 GB GPUs): LoRA on both experts holds
#     2 x 14.3 B parameters, 68.8 GB with the base in bf16 on one GPU, so it is sharded: FSDP over at least 4 GPUs
#     (the base in fp32, 4 bytes per parameter / N) with `ACCELERATE_ARGS="--config_file
#     configs/accelerate/fsdp_wan.yaml"`; a full fine-tune of both experts does not fit 80 GB GPUs at any FSDP size (the
#     reference stays whole on every GPU: 57.2 GB), of one expert (--train_expert) over 16. Activations: not measured.
#   beta 100: beta_flow = 5000 E[(1 - s)^2] = 102 under the logit-normal(0, 1) density with shift 12 (Wan2.2's
#     sample_shift for t2v-A14B; the scheduler config decides), as the Wan2.1 launcher derives it (derived, not
#     tuned). One expert alone sees only its side: E[(1 - s)^2] x 5000 is 22 above the boundary and 295 below it
#     (give --beta_dpo for --train_expert high / low accordingly).
#   LoRA rank 8, learning rate 1e-5: diffusers' LoRA Diffusion-DPO recipe (as the other video launchers).
#   mu 0.9, batch 1 pair per GPU x 16 accumulation steps, gradient checkpointing, bf16: as the Wan2.1 launcher.
# Writes output/wan22-a14b-diffusion-dpo/: pytorch_lora_weights.safetensors (transformer) and
# pytorch_lora_weights_2.safetensors (transformer_2: pipe.load_lora_weights(out, weight_name=
# "pytorch_lora_weights_2.safetensors", load_into_transformer_2=True)), checkpoints, metrics.jsonl, README.md.
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE, CPU=1,
# SAFEGUARD=0 (no safeguard), VARIANT=cm (DPO-C&M) or VARIANT=is (importance-weighted).
set -euo pipefail

VIDEO_PAIRS=1  # no public default dataset: _launch.sh asks for --dataset_name
NAME=wan22-a14b-diffusion-dpo
ARGS=(
    --pretrained_model_name_or_path Wan-AI/Wan2.2-T2V-A14B-Diffusers --model_family wan22_a14b --train_expert both
    --train_method diffusion-dpo --beta_dpo 100
    --use_winner_preserving --winner_preserving_mu 0.9
    --use_lora --lora_rank 8 --learning_rate 1e-5
    --train_batch_size 1 --gradient_accumulation_steps 16 --gradient_checkpointing
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
