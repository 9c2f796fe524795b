"""A bitwise fixture of what a user sees from train.py, to check that a restructure changed nothing (issue 21).

    python scripts/structure_fixture.py record /tmp/i21-fixture    # on the code before the change
    python scripts/structure_fixture.py check /tmp/i21-fixture     # on the code after it: "bit-identical" or the diff

For each tiny family (SD1.5, SDXL, SD2 v-prediction, SD3, FLUX, Wan, CogVideoX) and each method (Diffusion-DPO with and
without the winner-preserving safeguard, DSPO, DMPO, SFT on SD1.5), a resumed run and a run from the latent cache: a
few train.py steps' metrics.jsonl lines, the sha256 of every final weight tensor, the names of the files written and
the log messages (times masked); plus the full --help text of train.py, latent_cache.py and the eval scripts.

Bit-for-bit hashes differ across CPUs (docs/testing.md): record and check on the same machine. Not a suite test.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

HELP_COMMANDS = {
    "train.py": [sys.executable, "train.py", "--help"],
    "latent_cache.py": [sys.executable, "latent_cache.py", "--help"],
    **{f"eval.{name}": [sys.executable, "-m", f"eval.{name}", "--help"]
       for name in ("generate", "score", "compare", "make_pairs", "vbench")},
}


def base_args(model, data, output_dir, steps=2):
    return ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir",
            str(output_dir), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--mixed_precision", "no", "--seed", "0", "--learning_rate", "1e-4",
            "--lr_warmup_steps", "0", "--report_to", "none"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def masked(text: str, root: Path) -> str:
    text = text.replace(str(root), "<root>")
    text = re.sub(r"\d+\.\d+ h \(\d+ s\)", "<time>", text)
    return re.sub(r"\d+(\.\d+)? ?(s|ms|it/s|s/it)\b", "<t>", text)


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.name}:{record.levelname}:{record.getMessage()}")


def run(entry, argv, root: Path) -> list[str]:
    handler, out = Messages(), io.StringIO()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)  # what train.py's basicConfig sets (it adds no handler beside ours)
    try:
        with contextlib.redirect_stdout(out):
            entry(argv)
    finally:
        logging.getLogger().removeHandler(handler)
        reset_accelerate()
    return [masked(line, root) for line in handler.lines + out.getvalue().splitlines()]


def tensor_hashes(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    hashes = {}
    for path in sorted(output_dir.glob("*.safetensors")):
        for name, tensor in sorted(load_file(str(path)).items()):
            hashes[f"{path.name}:{name}"] = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()
                                                           if tensor.numel() else b"").hexdigest()
    return hashes


def record_run(entry, argv, output_dir: Path, root: Path) -> dict:
    messages = run(entry, argv, root)
    return {"metrics": (output_dir / "metrics.jsonl").read_text().splitlines(),
            "weights": tensor_hashes(output_dir),
            "files": sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*")),
            "messages": messages}


def training_runs(root: Path) -> dict:
    import latent_cache
    import train
    from tiny import build_cogvideox, build_flux, build_pickapic, build_sd2v, build_sd3, build_sd15, build_sdxl
    from tiny import build_pickapic_webdataset, build_video_pairs, build_wan

    models = {"sd15": build_sd15(root / "sd15"), "sdxl": build_sdxl(root / "sdxl"), "sd2v": build_sd2v(root / "sd2v"),
              "sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux"), "wan": build_wan(root / "wan"),
              "cogvideox": build_cogvideox(root / "cogvideox", num_frames=9)}
    images = build_pickapic(root / "pickapic", n_pairs=64)
    shards = build_pickapic_webdataset(root / "pickapic-wds", n_pairs=64)
    videos = build_video_pairs(root / "video-pairs")["parquet"]
    safeguard = ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    runs = {
        "sd15-dpo": ("sd15", images, []),
        "sd15-dpo-safeguard": ("sd15", images, safeguard),
        "sd15-dspo": ("sd15", images, ["--train_method", "dspo", "--beta_dpo", "0.001"]),
        "sd15-dmpo": ("sd15", images, ["--train_method", "dmpo", "--dmpo_alpha", "0.01", "--noise_offset", "0.05",
                                       "--input_perturbation", "0.1"]),
        "sd15-sft": ("sd15", images, ["--train_method", "sft"]),
        "sd15-lora-importance": ("sd15", images, ["--use_lora", "--importance_weighting", "full",
                                                  "--gradient_accumulation_steps", "2"]),
        "sd15-ema-dspo": ("sd15", images, ["--use_ema", "--train_method", "dspo", "--beta_dpo", "0.001"]),
        "sd15-webdataset-stream": ("sd15", shards, ["--dataloader_num_workers", "1"]),
        "sd15-streaming": ("sd15", images, ["--streaming", "--use_lora", "--use_ema"]),
        "sdxl-dpo": ("sdxl", images, ["--sdxl"]),
        "sdxl-dpo-safeguard": ("sdxl", images, ["--sdxl", *safeguard]),
        "sd2v-dpo": ("sd2v", images, safeguard),
        "sd3-dpo": ("sd3", images, safeguard),
        "flux-dmpo": ("flux", images, ["--train_method", "dmpo", "--dmpo_alpha", "0.01"]),
        "wan-dpo": ("wan", videos, ["--num_frames", "5", *safeguard]),
        "cogvideox-dspo": ("cogvideox", videos, ["--num_frames", "9", "--train_method", "dspo", "--beta_dpo", "0.001"]),
    }
    recorded = {}
    for name, (model, data, extra) in runs.items():
        out = root / "runs" / name
        print(f"run {name}", file=sys.stderr, flush=True)
        recorded[name] = record_run(train.main, base_args(models[model], data, out) + extra, out, root)

    # Resume: 2 steps, then on to 4 from checkpoint-2.
    out = root / "runs" / "sd15-resume"
    run(train.main, base_args(models["sd15"], images, out), root)
    recorded["sd15-resume"] = record_run(
        train.main, base_args(models["sd15"], images, out, steps=4) + ["--resume_from_checkpoint", "latest"], out, root)

    # Resume a stream with EMA and LoRA: 2 steps, then on to 4.
    out = root / "runs" / "sd15-stream-resume"
    stream_args = ["--streaming", "--use_lora", "--use_ema"]
    run(train.main, base_args(models["sd15"], images, out) + stream_args, root)
    recorded["sd15-stream-resume"] = record_run(
        train.main, base_args(models["sd15"], images, out, steps=4) + stream_args + ["--resume_from_checkpoint", "latest"],
        out, root)

    # The latent cache: encode, then train from it.
    out, cache = root / "runs" / "sd15-cache", root / "cache"
    recorded["sd15-cache-build"] = {"messages": run(latent_cache.main, base_args(models["sd15"], images, out)
                                                    + ["--latents_cache", str(cache)], root)}
    recorded["sd15-cache"] = record_run(train.main, base_args(models["sd15"], images, out)
                                        + ["--latents_cache", str(cache)], out, root)
    return recorded


def help_texts() -> dict:
    environ = {**os.environ, "COLUMNS": "120"}
    texts = {}
    for name, command in HELP_COMMANDS.items():
        done = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True)
        texts[name] = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    return texts


def fixture() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return {"help": help_texts(), "runs": training_runs(Path(folder))}


def differences(recorded, now, where="") -> list[str]:
    if isinstance(recorded, dict) and isinstance(now, dict):
        found = [f"{where}/{k}: only in the fixture" for k in recorded.keys() - now.keys()]
        found += [f"{where}/{k}: only now" for k in now.keys() - recorded.keys()]
        for key in sorted(recorded.keys() & now.keys()):
            found += differences(recorded[key], now[key], f"{where}/{key}")
        return found
    if recorded != now:
        return [f"{where}: fixture {json.dumps(recorded)[:400]}\n{' ' * len(where)}  now     {json.dumps(now)[:400]}"]
    return []


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "check"):
        sys.exit(__doc__)
    mode, path = sys.argv[1], Path(sys.argv[2])
    now = fixture()
    if mode == "record":
        path.mkdir(parents=True, exist_ok=True)
        (path / "fixture.json").write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"recorded {len(now['runs'])} runs and {len(now['help'])} help texts in {path / 'fixture.json'}")
        return
    found = differences(json.loads((path / "fixture.json").read_text()), json.loads(json.dumps(now)))
    for line in found:
        print(line)
    print(f"{len(found)} differences" if found else
          f"bit-identical: {len(now['runs'])} runs (metrics, weight sha256, files, messages), {len(now['help'])} help texts")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
