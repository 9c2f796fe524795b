#!/usr/bin/env bash
# Wan2.1-T2V-1.3B + Diffusion-DPO with the winner-preserving safeguard, LoRA, on video preference pairs (rectified
# flow with the model's shift). Not a setting of the official code (images only) nor of the SDPO paper's (its video
# settings are not public): a starting point, not a tuned recipe.
#
#   bash scripts/train/wan_diffusion_dpo.sh --dataset_name DATA [extra train.py arguments]
#   DATA: a folder of parquet files or WebDataset shards with mp4_0, mp4_1, label_0, caption, or a JSONL manifest
#   of local files (caption, video_0, video_1, label_0; docs/video.md). There is no public default: it is required.
#   e.g. --pretrained_model_name_or_path /models/wan2.1-t2v-1.3b (a local copy), --max_train_steps 10, --output_dir DIR
#
# Settings, each with its reason:
#   81 frames at 480 x 832 (the family's default): WanPipeline's default clip and the 1.3B model's resolution.
#     Computed (not measured) to fit an 80 GB GPU with LoRA and with a full fine-tune (docs/video.md).
#   LoRA rank 8, learning rate 1e-5: diffusers' LoRA Diffusion-DPO recipe (examples/research_projects/diffusion_dpo,
#     SD1.5/SDXL UNets; no published recipe for this model); adapters on to_k/to_q/to_v/to_out.0 (the family's default).
#   beta 500: SD1.5's 5000 carried over to this parametrisation so that margins match on average in epsilon units:
#     for rectified flow eps_hat - eps = (1 - s)(v_hat - v), so beta_flow = 5000 E[(1 - s)^2] = 565 under the
#     logit-normal(0, 1) density and Wan2.1's flow_shift 3.0, the same as SD3.5-medium's, rounded down as its
#     launcher does (docs/families.md; derived, not tuned).
#   mu 0.9: the paper's SD1.5 value. Batch 1 pair per GPU (two 81-frame videos per forward) x 16 accumulation steps
#     (128 pairs per update on 8 GPUs: our choice, not a published setting), gradient checkpointing, bf16.
# Writes output/wan-diffusion-dpo/: checkpoint-500 ... checkpoint-2000/, pytorch_lora_weights.safetensors,
# metrics.jsonl, training_config.json, README.md (model card), logs/. Load it with diffusers' WanPipeline and
# pipe.load_lora_weights(output/wan-diffusion-dpo) ; evaluate it with
#   bash scripts/eval/test_wan.sh output/wan-diffusion-dpo   (mp4s, frame scores, temporal consistency; docs/video.md).
# A failed run ends with one line, `error: <cause> (exit status N)`, and exits with that status.
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE,
# CPU=1 (on the CPU with smoke-test settings; arguments override them), SAFEGUARD=0 (no safeguard),
# VARIANT=cm (DPO-C&M: --importance_weighting clip_mask) or VARIANT=is (--importance_weighting full).
set -euo pipefail

VIDEO_PAIRS=1  # no public default dataset: _launch.sh asks for --dataset_name
NAME=wan-diffusion-dpo
ARGS=(
    --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --model_family wan
    --train_method diffusion-dpo --beta_dpo 500
    --use_winner_preserving --winner_preserving_mu 0.9
    --use_lora --lora_rank 8 --learning_rate 1e-5
    --train_batch_size 1 --gradient_accumulation_steps 16 --gradient_checkpointing
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
