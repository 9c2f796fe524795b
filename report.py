"""What a run tells its user: the run description logged at the start, the summary at the end with the command that
evaluates the result, and the model card (README.md) written beside the weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import checkpoints
from families import FAMILIES, make_family
from weights import EVAL_EULER_FAMILIES, LORA_WEIGHTS

logger = logging.getLogger("train")


def resolved_location(name: str, revision=None) -> str:
    """Where a model actually came from: a local folder, or the hub id and its snapshot in the Hugging Face cache."""
    if Path(name).exists():
        return str(Path(name).absolute())
    try:
        from huggingface_hub import snapshot_download

        return f"{name} (cache snapshot {snapshot_download(name, revision=revision, local_files_only=True)})"
    except Exception:  # noqa: BLE001 - only a description
        return f"{name} (hub)"


def describe_run(args, requested: dict, accelerator, weight_dtype, base_lr: float) -> dict:
    """What was loaded from where and the settings that matter, as logged at the start and kept in
    <output_dir>/training_config.json beside the arguments as given."""
    base = resolved_location(args.pretrained_model_name_or_path, args.revision)
    optimizer = args.optimizer + (" (the official SDXL default; --optimizer adamw to change)"
                                  if "optimizer" in args.sdxl_defaults else "")
    checkpointing = ("on" if args.gradient_checkpointing else "off") + (
        " (the official SDXL default; --no_gradient_checkpointing to change)"
        if "gradient_checkpointing" in args.sdxl_defaults else "")
    return {
        "model": base,
        "family": args.model_family,
        "denoiser": f"{resolved_location(args.unet_init) if args.unet_init else base} ({FAMILIES[args.model_family].denoiser}/)",
        "vae": resolved_location(args.pretrained_vae_model_name_or_path) if args.pretrained_vae_model_name_or_path else f"{base} (vae/)",
        "dataset": getattr(args, "resolved_dataset", args.dataset_name or args.train_data_dir),
        "optimizer": optimizer,
        "learning_rate": (f"{args.learning_rate:g} (--scale_lr: {base_lr:g} x {args.gradient_accumulation_steps} "
                          f"accumulation x {args.train_batch_size} batch x {accelerator.num_processes} processes)"
                          if args.scale_lr else f"{args.learning_rate:g}"),
        "resolution": args.resolution,
        "precision": f"{accelerator.mixed_precision} (frozen modules in {str(weight_dtype).removeprefix('torch.')}; "
                     f"policy weights fp32)",
        "gradient_checkpointing": checkpointing,
        "gradient_clipping": f"max norm {args.max_grad_norm:g}" if args.max_grad_norm > 0 else "off",
        "processes": accelerator.num_processes,
        "effective_batch": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "seed": args.seed if requested["seed"] is not None else f"{args.seed} (drawn: no --seed given; a resume reuses it)",
        **({"video": video_clip(args)} if FAMILIES[args.model_family].video else {}),
    }


def video_clip(args) -> str:
    """A video run's clip: frames, size and how the frames are spaced in time (logged, in the model card)."""
    height, width = args.video_size
    spacing = (f"sampled at {args.target_fps:g} fps" if args.target_fps is not None else
               "consecutive source frames (the source's fps)" if args.frame_stride == 1 else
               f"every {args.frame_stride}-th source frame (the source's fps / {args.frame_stride})")
    return f"{args.num_frames} frames of {height} x {width} px, {spacing}"


def final_weight_names(args) -> list[str]:
    stem = LORA_WEIGHTS if args.use_lora else FAMILIES[args.model_family].denoiser
    formats = ["safetensors"] if args.use_lora else ["safetensors", "pth"]
    experts = make_family(args).experts  # wan22_a14b: a file per trained expert
    return [f"{stem}{part}{suffix}.{fmt}" for suffix in ([""] + (["_ema"] if args.use_ema else [])) for part in experts
            for fmt in formats]


