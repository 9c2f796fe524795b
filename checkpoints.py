"""What train.py needs to trust a checkpoint folder and to write files safely.

A checkpoint `checkpoint-N/` holds the trained weights (`unet.safetensors`, or the LoRA adapter), accelerate's
optimizer, scheduler and per-rank RNG files, and `training_state.json`: the data position, EMA step count, the
skipped-row count and the run's arguments. Nothing here unpickles arbitrary objects: the JSON is read as JSON, and
accelerate reads its `.bin`/`.pkl` files with `torch.load(weights_only=True)` (tensors, numbers and numpy arrays only).
Before a resume, every file a checkpoint must hold is checked (present, complete, readable; each field of
training_state.json; under FSDP each rank's shard against the shards' index, itself read by a restricted unpickler),
so a damaged checkpoint stops the run with a message naming the file (and the field), or, with
`--resume_from_checkpoint latest`, gives way to the newest complete one.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger("train")

TRAINING_STATE = "training_state.json"
STATE_FORMAT = 1

# Arguments a resumed run must share with its checkpoint: they define the objective, the model, the data order, or
# state that the checkpoint restores over the command line (the optimizer's and the lr scheduler's hyperparameters
# are loaded from optimizer.bin / scheduler.bin, so a new value would be silently ignored). Every other argument
# (--max_train_steps, --checkpointing_steps, logging, workers, --max_grad_norm, speed flags, ...) may change.
RESUME_FIXED = (
    "pretrained_model_name_or_path", "revision", "unet_init", "pretrained_vae_model_name_or_path", "sdxl",
    "dataset_name", "dataset_config_name", "train_data_dir", "split", "caption_column", "max_train_samples",
    "dreamlike_pairs_only", "streaming", "shuffle_buffer_size", "resolution", "random_crop", "no_hflip",
    "proportion_empty_prompts", "choice_model", "train_batch_size", "gradient_accumulation_steps", "seed",
    "optimizer", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
    "adam_weight_decay", "adam_epsilon", "mixed_precision", "noise_offset", "input_perturbation",
    "train_method", "beta_dpo", "use_winner_preserving", "winner_preserving_mu", "winner_preserving_granularity",
    "dmpo_alpha", "timestep_range", "importance_weighting", "is_mask_below", "is_clip_min", "is_clip_max",
    "use_lora", "lora_rank", "lora_alpha", "lora_target_modules", "use_ema", "ema_decay", "ema_update_after_step",
    "ema_power",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """checkpoint-N folders in output_dir, oldest first (temporary .checkpoint-N.tmp folders are not checkpoints)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is whole: its header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                return "is truncated (shorter than its header)"
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError) as error:
        return f"is not a readable safetensors file ({type(error).__name__})"
    if size < 8 + header_size + end:
        return f"is truncated ({size} bytes, its header says {8 + header_size + end})"
    return None


