#!/usr/bin/env bash
# Installs (if needed) and runs the test suite offline on the tiny models. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
