"""scripts/setup.sh on an installed .venv: no pip run, one line saying what is installed. A copy of the script runs in a
folder whose .venv/bin/python stands in for this venv's interpreter and whose install stamp matches requirements.txt."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fake_checkout(tmp_path, python_flags=""):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch\ndiffusers\naccelerate\n")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" {python_flags} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    (tmp_path / ".venv" / ".requirements.sha").write_text(hashlib.sha256(requirements.read_bytes()).hexdigest() + "\n")
    return tmp_path / "scripts" / "setup.sh"


def test_installed_venv_says_it_is_ready(tmp_path):
    done = subprocess.run(["bash", str(fake_checkout(tmp_path))], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(f".venv ready: Python {sys.version.split()[0]}, torch ")
    assert ", diffusers " in lines[0] and ", accelerate " in lines[0]
    assert lines[0].endswith("(requirements.txt unchanged since the last install)")


def test_missing_packages_are_named(tmp_path):
    done = subprocess.run(["bash", str(fake_checkout(tmp_path, "-S"))], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert ".venv incomplete: torch, diffusers, accelerate not installed" in done.stderr
