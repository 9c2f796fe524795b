#!/usr/bin/env bash
# Creates .venv (if absent) and installs requirements.txt into it. Idempotent: a second run only checks.
# Ends with one line: `.venv ready: Python X, torch Y, diffusers Z, accelerate W (...)` (versions read from the
# installed package metadata, without importing torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing requirements.txt into .venv (torch is large: this takes a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
  state="requirements.txt installed"
else
  state="requirements.txt unchanged since the last install"
fi
.venv/bin/python - "$state" << 'EOF'
import platform, sys
from importlib.metadata import PackageNotFoundError, version
found, missing = [], []
for name in ("torch", "diffusers", "accelerate"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f".venv incomplete: {', '.join(missing)} not installed; reinstall with "
             "`rm .venv/.requirements.sha && bash scripts/setup.sh`")
print(f".venv ready: Python {platform.python_version()}, {', '.join(found)} ({sys.argv[1]})")
EOF
