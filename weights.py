"""The trained weights on disk: what a run saves (full weights, LoRA adapters, EMA), loads back on resume, prunes,
and the pipeline folder of --save_pipeline. checkpoints.py holds the checkpoints' integrity checks and safe writes."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

import checkpoints
from families import FAMILIES, make_family
from model_setup import trainable_parameters

logger = logging.getLogger("train")


def unet_state_dict(unet) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}


def trained_state(unet, ema=None, family=None) -> dict:
    """What training changes, on the CPU: the denoiser's state dict, or for LoRA its adapters in the format the
    family's `pipeline.load_lora_weights` reads. With `ema`, its moving averages stand in for the trained values.
    Under FSDP the shards are gathered into full tensors: a collective, so every rank calls it."""
    state = unet.state_dict()
    if ema is not None:
        state.update({name: average for (name, _), average in zip(trainable_parameters(unet), ema.shadow_params)})
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}  # FSDP2's DTensors
    if getattr(unet, "peft_config", None):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet, state_dict=state)
        if family is None:  # a UNet: diffusers' UNet LoRA format
            from diffusers.utils import convert_state_dict_to_diffusers

            state = convert_state_dict_to_diffusers(state)
        else:
            state = family.lora_state(state)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_unet(unet, folder: Path, formats=("safetensors", "pth"), name: str = "unet", state: dict | None = None):
    """The UNet weights as `<name>.safetensors` and/or `<name>.pth` (a plain state dict: the released checkpoints' format).

    Each file is written under a temporary name and renamed, so a crash never leaves a truncated file behind; its mode
    follows the user's umask (safetensors alone would write 0600).
    """
    from safetensors.torch import save_file

    state = unet_state_dict(unet) if state is None else state
    for fmt in formats:
        final = folder / f"{name}.{fmt}"
        tmp = folder / f".{name}.{fmt}.tmp"
        save_file(state, str(tmp)) if fmt == "safetensors" else torch.save(state, tmp)
        checkpoints.umask_mode(tmp)
        os.replace(tmp, final)


LORA_WEIGHTS = "pytorch_lora_weights"  # diffusers' file name; load_lora_weights(folder) finds it


def save_weights(unet, folder: Path, args, ema=None, formats=("safetensors", "pth"), family=None, write=True):
    """What training changed, into `folder`: unet.safetensors/.pth (transformer.* for sd3/flux), or with LoRA
    pytorch_lora_weights.safetensors (+ adapter config as metadata); with `ema`, the moving average beside it as
    unet_ema.* or pytorch_lora_weights_ema.*. Under FSDP every rank calls it (the gather) and one writes (`write`)."""
    family = family or make_family(args)
    for suffix, average in [("", None)] + ([("_ema", ema)] if ema is not None else []):
        state = trained_state(unet, average, family)
        if not write:
            continue
        for part, state in family.expert_states(state).items():  # one file; wan22_a14b: one per expert ("", "_2")
            if not args.use_lora:
                save_unet(None, folder, formats, name=f"{family.denoiser}{part}{suffix}", state=state)
                continue
            tmp = f".{LORA_WEIGHTS}{part}{suffix}.safetensors.tmp"
            family.save_lora(folder, state, tmp, unet.peft_config["default"].to_dict())
            checkpoints.umask_mode(folder / tmp)
            os.replace(folder / tmp, folder / f"{LORA_WEIGHTS}{part}{suffix}.safetensors")


def load_weights(unet, folder: Path, args, ema=None, family=None):
    """The inverse of `save_weights`, for a resume. The EMA file is read first, through the model into the average."""
    from safetensors.torch import load_file

    family = family or make_family(args)

    def load(suffix):
        if not args.use_lora:
            unet.load_state_dict(family.joined_state({part: load_file(str(folder / f"{family.denoiser}{part}{suffix}.safetensors"))
                                                      for part in family.experts}))
            return
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        states = {part: load_file(str(folder / f"{LORA_WEIGHTS}{part}{suffix}.safetensors")) for part in family.experts}
        state = family.joined_state({part: convert_unet_state_dict_to_peft(
            {k.removeprefix(f"{family.denoiser}."): v for k, v in state.items()}) for part, state in states.items()})
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise RuntimeError(f"{folder}: the adapter does not fit this UNet (--lora_rank/--lora_target_modules changed?): "
                               f"{(result.unexpected_keys + missing)[:3]}")

    if ema is not None:
        load("_ema")
        ema.shadow_params = [param.detach().clone() for _, param in trainable_parameters(unet)]
    load("")


def load_sharded_ema(unet, ema, path: Path, family):
    """The EMA of a resumed FSDP run: the full averages from `path`, each sharded as its parameter is (a LoRA file
    holds the adapters under the pipeline's names: mapped back to the parameters' as load_weights maps them)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    full = load_file(str(path))
    if path.name.startswith(LORA_WEIGHTS):
        from diffusers.utils import convert_unet_state_dict_to_peft

        full = convert_unet_state_dict_to_peft({k.removeprefix(f"{family.denoiser}."): v for k, v in full.items()})
    ema.shadow_params = [distribute_tensor(full[name.replace(".default", "")].to(param.dtype), param.device_mesh,
                                           param.placements) for name, param in trainable_parameters(unet)]


def weight_file_names(args) -> list[str]:
    """The weight files a checkpoint holds (save_weights with formats=("safetensors",))."""
    name = LORA_WEIGHTS if args.use_lora else FAMILIES[args.model_family].denoiser
    experts = make_family(args).experts  # wan22_a14b: a file per trained expert
    return [f"{name}{part}{suffix}.safetensors" for suffix in ([""] + (["_ema"] if args.use_ema else [])) for part in experts]


def checkpoint_bytes(unet, optimizer, ema=None) -> int:
    """About what a checkpoint writes: the trained weights (and their EMA) in fp32 plus the optimizer's state."""
    trained = sum(p.numel() * 4 for _, p in trainable_parameters(unet))
    optimizer_state = sum(v.numel() * v.element_size() for state in optimizer.state_dict()["state"].values()
                          for v in state.values() if torch.is_tensor(v))
    frozen_unet = 0 if getattr(unet, "peft_config", None) else sum(b.numel() * b.element_size() for b in unet.buffers())
    return trained * (2 if ema is not None else 1) + optimizer_state + frozen_unet + 2**20


def prune_checkpoints(output_dir: Path, keep: int):
    for old in checkpoints.checkpoint_folders(output_dir)[: -keep]:
        shutil.rmtree(old)


EVAL_EULER_FAMILIES = ("sd", "sdxl")  # eval.generate samples these with Euler from the base's scheduler config


def save_pipeline(args, unet, output_dir: Path):
    """The full diffusers pipeline: trained UNet (fp32) and the frozen parts reloaded in their original precision
    (the official saved bf16 copies of the SD1.5 VAE/text encoder, SPEC B4, and saved SDXL twice, B3). For sd and
    sdxl the scheduler is the one eval.generate samples with (Euler from the base's scheduler config: for SD1.5, whose
    folder holds a PNDM config, "linspace" spacing), so the pipeline samples as the evaluation does.

    Written into a temporary folder and moved into output_dir with model_index.json last, so a failed save leaves no
    loadable half pipeline. The UNet weights are not kept twice: once written, unet/diffusion_pytorch_model.safetensors
    is replaced by a hard link to output_dir/unet.safetensors (same tensors and keys; a copy where links fail)."""
    import diffusers
    from diffusers import AutoencoderKL

    family = make_family(args)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    extra = {}
    if args.pretrained_vae_model_name_or_path:
        extra["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    if args.use_lora:  # the base denoiser in fp32; the adapter file is already in output_dir (pipeline.load_lora_weights)
        unet = family.load_denoiser(args.unet_init or args.pretrained_model_name_or_path,
                                    None if args.unet_init else args.revision)
    extra.update(family.pipeline_denoisers(unet))  # {"unet": unet}; wan22_a14b: its expert(s)
    if family.name in EVAL_EULER_FAMILIES:  # the scheduler eval.generate samples with, not the base's own (SD1.5: PNDM)
        from eval.generate import load_scheduler

        extra["scheduler"] = load_scheduler(args.pretrained_model_name_or_path, args.revision)
    pipeline = pipeline_class.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision, **extra)
    tmp = output_dir / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        size = sum(p.numel() * p.element_size() for module in pipeline.components.values()
                   if isinstance(module, torch.nn.Module) for p in module.parameters())
        checkpoints.check_free_space(output_dir, size, "the pipeline (--save_pipeline)")  # the UNet is written, then linked
        pipeline.save_pretrained(tmp)
        for part in family.experts:
            trained = output_dir / f"{family.denoiser}{part}.safetensors"
            if not args.use_lora and trained.is_file():
                linked = tmp / f"{family.denoiser}{part}" / "diffusion_pytorch_model.safetensors"
                linked.unlink()
                try:
                    os.link(trained, linked)
                except OSError:
                    shutil.copy2(trained, linked)
        for path in tmp.rglob("*"):
            if path.is_file():
                checkpoints.umask_mode(path)
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == "model_index.json"):  # model_index.json last
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Saved the pipeline in {output_dir} ({family.denoiser}/ shares {family.denoiser}.safetensors' data "
                f"through a hard link)")
