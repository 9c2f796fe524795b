"""FSDP2 through accelerate on two CPU ranks (gloo), with gradient checkpointing and EMA: the same training as DDP to
float rounding (weights, lambda, logged metrics), and a resume from an FSDP checkpoint bit-exact, EMA included."""

import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from test_latent_cache import LINEAR_ADAMW, relative_update_difference
from test_train import ACCELERATE, REPO, base_unet, metrics, train_args

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
              "--gradient_checkpointing", *LINEAR_ADAMW]  # composes with FSDP; a step linear in the gradients
    (root / "fsdp.log").write_text(launch_two("fsdp", *train_args(tiny_sd15, pickapic, root / "fsdp", *common, steps=4)).stderr)
    launch_two("ddp", *train_args(tiny_sd15, pickapic, root / "ddp", *common, steps=4))
    return root, common


def test_fsdp_trains_as_ddp(runs, tiny_sd15):
    """FSDP and DDP compute the same gradients with differently grouped float32 operations (sharded parameters
    gathered per block, gradients reduce-scattered instead of all-reduced), so they agree to rounding, not bit for bit.
    Compared: the total weight update of a step linear in the gradients (see LINEAR_ADAMW) and the logged numbers; a
    rounding-sized gradient difference gives a relative update difference of about 1e-6 (measured 2e-6 to 5e-6 for the
    cache's), while a missing or doubled rank's gradient moves it by O(1), so 1e-4 separates the two."""
    root, _ = runs
    checkpoint = root / "fsdp" / "checkpoint-2"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded state
    assert (checkpoint / "unet.safetensors").is_file()  # and the full weights the eval scripts read
    base = base_unet(tiny_sd15)
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        fsdp, ddp = load_file(str(root / "fsdp" / name)), load_file(str(root / "ddp" / name))
        assert fsdp.keys() == ddp.keys()
        assert relative_update_difference(base, ddp, fsdp) < 1e-4, name
    for a, b in zip(metrics(root / "fsdp"), metrics(root / "ddp")):
        assert a["step"] == b["step"]
        # what the loss is made of; the loss itself is not compared: beta = 5000 multiplies the MSEs' rounding
        # (about 1e-6 of an MSE near 1) into ~1e-3 differences of its logit, which says nothing about the path
        for key in ("avg_lose_l_scale", "implicit_acc_accumulated", "model_mse_unaccumulated", "ref_mse_unaccumulated"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


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


@pytest.mark.parametrize("damage", ["missing pytorch_model_fsdp_0/__1_0.distcp", "truncated optimizer_0/__1_0.distcp",
                                    "truncated optimizer_0/.metadata", "planted pytorch_model_fsdp_0/.metadata"])
def test_a_damaged_shard_is_named(runs, tmp_path, monkeypatch, damage):
    """One rank's shard gone or cut short, or the shards' index damaged or holding a planted object (torch loads it
    with plain pickle): the checkpoint is not resumable, the file is named, and no planted code runs."""
    import checkpoints
    from test_faults import MARKER, Payload

    root, _ = runs
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(root / "fsdp" / "checkpoint-2", folder)
    assert checkpoints.checkpoint_problems(folder, ["unet.safetensors", "unet_ema.safetensors"], False, fsdp=True) == []
    kind, name = damage.split()
    path = folder / name
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        import pickle

        monkeypatch.chdir(tmp_path)
        path.write_bytes(pickle.dumps(Payload(tmp_path / MARKER)))
    problems = checkpoints.checkpoint_problems(folder, ["unet.safetensors", "unet_ema.safetensors"], False, fsdp=True)
    assert len(problems) == 1 and problems[0].startswith(str(path)), problems
    assert not (tmp_path / MARKER).exists()


def test_fsdp_latest_falls_back_past_a_truncated_shard(runs, tiny_sd15, pickapic, tmp_path):
    """checkpoint-4 with one rank's model shard cut short: `latest` resumes from checkpoint-2 under FSDP, with a
    warning naming the file, and ends with the undisturbed run's weights bit for bit (as test_fsdp_resume_is_exact)."""
    root, common = runs
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp", run)
    shard = run / "checkpoint-4" / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        (run / name).unlink()  # as if killed before the end
    result = launch_two("fsdp", *train_args(tiny_sd15, pickapic, run, *common, steps=4))
    assert f"checkpoint-4 cannot be resumed ({shard} is truncated" in result.stderr
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        a, b = load_file(str(root / "fsdp" / name)), load_file(str(run / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


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
    common = ["--use_lora", "--use_ema", "--checkpointing_steps", "2", *LINEAR_ADAMW]
    launch_two("fsdp", *train_args(tiny_sd15, pickapic, tmp_path / "fsdp", *common, steps=2))
    launch_two("ddp", *train_args(tiny_sd15, pickapic, tmp_path / "ddp", *common, steps=2))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        fsdp, ddp = load_file(str(tmp_path / "fsdp" / name)), load_file(str(tmp_path / "ddp" / name))
        assert fsdp.keys() == ddp.keys()
        # the adapters start at B = 0, so the update is the adapter itself; see test_fsdp_trains_as_ddp for the bound
        assert relative_update_difference({k: torch.zeros_like(v) for k, v in ddp.items()}, ddp, fsdp) < 1e-4, name
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
