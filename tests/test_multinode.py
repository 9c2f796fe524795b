"""Past one machine, on CPU ranks (gloo): two "nodes" over 127.0.0.1, one process each, train exactly as one node with
two processes; a checkpoint resumes on another number of processes with the same global batch (the gradient
accumulation adjusted) and the same pairs in every update, neither repeated nor skipped."""

import os
import shutil
import signal
import socket
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import record_pairs
import train
from test_fsdp import FSDP
from test_train import ACCELERATE, REPO, metrics, reset_accelerate, train_args

LAUNCH = ["--mixed_precision", "no", "--dynamo_backend", "no"]
# Updates of 4 pairs (2 per micro-batch) over 14 pairs, 7 batches: on 2 processes an epoch is 3 updates (the 7th
# batch makes no full round), on 1 process with accumulation 2 it is 4 (the last of 1 micro-batch). Checkpoints every
# 2 steps; the lr still warms up at step 6, so a wrongly rescaled lr schedule shows in the log.
COMMON = ["--max_train_samples", "14", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "8",
          "--use_winner_preserving", "--winner_preserving_mu", "0.5"]


def free_port() -> int:
    with socket.socket() as s:  # the OS picks a free port: parallel test runs do not collide on 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, log_dir, machines=1, processes=2, strategy="ddp", timeout=300, folders=None):
    """`accelerate launch tests/record_pairs.py` once per machine, all on this one: machine 0 (started first) hosts
    torch.distributed's rendezvous at 127.0.0.1:<free port>, as the first node of a SLURM job would. Each machine
    runs in the repository, or in folders[rank]. Returns the exit codes and the launchers' combined output."""
    port = free_port()
    kind = FSDP if strategy == "fsdp" else ["--multi_gpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PAIRS_LOG=str(log_dir))
    log_dir.mkdir(parents=True, exist_ok=True)
    launchers = []
    for rank in range(machines):
        where = ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port)]
        output = open(log_dir / f"launcher{rank}.log", "w")
        command = [*ACCELERATE, "--num_processes", str(processes), *where, *LAUNCH, *kind,
                   str(REPO / "tests" / "record_pairs.py"), *args]
        launchers.append((subprocess.Popen(command, cwd=folders[rank] if folders else REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                           start_new_session=True), output))
    try:
        codes = [process.wait(timeout=timeout) for process, _ in launchers]
    finally:
        for process, output in launchers:
            if process.poll() is None:  # a launcher left waiting for its peer: stop it and its workers
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            output.close()
    text = "\n".join((log_dir / f"launcher{rank}.log").read_text() for rank in range(machines))
    return codes, text


def launch_ok(*args, **kwargs):
    codes, text = launch(*args, **kwargs)
    assert codes == [0] * len(codes), text[-4000:]
    return text


def run_in_process(args, log_dir):
    """One process, train.main here (about a second per tiny step), its pairs recorded."""
    log_dir.mkdir(parents=True, exist_ok=True)
    original = record_pairs.install(log_dir, 0)
    try:
        return train.main(args)
    finally:
        train.compute_loss = original
        reset_accelerate()


