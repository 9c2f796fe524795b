"""FSDP2 through accelerate on two CPU ranks (gloo), with gradient checkpointing and EMA: the same training as DDP to
float rounding (weights, lambda, logged metrics), and a resume from an FSDP checkpoint bit-exact, EMA included."""

import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from test_train import ACCELERATE, REPO, metrics, train_args

FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "BasicTransformerBlock,ResnetBlock2D",
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_reshard_after_forward", "true"]


def launch_two(strategy, *args):
    launcher = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += FSDP if strategy == "fsdp" else ["--multi_gpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([*ACCELERATE, *launcher, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tiny_sd15, pickapic, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    common = ["--use_winner_preserving", "--winner_preserving_mu", "0.5", "--use_ema", "--checkpointing_steps", "2",
              "--gradient_checkpointing"]  # composes with FSDP
    (root / "fsdp.log").write_text(launch_two("fsdp", *train_args(tiny_sd15, pickapic, root / "fsdp", *common, steps=4)).stderr)
    launch_two("ddp", *train_args(tiny_sd15, pickapic, root / "ddp", *common, steps=4))
    return root, common


def test_fsdp_trains_as_ddp(runs):
    root, _ = runs
    checkpoint = root / "fsdp" / "checkpoint-2"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded state
    assert (checkpoint / "unet.safetensors").is_file()  # and the full weights the eval scripts read
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        fsdp, ddp = load_file(str(root / "fsdp" / name)), load_file(str(root / "ddp" / name))
        assert fsdp.keys() == ddp.keys()
        assert max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) < 1e-5
    for a, b in zip(metrics(root / "fsdp"), metrics(root / "ddp")):
        assert a["step"] == b["step"]
        for key in ("avg_lose_l_scale", "implicit_acc_accumulated", "model_mse_unaccumulated"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        # beta = 5000 turns the weights' 1e-6 rounding differences into ~1e-4 relative differences of the DPO loss
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)


