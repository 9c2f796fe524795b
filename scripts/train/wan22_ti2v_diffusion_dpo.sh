#!/usr/bin/env bash
# Wan2.2-TI2V-5B + Diffusion-DPO with the winner-preserving safeguard, LoRA, on video preference pairs (text-to-video;
# add --conditioning_image first_frame for image-to-video pairs made from one image). Not a setting of the official
# code (images only) nor of the SDPO paper's: a starting point, not a tuned recipe.
#
#   bash scripts/train/wan22_ti2v_diffusion_dpo.sh --dataset_name DATA [extra train.py arguments]
#   DATA: parquet files or WebDataset shards with mp4_0, mp4_1, label_0, caption, or a JSONL manifest (docs/video.md).
#
# Settings, each with its reason:
#   121 frames at 704 x 1280 (the family's default): the Wan-AI/Wan2.2-TI2V-5B-Diffusers model card's example
#     (720p at 24 fps); the size must be a multiple of 32 (16x VAE, then 2x2 patches). Fixed state per GPU with LoRA:
#     22.8 GB (benchmarks/memory_table.py); activations at this size: not measured (no GPU lent), so lower
#     --num_frames / --video_size if it does not fit.
#   beta 300: SD1.5's 5000 carried over as for Wan2.1 (scripts/train/wan_diffusion_dpo.sh): for rectified flow
#     eps_hat - eps = (1 - s)(v_hat - v), so beta_flow = 5000 E[(1 - s)^2] = 322 under the logit-normal(0, 1)
#     density with the TI2V-5B's shift 5.0 (Wan2.2's sample_shift for ti2v-5B; the scheduler config decides), rounded
#     down as the Wan2.1 launcher rounds (derived, not tuned).
#   LoRA rank 8, learning rate 1e-5: diffusers' LoRA Diffusion-DPO recipe (examples/research_projects/diffusion_dpo;
#     no published recipe for this model); adapters on to_k/to_q/to_v/to_out.0 (the family's default).
#   mu 0.9: the paper's SD1.5 value. Batch 1 pair per GPU x 16 accumulation steps (our choice), gradient
#     checkpointing, bf16 (the launcher's default).
# Writes output/wan22-ti2v-diffusion-dpo/: checkpoints, pytorch_lora_weights.safetensors, metrics.jsonl,
# training_config.json, README.md (model card). Load it with diffusers' WanPipeline (WanImageToVideoPipeline for
# image-to-video) and pipe.load_lora_weights(...); evaluate with python -m eval.generate --unet_path <output>.
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE, CPU=1,
# SAFEGUARD=0 (no safeguard), VARIANT=cm (DPO-C&M) or VARIANT=is (importance-weighted).
set -euo pipefail

VIDEO_PAIRS=1  # no public default dataset: _launch.sh asks for --dataset_name
NAME=wan22-ti2v-diffusion-dpo
ARGS=(
    --pretrained_model_name_or_path Wan-AI/Wan2.2-TI2V-5B-Diffusers --model_family wan22
    --train_method diffusion-dpo --beta_dpo 300
    --use_winner_preserving --winner_preserving_mu 0.9
    --use_lora --lora_rank 8 --learning_rate 1e-5
    --train_batch_size 1 --gradient_accumulation_steps 16 --gradient_checkpointing
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
