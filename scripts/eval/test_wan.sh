#!/usr/bin/env bash
# Evaluate a Wan2.1 (480 x 832, 50 steps, guidance 5.0) model trained by train.py: for each prompt set, one mp4 per prompt
# (eval.generate), then the five image metrics averaged over sampled frames and temporal consistency (eval.score), and
# the table of every set scored in the output folder. The same steps, log and environment variables as test_sd15.sh,
# which this runs for the wan family (SIZE as HEIGHTxWIDTH, e.g. SIZE=480x832; STEP, CFG, SEED, PROMPT_GROUPS,
# PRETRAIN: the base model, a hub id or a local folder). VBench: scripts/eval/vbench.sh on a generated manifest.
#
#   bash scripts/eval/test_wan.sh output/wan-diffusion-dpo [--max_prompts 4] [extra eval.generate args, e.g. --num_frames 17]
set -euo pipefail
EVAL_FAMILY=wan EVAL_SCRIPT=$0 exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