EVAL_SCRIPTS = {"sd": ("scripts/eval/test_sd15.sh", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                "sdxl": ("scripts/eval/test_sdxl.sh", "stabilityai/stable-diffusion-xl-base-1.0"),
                "sd3": ("scripts/eval/test_sd3.sh", "stabilityai/stable-diffusion-3.5-medium"),
                "flux": ("scripts/eval/test_flux.sh", "black-forest-labs/FLUX.1-dev"),
                "wan": ("scripts/eval/test_wan.sh", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
                "cogvideox": ("scripts/eval/test_cogvideox.sh", "THUDM/CogVideoX-2b")}


def eval_command(args, output_dir: Path) -> str:
    if args.model_family not in EVAL_SCRIPTS:  # a family without an evaluation script
        return f"no evaluation script for {args.model_family} yet; load it with diffusers' {FAMILIES[args.model_family].pipeline_class}"
    script, default_base = EVAL_SCRIPTS[args.model_family]
    target = output_dir if args.use_lora else output_dir / f"{FAMILIES[args.model_family].denoiser}.pth"
    env = f"PRETRAIN={args.pretrained_model_name_or_path} " if args.pretrained_model_name_or_path != default_base else ""
    return f"{env}bash {script} {target}"


def log_summary(args, output_dir: Path, steps: int, seconds: float, logs: dict, written: list, skipped: dict,
                first_step: int = 0):
    """The end of a run in a few lines: time, steps, last metrics, files, and the command to evaluate it."""
    shown = {k: v for k, v in logs.items() if k in ("train_loss", "implicit_acc_accumulated", "avg_lose_l_scale", "lr")}
    finished = f"Finished {steps} steps in {seconds / 3600:.2f} h ({seconds:.0f} s)"
    if first_step:  # resumed: the time is this launch's, so say which steps it covers
        finished = (f"Finished at step {steps}: steps {first_step + 1}..{steps} ({steps - first_step}) in this launch, "
                    f"{seconds / 3600:.2f} h ({seconds:.0f} s), resumed from step {first_step}")
    lines = [finished,
             "Last metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if v is not None),
             f"Skipped: {logs.get('skipped_updates', 0)} non-finite updates, {sum(skipped.values())} data rows"
             + (f" ({', '.join(f'{reason} {count}' for reason, count in skipped.items())})" if skipped else ""),
             "Wrote: " + ", ".join(str(p) for p in written if p.exists()) + f", {output_dir / 'metrics.jsonl'}, "
             f"{output_dir / 'training_config.json'}, {output_dir / 'README.md'} (model card)",
             f"Evaluate: {eval_command(args, output_dir)}"]
    for line in lines:
        logger.info(line)


def write_model_card(args, output_dir: Path, steps: int, logs: dict):
    """README.md in output_dir: what was trained, how, and how to use it (uploaded by --push_to_hub)."""
    method = {"diffusion-dpo": "Diffusion-DPO", "dspo": "DSPO", "dmpo": "DMPO", "sft": "SFT"}[args.train_method]
    safeguard = (f" with the winner-preserving safeguard (Diffusion-SDPO, mu {args.winner_preserving_mu:g})"
                 if args.use_winner_preserving else "")
    base, family = args.pretrained_model_name_or_path, FAMILIES[args.model_family]
    if args.use_lora:
        usage = (f"pipe = {family.pipeline_class}.from_pretrained(\"{base}\")\n"
                 f"pipe.load_lora_weights(\"<this folder or repo>\")")
    else:
        usage = ("from safetensors.torch import load_file\n"
                 f"pipe = {family.pipeline_class}.from_pretrained(\"{base}\")\n"
                 f"pipe.{family.denoiser}.load_state_dict(load_file(\"{family.denoiser}.safetensors\"))")
    usage = make_family(args).card_usage(usage, base)  # wan22_a14b: each trained expert's file
    sampling = ""
    if args.model_family in EVAL_EULER_FAMILIES:  # what eval.generate does, so that users sample as evaluated
        usage += ("\n# sample as evaluated (eval.generate): Euler from the base's scheduler config (the pipeline "
                  "saved by --save_pipeline has it),\n# 50 steps, guidance_scale 8.5 (the official cfg 7.5: "
                  "eps_c + 7.5 (eps_c - eps_u))\n"
                  "from diffusers import EulerDiscreteScheduler\n"
                  f"pipe.scheduler = EulerDiscreteScheduler.from_pretrained(\"{base}\", subfolder=\"scheduler\")\n"
                  "image = pipe(\"a prompt\", num_inference_steps=50, guidance_scale=8.5).images[0]")
        sampling = ("\nEvaluated with `eval.generate`: Euler built from the base's scheduler config (SD1.5's own "
                    "PNDM samples differently), 50 steps, guidance scale 8.5 in diffusers' terms.\n")
    loss = logs.get("train_loss")
    size = f"{args.resolution} px"
    if family.video:  # frames, size and their spacing: "64 px" alone does not say what a video model saw
        size = video_clip(args)
    text = f"""---
base_model: {base}
library_name: diffusers
tags: [{'text-to-video' if family.video else 'text-to-image'}, diffusers, preference-optimization, {args.train_method}]
---

# {method}{' (LoRA)' if args.use_lora else ''} fine-tune of {base}

Trained with train.py of this project: {method}{safeguard}, beta {args.beta_dpo:g}, {steps} steps, learning rate
{args.learning_rate:g}, effective batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x processes,
{size}, mixed precision {args.mixed_precision}, data `{args.dataset_name or args.train_data_dir}` (split `{args.split}`).
Last logged train loss: {f'{loss:.4g}' if isinstance(loss, float) and math.isfinite(loss) else 'n/a'}.
Every argument is in `training_config.json`; the training curves in `metrics.jsonl`.
{sampling}
```python
from diffusers import {family.pipeline_class}
{usage}
```
"""
    checkpoints.write_text_atomic(output_dir / "README.md", text)
