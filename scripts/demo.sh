#!/usr/bin/env bash
# The offline demo: a tiny diffusion model learns a toy colour preference with Diffusion-DPO, with and without the
# Diffusion-SDPO safeguard; the report (Markdown, training curves, Figure 1 at toy scale, win rates, samples) lands in
# demo_output/. No network beyond the package index for the first install, no GPU; a few minutes on 2 CPU cores.
#
#   bash scripts/demo.sh [--quick] [--output_dir DIR] [any scripts/demo.py option, see --help]
#
# First installs requirements.txt into .venv if needed (scripts/setup.sh). DEMO_PYTHON=/path/to/python skips that
# and uses an interpreter that already has the requirements. Works from any directory.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${DEMO_PYTHON:-} ]]; then
    PYTHON_BIN=$DEMO_PYTHON
else
    bash "$REPO/scripts/setup.sh"
    PYTHON_BIN=$REPO/.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PYTHON_BIN" "$REPO/scripts/${DEMO_SCRIPT:-demo.py}" "$@"  # DEMO_SCRIPT: scripts/video_demo.sh sets it
