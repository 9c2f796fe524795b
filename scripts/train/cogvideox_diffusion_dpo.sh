#!/usr/bin/env bash
# CogVideoX-2b + Diffusion-DPO with the winner-preserving safeguard, LoRA, on video preference pairs (v-prediction on
# its zero-terminal-SNR schedule). Not a setting of the official code (images only) nor of the SDPO paper's (its
# video settings are not public): a starting point, not a tuned recipe.
#
#   bash scripts/train/cogvideox_diffusion_dpo.sh --dataset_name DATA [extra train.py arguments]
#   DATA: a folder of parquet files or WebDataset shards with mp4_0, mp4_1, label_0, caption, or a JSONL manifest
#   of local files (caption, video_0, video_1, label_0; docs/video.md). There is no public default: it is required.
#   CogVideoX-5b: add --pretrained_model_name_or_path THUDM/CogVideoX-5b --beta_dpo 1800 (see beta below).
#
# Settings, each with its reason:
#   49 frames at 480 x 720 (the family's default): CogVideoXPipeline's defaults, the models' training size.
#     Computed (not measured) to fit an 80 GB GPU with LoRA, and for the 2b with a full fine-tune (docs/video.md).
#   LoRA rank 8, learning rate 1e-5: diffusers' LoRA Diffusion-DPO recipe (examples/research_projects/diffusion_dpo,
#     SD1.5/SDXL UNets; no published recipe for this model); adapters on to_k/to_q/to_v/to_out.0, the targets of
#     diffusers' CogVideoX LoRA example (examples/cogvideo).
#   beta 1200: SD1.5's 5000 carried over to v-prediction so that margins match on average in epsilon units:
#     eps_hat - eps = sqrt(abar_t)(v_hat - v), so beta_v = 5000 E_t[abar_t] = 1173 for uniform t on CogVideoX-2b's
#     schedule (snr_shift_scale 3.0, zero terminal SNR), rounded; 1761 (1800) on the 5b's (snr_shift_scale 1.0, as far
#     as we know) (docs/families.md; derived, not tuned).
#   mu 0.9: the paper's SD1.5 value. Batch 1 pair per GPU x 16 accumulation steps (128 pairs per update on 8 GPUs:
#     our choice, not a published setting), gradient checkpointing, bf16.
# Writes output/cogvideox-diffusion-dpo/: checkpoint-500 ... checkpoint-2000/, pytorch_lora_weights.safetensors,
# metrics.jsonl, training_config.json, README.md (model card), logs/. Load it with diffusers' CogVideoXPipeline and
# pipe.load_lora_weights(output/cogvideox-diffusion-dpo) ; evaluate it with
#   bash scripts/eval/test_cogvideox.sh output/cogvideox-diffusion-dpo   (mp4s, frame scores, temporal consistency; docs/video.md).
# A failed run ends with one line, `error: <cause> (exit status N)`, and exits with that status.
# Environment (scripts/train/_launch.sh): NUM_GPUS, NUM_PROCESSES, ACCELERATE_ARGS, PYTHON, ACCELERATE,
# CPU=1 (on the CPU with smoke-test settings; arguments override them), SAFEGUARD=0 (no safeguard),
# VARIANT=cm (DPO-C&M: --importance_weighting clip_mask) or VARIANT=is (--importance_weighting full).
set -euo pipefail

VIDEO_PAIRS=1  # no public default dataset: _launch.sh asks for --dataset_name
NAME=cogvideox-diffusion-dpo
ARGS=(
    --pretrained_model_name_or_path THUDM/CogVideoX-2b --model_family cogvideox
    --train_method diffusion-dpo --beta_dpo 1200
    --use_winner_preserving --winner_preserving_mu 0.9
    --use_lora --lora_rank 8 --learning_rate 1e-5
    --train_batch_size 1 --gradient_accumulation_steps 16 --gradient_checkpointing
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
