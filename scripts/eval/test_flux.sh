#!/usr/bin/env bash
# Evaluate a fine-tuned FLUX.1 transformer: 1024x1024, 50 steps, guidance 3.5 (FLUX.1-dev's guidance embedding: one
# forward pass per step, no unconditional branch), seed 0, with FluxPipeline and its FlowMatchEulerDiscreteScheduler
# (resolution-dependent shift), base black-forest-labs/FLUX.1-dev (50 steps and guidance 3.5: that model card's
# diffusers example).
#
#   bash scripts/eval/test_flux.sh output/flux-dpo/transformer.pth [extra eval.generate args]
#   bash scripts/eval/test_flux.sh output/flux-lora                   # a train.py --use_lora folder: its LoRA adapter
#   bash scripts/eval/test_flux.sh output/flux-dpo/transformer.pth --max_prompts 8  # smoke run: first 8 prompts per set
#   PRETRAIN=/models/FLUX.1-dev bash scripts/eval/test_flux.sh output/flux-dpo/transformer.pth
#   PRETRAIN=black-forest-labs/FLUX.1-schnell STEP=4 CFG=0 bash scripts/eval/test_flux.sh output/schnell-dpo/transformer.pth
#
# PRETRAIN: the base model the transformer was trained from, a hub id (default above; gated: accept its licence and
# log in, or download it first) or a local pipeline folder (offline machines). FLUX.1-schnell: 4 steps and guidance 0
# as its model card says (its 256 T5 tokens are chosen from the model). The argument may be transformer.pth /
# .safetensors, a transformer or pipeline folder, or a train.py output folder. Same steps, log
# (<OUTPUT>/joint_test_1024.log, appended to) and environment variables as test_sd15.sh, which this runs for the flux
# family. SIZE, STEP, CFG, SEED override the protocol.
set -euo pipefail
EVAL_FAMILY=flux exec bash "$(dirname "${BASH_SOURCE[0]}")/test_sd15.sh" "$@"
