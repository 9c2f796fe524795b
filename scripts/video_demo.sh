#!/usr/bin/env bash
# The offline video demo: a tiny Wan2.1-like model learns a toy colour preference on moving shapes with Diffusion-DPO,
# plain, with the Diffusion-SDPO safeguard, and with the safeguard plus importance weighting; the report (Markdown,
# frame strips, winner/loser error curves, win rates) lands in video_demo_output/. No GPU; a few minutes on 2 cores.
#
#   bash scripts/video_demo.sh [--quick] [--output_dir DIR] [any scripts/video_demo.py option, see --help]
#
# As scripts/demo.sh: installs requirements.txt into .venv if needed (scripts/setup.sh); DEMO_PYTHON=/path/to/python
# skips that. Works from any directory.
set -euo pipefail
DEMO_SCRIPT=video_demo.py exec bash "$(dirname "${BASH_SOURCE[0]}")/demo.sh" "$@"
