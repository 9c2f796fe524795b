"""Several processes: FSDP detection and its checks, CPU ranks (gloo) when no accelerator is present, the memory a
process holds, a shared output folder, and keeping the global batch when a run resumes on another number of processes."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path

import torch

import checkpoints

logger = logging.getLogger("train")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def held_bytes(module) -> int:
    """Bytes of a module's parameters held by this process: a DTensor's local shard, a plain tensor whole."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in module.parameters())


def distributed_accelerator_present() -> bool:
    """Whether accelerate would run several processes on an accelerator: the devices its PartialState looks for, in
    its order (CUDA, and XPU, NPU, HPU, MLU, MUSA, SDAA, Neuron, XLA)."""
    from accelerate import utils

    return (torch.cuda.is_available() or utils.is_torch_xla_available() or utils.is_mlu_available()
            or utils.is_sdaa_available() or utils.is_musa_available() or utils.is_npu_available()
            or utils.is_hpu_available() or (utils.is_xpu_available() and utils.is_xccl_available())
            or utils.is_neuron_available())


def uses_cpu_ranks(world_size: int) -> bool:
    """Several processes and no accelerator (e.g. `accelerate launch --multi_gpu` on a CPU machine): gloo on CPU,
    which accelerate does only when told (cpu=True). With an accelerator of any kind accelerate picks it itself."""
    return world_size > 1 and not distributed_accelerator_present()


def process_state():
    """accelerate's PartialState for the scripts beside train.py (latent_cache.py, eval.generate, eval.make_pairs):
    on CPU ranks when several processes run without an accelerator, as train.py's Accelerator is. Without cpu=True
    accelerate makes each such process a world of one, and every rank would write the same files."""
    from accelerate import PartialState

    return PartialState(cpu=uses_cpu_ranks(int(os.environ.get("WORLD_SIZE", 1))))


def check_fsdp_version(version: int):
    if version != 2:  # train.py reads and writes FSDP2's DTensor shards
        raise ValueError(f"FSDP version {version} is not supported: train.py runs FSDP2 only. Set `fsdp_version: 2` "
                         f"under fsdp_config in the accelerate config (or pass --fsdp_version 2 to accelerate launch); "
                         f"accelerate's default is 1. configs/accelerate/fsdp_*.yaml are examples")


def check_fsdp_setup(args, plugin):
    """What train.py's FSDP path supports, checked before any model loads: FSDP2 and an optimizer that takes DTensor
    parameters."""
    check_fsdp_version(plugin.fsdp_version)
    if args.optimizer == "adamw8bit":
        raise ValueError("--use_8bit_adam (--optimizer adamw8bit) cannot train under FSDP: bitsandbytes' 8-bit "
                         "optimizers do not take FSDP2's sharded (DTensor) parameters (bitsandbytes issues #89, #1633). "
                         "Use --optimizer adamw or adafactor with FSDP, or 8-bit AdamW with DDP (no --use_fsdp)")


