"""Every train.py flag: the parser (the official implementation's names and defaults), the checks that refuse a
contradiction or an out-of-range number at parse time, and what the flags resolve to (model family, precision,
optimizer). latent_cache.py parses the same flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import flag_ranges
from families import FAMILIES, resolve_family

# train.py --help's first line (train.py's docstring opens with it)
DESCRIPTION = ("Preference fine-tuning of diffusion models on image and video pairs: SD1.x/2.x, SDXL, SD3/SD3.5, "
               "FLUX.1, Wan2.1 and\nCogVideoX, each a model family (families/) behind one interface, so the losses and "
               "the loop below never branch on a\nmodel name.")


PREFERENCE_METHODS = ("diffusion-dpo", "dspo", "dmpo")
METHODS = PREFERENCE_METHODS + ("sft",)
DEFAULT_MAX_NONFINITE = 10
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="Base diffusers model: a hub id or a local folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the base model.")
    model.add_argument("--unet_init", type=str, default="",
                       help="Start the policy and reference UNets from <unet_init>/unet (a diffusers folder) instead of the base.")
    model.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="Another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL), loaded without subfolder.")
    model.add_argument("--sdxl", action="store_true", help="The base model is SDXL (same as --model_family sdxl).")
    model.add_argument("--model_family", type=str, default=None, choices=list(FAMILIES),
                       help="sd (SD1.x/2.x), sdxl, sd3 (SD3/SD3.5), flux (FLUX.1), wan (Wan2.1), cogvideox (CogVideoX), wan22 (Wan2.2-TI2V-5B), wan22_a14b (Wan2.2-A14B, two experts), wan_i2v (Wan2.1-I2V); default: from the model's model_index.json.")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="Hub id, local folder (parquet/arrow files or a save_to_disk folder), or parquet/arrow files (glob).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Dataset configuration name.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="With --dataset_name: passed as data_dir. Alone: a local dataset folder, as --dataset_name.")
    data.add_argument("--image_column", type=str, default="image", help="Accepted for compatibility; pairs use jpg_0/jpg_1.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column holding the prompt.")
    data.add_argument("--max_train_samples", type=int, default=None, help="After filtering: shuffle (seeded) and keep N rows.")
    data.add_argument("--cache_dir", type=str, default=None, help="Cache folder for the dataset download.")
    data.add_argument("--resolution", type=int, default=None, help="Training resolution; default 512 (sd), 1024 (sdxl, sd3, flux); wan, cogvideox: a square frame size (else --video_size).")
    data.add_argument("--random_crop", action="store_true", help="Random instead of center crop.")
    data.add_argument("--no_hflip", action="store_true", help="Disable the random horizontal flip (p = 0.5).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    data.add_argument("--split", type=str, default="train", help="Dataset split; shuffled only when it is 'train'.")
    data.add_argument("--proportion_empty_prompts", type=float, default=0.2,
                      help="Probability of replacing a pair's caption by '' (official default 0.2, despite its help text).")
    data.add_argument("--choice_model", type=str, default="",
                      help="Re-rank every pair with a scorer (pickscore, hpsv2, aesthetics, clip, imagereward; official aliases hps, aes).")
    data.add_argument("--choice_model_path", type=str, default=None,
                      help="Weights of the --choice_model scorer (load_scorer's model_path; default: the official hub files).")
    data.add_argument("--choice_model_config", type=str, default=None,
                      help="JSON object (or a .json file) of further load_scorer options, e.g. '{\"processor_path\": \"...\"}'.")
    data.add_argument("--choice_model_device", type=str, default=None, help="Device of the scorer (default: the training device).")
    data.add_argument("--choice_model_batch_size", type=int, default=32, help="Images per scorer forward pass.")
    data.add_argument("--dreamlike_pairs_only", action="store_true", help="Keep only pairs where both generators are Dreamlike.")
    data.add_argument("--streaming", action="store_true",
                      help="Stream the dataset (hub id or files) instead of downloading it first. WebDataset shards always stream.")
    data.add_argument("--latents_cache", type=str, default=None,
                      help="Train from VAE moments and text embeddings encoded once by latent_cache.py into this folder "
                           "(no VAE or text encoder is loaded; README 'Cached latents').")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000,
                      help="Streams only: rows in the seeded shuffling buffer (the shard order is shuffled too).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=1, help="Pairs per device per micro-batch (the UNet sees twice this).")
    optim.add_argument("--num_train_epochs", type=int, default=100, help="Recomputed from --max_train_steps when that is set.")
    optim.add_argument("--max_train_steps", type=int, default=2000, help="Optimizer steps.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument("--gradient_checkpointing", action="store_true", default=None,
                       help="Gradient checkpointing in the policy UNet (default: on with --sdxl, as the official, else off).")
    optim.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                       help="No gradient checkpointing, even with --sdxl.")
    optim.add_argument("--learning_rate", type=float, default=1e-8, help="Base learning rate (before --scale_lr).")
    optim.add_argument("--scale_lr", action="store_true", help="lr *= gradient_accumulation_steps * train_batch_size * num_processes.")
    optim.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", help="diffusers get_scheduler name.")
    optim.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup in optimizer steps.")
    optim.add_argument("--optimizer", type=str, default=None, choices=list(OPTIMIZERS),
                       help="Default: adafactor with --sdxl (the official code forces it), else adamw.")
    optim.add_argument("--use_adafactor", action="store_true", help="Same as --optimizer adafactor (official flag).")
    optim.add_argument("--use_8bit_adam", action="store_true", help="Same as --optimizer adamw8bit (bitsandbytes 8-bit AdamW).")
    optim.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs.")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay (AdamW and Adafactor).")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="Clip the global gradient norm on every update (0 disables). Unlike the official code, "
                            "--use_adafactor does not switch clipping off; the shipped SDXL runs clipped too (SPEC B6).")
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Autocast precision of the policy; also the dtype of the frozen VAE, text encoders and reference "
                            "UNet. Default: the launcher's (accelerate launch's --mixed_precision or its config file), "
                            "else fp16 (the official default).")
    optim.add_argument("--seed", type=int, default=None, help="Seed; rank r uses seed + r for noise and timesteps.")
    optim.add_argument("--noise_offset", type=float, default=0.0, help="Offset noise scale.")
    optim.add_argument("--input_perturbation", type=float, default=0.0,
                       help="Input perturbation scale; applied to the pair's shared noise (fixes SPEC B5).")
    optim.add_argument("--local_rank", type=int, default=-1, help="Accepted for compatibility; accelerate sets ranks.")
    optim.add_argument("--enable_xformers", action="store_true", help="xFormers attention in the policy UNet (PyTorch SDPA otherwise).")

    speed = parser.add_argument_group("speed (off by default: each changes results by rounding; docs/benchmarks.md)")
    speed.add_argument("--fused_adam", action="store_true", help="The fused AdamW kernel (CPU and CUDA).")
    speed.add_argument("--channels_last", action="store_true", help="Channels-last (NHWC) memory format for the UNets and the VAE.")
    speed.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the policy and reference UNets (minutes of compilation first).")

    pref = parser.add_argument_group("preference objective")
    pref.add_argument("--train_method", type=str, default="diffusion-dpo", choices=list(METHODS))
    pref.add_argument("--beta_dpo", type=float, default=5000, help="beta: the margin is -(beta/2) times the loss difference.")
    pref.add_argument("--use_winner_preserving", action="store_true", help="The Diffusion-SDPO safeguard on the loser gradient.")
    pref.add_argument("--winner_preserving_mu", type=float, default=0.0, help="mu in [0, 1]: required winner-loss decrease.")
    pref.add_argument("--winner_preserving_granularity", type=str, default="batch", choices=["batch", "sample"],
                      help="One lambda per micro-batch (official) or one per pair.")
    pref.add_argument("--dmpo_alpha", type=float, default=0.0, help="DMPO alpha: target probability q = 1 - alpha.")
    pref.add_argument("--sft", action="store_true", help="Accepted for compatibility; use --train_method sft.")
    pref.add_argument("--timestep_range", type=int, nargs=2, default=[0, 999], metavar=("LO", "HI"),
                      help="Draw training timesteps uniformly from [LO, HI] (DDPM index, 0 = least noise): the timestep "
                           "mask of DPO-C&M (arXiv:2505.21893; docs/importance.md).")
    pref.add_argument("--importance_weighting", type=str, default="none", choices=["none", "clip_mask", "full"],
                      help="Weight each pair's loss by its importance weight w = p_theta/q (our interpretation of "
                           "arXiv:2505.21893): clip_mask zeroes pairs with w < --is_mask_below (DPO-C&M); full clips w "
                           "to [--is_clip_min, --is_clip_max] and normalises it to mean 1 over the micro-batch.")
    pref.add_argument("--is_mask_below", type=float, default=0.9,
                      help="clip_mask: pairs with w below this get weight 0 (0.9: per-element KL(q || p_theta) > 0.105).")
    pref.add_argument("--is_clip_min", type=float, default=0.1, help="full: lower clip of w, in (0, --is_clip_max].")
    pref.add_argument("--is_clip_max", type=float, default=1.0, help="full: upper clip of w (w <= 1 by construction).")
    pref.add_argument("--pair_weight_column", type=str, default=None,
                      help="A dataset column of per-pair loss weights (eval.make_pairs writes pair_weight, e.g. "
                           "--gap_weight_power 1): each pair's loss term is multiplied by its weight (times the "
                           "importance weight, if any). Default: none, every pair weighs 1.")

    flow = parser.add_argument_group("rectified flow (sd3, flux): timestep density as diffusers' SD3/FLUX training")
    flow.add_argument("--weighting_scheme", type=str, default="logit_normal", choices=["logit_normal", "mode", "uniform"],
                      help="Density of the training sigmas (SD3 paper: logit_normal).")
    flow.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean of the normal.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: standard deviation of the normal.")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="mode: scale of the mode density.")
    flow.add_argument("--guidance_scale", type=float, default=3.5,
                      help="flux with a guidance embedding (FLUX.1-dev): the guidance value the transformer sees.")

    from data.video import add_video_arguments

    add_video_arguments(parser)  # --num_frames, --frame_stride, --target_fps, --video_size, --vae_tiling
    from families.wan22 import add_wan22_arguments

    add_wan22_arguments(parser)  # --train_expert, --conditioning_image

    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--use_lora", action="store_true",
                      help="Train LoRA adapters only; the reference is the same UNet with its adapters disabled (no second UNet).")
    lora.add_argument("--lora_rank", type=int, default=4, help="Rank r of the adapters.")
    lora.add_argument("--lora_alpha", type=float, default=None, help="Adapter scale alpha (the update is alpha/r B A); default r.")
    lora.add_argument("--lora_target_modules", type=str, default=None,
                      help="Comma-separated names of the denoiser's modules that get adapters (default: the family's: "
                           "to_k,to_q,to_v,to_out.0 for the UNets; attention and feed-forward projections for sd3/flux).")

    ema = parser.add_argument_group("EMA")
    ema.add_argument("--use_ema", action="store_true",
                     help="Keep an exponential moving average of the trained weights (saved as unet_ema.* beside unet.*).")
    ema.add_argument("--ema_decay", type=float, default=0.9999, help="Largest decay of the average.")
    ema.add_argument("--ema_update_after_step", type=int, default=0, help="Optimizer steps before the average starts.")
    ema.add_argument("--ema_power", type=float, default=None,
                     help="Warm-up decay 1 - (1 + t)^-power; default: diffusers' (1 + t) / (10 + t). Either is capped at --ema_decay.")

    out = parser.add_argument_group("logging and checkpoints")
    out.add_argument("--output_dir", type=str, default="sd-model-finetuned")
    out.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, inside output_dir.")
    out.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all, or none.")
    out.add_argument("--tracker_project_name", type=str, default="tuning")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="Save checkpoint-N every N optimizer steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    out.add_argument("--resume_from_checkpoint", type=str, default="latest",
                     help="'latest' (official default: the newest checkpoint in output_dir, if any), a checkpoint path, or 'none'.")
    out.add_argument("--hard_skip_resume", action="store_true",
                     help="On resume, start the interrupted epoch from its beginning instead of skipping the seen batches.")
    out.add_argument("--max_nonfinite_steps", type=int, default=DEFAULT_MAX_NONFINITE,
                     help="Stop after this many consecutive updates with a non-finite loss (each one is skipped).")
    out.add_argument("--save_pipeline", action="store_true", help="Also save the full diffusers pipeline in output_dir.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload output_dir to --hub_model_id at the end.")
    out.add_argument("--hub_model_id", type=str, default=None, help="Hub repository for --push_to_hub.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    try:
        args.model_family = resolve_family(args)
    except ValueError as error:
        parser.error(str(error))
    args.sdxl = args.model_family == "sdxl"  # the official flag, which the SDXL-only code paths read
    family = FAMILIES[args.model_family]
    from data.video import check_video_args

    check_video_args(parser, args, family)  # video families: size, frames; image families: no video flags
    family.check_args(parser, args)  # the family's own (Wan2.2 experts, image-to-video)
    if args.resolution is None:
        args.resolution = family.default_resolution
    if args.lora_target_modules is None:
        args.lora_target_modules = family.lora_targets
    if family.denoiser == "transformer" and args.resolution % 16:
        parser.error(f"--resolution must be a multiple of 16 for {args.model_family} (8x VAE, then 2x2 patches), "
                     f"got {args.resolution}")
    if not args.logit_std > 0 or args.mode_scale < 0:
        parser.error(f"--logit_std must be > 0 and --mode_scale >= 0, got {args.logit_std} {args.mode_scale}")
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("give --dataset_name (hub id, folder or files) or --train_data_dir (a local dataset folder)")
    if not 0.0 <= args.winner_preserving_mu <= 1.0:
        parser.error(f"--winner_preserving_mu must be in [0, 1], got {args.winner_preserving_mu}")
    low, high = args.timestep_range
    if not 0 <= low <= high:
        parser.error(f"--timestep_range LO HI needs 0 <= LO <= HI, got {low} {high}")
    if not 0.0 <= args.is_mask_below <= 1.0:
        parser.error(f"--is_mask_below must be in [0, 1] (w <= 1 by construction), got {args.is_mask_below}")
    if not 0.0 < args.is_clip_min <= args.is_clip_max:
        parser.error(f"--is_clip_min and --is_clip_max need 0 < min <= max, got {args.is_clip_min} {args.is_clip_max}")
    if args.importance_weighting == "full" and args.train_batch_size == 1:
        parser.error("--importance_weighting full normalises the weights to mean 1 over the micro-batch, so with "
                     "--train_batch_size 1 every weight is 1: raise --train_batch_size or use clip_mask")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.choice_model:
        from eval.scorers import ALIASES, METRICS

        if args.choice_model.lower() not in METRICS + tuple(ALIASES):
            parser.error(f"--choice_model {args.choice_model}: not a scorer; choose from {', '.join(METRICS)} "
                         f"(official aliases {', '.join(ALIASES)})")
    if args.lora_alpha is None:
        args.lora_alpha = args.lora_rank
    if args.lora_rank < 1:
        parser.error(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error(f"--ema_decay must be in [0, 1], got {args.ema_decay}")
    if args.shuffle_buffer_size < 1:
        parser.error(f"--shuffle_buffer_size must be >= 1, got {args.shuffle_buffer_size}")
    check_numbers(parser, args)
    resolve_optimizer(parser, args)
    if args.latents_cache:
        from data.latent_cache import check_cacheable

        try:
            check_cacheable(args)
        except ValueError as error:
            parser.error(str(error))
    if args.fused_adam and args.optimizer != "adamw":
        parser.error(f"--fused_adam is for torch's AdamW; drop it with --optimizer {args.optimizer}")
    if args.pair_weight_column and (args.latents_cache or family.video):
        parser.error("--pair_weight_column reads the weights from image pair rows: it does not work with "
                     "--latents_cache or a video family yet; drop one of them")
    return args


# Every numeric flag's range, checked at parse time (flag_ranges.py; the video flags come from data/video.py). Orderings
# (--timestep_range, --is_clip_min <= --is_clip_max) and multiples (--resolution) are checked in parse_args.
FLAG_RANGES = {
    "max_train_samples": ">= 1", "resolution": ">= 8", "dataloader_num_workers": ">= 0",
    "proportion_empty_prompts": "[0, 1]", "choice_model_batch_size": ">= 1", "shuffle_buffer_size": ">= 1",
    "train_batch_size": ">= 1", "num_train_epochs": ">= 1", "max_train_steps": ">= 1",
    "gradient_accumulation_steps": ">= 1", "learning_rate": "> 0", "lr_warmup_steps": ">= 0",
    "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_weight_decay": ">= 0", "adam_epsilon": "> 0",
    "max_grad_norm": ">= 0",  # 0 switches clipping off
    "seed": "[0, 4294967295]", "noise_offset": ">= 0", "input_perturbation": ">= 0", "local_rank": ">= -1",
    "beta_dpo": "> 0", "winner_preserving_mu": "[0, 1]", "dmpo_alpha": "[0, 1)", "timestep_range": ">= 0",
    "is_mask_below": "[0, 1]", "is_clip_min": "> 0", "is_clip_max": "> 0",
    "logit_mean": "finite", "logit_std": "> 0", "mode_scale": ">= 0", "guidance_scale": ">= 0",
    "num_frames": ">= 1", "frame_stride": ">= 1", "target_fps": "> 0", "video_size": ">= 16",
    "lora_rank": ">= 1", "lora_alpha": "> 0", "ema_decay": "(0, 1)", "ema_update_after_step": ">= 0",
    "ema_power": "> 0", "checkpointing_steps": ">= 1", "checkpoints_total_limit": ">= 1", "max_nonfinite_steps": ">= 1",
}


def check_numbers(parser, args):
    """Values that would fail (or silently misbehave) only after the models have loaded, refused up front."""
    at_least_one = ["train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                    "max_nonfinite_steps", "num_train_epochs"]
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1 (it would delete the checkpoint just written), got "
                     f"{args.checkpoints_total_limit}; leave it out to keep every checkpoint")
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    if not args.beta_dpo > 0:
        parser.error(f"--beta_dpo must be > 0, got {args.beta_dpo}")
    if not 0.0 <= args.dmpo_alpha < 1.0:
        parser.error(f"--dmpo_alpha must be in [0, 1) (the target probability is 1 - alpha), got {args.dmpo_alpha}")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    flag_ranges.check_ranges(parser, args, FLAG_RANGES)  # after the checks above, whose messages say more
    for parent in [Path(args.output_dir).absolute(), *Path(args.output_dir).absolute().parents]:
        if parent.exists():
            if not parent.is_dir():
                parser.error(f"--output_dir {args.output_dir}: {parent} is a file, not a folder; choose another --output_dir")
            break


def resolve_mixed_precision(flag: str | None, environ) -> tuple[str, str]:
    """The precision and where it came from: --mixed_precision if given, else what `accelerate launch` passes on
    (its --mixed_precision flag or config file, in ACCELERATE_MIXED_PRECISION), else the official default fp16."""
    if flag is not None:
        return flag, "--mixed_precision"
    launcher = environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher in ("no", "fp16", "bf16"):
        return launcher, "accelerate launch (its --mixed_precision or config file)"
    return "fp16", "train.py's default (no --mixed_precision and no launcher setting)"


def resolve_optimizer(parser, args):
    """--optimizer, or the official flags; with --sdxl and neither, the official behaviour (Adafactor, checkpointing)."""
    chosen = {name for name, flag in [("adafactor", args.use_adafactor), ("adamw8bit", args.use_8bit_adam)] if flag}
    if args.optimizer:
        chosen.add(args.optimizer)
    if len(chosen) > 1:
        parser.error(f"choose one optimizer, got {' and '.join(sorted(chosen))} (--optimizer, --use_adafactor, --use_8bit_adam)")
    defaulted = [] if chosen else ["optimizer"]
    args.optimizer = chosen.pop() if chosen else ("adafactor" if args.sdxl else "adamw")
    args.use_adafactor, args.use_8bit_adam = args.optimizer == "adafactor", args.optimizer == "adamw8bit"
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.sdxl
        defaulted.append("gradient_checkpointing")
    args.sdxl_defaults = ",".join(defaulted) if args.sdxl else ""  # what --sdxl chose, said in the log
