"""scripts/train/*.sh: the shipped settings (SPEC Part B §5.1) reach train.py, extra arguments pass through, GPUs are
counted, and without a GPU the script says how to run on the CPU (CPU=1: smoke-test settings); --use_lora gets a LoRA
learning rate; a failure ends with its one-line cause; signals reach the training. `accelerate` and `python` are stubs
on PATH that record their arguments; train.py's own parser then checks every flag."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import train

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "train"

COMMON = {
    "--dataset_name": "yuvalkirstain/pickapic_v2", "--train_batch_size": "8", "--gradient_accumulation_steps": "32",
    "--dataloader_num_workers": "16", "--max_train_steps": "2000", "--lr_scheduler": "constant_with_warmup",
    "--lr_warmup_steps": "500", "--checkpointing_steps": "500", "--mixed_precision": "bf16", "--allow_tf32": True,
    "--scale_lr": True, "--use_winner_preserving": True,
}
SD15 = {"--pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5", "--learning_rate": "1e-8"}
SDXL = {"--pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0", "--sdxl": True,
        "--pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix", "--learning_rate": "1e-9",
        "--use_adafactor": True, "--gradient_checkpointing": True}
SHIPPED = {  # script -> (base, method, beta, mu, dmpo_alpha)
    "sd15_diffusion_dpo": (SD15, "diffusion-dpo", "5000", "0.9", None),
    "sd15_dspo": (SD15, "dspo", "0.001", "0.2", None),
    "sd15_dmpo": (SD15, "dmpo", "2000", "0.9", "0.01"),
    "sdxl_diffusion_dpo": (SDXL, "diffusion-dpo", "5000", "0.6", None),
    "sdxl_dspo": (SDXL, "dspo", "5000", "0.6", None),
    "sdxl_dmpo": (SDXL, "dmpo", "6000", "0.6", "0.01"),
}


@pytest.fixture
def stubs(tmp_path):
    """A bin folder with `accelerate` (records its argv as JSON) and `python` (prints $STUB_GPUS for the GPU count)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(
        "#!/usr/bin/env bash\n"
        "printf '%s\\0' \"$@\" > \"$STUB_ARGV\"\n")
    (bin_dir / "python").write_text("#!/usr/bin/env bash\necho \"${STUB_GPUS:-0}\"\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def launch(script, stubs, tmp_path, *extra, gpus=8, **env):
    """Run scripts/train/<script>.sh from tmp_path; return (completed process, accelerate argv or None)."""
    argv_file = tmp_path / "argv"
    argv_file.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_ARGV": str(argv_file),
                "STUB_GPUS": str(gpus), "HF_HOME": str(tmp_path / "hf"), **env}
    for key in ("NUM_GPUS", "NUM_PROCESSES", "ACCELERATE_ARGS", "CPU", "SAFEGUARD", "PYTHON", "ACCELERATE",
                "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT"):
        if key not in env:
            full_env.pop(key, None)
    done = subprocess.run(["bash", str(SCRIPTS / f"{script}.sh"), *extra], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True)
    argv = argv_file.read_text().split("\0")[:-1] if argv_file.exists() else None
    return done, argv


def split(argv):
    """accelerate argv -> (launch options, train.py arguments)."""
    assert argv[0] == "launch"
    index = argv.index(str(REPO / "train.py"))
    return argv[1:index], argv[index + 1:]


def options(args):
    """`--flag value` / `--flag` pairs, the last occurrence winning (as argparse)."""
    found, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            found[args[i]] = args[i + 1]
            i += 2
        else:
            found[args[i]] = True
            i += 1
    return found


@pytest.mark.parametrize("script", sorted(SHIPPED))
def test_shipped_settings_and_pass_through(script, stubs, tmp_path):
    base, method, beta, mu, alpha = SHIPPED[script]
    done, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pickapic", "--max_train_steps", "10", gpus=8)
    assert done.returncode == 0, done.stderr
    launch_options, train_args = split(argv)
    assert launch_options == ["--quiet", "--num_processes", "8"]
    assert train_args[-4:] == ["--dataset_name", "/local/pickapic", "--max_train_steps", "10"]  # extra args come last

    shipped = options(train_args[:-4])
    expected = {**COMMON, **base, "--train_method": method, "--beta_dpo": beta, "--winner_preserving_mu": mu,
                "--output_dir": str(REPO / "output" / script.replace("_", "-"))}
    if alpha:
        expected["--dmpo_alpha"] = alpha
    assert shipped == expected

    parsed = train.parse_args(train_args)  # every flag exists in train.py; the extra ones won
    assert parsed.dataset_name == "/local/pickapic" and parsed.max_train_steps == 10
    assert parsed.use_winner_preserving and parsed.scale_lr and parsed.allow_tf32
    assert parsed.resolution == (1024 if base is SDXL else 512)
    assert parsed.max_grad_norm == 1.0  # SDXL keeps the global clipping the official run had (B6)