def torch_file_problem(path: Path, load: bool = False) -> str | None:
    """Whether a torch.save file (a zip archive) is whole; `load` also reads it with weights_only=True, memory-mapped
    (the pickle is checked, the tensors' bytes are not read: an optimizer state costs no second copy in memory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as error:
        return f"is truncated or not a torch file ({error})"
    if load:
        from accelerate.utils import load as safe_load  # torch.load(weights_only=True) + numpy arrays

        try:
            safe_load(path, map_location="cpu", mmap=True)
        except Exception as error:  # noqa: BLE001 - anything that is not plain data is refused
            return f"cannot be read as plain data with weights_only=True ({type(error).__name__}: {str(error)[:200]})"
    return None


# training_state.json: each key and what its value must be. `step` must also equal the folder's number.
STATE_KEYS = ("format", "step", "num_processes", "data", "skipped_rows", "ema", "args")
# Absent in checkpoints written before they were recorded: skipped_by_reason {reason: rows}; global_batch (pairs per
# update, kept when a run resumes on another number of processes).
OPTIONAL_STATE_KEYS = ("skipped_by_reason", "global_batch")
# A map-style run saves the seed, the epoch and the pairs used in it by all ranks; a stream the seed, epoch, position.
DATA_KEYS = {"seed": 0, "epoch": 0, "position": 0, "used": 0}
EMA_KEYS = {"decay": (float, 0.0, 1.0), "min_decay": (float, 0.0, 1.0), "optimization_step": (int, 0, None),
            "update_after_step": (int, 0, None), "use_ema_warmup": (bool, None, None),
            "inv_gamma": (float, 0.0, None), "power": (float, 0.0, None)}  # diffusers' EMAModel.state_dict


def _number_problem(field: str, value, kind, low=None, high=None) -> str | None:
    """Why `value` is not a `kind` (int, float or bool) in [low, high]; None if it is. JSON numbers: an int is a float."""
    ok_type = (isinstance(value, bool) if kind is bool else not isinstance(value, bool) and
               isinstance(value, int if kind is int else (int, float)))
    if not ok_type:
        return f"has field {field!r} = {value!r:.80} (must be {'an integer' if kind is int else 'a boolean' if kind is bool else 'a number'})"
    if kind is float and not math.isfinite(value):
        return f"has field {field!r} = {value!r:.80} (must be a finite number)"
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        return f"has field {field!r} = {value!r:.80} (must be {bounds})"
    return None


def training_state_problem(state, folder: Path) -> str | None:
    """What is wrong with a checkpoint's training_state.json (already parsed), naming the field; None if nothing.

    Every field is checked against what save_checkpoint writes: a damaged or edited state (a negative step, a text
    where a number belongs, a step that is not the folder's) would otherwise resume wrong or crash mid-resume."""
    if not isinstance(state, dict):
        return f"is {type(state).__name__}, not a JSON object"
    if state.get("format") != STATE_FORMAT:
        return f"has an unknown format (field 'format' is {state.get('format')!r}, expected {STATE_FORMAT})"
    unknown = sorted(set(state) - set(STATE_KEYS) - set(OPTIONAL_STATE_KEYS))
    missing = [k for k in STATE_KEYS if k not in state]
    if unknown or missing:
        return "; ".join(([f"has unknown fields {unknown}"] if unknown else []) +
                         ([f"lacks the fields {missing}"] if missing else []))
    problem = (_number_problem("step", state["step"], int, 1) or _number_problem("num_processes", state["num_processes"], int, 1)
               or _number_problem("skipped_rows", state["skipped_rows"], int, 0))
    if problem:
        return problem
    number = Path(folder).name.split("-")[-1]  # checkpoint-N (a folder renamed by hand has no number to match)
    if "-" in Path(folder).name and number.isdigit() and state["step"] != int(number):
        return f"has field 'step' = {state['step']} (must be {number}, the number of its folder {Path(folder).name})"
    data = state["data"]
    if not isinstance(data, dict) or "seed" not in data or set(data) - set(DATA_KEYS):
        return (f"has field 'data' = {data!r:.80} (must hold 'seed', and 'epoch' with 'used' or, for a stream, "
                f"'position')")
    for key, value in data.items():
        problem = _number_problem(f"data.{key}", value, int, DATA_KEYS[key])
        if problem:
            return problem
    ema = state["ema"]
    if ema is not None:
        if not isinstance(ema, dict) or set(ema) - set(EMA_KEYS):
            return f"has field 'ema' = {ema!r:.80} (must be null or an object with the fields {list(EMA_KEYS)})"
        for key, value in ema.items():
            kind, low, high = EMA_KEYS[key]
            problem = _number_problem(f"ema.{key}", value, kind, low, high)
            if problem:
                return problem
    if "global_batch" in state:
        problem = _number_problem("global_batch", state["global_batch"], int, 1)
        if problem:
            return problem
    reasons = state.get("skipped_by_reason", {})
    if not isinstance(reasons, dict) or not all(isinstance(k, str) for k in reasons):
        return f"has field 'skipped_by_reason' = {reasons!r:.80} (must be an object of reason: rows)"
    for key, value in reasons.items():
        problem = _number_problem(f"skipped_by_reason.{key}", value, int, 0)
        if problem:
            return problem
    if not isinstance(state["args"], dict):
        return f"has field 'args' = {state['args']!r:.80} (must be an object of the run's arguments)"
    return None


class _ShardIndexUnpickler:
    """Reads torch.distributed.checkpoint's `.metadata` (a pickle, which torch itself loads with plain pickle.load)
    admitting only its own record types, paths, torch sizes, dtypes and layouts: a planted object is refused unrun."""

    ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
               ("collections", "OrderedDict")}

    @classmethod
    def load(cls, path: Path):
        import pickle

        import torch

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                found = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
                if (module, name) in cls.ALLOWED or (
                        module == "torch" and isinstance(found, (torch.dtype, torch.layout, torch.memory_format))) or (
                        module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
                        and found.__module__ == module):
                    return found
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a sharded checkpoint's index")

        with open(path, "rb") as f:
            return Unpickler(f).load()


