#!/usr/bin/env bash
# VBench on a video manifest written by eval.generate: lays the videos out as <prompt>-<k>.mp4 (VBench's standard
# naming), runs VBench's evaluate in .venv-vbench (made by scripts/eval/setup_vbench.sh) for the chosen dimensions,
# and writes its per-dimension means as <manifest stem>_vbench_scores.md/.json (eval.score's table format).
#
#   python prompts/build.py vbench --from_file .venv-vbench/lib/python3.*/site-packages/vbench/VBench_full_info.json \
#       --dimensions subject_consistency motion_smoothness
#   python -m eval.generate --pretrain_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --unet_path output/wan-dpo \
#       --test_json prompts/vbench-subject-consistency-motion-smoothness.json
#   bash scripts/eval/vbench.sh output/wan-dpo/vbench-subject-consistency-motion-smoothness_seed0_480x832_50s_5.0cfg.json \
#       --dimensions subject_consistency motion_smoothness [--device cuda] [--mode custom_input]
#
# Extra arguments go to `python -m eval.vbench run` (see its --help). PYTHON: this project's interpreter (default
# .venv/bin/python if present, else python).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/eval/vbench.sh MANIFEST [--dimensions DIM ...] [--device cuda] [--mode custom_input]" >&2
  exit 2
fi
manifest="$1"; shift
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m eval.vbench run --json_path "$manifest" "$@"