def interrupted_copy(run, folder, step):
    """`run`'s folder as a kill right after checkpoint-<step> left it (as tests/test_fsdp.py does)."""
    folder.mkdir(parents=True)
    shutil.copytree(run / f"checkpoint-{step}", folder / f"checkpoint-{step}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(lines[:step]) + "\n")
    return folder


def same_weights(a, b):
    a, b = load_file(str(a / "unet.safetensors")), load_file(str(b / "unet.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_process_run(tiny_sd15, pickapic, tmp_path_factory):
    """One node, 2 processes, 6 steps (2 epochs), batch 2 per process, no accumulation: 4 pairs per update."""
    out = tmp_path_factory.mktemp("multinode") / "one-node"
    launch_ok(train_args(tiny_sd15, pickapic, out, *COMMON, steps=6), out / "pairs")
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_train_as_one(tiny_sd15, pickapic, tmp_path, two_process_run, strategy):
    """Bitwise by construction: both runs have world size 2 with the same ranks (rank r = machine r here, local rank
    r there), so each rank gets the same batches (accelerate deals batch g to rank g % 2), the same seed (seed + rank)
    and the same gloo collectives over 2 ranks in the same order; only the process launch differs (one torchrun
    agent per machine, meeting at 127.0.0.1:port, instead of one agent for both)."""
    if strategy == "ddp":
        one_node = two_process_run
    else:
        one_node = tmp_path / "one-node"
        launch_ok(train_args(tiny_sd15, pickapic, one_node, *COMMON, steps=6), one_node / "pairs", strategy="fsdp")
    two_nodes = tmp_path / "two-nodes"
    launch_ok(train_args(tiny_sd15, pickapic, two_nodes, *COMMON, steps=6), two_nodes / "pairs", machines=2,
              strategy=strategy)
    assert same_weights(one_node, two_nodes)
    assert same_weights(one_node / "checkpoint-4", two_nodes / "checkpoint-4")
    assert [m["train_loss"] for m in metrics(one_node)] == [m["train_loss"] for m in metrics(two_nodes)]
    assert record_pairs.updates(one_node / "pairs", 2, 1) == record_pairs.updates(two_nodes / "pairs", 2, 1)


def test_resume_on_one_process_keeps_batch_and_pairs(tiny_sd15, pickapic, tmp_path, two_process_run, caplog):
    """2 processes -> 1: accumulation 1 -> 2, from checkpoint-4, 1 update into the second epoch (the step count alone
    would place it at that epoch's start on 1 process, whose epochs are 4 updates). Bit-exact: the loaded state
    (resuming a finished run changes nothing), the pairs of every update (the global data position) and the lr
    schedule. Not even equal to float rounding: the weights after further steps, since the noise and timesteps come
    from the ranks' own random streams and rank 0 now draws them for both micro-batches."""
    resumed = interrupted_copy(two_process_run, tmp_path / "resumed", 4)
    run_in_process(train_args(tiny_sd15, pickapic, resumed, *COMMON, steps=4), tmp_path / "unused")
    assert same_weights(resumed, two_process_run / "checkpoint-4")  # the weights load bit-exact on 1 process
    caplog.clear()
    run_in_process(train_args(tiny_sd15, pickapic, resumed, *COMMON, steps=6), resumed / "pairs")
    assert "gradient accumulation 1 -> 2 steps, keeping the checkpoint's global batch of 4 pairs" in caplog.text
    assert record_pairs.updates(resumed / "pairs", 1, 2) == record_pairs.updates(two_process_run / "pairs", 2, 1)[4:]
    straight, logged = metrics(two_process_run), metrics(resumed)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in logged] == [m["lr"] for m in straight]  # 5/8, 6/8 of the lr, as unbroken
    assert not same_weights(resumed, two_process_run)  # the noise differs (see above): not the same run


def test_resume_on_two_processes_keeps_batch_and_pairs(tiny_sd15, pickapic, tmp_path):
    """1 process with accumulation 2 -> 2 processes with accumulation 1, from checkpoint-4, the end of the first
    epoch (4 updates on 1 process, the last of 1 micro-batch): the second epoch starts from its beginning. Then the
    refusal where the global batch cannot be kept (1 process, no accumulation: 2 pairs per update, less than one
    batch of 2 on each of 2 ranks)."""
    straight = tmp_path / "straight"
    run_in_process(train_args(tiny_sd15, pickapic, straight, *COMMON, "--gradient_accumulation_steps", "2", steps=6),
                   straight / "pairs")
    resumed = interrupted_copy(straight, tmp_path / "resumed", 4)
    text = launch_ok(train_args(tiny_sd15, pickapic, resumed, *COMMON, "--gradient_accumulation_steps", "2", steps=6),
                     resumed / "pairs")
    assert "gradient accumulation 2 -> 1 steps, keeping the checkpoint's global batch of 4 pairs" in text
    # the 1-process run's micro-batches: 4 updates of 2, 1, 2, 1 ... : its updates 5 and 6 are micro-batches 7..10
    micro_batches = record_pairs.updates(straight / "pairs", 1, 1)
    expected = [sorted(micro_batches[7] + micro_batches[8]), sorted(micro_batches[9] + micro_batches[10])]
    assert record_pairs.updates(resumed / "pairs", 2, 1) == expected
    assert [m["lr"] for m in metrics(resumed)] == [m["lr"] for m in metrics(straight)]

    small = tmp_path / "small"
    run_in_process(train_args(tiny_sd15, pickapic, small, *COMMON, steps=2), small / "pairs")
    codes, text = launch(train_args(tiny_sd15, pickapic, small, *COMMON, steps=4), small / "refused")
    assert codes == [1]
    assert "its global batch of 2 pairs per update cannot be kept" in text and "Resume on a number of processes that keeps it (1)" in text


def test_output_dir_not_shared_by_the_machines_is_refused(tiny_sd15, pickapic, tmp_path):
    """Node-local storage, simulated: each machine runs in its own folder with a relative --output_dir, so each sees
    its own "out". Every rank writes its part of a checkpoint there, so the run stops at the start, on every rank."""
    folders = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in folders:
        folder.mkdir()
    codes, text = launch(train_args(tiny_sd15, pickapic, "out", *COMMON, steps=2), tmp_path / "pairs", machines=2,
                         folders=folders)
    assert codes == [1, 1]
    assert "--output_dir out is not shared by the 2 machines: ranks [1] do not see the file rank 0 wrote" in text
    assert not (folders[0] / "out" / "checkpoint-2").exists()


def test_fsdp_resume_on_three_processes_reshards(tiny_sd15, pickapic, tmp_path):
    """FSDP2, 2 processes (1 pair x 3 accumulation steps each) -> 3 processes (1 pair x 2): accelerate loads the
    sharded model and optimizer through torch.distributed.checkpoint, which re-shards them for 3 ranks. Bit-exact:
    the loaded weights (a finished run resumed on 3 ranks writes the checkpoint's weights), the pairs of each update
    and the lr. The weights after further updates differ (the ranks' noise, as on DDP)."""
    extra = [a for a in COMMON if a not in ("--max_train_samples", "14")]  # 64 pairs: no epoch end within 4 steps
    extra += ["--train_batch_size", "1", "--gradient_accumulation_steps", "3"]
    straight = tmp_path / "straight"
    launch_ok(train_args(tiny_sd15, pickapic, straight, *extra, steps=4), straight / "pairs", strategy="fsdp")
    finished = interrupted_copy(straight, tmp_path / "finished", 4)
    launch_ok(train_args(tiny_sd15, pickapic, finished, *extra, steps=4), finished / "pairs", processes=3,
              strategy="fsdp")
    assert same_weights(finished, straight)
    resumed = interrupted_copy(straight, tmp_path / "resumed", 2)
    text = launch_ok(train_args(tiny_sd15, pickapic, resumed, *extra, steps=4), resumed / "pairs", processes=3,
                     strategy="fsdp")
    assert "gradient accumulation 3 -> 2 steps, keeping the checkpoint's global batch of 6 pairs" in text
    assert record_pairs.updates(resumed / "pairs", 3, 2) == record_pairs.updates(straight / "pairs", 2, 3)[2:]
    assert [m["lr"] for m in metrics(resumed)] == [m["lr"] for m in metrics(straight)]


def test_streamed_resume_on_one_process_keeps_batch_and_pairs(tiny_sd15, pickapic, tmp_path):
    """--streaming, 2 processes -> 1: the stream's saved row position is global already (PairStream deals rows as
    accelerate deals map-style batches); the accumulation is raised to keep 4 pairs per update, and the lr goes on."""
    extra = [a for a in COMMON if a not in ("--max_train_samples", "14")]  # 64 pairs: no epoch end within 4 steps
    extra += ["--streaming", "--shuffle_buffer_size", "4"]
    straight = tmp_path / "straight"
    launch_ok(train_args(tiny_sd15, pickapic, straight, *extra, steps=4), straight / "pairs")
    resumed = interrupted_copy(straight, tmp_path / "resumed", 2)
    run_in_process(train_args(tiny_sd15, pickapic, resumed, *extra, steps=4), resumed / "pairs")
    assert record_pairs.updates(resumed / "pairs", 1, 2) == record_pairs.updates(straight / "pairs", 2, 1)[2:]
    assert [m["lr"] for m in metrics(resumed)] == [m["lr"] for m in metrics(straight)]
