#!/usr/bin/env bash
# Evaluate a fine-tuned SD3 / SD3.5 transformer: 1024x1024, 40 steps, CFG 4.5 (diffusers' standard guidance formula),
# seed 0, with StableDiffusion3Pipeline and its FlowMatchEulerDiscreteScheduler, base
# stabilityai/stable-diffusion-3.5-medium (40 steps and guidance 4.5: that model card's diffusers example).
#
#   bash scripts/eval/test_sd3.sh output/sd35-dpo/transformer.pth [extra eval.generate args]
#   bash scripts/eval/test_sd3.sh output/sd35-lora                    # a train.py --use_lora folder: its LoRA adapter
#   bash scripts/eval/test_sd3.sh output/sd35-dpo/transformer.pth --max_prompts 8   # smoke run: first 8 prompts per set
#   PRETRAIN=/models/stable-diffusion-3.5-medium bash scripts/eval/test_sd3.sh output/sd35-dpo/transformer.pth
#
# PRETRAIN: the base model the transformer was trained from, a hub id (default above; gated: accept its licence and
# log in, or download it first) or a local pipeline folder (offline machines). The argument may be transformer.pth /
# .safetensors, a transformer or pipeline folder, or a train.py output folder. Same steps, log
# (<OUTPUT>/joint_test_1024.log, appended to) and environment variables as test_sd15.sh, which this runs for the sd3
# family: a smoke run is completed by the same command without --max_prompts, all sets are scored in one eval.score
# call, and the table (with n) covers every set scored in OUTPUT. SIZE, STEP, CFG, SEED override the protocol.
set -euo pipefail
EVAL_FAMILY=sd3 exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
