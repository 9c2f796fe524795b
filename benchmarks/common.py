"""Measuring helpers shared by the benchmarks: device sync, interleaved timing, peak memory, device names, records."""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import date
from pathlib import Path

import torch

# Dense bf16/fp16 tensor-core peaks (vendor datasheets), for the MFU estimate; most specific names first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        except OSError:
            pass


def peak_memory_mb(device) -> float | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device, repeats: int, warmup: int) -> list[float]:
    return interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def interleaved(fns: dict, device, repeats: int, warmup: int, first: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn, in alternating order (A B, B A, A B, ...), so that a
    change in the machine's load hits every function alike and none always runs right after another. The first
    `warmup` rounds are not timed; each function's very first call (allocation, autotuning, compilation) goes to
    `first` if given."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in (fns.items() if round_ % 2 == 0 else reversed(fns.items())):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ == 0 and first is not None:
                first[name] = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():  # most specific first ("H100 PCIe" before "H100")
        if key in name:
            return value
    return None


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    if torch.device(device).type == "meta":
        return "meta (FLOP count only)"
    import platform

    model = platform.processor()
    if Path("/proc/cpuinfo").exists():
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"




def quiet_libraries():
    """diffusers/transformers info messages and weight-loading bars would bury the figures."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def common_fields(device, command: str) -> dict:
    """What every record carries so that a figure can be reproduced: device, load, command and date."""
    return {"device": device_name(device), "load_avg_1m": round(os.getloadavg()[0], 2), "date": date.today().isoformat(),
            "torch": torch.__version__, "command": command}


def command_line(script: str, argv) -> str:
    return " ".join([f"python benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
