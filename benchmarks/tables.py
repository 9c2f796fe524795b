#!/usr/bin/env python
"""Markdown tables (as in RESULTS.md) from the benchmarks' --json outputs.

    python benchmarks/tables.py benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def footer(records: list[dict]) -> str:
    r = records[0]
    return (f"\n\nDevice: {r['device']}; torch {r['torch']}; load average {r['load_avg_1m']} at the start; {r['date']}.\n"
            f"Command: `{r['command']}`")


def flop_table(records: list[dict]) -> str:
    present = {p for r in records for p in r["tflop_breakdown"]}
    parts = [p for p in ("vae_encode", "text_encoder_1", "text_encoder_2", "policy_forward", "reference_forward",
                         "backward_and_loss", "total") if p in present]
    lines = ["| config | flags | method | safeguard | batch | " + " | ".join(parts) + " |", "|" + "---|" * (5 + len(parts))]
    for r in records:
        lines.append(f"| {r['config']} | {r.get('train_flags') or '-'} | {r['method']} | {'on' if r['safeguard'] else 'off'} | "
                     f"{r['batch']} | " + " | ".join(f"{r['tflop_breakdown'][p]:.3f}" if p in r["tflop_breakdown"] else "-" for p in parts) + " |")
    return "\n".join(lines) + footer(records)


def breakdown_table(records: list[dict]) -> str:
    """Where one step's time goes (synchronising hooks on each module's forward and on the optimizer step)."""
    parts = list(records[0]["breakdown_s"])
    lines = ["| config | flags | method | batch | " + " | ".join(parts) + " |", "|" + "---|" * (4 + len(parts))]
    for r in records:
        total = r["breakdown_s"]["total"]
        lines.append(f"| {r['config']} | {r.get('train_flags') or '-'} | {r['method']} | {r['batch']} | " + " | ".join(
            f"{1e3 * r['breakdown_s'].get(p, 0):.1f} ms ({100 * r['breakdown_s'].get(p, 0) / total:.0f}%)" for p in parts) + " |")
    return "\n".join(lines) + footer(records)


def data_table(records: list[dict]) -> str:
    lines = ["| workers | resolution | tokenizers | persistent | pairs/s | pairs/s per worker | first batch s | next epoch s |",
             "|" + "---|" * 8]
    for r in records:
        lines.append(f"| {r['workers']} | {r['resolution']} | {2 if r['sdxl'] else 1} | {r['persistent_workers']} | "
                     f"{r['pairs_per_s']:.1f} | {r['pairs_per_s_per_worker']:.1f} | {r['first_batch_s']:.2f} | "
                     f"{r['epoch_restart_s']:.2f} |")
    return "\n".join(lines) + footer(records)


def eval_table(records: list[dict]) -> str:
    lines = ["| what | model | batch | size | steps | dtype | seconds per call | images/s |", "|" + "---|" * 8]
    for r in records:
        if r["bench"] == "generate":
            lines.append(f"| generate | {r['config']} | {r['batch']} | {r['size']} | {r['steps']} | {r['dtype']} | "
                         f"{r['seconds']:.3f} | {r['images_per_s']:.2f} |")
        else:
            lines.append(f"| score | {r['scorer']} ({r['weights']} weights) | {r['batch']} | {r['image_size']} | - | fp32 | "
                         f"{r['seconds']:.3f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines) + footer(records)


def modules_table(records: list[dict]) -> str:
    lines = ["| config | part | round | batch | A | A ms | B | B ms | speed-up of B | max abs difference |",
             "|" + "---|" * 10]
    for r in records:
        lines.append(f"| {r['config']} | {r['part']} | {r.get('round', 0)} | {r['batch']} | {r['a']} | {1e3 * r['a_s']:.2f} | {r['b']} | "
                     f"{1e3 * r['b_s']:.2f} | {r['speedup']:.3f} | {r['max_abs_diff']:.2g} |")
    return "\n".join(lines) + footer(records)


def table(records: list[dict]) -> str:
    from benchmarks.bench_train import markdown

    first = records[0]
    if "tflop_breakdown" in first:
        return flop_table(records)
    if "breakdown_s" in first:
        return markdown(records) + "\n\n" + breakdown_table(records)
    if "method" in first:
        return markdown(records)
    if "workers" in first:
        return data_table(records)
    if "bench" in first:
        return eval_table(records)
    if "part" in first:
        return modules_table(records)
    raise ValueError(f"unknown record kind: {sorted(first)}")


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"### {Path(path).name}\n\n{table(json.loads(Path(path).read_text()))}\n")