def test_memory_table_holds_what_fsdp_holds(runs, tiny_sd15):
    """benchmarks/memory_table.py's FSDP rows divide the policy by the number of ranks and hold the reference whole:
    what train.py's FSDP run above held on rank 0 (fp32 here: --mixed_precision no)."""
    import re

    from benchmarks import memory_table

    root, _ = runs
    n = sum(v.numel() for v in load_file(str(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors")).values())
    held = re.search(r"policy (\d+) bytes \(its FSDP shard\), frozen reference (\d+) bytes", (root / "fsdp.log").read_text())
    policy, reference = int(held[1]), int(held[2])
    assert reference == 4 * n and not memory_table.REFERENCE_SHARDED  # whole on every rank, as the table counts it
    # FSDP2 gives rank 0 the larger half of a first dimension that does not split evenly: a little over 1/2
    assert 4 * n / 2 <= policy < 4 * n * 0.55
    assert memory_table.full_state_bytes(n, 2) == memory_table.POLICY_BYTES * n / 2 + memory_table.REFERENCE_BYTES * n


def test_fsdp_resume_is_exact(runs, tiny_sd15, pickapic):
    """A run killed after checkpoint-2 (its folder as it was then) resumes under FSDP to the undisturbed run's weights."""
    root, common = runs
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(root / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    lines = (root / "fsdp" / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # step 3 was logged before the kill
    launch_two("fsdp", *train_args(tiny_sd15, pickapic, resumed, *common, steps=4))
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        a, b = load_file(str(root / "fsdp" / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4]
    assert [m["train_loss"] for m in metrics(resumed)] == [m["train_loss"] for m in metrics(root / "fsdp")]


def test_accelerate_configs_name_each_familys_block():
    """configs/accelerate/fsdp_<family>.yaml: FSDP2, bf16, and a wrapping unit that exists in diffusers."""
    import importlib

    from accelerate.commands.config.config_args import load_config_from_file

    where = {"BasicTransformerBlock": "attention", "JointTransformerBlock": "attention", "ResnetBlock2D": "resnet",
             "FluxTransformerBlock": "transformers.transformer_flux",
             "FluxSingleTransformerBlock": "transformers.transformer_flux",
             "WanTransformerBlock": "transformers.transformer_wan",
             "CogVideoXBlock": "transformers.cogvideox_transformer_3d"}
    expected = {"sd15": "BasicTransformerBlock,ResnetBlock2D", "sdxl": "BasicTransformerBlock,ResnetBlock2D",
                "sd3": "JointTransformerBlock", "flux": "FluxTransformerBlock,FluxSingleTransformerBlock",
                "wan": "WanTransformerBlock", "cogvideox": "CogVideoXBlock"}
    for name, blocks in expected.items():
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"fsdp_{name}.yaml"))
        assert config.fsdp_config["fsdp_version"] == 2 and config.mixed_precision == "bf16"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == blocks
        for block in blocks.split(","):
            assert hasattr(importlib.import_module(f"diffusers.models.{where[block]}"), block), block


def test_fsdp_lora_with_ema_trains_as_ddp(tiny_sd15, pickapic, tmp_path):
    """LoRA under FSDP (the base sharded in fp32 beside the fp32 adapters): the same adapter and EMA as DDP."""
    common = ["--use_lora", "--use_ema", "--learning_rate", "1e-3", "--checkpointing_steps", "2"]
    launch_two("fsdp", *train_args(tiny_sd15, pickapic, tmp_path / "fsdp", *common, steps=2))
    launch_two("ddp", *train_args(tiny_sd15, pickapic, tmp_path / "ddp", *common, steps=2))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        fsdp, ddp = load_file(str(tmp_path / "fsdp" / name)), load_file(str(tmp_path / "ddp" / name))
        assert fsdp.keys() == ddp.keys()
        # Adam's first steps act like sign(g) on tiny adapter gradients, so compare relative to the weights
        difference = torch.sqrt(sum((fsdp[k] - ddp[k]).pow(2).sum() for k in fsdp))
        assert difference / torch.sqrt(sum(ddp[k].pow(2).sum() for k in ddp)) < 1e-3
        assert any(v.abs().sum() > 0 for k, v in fsdp.items() if "lora.up" in k)  # B starts at 0: it trained


def test_fsdp_adafactor_trains_and_resumes_as_ddp(tiny_sd15, pickapic, tmp_path):
    """Adafactor (the --sdxl default) under FSDP2: its factored moments are taken over the whole matrix, as DDP's
    unsharded Adafactor takes them, so the two agree to float rounding; the sharded state resumes bit-exact."""
    common = ["--optimizer", "adafactor", "--checkpointing_steps", "2"]
    launch_two("fsdp", *train_args(tiny_sd15, pickapic, tmp_path / "fsdp", *common, steps=3))
    launch_two("ddp", *train_args(tiny_sd15, pickapic, tmp_path / "ddp", *common, steps=3))
    fsdp, ddp = load_file(str(tmp_path / "fsdp" / "unet.safetensors")), load_file(str(tmp_path / "ddp" / "unet.safetensors"))
    base = load_file(str(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors"))
    # the same bound as AdamW's above: Adafactor's update is a normalised gradient, so the gradients' reduction-order
    # rounding (~1e-7 relative) reaches the weights as ~1e-7 relative of lr-sized steps, far under 1e-5
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) < 1e-5
    assert max((fsdp[k] - base[k]).abs().max().item() for k in fsdp) > 1e-5  # and it trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()[:2]))
    launch_two("fsdp", *train_args(tiny_sd15, pickapic, resumed, *common, steps=3))
    again = load_file(str(resumed / "unet.safetensors"))
    assert all(torch.equal(fsdp[k], again[k]) for k in fsdp)


def test_fsdp1_is_refused_naming_the_setting(tiny_sd15, pickapic, tmp_path):
    launcher = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                *[value if value != "2" else "1" for value in FSDP]]  # the same config with fsdp_version 1
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([*ACCELERATE, *launcher, str(REPO / "train.py"), *train_args(tiny_sd15, pickapic, tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "FSDP version 1 is not supported" in result.stderr
    assert "`fsdp_version: 2`" in result.stderr


def test_fsdp_setup_refuses_fsdp1_and_8bit_adam():
    import train

    fsdp2 = SimpleNamespace(fsdp_version=2)
    with pytest.raises(ValueError, match="`fsdp_version: 2`"):
        train.check_fsdp_setup(SimpleNamespace(optimizer="adamw"), SimpleNamespace(fsdp_version=1))
    train.check_fsdp_setup(SimpleNamespace(optimizer="adamw"), fsdp2)
    train.check_fsdp_setup(SimpleNamespace(optimizer="adafactor"), fsdp2)
    with pytest.raises(ValueError, match="cannot train under FSDP"):
        train.check_fsdp_setup(SimpleNamespace(optimizer="adamw8bit"), fsdp2)


@pytest.mark.parametrize("present, world_size, cpu", [
    (None, 2, True), (None, 1, False), ("cuda", 2, False), ("npu", 2, False), ("hpu", 2, False), ("xpu", 2, False)])
def test_cpu_ranks_only_without_an_accelerator(monkeypatch, present, world_size, cpu):
    """Accelerator(cpu=True) for several processes only when accelerate would find no accelerator of any kind."""
    from accelerate import utils

    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: present == "cuda")
    for name in ("npu", "hpu", "mlu", "musa", "sdaa", "neuron"):
        monkeypatch.setattr(utils, f"is_{name}_available", lambda *a, name=name, **k: present == name)
    monkeypatch.setattr(utils, "is_xpu_available", lambda *a, **k: present == "xpu")
    monkeypatch.setattr(utils, "is_xccl_available", lambda: present == "xpu")
    monkeypatch.setattr(utils, "is_torch_xla_available", lambda *a, **k: False)
    assert train.uses_cpu_ranks(world_size) is cpu
