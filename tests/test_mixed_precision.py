"""Where the training precision comes from: --mixed_precision if given, else the launcher's setting (accelerate
launch's flag or config file), else fp16; the log says which."""

import json
import os
import subprocess

import train
from test_train import ACCELERATE, REPO, train_args


def test_the_flag_then_the_launcher_then_fp16():
    assert train.resolve_mixed_precision("no", {"ACCELERATE_MIXED_PRECISION": "bf16"})[0] == "no"
    precision, source = train.resolve_mixed_precision(None, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert precision == "bf16" and "accelerate launch" in source
    assert train.resolve_mixed_precision(None, {})[0] == "fp16"


def test_accelerate_configs_precision_wins_without_the_flag(tiny_sd15, pickapic, tmp_path, cpu_bf16_attention):
    config = tmp_path / "bf16.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
                      "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    args = train_args(tiny_sd15, pickapic, tmp_path / "out", steps=1)
    at = args.index("--mixed_precision")
    del args[at:at + 2]  # not given to train.py
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    result = subprocess.run([*ACCELERATE, "--config_file", str(config), str(REPO / "train.py"), *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Mixed precision bf16, from accelerate launch" in result.stderr
    resolved = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert resolved["arguments"]["mixed_precision"] == "bf16"
    assert resolved["resolved"]["precision"].startswith("bf16")