def sharded_state_problem(folder: Path) -> str | None:
    """Whether accelerate's sharded (FSDP) state folder is whole: its `.metadata` lists each rank's shard file and
    the bytes read from it; every file must be there and that long. None if it is."""
    index = folder / ".metadata"
    if not index.is_file():
        return f"{index} is missing (the index of the ranks' shards)"
    try:
        needed = {}
        for info in _ShardIndexUnpickler.load(index).storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as error:  # noqa: BLE001 - a damaged or planted index is refused, whatever it raises
        return f"{index} is not a readable shard index ({type(error).__name__}: {str(error)[:200]})"
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (one rank's shard)"
        if path.stat().st_size < size:
            return f"{path} is truncated ({path.stat().st_size} bytes, its index says at least {size})"
    return None


def required_files(weights: list[str], num_processes: int, scaler: bool) -> list[str]:
    files = list(weights) + ["optimizer.bin", "scheduler.bin", TRAINING_STATE]
    files += [f"random_states_{rank}.pkl" for rank in range(num_processes)]
    return files + (["scaler.pt"] if scaler else [])


def saved_process_count(folder: Path) -> int:
    """How many processes wrote the checkpoint (their RNG files are all required); 1 if the state is unreadable or
    damaged (its own problem is reported then)."""
    try:
        state = json.loads((Path(folder) / TRAINING_STATE).read_text())
        return state["num_processes"] if training_state_problem(state, folder) is None else 1
    except (OSError, ValueError):
        return 1


def checkpoint_problems(folder: Path, weights: list[str], scaler: bool, fsdp: bool = False) -> list[str]:
    """Every reason `folder` cannot be resumed exactly: a missing, truncated or unreadable file; [] if none. Under
    FSDP accelerate keeps the model and optimizer in its own (sharded) layout, checked for presence."""
    problems = []
    names = required_files(weights, saved_process_count(folder), scaler)
    if fsdp:
        names.remove("optimizer.bin")
        for choices in (("optimizer_0", "optimizer.bin"), ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")):
            if not any((folder / c).exists() for c in choices):
                problems.append(f"{folder / choices[0]} is missing (accelerate's FSDP state)")
            elif (folder / choices[0]).is_dir():  # sharded: each rank's file, as its index lists them
                problems += [p for p in [sharded_state_problem(folder / choices[0])] if p]
    for name in names:
        path = folder / name
        if not path.is_file():
            problem = "is missing"
            if name == TRAINING_STATE and list(folder.glob("custom_checkpoint_*.pkl")):
                problem += (" (the checkpoint comes from an older version, which kept this state as a pickle that "
                            "is not loaded any more because it can run code)")
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(path)
        elif name == TRAINING_STATE:
            try:
                problem = training_state_problem(json.loads(path.read_text()), folder)
            except (OSError, ValueError) as error:
                problem = f"is not readable JSON ({error})"
        else:  # every pickle accelerate reads is read here first: a refused one is named and `latest` falls back
            problem = torch_file_problem(path, load=True)
        if problem:
            problems.append(f"{path} {problem}")
    for stray in sorted(folder.glob("custom_checkpoint_*.pkl")):  # accelerate would unpickle these in full
        problems.append(f"{stray} is a pickle, which this version never loads (it can run code)")
    return problems


def choose_checkpoint(output_dir: Path, spec: str, problems_of) -> Path | None:
    """The checkpoint to resume from: `spec` is 'latest', 'none' or a path (or a checkpoint name in output_dir).

    `problems_of(folder)` lists what is wrong with a folder. With 'latest', a damaged newest checkpoint gives way to
    the newest complete one, with a warning; a named damaged checkpoint stops the run, naming the file and the newest
    complete checkpoint."""
    output_dir = Path(output_dir)
    if spec.lower() in ("", "none"):
        return None
    folders = checkpoint_folders(output_dir)
    if spec == "latest":
        damaged = []
        for folder in reversed(folders):
            problems = problems_of(folder)
            if not problems:
                for bad, bad_problems in damaged:
                    logger.warning(f"{bad.name} cannot be resumed ({'; '.join(bad_problems)}); resuming from the "
                                   f"newest complete checkpoint, {folder.name}")
                return folder
            damaged.append((folder, problems))
        if damaged:
            listing = "; ".join(f"{'; '.join(p)}" for _, p in damaged)
            raise CheckpointError(f"no complete checkpoint in {output_dir}: {listing}. Start over with "
                                  f"--resume_from_checkpoint none (or another --output_dir)")
        return None
    folder = next((c for c in (Path(spec), output_dir / Path(spec).name) if c.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: no such checkpoint folder (looked in {output_dir} too)")
    problems = problems_of(folder)
    if problems:
        intact = next((f for f in reversed(folders) if f.resolve() != folder.resolve() and not problems_of(f)), None)
        other = (f"the newest complete checkpoint is {intact} (--resume_from_checkpoint {intact})" if intact
                 else "no other complete checkpoint exists; start over with --resume_from_checkpoint none")
        raise CheckpointError(f"cannot resume from {folder}: {'; '.join(problems)}. {other}")
    return folder


def read_training_state(folder: Path) -> dict:
    return json.loads((Path(folder) / TRAINING_STATE).read_text())


def resumed_arguments(saved: dict, current: dict) -> list[str]:
    """Compare the checkpoint's arguments with this run's (both `run_arguments` dicts): a change of a RESUME_FIXED
    argument is refused (raises CheckpointError naming each); other changes are returned as lines to log."""
    fixed, changed = [], []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old != new:
            (fixed if name in RESUME_FIXED else changed).append(f"--{name}: {old!r} in the checkpoint, {new!r} now")
    if fixed:
        raise CheckpointError("the run's arguments differ from the checkpoint's in what a resume must keep: "
                              + "; ".join(fixed) + ". Resume with the checkpoint's values, or train into a new "
                              "--output_dir (or pass --resume_from_checkpoint none). Free to change: everything else, "
                              "e.g. --max_train_steps, --checkpointing_steps, logging, workers.")
    return changed


def run_arguments(args) -> dict:
    """The run's arguments as JSON values (tuples and lists as lists)."""
    values = {}
    for name, value in sorted(vars(args).items()):
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            values[name] = value
        else:
            values[name] = str(value)
    return values


def truncate_metrics(metrics_file: Path, step: int):
    """Drop the lines of metrics.jsonl after `step` (logged after the checkpoint a run resumes from), atomically."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a crash
    write_text_atomic(metrics_file, "".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------------------------------------------
# Writing files


def write_text_atomic(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, value):
    write_text_atomic(path, json.dumps(value, indent=1, allow_nan=False) + "\n")


def finite_or_none(logs: dict) -> dict:
    """Non-finite numbers as None (JSON null): a skipped update logs no loss rather than NaN or a fake 0."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in logs.items()}


def umask_mode(path: Path):
    """A file's mode as the user's umask makes it (safetensors writes 0600 whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def mount_point(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_free_space(folder: Path, needed: int, what: str, previous: str | None = None):
    """Stop before a save that cannot fit, with the numbers, instead of failing halfway through it."""
    folder = Path(folder)
    free = shutil.disk_usage(mount_point(folder)).free
    margin = max(needed // 20, 64 * 2**20)
    if free < needed + margin:
        intact = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise OSError(errno.ENOSPC, f"not enough disk space for {what}: about {gigabytes(needed)} needed, "
                                    f"{gigabytes(free)} free on {mount_point(folder)}{intact}. Free space, lower "
                                    f"--checkpoints_total_limit, or choose an --output_dir on a larger disk")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, or torch's way of saying it ('[enforce fail at inline_container.cc] unexpected pos')."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


def newest_file(folder: Path) -> Path | None:
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
