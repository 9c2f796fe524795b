#!/usr/bin/env bash
# Evaluate a fine-tuned SDXL UNet as the official scripts/eval/test_sdxl.sh does: 1024x1024, 50 Euler steps, CFG 7.5,
# seed 0, base stabilityai/stable-diffusion-xl-base-1.0 with the madebyollin/sdxl-vae-fp16-fix VAE.
#
#   bash scripts/eval/test_sdxl.sh output/sdxl-dpo/unet.pth [extra eval.generate args]
#   bash scripts/eval/test_sdxl.sh output/sdxl-dpo/unet.pth --max_prompts 8   # smoke run: first 8 prompts per set
#
# Same steps, log (<OUTPUT>/joint_test_1024.log, appended to) and environment variables as test_sd15.sh, which this
# runs in SDXL mode: a train.py --use_lora folder is evaluated as its LoRA adapter, a smoke run is completed by the
# same command without --max_prompts, all sets are scored in one eval.score call, and the table (with n) covers every
# set scored in OUTPUT.
set -euo pipefail
EVAL_SDXL=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