def test_processes_follow_the_gpus_and_overrides(stubs, tmp_path):
    _, argv = launch("sd15_diffusion_dpo", stubs, tmp_path, gpus=2)
    assert split(argv)[0] == ["--quiet", "--num_processes", "2"]
    _, argv = launch("sd15_diffusion_dpo", stubs, tmp_path, gpus=2, NUM_PROCESSES="16",
                     ACCELERATE_ARGS="--num_machines 2 --machine_rank 1")
    assert split(argv)[0] == ["--quiet", "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1"]
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"  # `accelerate config` wrote one: it decides
    config.parent.mkdir(parents=True)
    config.write_text("num_processes: 16\n")
    done, argv = launch("sd15_diffusion_dpo", stubs, tmp_path, gpus=8)
    assert split(argv)[0] == ["--quiet"] and "accelerate config" in done.stdout


def test_several_machines(stubs, tmp_path):
    """NUM_MACHINES > 1: accelerate's multi-node options, and the processes of the whole job (GPUs x machines)."""
    where = dict(NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.0.0.1", MAIN_PROCESS_PORT="29555")
    done, argv = launch("sd15_diffusion_dpo", stubs, tmp_path, gpus=8, **where)
    assert done.returncode == 0, done.stderr
    assert split(argv)[0] == ["--quiet", "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
                              "--main_process_ip", "10.0.0.1", "--main_process_port", "29555"]
    assert "16 processes on 2 machines (this is machine 1" in done.stdout
    for missing in ("MACHINE_RANK", "MAIN_PROCESS_IP"):
        done, argv = launch("sd15_diffusion_dpo", stubs, tmp_path, gpus=8,
                            **{k: v for k, v in where.items() if k != missing})
        assert done.returncode == 2 and argv is None and "slurm.sbatch" in done.stderr
    done, argv = launch("sd15_diffusion_dpo", stubs, tmp_path, gpus=8, **dict(where, MACHINE_RANK="2"))
    assert done.returncode == 2 and "MACHINE_RANK (0 .. 1" in done.stderr


def test_slurm_sbatch_derives_the_machines_from_slurm(stubs, tmp_path):
    """scripts/train/slurm.sbatch under a stub `srun` that runs its command once per node (SLURM_NODEID 0, 1) and a
    stub `scontrol show hostnames`: each node's `accelerate launch` gets its rank, the first host and one port."""
    (stubs / "scontrol").write_text("#!/usr/bin/env bash\n[[ $* == 'show hostnames node-[07-08]' ]] && "
                                    "printf 'node-07\\nnode-08\\n'\n")
    (stubs / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "printf '%s\\0' \"$@\" > \"$STUB_ARGV.srun\"\n"
        "while [[ $1 == --* ]]; do [[ $1 == *=* ]] && shift || shift 2; done\n"
        "for ((node = 0; node < SLURM_NNODES; node++)); do\n"
        "    SLURM_NODEID=$node SLURM_PROCID=$node STUB_ARGV=$STUB_ARGV.$node \"$@\" || exit\n"
        "done\n")
    for stub in ("scontrol", "srun"):
        (stubs / stub).chmod(0o755)
    slurm = dict(SLURM_JOB_ID="123456", SLURM_NNODES="2", SLURM_JOB_NODELIST="node-[07-08]",
                 SLURM_SUBMIT_DIR=str(REPO), SLURM_GPUS_ON_NODE="4")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_ARGV": str(tmp_path / "argv"),
           "HF_HOME": str(tmp_path / "hf"), **slurm}
    for key in ("NUM_GPUS", "NUM_PROCESSES", "ACCELERATE_ARGS", "CPU", "MAIN_PROCESS_PORT", "REPO"):
        env.pop(key, None)
    done = subprocess.run(["bash", str(SCRIPTS / "slurm.sbatch"), "sd15_diffusion_dpo", "--max_train_steps", "10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--kill-on-bad-exit=1" in (tmp_path / "argv.srun").read_text().split("\0")  # one dead node ends the job
    for node in (0, 1):
        argv = (tmp_path / f"argv.{node}").read_text().split("\0")[:-1]
        launch_options, train_args = split(argv)
        assert launch_options == ["--quiet", "--num_processes", "8", "--num_machines", "2", "--machine_rank", str(node),
                                  "--main_process_ip", "node-07", "--main_process_port", str(20000 + 123456 % 20000)]
        assert train_args[-2:] == ["--max_train_steps", "10"]
    done = subprocess.run(["bash", str(SCRIPTS / "slurm.sbatch"), "no_such_script"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "sd15_diffusion_dpo" in done.stderr


def test_no_gpu_says_how_to_run_on_cpu(stubs, tmp_path):
    done, argv = launch("sdxl_dspo", stubs, tmp_path, gpus=0)
    assert done.returncode == 1 and argv is None
    assert "No GPU found" in done.stderr
    assert "CPU=1 bash scripts/train/sdxl_dspo.sh --dataset_name DIR" in done.stderr

    done, argv = launch("sdxl_dspo", stubs, tmp_path, gpus=0, CPU="1")
    assert done.returncode == 0, done.stderr
    launch_options, train_args = split(argv)
    assert launch_options == ["--quiet", "--cpu", "--num_processes", "1"]
    assert train.parse_args(train_args).mixed_precision == "no"


@pytest.mark.parametrize("script, resolution", [("sd15_diffusion_dpo", 256), ("sdxl_dmpo", 512)])
def test_cpu_applies_smoke_settings_that_arguments_override(script, resolution, stubs, tmp_path):
    """CPU=1: a smoke test that finishes (batch 1, no accumulation, small images, 4 steps with a checkpoint at 2,
    fp32, no more data workers than cores), said on stdout; the script's own arguments still win."""
    done, argv = launch(script, stubs, tmp_path, gpus=0, CPU="1")
    assert done.returncode == 0, done.stderr
    assert "CPU=1: smoke-test settings" in done.stdout
    parsed = train.parse_args(split(argv)[1])
    assert parsed.train_batch_size == 1 and parsed.gradient_accumulation_steps == 1
    assert parsed.dataloader_num_workers <= min(2, len(os.sched_getaffinity(0)))
    assert parsed.checkpointing_steps <= parsed.max_train_steps <= 10
    assert parsed.mixed_precision == "no" and parsed.lr_warmup_steps == 0 and parsed.max_train_samples == 16
    assert parsed.resolution == resolution

    _, argv = launch(script, stubs, tmp_path, "--max_train_steps", "6", "--resolution", "64", gpus=0, CPU="1")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.max_train_steps == 6 and parsed.resolution == 64 and parsed.train_batch_size == 1


@pytest.mark.parametrize("script", ["sd15_dspo", "sdxl_diffusion_dpo"])
def test_lora_gets_a_lora_learning_rate(script, stubs, tmp_path):
    """--use_lora: diffusers' Diffusion-DPO LoRA recipe (lr 1e-5, rank 8, no --scale_lr) instead of the full
    fine-tune lr 1e-8/1e-9 x 2048, unless the arguments say otherwise."""
    done, argv = launch(script, stubs, tmp_path, "--use_lora")
    assert done.returncode == 0, done.stderr
    assert "--use_lora:" in done.stdout and "diffusion_dpo/README.md" in done.stdout
    parsed = train.parse_args(split(argv)[1])
    assert parsed.use_lora and parsed.learning_rate == 1e-5 and not parsed.scale_lr and parsed.lora_rank == 8

    _, argv = launch(script, stubs, tmp_path, "--use_lora", "--learning_rate=3e-5", "--lora_rank", "16")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.learning_rate == 3e-5 and parsed.lora_rank == 16 and not parsed.scale_lr
    _, argv = launch(script, stubs, tmp_path, "--use_lora", "--learning_rate", "2e-6", "--scale_lr")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.learning_rate == 2e-6 and parsed.scale_lr


def fake_accelerate(tmp_path, body):
    path = tmp_path / "fake-accelerate"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


TRACEBACKS = """cat >&2 << 'EOF'
Traceback (most recent call last):
  File "/repo/train.py", line 1500, in main
    raise SystemExit(1)
%s
Traceback (most recent call last):
  File "/venv/bin/accelerate", line 8, in <module>
    sys.exit(main())
subprocess.CalledProcessError: Command '['/venv/bin/python', '/repo/train.py', '--output_dir', 'x']' returned non-zero exit status 1.
EOF
"""


def test_failure_ends_with_its_cause(stubs, tmp_path):
    """The output streams through unchanged, then one last line names the cause; the exit status is kept."""
    body = "echo 'Steps: 10%' >&2\n" + TRACEBACKS % "usage: train.py [-h]\ntrain.py: error: X is missing" + "exit 3\n"
    done, _ = launch("sd15_dspo", stubs, tmp_path, ACCELERATE=fake_accelerate(tmp_path, body))
    assert done.returncode == 3
    assert "Steps: 10%" in done.stderr and "CalledProcessError" in done.stderr
    assert done.stderr.splitlines()[-1] == "error: train.py: error: X is missing (exit status 3)"

    body = TRACEBACKS % "ValueError: the cause" + "echo '=====' >&2\nexit 1\n"  # no train.py line: the exception
    done, _ = launch("sd15_dspo", stubs, tmp_path, ACCELERATE=fake_accelerate(tmp_path, body))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "error: ValueError: the cause (exit status 1)"

    done, _ = launch("sd15_dspo", stubs, tmp_path, gpus=1)  # success: no error line
    assert done.returncode == 0 and "error:" not in done.stderr

    (stubs / "env").write_text('#!/bin/sh\ncase "$1" in --default-signal*) exit 125;; esac\nexec /usr/bin/env "$@"\n')
    (stubs / "env").chmod(0o755)  # an env without --default-signal (coreutils < 8.31): run in the foreground
    body = TRACEBACKS % "train.py: error: Y" + "exit 1\n"
    done, _ = launch("sd15_dspo", stubs, tmp_path, ACCELERATE=fake_accelerate(tmp_path, body))
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == "error: train.py: error: Y (exit status 1)"


@pytest.mark.parametrize("sig, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_signals_stop_the_training(sig, to_group, stubs, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) and SIGTERM to the script alone or to the group reach the
    training; the script then ends with the training's status."""
    mark = tmp_path / "mark"
    mark.write_text("")
    body = (f"trap 'echo INT >> {mark}; kill $!; exit 130' INT\n"
            f"trap 'echo TERM >> {mark}; kill $!; exit 143' TERM\n"
            f"echo started >> {mark}\nsleep 30 & wait\n")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_GPUS": "1",
           "ACCELERATE": fake_accelerate(tmp_path, body)}
    script = subprocess.Popen(["bash", str(SCRIPTS / "sd15_dspo.sh")], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "started" not in mark.read_text():
            assert time.monotonic() < deadline and script.poll() is None, script.communicate()
            time.sleep(0.05)
        time.sleep(0.2)
        (os.killpg if to_group else os.kill)(script.pid, sig)
        _, err = script.communicate(timeout=20)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    received = "INT" if sig == signal.SIGINT else "TERM"
    started, *got = mark.read_text().split()  # SIGTERM to the group: from there and forwarded, maybe both seen
    assert started == "started" and got and set(got) == {received}
    assert script.returncode == 128 + sig
    assert err.splitlines()[-1].endswith(f"(exit status {128 + sig})")


def test_safeguard_off(stubs, tmp_path):
    _, argv = launch("sd15_dmpo", stubs, tmp_path, SAFEGUARD="0")
    shipped = options(split(argv)[1])
    assert "--use_winner_preserving" not in shipped and "--winner_preserving_mu" not in shipped
    assert shipped["--dmpo_alpha"] == "0.01" and shipped["--beta_dpo"] == "2000"
    assert shipped["--output_dir"].endswith("output/sd15-dmpo-no-safeguard")


def test_missing_tools_are_named(stubs, tmp_path):
    done, _ = launch("sd15_dspo", stubs, tmp_path, ACCELERATE="no-such-accelerate")
    assert done.returncode == 1 and "'no-such-accelerate' not found" in done.stderr
    (stubs / "broken").write_text("#!/usr/bin/env bash\nexit 1\n")
    (stubs / "broken").chmod(0o755)
    done, _ = launch("sd15_dspo", stubs, tmp_path, PYTHON="broken")
    assert done.returncode == 1 and "cannot import torch" in done.stderr
    done = subprocess.run(["bash", str(SCRIPTS / "_launch.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "sourced by the training scripts" in done.stderr


def test_every_script_is_tested():
    """The six official runs, {sd15, sdxl} x {diffusion_dpo, dspo, dmpo}, the two flow-family launchers, the three video
    launchers, no other."""
    assert sorted(p.stem for p in SCRIPTS.glob("*.sh") if not p.stem.startswith("_")) == sorted(
        [*SHIPPED, "sd35_diffusion_dpo", "flux_diffusion_dpo", "wan_diffusion_dpo", "cogvideox_diffusion_dpo",
         "cogvideox5b_diffusion_dpo", "wan22_ti2v_diffusion_dpo", "wan22_a14b_diffusion_dpo", "wan_i2v_diffusion_dpo"])


@pytest.mark.parametrize("script, family, beta", [("sd35_diffusion_dpo", "sd3", 500.0), ("flux_diffusion_dpo", "flux", 1500.0)])
def test_flow_family_launchers(script, family, beta, stubs, tmp_path):
    """The SD3.5-medium and FLUX.1-dev launchers: their family named (no model needed to parse), LoRA at diffusers'
    DPO LoRA rate without --scale_lr, the derived beta, the common Pick-a-Pic settings otherwise."""
    done, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pickapic", gpus=8)
    assert done.returncode == 0, done.stderr
    parsed = train.parse_args(split(argv)[1])
    assert parsed.model_family == family and parsed.use_lora and parsed.lora_rank == 8
    assert parsed.learning_rate == 1e-5 and not parsed.scale_lr and parsed.beta_dpo == beta
    assert parsed.resolution == 1024 and parsed.gradient_checkpointing and parsed.dataset_name == "/local/pickapic"
    assert parsed.output_dir == str(REPO / "output" / script.replace("_", "-"))
    assert "add_k_proj" in parsed.lora_target_modules


@pytest.mark.parametrize("script, family, beta, size, frames", [("wan_diffusion_dpo", "wan", 500.0, [480, 832], 81),
                                                                 ("cogvideox_diffusion_dpo", "cogvideox", 1200.0, [480, 720], 49)])
def test_video_family_launchers(script, family, beta, size, frames, stubs, tmp_path):
    """The Wan2.1-1.3B and CogVideoX-2b launchers: their family named (no model needed to parse), LoRA at diffusers'
    DPO LoRA rate without --scale_lr, the derived beta, the model's frame count and size, one pair per GPU; the data
    must be given (there is no public default), and a smoke run (CPU=1) gets a square size."""
    done, argv = launch(script, stubs, tmp_path, gpus=8)
    assert done.returncode == 2 and argv is None and "give --dataset_name" in done.stderr
    done, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pairs.jsonl", gpus=8)
    assert done.returncode == 0, done.stderr
    parsed = train.parse_args(split(argv)[1])
    assert parsed.model_family == family and parsed.use_lora and parsed.lora_rank == 8
    assert parsed.learning_rate == 1e-5 and not parsed.scale_lr and parsed.beta_dpo == beta
    assert parsed.video_size == size and parsed.num_frames == frames and parsed.train_batch_size == 1
    assert parsed.gradient_checkpointing and parsed.use_winner_preserving and parsed.winner_preserving_mu == 0.9
    assert parsed.dataset_name == "/local/pairs.jsonl" and parsed.mixed_precision == "bf16"
    assert parsed.output_dir == str(REPO / "output" / script.replace("_", "-"))
    assert parsed.lora_target_modules == "to_k,to_q,to_v,to_out.0"
    _, argv = launch(script, stubs, tmp_path, "--dataset_name=/local/pairs", "--num_frames", "9", gpus=0, CPU="1")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.video_size == [64, 64] and parsed.num_frames == 9 and parsed.mixed_precision == "no"


def test_importance_variants(stubs, tmp_path):
    """VARIANT=cm (DPO-C&M) and VARIANT=is (importance-weighted, a batch of 1 pair made 2 with half the accumulation)."""
    done, argv = launch("cogvideox_diffusion_dpo", stubs, tmp_path, "--dataset_name", "/data/videos", gpus=8, VARIANT="cm")
    assert done.returncode == 0, done.stderr
    parsed = train.parse_args(split(argv)[1])
    assert parsed.importance_weighting == "clip_mask" and parsed.output_dir.endswith("cogvideox-diffusion-dpo-cm")
    done, argv = launch("cogvideox_diffusion_dpo", stubs, tmp_path, "--dataset_name", "/data/videos", gpus=8, VARIANT="is")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.importance_weighting == "full" and parsed.train_batch_size == 2
    assert parsed.gradient_accumulation_steps == 8 and parsed.output_dir.endswith("-is")
    done, _ = launch("sd15_dspo", stubs, tmp_path, gpus=8, VARIANT="xx")
    assert done.returncode == 2 and "VARIANT=xx" in done.stderr


def test_cogvideox5b_launcher(stubs, tmp_path):
    done, argv = launch("cogvideox5b_diffusion_dpo", stubs, tmp_path, "--dataset_name", "/data/videos", gpus=8)
    assert done.returncode == 0, done.stderr
    parsed = train.parse_args(split(argv)[1])
    assert parsed.pretrained_model_name_or_path == "THUDM/CogVideoX-5b" and parsed.model_family == "cogvideox"
    assert parsed.beta_dpo == 1800 and parsed.use_lora and parsed.output_dir.endswith("cogvideox5b-diffusion-dpo")
    done, _ = launch("cogvideox5b_diffusion_dpo", stubs, tmp_path, gpus=8)
    assert done.returncode == 2 and "give --dataset_name" in done.stderr


@pytest.mark.parametrize("script, frames", [("wan_diffusion_dpo", 5), ("cogvideox_diffusion_dpo", 9),
                                            ("cogvideox5b_diffusion_dpo", 9)])
def test_cpu_smoke_settings_for_video_families(script, frames, stubs, tmp_path):
    """CPU=1 on a video launcher: the smallest valid clip (64 px, wan 5 = 4k + 1 frames, cogvideox 9 = 8k + 1), not
    the shipped 81/49 frames at 480 px; --video_size replaces the square size; without a GPU the message is the
    video one (its smoke settings and the video demo), not the image scripts' Pick-a-Pic settings."""
    _, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pairs.jsonl", gpus=0, CPU="1")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.video_size == [64, 64] and parsed.num_frames == frames and parsed.train_batch_size == 1
    _, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pairs.jsonl", "--video_size", "32", "48",
                     gpus=0, CPU="1")
    assert train.parse_args(split(argv)[1]).video_size == [32, 48]
    done, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pairs.jsonl", gpus=0)
    assert done.returncode == 1 and argv is None
    assert "scripts/video_demo.sh" in done.stderr and "Pick-a-Pic" not in done.stderr and "64 px" in done.stderr


@pytest.mark.parametrize("script, family, beta, size, frames", [
    ("wan22_ti2v_diffusion_dpo", "wan22", 300.0, [704, 1280], 121),
    ("wan22_a14b_diffusion_dpo", "wan22_a14b", 100.0, [480, 832], 81),
    ("wan_i2v_diffusion_dpo", "wan_i2v", 500.0, [480, 832], 81)])
def test_wan22_and_i2v_launchers(script, family, beta, size, frames, stubs, tmp_path):
    """The Wan2.2-TI2V-5B, A14B (both experts) and Wan2.1-I2V launchers (issue 22): the family named (no model needed
    to parse), LoRA at diffusers' rate, the derived beta, the size and frames their headers give; I2V conditions on
    the shared first frame; the data must be given; a smoke run (CPU=1) parses."""
    done, argv = launch(script, stubs, tmp_path, gpus=8)
    assert done.returncode == 2 and "give --dataset_name" in done.stderr
    done, argv = launch(script, stubs, tmp_path, "--dataset_name", "/local/pairs.jsonl", gpus=8)
    assert done.returncode == 0, done.stderr
    parsed = train.parse_args(split(argv)[1])
    assert parsed.model_family == family and parsed.use_lora and parsed.lora_rank == 8 and parsed.learning_rate == 1e-5
    assert parsed.beta_dpo == beta and parsed.video_size == size and parsed.num_frames == frames
    assert parsed.use_winner_preserving and parsed.winner_preserving_mu == 0.9 and parsed.gradient_checkpointing
    assert parsed.conditioning_image == ("first_frame" if family == "wan_i2v" else "none")
    assert parsed.train_expert == ("both" if family == "wan22_a14b" else None)
    assert parsed.output_dir == str(REPO / "output" / script.replace("_", "-"))
    _, argv = launch(script, stubs, tmp_path, "--dataset_name=/local/pairs", "--num_frames", "9", gpus=0, CPU="1")
    parsed = train.parse_args(split(argv)[1])
    assert parsed.video_size == [256, 256] and parsed.num_frames == 9