def enable_fsdp_on_cpu_ranks(accelerator):
    """`accelerate launch --use_fsdp` on CPU ranks (gloo): accelerate enables FSDP only for accelerators, so it is
    switched on here with the plugin the launcher's FSDP_* environment describes. This is how the tests run FSDP2
    against DDP on two CPU processes; on GPUs accelerate does it itself."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    for state in (accelerator.state, PartialState()):  # AcceleratorState re-reads PartialState's on every construction
        state.distributed_type = DistributedType.FSDP


def check_output_dir_is_shared(accelerator, output_dir: Path):
    """Several machines: every rank writes its part of each checkpoint (its RNG state, FSDP shards) into output_dir,
    and rank 0 then renames the folder, so output_dir must be one folder that every machine sees. Checked at the
    start: rank 0 writes a token there, and every rank must read it back; all ranks stop together if one cannot."""
    machines = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    if machines <= 1:
        return
    from accelerate.utils import broadcast_object_list

    marker = output_dir / ".shared_storage_check"
    token = [f"{os.getpid()}-{random.SystemRandom().random()}" if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        marker.write_text(token[0])
    token = broadcast_object_list(token)[0]
    accelerator.wait_for_everyone()
    seen = False
    for _ in range(20):  # a network file system can take a moment to show another machine's new file
        seen = marker.is_file() and marker.read_text() == token
        if seen:
            break
        time.sleep(1)
    blind = accelerator.gather(torch.tensor([0.0 if seen else 1.0], device=accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if blind.sum() > 0:
        ranks = [rank for rank, value in enumerate(blind.tolist()) if value]
        raise RuntimeError(f"--output_dir {output_dir} is not shared by the {machines} machines: ranks {ranks} do not "
                           f"see the file rank 0 wrote there. Put it on storage that every machine mounts at the same "
                           f"path (docs/multinode.md, 'Checkpoints on shared storage')")


def keep_global_batch(args, accelerator, checkpoint: Path, state: dict, logger) -> bool:
    """A checkpoint resumed on another number of processes keeps its global batch (pairs per update): the gradient
    accumulation becomes global batch / (--train_batch_size x processes), said in the log, or the resume is refused
    where that is no whole number. Returns whether the processes or the accumulation differ from the checkpoint's."""
    saved_processes, saved = state["num_processes"], state["args"]
    global_batch = state.get("global_batch",  # absent in older checkpoints: their run's own arguments
                             saved["train_batch_size"] * saved["gradient_accumulation_steps"] * saved_processes)
    per_micro_step = args.train_batch_size * accelerator.num_processes
    if saved_processes == accelerator.num_processes and global_batch == per_micro_step * args.gradient_accumulation_steps:
        return False
    message = f"{checkpoint} was written by {saved_processes} processes and this run has {accelerator.num_processes}"
    if not {"position", "used"} & state["data"].keys():
        raise checkpoints.CheckpointError(
            f"{message}, and it comes from a version that saved no global data position. Resume with "
            f"--num_processes {saved_processes}, or train into a new --output_dir")
    if global_batch % per_micro_step:
        fits = [n for n in range(1, global_batch // args.train_batch_size + 1)
                if global_batch % (args.train_batch_size * n) == 0]
        raise checkpoints.CheckpointError(
            f"{message}: its global batch of {global_batch} pairs per update cannot be kept, as it is no whole number "
            f"of --train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes. Resume on a "
            f"number of processes that keeps it ({', '.join(map(str, fits))}), or train into a new --output_dir")
    accumulation = global_batch // per_micro_step
    logger.warning(f"{message}: gradient accumulation {args.gradient_accumulation_steps} -> {accumulation} steps, "
                   f"keeping the checkpoint's global batch of {global_batch} pairs ({args.train_batch_size} per "
                   f"process x {accumulation} x {accelerator.num_processes} processes). The data goes on from the "
                   f"checkpoint's global position; noise and timesteps are drawn from this run's per-rank random "
                   f"streams, so the run is not bit-identical to an unbroken one (docs/multinode.md)")
    args.gradient_accumulation_steps = accelerator.gradient_accumulation_steps = accumulation
    return True


def regroup_resumed_state(args, accelerator, state: dict, lr_scheduler, sampler=None, updates_per_epoch=None):
    """After loading a checkpoint of another process count or accumulation: its counters moved to this run's
    grouping. For map-style data (`sampler`, already loaded) returns (first epoch, batches per process to skip in it)
    from the checkpoint's global position; a stream's saved (epoch, row position) is global already."""
    accelerator.step = 0  # micro-batches since the last update: the checkpoint counted them in its own accumulation
    scheduler = lr_scheduler.scheduler  # accelerate steps it once per process and update: rescaled to this run's
    scheduler.last_epoch = scheduler.last_epoch // state["num_processes"] * accelerator.num_processes
    if sampler is None:
        return None
    per_micro_step = args.train_batch_size * accelerator.num_processes
    if sampler.used % per_micro_step:  # a whole number of global batches, as keep_global_batch kept
        raise checkpoints.CheckpointError(f"the checkpoint's data position ({sampler.used} pairs into epoch "
                                          f"{sampler.epoch}) is no whole number of batches on this run's processes")
    remaining_epochs = math.ceil((args.max_train_steps - state["step"]) / updates_per_epoch)
    args.num_train_epochs = max(args.num_train_epochs, sampler.epoch + 1 + remaining_epochs)
    return sampler.epoch, 0 if args.hard_skip_resume else sampler.used // per_micro_step
