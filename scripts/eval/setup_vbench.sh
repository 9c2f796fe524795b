#!/usr/bin/env bash
# Creates .venv-vbench, a virtual environment of its own for VBench (python -m eval.vbench calls it as a subprocess),
# and installs the vbench package into it. Its own environment because vbench pins an old transformers and numpy<2,
# which this project's .venv (transformers 5, numpy 2) cannot share. Needs internet (PyPI, and later the hub and
# GitHub, from which VBench downloads its models on first use); offline it stops with one clear error.
#
#   bash scripts/eval/setup_vbench.sh
#   VBENCH_SPEC="vbench==0.1.5" PYTHON=python3.10 bash scripts/eval/setup_vbench.sh   # a pinned version, another python
#   WITH_DETECTRON2=1 bash scripts/eval/setup_vbench.sh   # object_class, multiple_objects, color, spatial_relationship
#
# VBENCH_SPEC: what pip installs (default "vbench", the newest on PyPI); PYTHON: the interpreter the environment is
# made from (VBench's README asks for Python 3.8-3.11 with torch); PIP_INDEX_URL: a mirror. Idempotent: a second run
# only checks the import.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${VBENCH_VENV:-.venv-vbench}
SPEC=${VBENCH_SPEC:-vbench}
# the index pip will use: PIP_INDEX_URL, else pip's configured index-url, else PyPI
INDEX=${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}
INDEX=${INDEX:-https://pypi.org/simple}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vbench" 2>/dev/null; then
  echo "$VENV ready: $("$VENV/bin/python" -c 'from importlib.metadata import version; print("vbench", version("vbench"))')"
  exit 0
fi
# offline: say so before creating anything (pip would retry for minutes, then print a long traceback)
if ! "$PYTHON" - "$INDEX" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/vbench/", timeout=10)
except Exception as error:
    print(f"error: cannot reach the package index {sys.argv[1]} ({type(error).__name__}: {error}).", file=sys.stderr)
    sys.exit(1)
PY
then
  echo "error: scripts/eval/setup_vbench.sh needs internet to install vbench (and VBench downloads its models on" \
       "first use). Run it on a machine that is online, or set PIP_INDEX_URL to a reachable mirror." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "Installing $SPEC into $VENV (it brings its own torch, transformers and numpy<2)"
"$VENV/bin/python" -m pip install -q "$SPEC"
if [ "${WITH_DETECTRON2:-0}" = "1" ]; then
  "$VENV/bin/python" -m pip install -q "detectron2@git+https://github.com/facebookresearch/detectron2.git"
fi
"$VENV/bin/python" -c "import vbench" || { echo "error: vbench does not import in $VENV (see above)" >&2; exit 1; }
echo "$VENV ready: $("$VENV/bin/python" -c 'from importlib.metadata import version; print("vbench", version("vbench"))')"
