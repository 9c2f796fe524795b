#!/usr/bin/env python
"""Preference fine-tuning of diffusion models on image and video pairs: SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, Wan2.1 and
CogVideoX, each a model family (families/) behind one interface, so the losses and the loop below never branch on a
model name.

Methods (`--train_method`): Diffusion-DPO, DSPO, DMPO and plain SFT on the preferred images, each optionally with
the winner-preserving safeguard of Diffusion-SDPO (`--use_winner_preserving`), which rescales the loser branch's
gradient so that, to first order, an update never increases the winner's denoising loss. Also with any method:
timestep masking (`--timestep_range`) and importance weights (`--importance_weighting`), our interpretation of SDPO
(arXiv:2505.21893; docs/importance.md).

    accelerate launch train.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name yuvalkirstain/pickapic_v2 --train_method diffusion-dpo --beta_dpo 5000 \
        --use_winner_preserving --winner_preserving_mu 0.9 --output_dir output/sd15-diffusion-dpo

Arguments keep the official implementation's names and defaults (AIDC-AI/Diffusion-SDPO), so its launch scripts run
unchanged. The file reads top to bottom: the losses (pure functions), the arguments, the data, then `main`.
Beside it: families/ (models and parametrisations), checkpoints.py (checkpoint integrity, safe writes),
video_data.py (video pairs), latent_cache.py (encode once, train without the VAE). `import train` has no side effects.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import checkpoints
import flag_ranges
from families import FAMILIES, make_family, resolve_family

logger = logging.getLogger("train")

PREFERENCE_METHODS = ("diffusion-dpo", "dspo", "dmpo")
METHODS = PREFERENCE_METHODS + ("sft",)
DEFAULT_MAX_NONFINITE = 10
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")


# ----------------------------------------------------------------------------------------------------------------
# Losses. Shapes: predictions and targets are (2B, C, H, W) with the B winners first, then the B losers, and winner i
# shares its noise and timestep with loser i. All losses are computed in fp32.


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32: (N, C, H, W) -> (N,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def winner_preserving_scale(
    model_pred: torch.Tensor, target: torch.Tensor, mu: float, granularity: str = "batch"
) -> torch.Tensor:
    """The loser-gradient scale lambda of Diffusion-SDPO (arXiv:2511.03317, Sec. 3, "winner-preserving update").

    With residuals R_w = eps_theta(x_t^w) - eps and R_l = eps_theta(x_t^l) - eps, the update -grad L_w + lambda grad L_l
    keeps <-g_w + lambda g_l, g_w> <= -mu ||g_w||^2 (the winner loss does not rise, to first order, in output space):

        lambda = clamp((1 - mu) ||R_w||^2 / <R_l, R_w>, 0, 1)   if <R_l, R_w> > 0,   else 1.

    As in the official code, ||.||^2 and <.,.> are of the gradients 2R/N of the mean-squared proxies (N = elements per
    half), with 1e-9 added to the denominator in that scale. `granularity="batch"` gives one scalar from the whole
    micro-batch (official); "sample" gives one lambda per pair from that pair's residuals, shape (B,).
    Closed form from the residuals: no extra autograd pass. Returned detached, in fp32.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"winner_preserving_mu must be in [0, 1], got {mu}")
    residual = model_pred.detach().float() - target.detach().float()
    r_win, r_lose = residual.chunk(2)
    if granularity == "batch":
        n = r_win.numel()
        win_sq, cross = r_win.pow(2).sum(), (r_lose * r_win).sum()
    elif granularity == "sample":
        n = r_win[0].numel()
        win_sq, cross = r_win.pow(2).flatten(1).sum(1), (r_lose * r_win).flatten(1).sum(1)
    else:
        raise ValueError(f"granularity must be 'batch' or 'sample', got {granularity!r}")
    numerator = (1.0 - mu) * 4.0 * win_sq / n**2
    denominator = 4.0 * cross / n**2
    scale = torch.where(denominator > 0, numerator / (denominator + 1e-9), torch.ones_like(denominator))
    return scale.clamp(0.0, 1.0)


def straight_through_scale(value: torch.Tensor, scale) -> torch.Tensor:
    """sg(x) + s (x - sg(x)): the value of x, the gradient of s x. How lambda touches only the loser's gradient."""
    return value.detach() + scale * (value - value.detach())


def diffusion_dpo_loss(margin: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO (Wallace et al., arXiv:2311.12908, Eq. 14): loss_i = -log sigmoid(u_i).

    u_i = -(beta/2) [(L_w,i - L_l,i) - (Lref_w,i - Lref_l,i)], L the per-sample denoising MSE (see `preference_loss`).
    """
    return -F.logsigmoid(margin)


def dmpo_loss(margin: torch.Tensor, alpha: float) -> torch.Tensor:
    """DMPO (Li et al., arXiv:2507.07510): KL(Bern(p_i) || Bern(q)) with p_i = sigmoid(u_i), q = 1 - alpha.

    loss_i = p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q)), q clamped to [1e-6, 1 - 1e-6]; log p and log(1 - p)
    as -softplus(-u) and -softplus(u) for stability. Minimised at u = logit(q), so the margin is held near a target
    instead of pushed to infinity.
    """
    q = min(max(1.0 - alpha, 1e-6), 1.0 - 1e-6)
    p = torch.sigmoid(margin)
    log_p, log_not_p = -F.softplus(-margin), -F.softplus(margin)
    return p * (log_p - math.log(q)) + (1.0 - p) * (log_not_p - math.log(1.0 - q))


def dspo_loss(
    margin: torch.Tensor, win_pred: torch.Tensor, win_ref_pred: torch.Tensor, win_target: torch.Tensor,
    beta: float, sdxl: bool,
) -> torch.Tensor:
    """DSPO (Zhu et al., ICLR 2025, "Direct Score Preference Optimization"), as the official code implements it.

    SD1.5:  loss_i = mean_CHW [ (eps_theta(x^w) - eps) - beta (1 - sigmoid(u_i)) (eps_theta(x^w) - eps_ref(x^w)) ]^2
    SDXL:   with D_i = eps_theta(x^w) - eps_ref(x^w) and m = mean over the micro-batch of D^2:
            loss_i = (1 - sigmoid(u_i))^2 mean_CHW D_i^2  if m >= 0.1,  else (1 - sigmoid(u_i))^2.
    The SDXL branch is chosen without a host sync (torch.where), with the same result as the official Python `if`.
    Winners only; the two variants are genuinely different objectives (SPEC Q13).
    """
    weight = 1.0 - torch.sigmoid(margin)
    drift = win_pred - win_ref_pred
    if not sdxl:
        residual = (win_pred - win_target) - beta * weight.view(-1, *[1] * (drift.dim() - 1)) * drift
        return residual.pow(2).flatten(1).mean(1)
    drift_sq = drift.pow(2).flatten(1).mean(1)
    far = drift.pow(2).mean() >= 0.1
    return torch.where(far, weight.pow(2) * drift_sq, weight.pow(2))


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised fine-tuning on the preferred images: the standard epsilon MSE (Ho et al., 2020).

    `sample_weight` (B,) multiplies each sample's MSE before the mean (importance weighting).
    """
    if sample_weight is None:
        return F.mse_loss(model_pred.float(), target.float())
    return (per_sample_mse(model_pred, target) * sample_weight).mean()


def preference_loss(
    method: str, model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta_dpo: float, *,
    dmpo_alpha: float = 0.0, sdxl: bool = False, loser_scale=1.0, pair_weight: torch.Tensor | None = None,
):
    """Loss of one micro-batch of B pairs for `method` in {"diffusion-dpo", "dspo", "dmpo"}; returns (loss, stats).

    Per-sample losses L = mean_CHW (eps_pred - eps)^2 for the policy and the reference, in fp32 (the official code
    rounds the reference losses to bf16, which adds about one logit of noise to u at beta = 5000: SPEC B10).
    The loser term enters as sg(L_l) + lambda (L_l - sg(L_l)) with lambda = `loser_scale` (a float, a 0-dim tensor or
    one value per pair), so values and logged metrics are unchanged and only the loser's gradient is scaled.
    Margin u_i = -(beta/2) [(L_w,i - L~_l,i) - (Lref_w,i - Lref_l,i)]. `pair_weight` (B,) multiplies each pair's loss
    before the mean (importance weighting). `stats` holds detached per-sample losses, margins and implicit accuracy.
    """
    if method not in PREFERENCE_METHODS:
        raise ValueError(f"method must be one of {PREFERENCE_METHODS}, got {method!r}")
    model_pred, ref_pred, target = model_pred.float(), ref_pred.detach().float(), target.float()
    model_win, model_lose = per_sample_mse(model_pred, target).chunk(2)
    ref_win, ref_lose = per_sample_mse(ref_pred, target).chunk(2)
    model_lose_scaled = straight_through_scale(model_lose, loser_scale)
    margin = -0.5 * beta_dpo * ((model_win - model_lose_scaled) - (ref_win - ref_lose))

    if method == "diffusion-dpo":
        losses = diffusion_dpo_loss(margin)
    elif method == "dmpo":
        losses = dmpo_loss(margin, dmpo_alpha)
    else:
        losses = dspo_loss(margin, model_pred.chunk(2)[0], ref_pred.chunk(2)[0], target.chunk(2)[0], beta_dpo, sdxl)
    if pair_weight is not None:
        losses = losses * pair_weight
    stats = {
        "model_win_loss": model_win.detach(), "model_lose_loss": model_lose.detach(),
        "ref_win_loss": ref_win.detach(), "ref_lose_loss": ref_lose.detach(),
        "margin": margin.detach(), "implicit_acc": (margin.detach() > 0).float().mean(),
    }
    return losses.mean(), stats


# Importance weights: our interpretation of SDPO (Yang et al., arXiv:2505.21893), whose code is not public and whose
# v2 notes an error in its main theorem. See docs/importance.md.


def importance_log_weight_coefficients(scheduler) -> torch.Tensor:
    """c_t for every training timestep t (diffusers DDPM index 0..T-1), so that log w = -c_t mean((eps_hat - eps)^2).

    p_theta(x_{t-1} | x_t) and the forward posterior q(x_{t-1} | x_t, x_0) share the variance
    btilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (abar_{-1} = 1; btilde_0 := btilde_1, DDPM's clipped variance),
    and their means differ by beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) (eps_hat - eps), so per element

        KL(q || p_theta) / d = c_t mean((eps_hat - eps)^2),   c_t = beta_t^2 / (2 btilde_t alpha_t (1 - abar_t)).

    Our interpretation of the step-wise importance weight of SDPO (arXiv:2505.21893). beta_t = 1 - abar_t / abar_{t-1}
    from the scheduler's alphas_cumprod, as DDPMScheduler.step derives it. Computed in float64, returned fp32.
    """
    alphas_cumprod = scheduler.alphas_cumprod.double()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = 1 - alphas_cumprod / previous
    posterior_variance = (1 - previous) / (1 - alphas_cumprod) * betas
    posterior_variance[0] = posterior_variance[1]
    return (betas.pow(2) / (2 * posterior_variance * (1 - betas) * (1 - alphas_cumprod))).float()


def log_importance_weight(
    model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, coefficients: torch.Tensor
) -> torch.Tensor:
    """Per-element log importance weight of each sample, (N, C, H, W) -> (N,), without gradient:

        log w = E_{x_{t-1} ~ q} [log p_theta(x_{t-1} | x_t) - log q(x_{t-1} | x_t, x_0)] / d = -c_t mean((eps_hat - eps)^2)

    with `target` the eps that produced x_t (for v-prediction and flow: the target built from it, families/noise.py),
    `timesteps` the index into `coefficients` (importance_log_weight_coefficients, or a parametrisation's
    log_weight_coefficients). Always <= 0: w = 1 where the policy's reverse step matches the forward posterior.
    Our interpretation of arXiv:2505.21893.
    """
    return -coefficients[timesteps] * per_sample_mse(model_pred.detach(), target)


def importance_weights(
    log_weight: torch.Tensor, mode: str, mask_below: float = 0.9, clip_min: float = 0.1, clip_max: float = 1.0
) -> torch.Tensor:
    """Loss weights from the log importance weights of a micro-batch's pairs (or SFT samples), (B,) -> (B,), detached.

    A pair's weight is w_i = exp((log w_i^win + log w_i^lose) / 2); pass that mean of the two log weights.
    "clip_mask" (DPO-C&M): 0 where w_i < mask_below, else 1 (the loss is still averaged over all B pairs).
    "full" (importance-sampled objective): clamp(w_i, clip_min, clip_max) / mean_j clamp(w_j, clip_min, clip_max),
    i.e. mean 1 over the micro-batch. Our interpretation of arXiv:2505.21893.
    """
    weight = log_weight.detach().float().exp()
    if mode == "clip_mask":
        return (weight >= mask_below).float()
    if mode == "full":
        weight = weight.clamp(clip_min, clip_max)
        return weight / weight.mean()
    raise ValueError(f"importance weighting mode must be 'clip_mask' or 'full', got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# Arguments: the official names and defaults (SPEC Part B §1), then our additions.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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

    from video_data import add_video_arguments

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
    from video_data import check_video_args

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
        from latent_cache import check_cacheable

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


# Every numeric flag's range, checked at parse time (flag_ranges.py; the video flags come from video_data.py). Orderings
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


# ----------------------------------------------------------------------------------------------------------------
# Data: Pick-a-Pic style rows (jpg_0, jpg_1, label_0, caption) -> winner-first pixel pairs and tokenised captions.

PAIR_COLUMNS = ("jpg_0", "jpg_1", "label_0")


def load_rows(args):
    """The raw dataset split named by --dataset_name / --train_data_dir: a hub id, a folder, files, a save_to_disk
    folder, or WebDataset shards. Streams (--streaming, and shards always) are `datasets.IterableDataset`s whose
    images stay undecoded bytes, so a resume can skip rows cheaply. A folder (and a hub id offline, through its
    snapshot in the Hugging Face cache) is read one split at a time: the other splits are never converted."""
    from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

    source = args.dataset_name or args.train_data_dir
    if FAMILIES[args.model_family].video and source.endswith(".jsonl"):  # a manifest of local video files
        from video_data import load_manifest

        return numeric_labels(load_manifest(source, args))
    data_dir = args.train_data_dir if args.dataset_name else None
    path = Path(source)
    shards = webdataset_shards(source, args.split)
    if not shards and args.dataset_name and not path.exists() and not any(ch in source for ch in "*?[") and hub_offline():
        path = dataset_snapshot(source)
        source = str(path)
    described = source
    if shards:
        described = f"{len(shards)} WebDataset shards ({shards[0]}{', ...' if len(shards) > 1 else ''})"
        dataset = load_dataset("webdataset", data_files={args.split: shards}, split=args.split, streaming=True,
                               cache_dir=args.cache_dir)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = load_from_disk(str(path))  # a save_to_disk folder
    elif path.is_file() or any(ch in source for ch in "*?["):
        builder = "arrow" if source.endswith(".arrow") else "parquet"
        files = sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]
        if not files:
            raise FileNotFoundError(f"--dataset_name {source}: no file matches")
        check_not_empty(files)
        described = f"{len(files)} {builder} files ({files[0]}{', ...' if len(files) > 1 else ''})"
        dataset = load_dataset(builder, data_files={args.split: files}, split=args.split, cache_dir=args.cache_dir,
                               streaming=args.streaming)
    elif path.is_dir():
        folder = path / data_dir if data_dir else path
        builder, files = split_files(folder, args.split)
        if files:
            check_not_empty(files)
            described = f"{source}: {len(files)} {builder} files of split {args.split} ({Path(files[0]).name}, ...)"
            dataset = load_dataset(builder, data_files={args.split: files}, split=args.split, cache_dir=args.cache_dir,
                                   streaming=args.streaming)
        else:  # a layout we do not recognise (a loading script, a README with configs): let datasets decide
            dataset = load_dataset(str(path), args.dataset_config_name, cache_dir=args.cache_dir, data_dir=data_dir,
                                   split=args.split, streaming=args.streaming)
    elif args.dataset_name:
        dataset = load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir, data_dir=data_dir,
                               streaming=args.streaming)
    else:
        raise FileNotFoundError(f"--train_data_dir {source}: no such folder")
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if args.split not in dataset:
            raise ValueError(f"{source} has no split {args.split!r} (it has {list(dataset)}); pass --split NAME")
        dataset = dataset[args.split]
    if args.streaming and not isinstance(dataset, IterableDataset):
        dataset = dataset.to_iterable_dataset()  # a save_to_disk folder is local already; stream it all the same
    if isinstance(dataset, IterableDataset):
        dataset = pickapic_columns(dataset.decode(False))
    args.resolved_dataset = described  # for the run's description (training_config.json)
    return numeric_labels(dataset) if "label_0" in (dataset.column_names or ()) else dataset


def hub_offline() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def dataset_snapshot(repo_id: str) -> Path:
    """A dataset hub id, offline: its snapshot folder in the Hugging Face cache (as `hf download --repo-type dataset`
    lays it out), read from then on as a local folder. datasets' own offline mode looks only in its own cache."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception as error:  # noqa: BLE001 - any failure means: not in the cache
        raise FileNotFoundError(
            f"--dataset_name {repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
            f"(HF_HUB_OFFLINE=1). Download it once with network access (hf download --repo-type dataset {repo_id}), "
            f"or pass --dataset_name a local folder of parquet files ({type(error).__name__})") from None


DATA_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow"}


def split_files(folder: Path, split: str) -> tuple[str | None, list[str]]:
    """The parquet/arrow files of `split` in a dataset folder, by datasets' own naming conventions
    (data/train-00000-of-00001.parquet, train/*.parquet, ...), so only that split is loaded. ([] if none: then datasets
    decides, e.g. for a README that declares configs.)"""
    from datasets.data_files import DataFilesList, get_data_patterns

    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="ignore"), re.MULTILINE):
        return None, []
    try:
        patterns = {str(name): value for name, value in get_data_patterns(str(folder)).items()}
    except Exception:  # noqa: BLE001 - no recognisable data files
        return None, []
    if split not in patterns:
        if any(Path(p).suffix in DATA_EXTENSIONS for p in map(str, folder.rglob("*"))):
            raise ValueError(f"{folder} has no files for split {split!r} (it has {', '.join(patterns)}); pass --split NAME")
        return None, []
    files = sorted(str(f) for f in DataFilesList.from_patterns(patterns[split], base_path=str(folder)))
    builders = {DATA_EXTENSIONS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        return None, []
    return builders.pop(), files


def check_not_empty(files: list[str]):
    """datasets fails on a file with no rows with a generic message; name the file instead."""
    import pyarrow.parquet as pq

    empty = [f for f in files if f.endswith(".parquet") and pq.ParquetFile(f).metadata.num_rows == 0]
    if empty and len(empty) == len(files):
        raise ValueError(f"{empty[0]}{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}: the parquet file holds "
                         f"no rows; check the export that wrote it")
    if empty:
        logger.warning(f"{len(empty)} parquet files hold no rows and are left out, e.g. {empty[0]}")
        files[:] = [f for f in files if f not in empty]


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: 'pairs-{000..002}.tar' -> pairs-000.tar, pairs-001.tar, pairs-002.tar; {a,b} lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if re.fullmatch(r"\d+\.\.\d+", body):
        low, high = body.split("..")
        options = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def webdataset_shards(source: str, split: str) -> list[str]:
    """The .tar shards `source` names (a folder of shards, a glob, a {000..099} range, or URLs), else [].

    In a folder, shards named after splits (train-00000.tar, test_unique-00000.tar) are filtered by `split`;
    unnamed ones (00012.tar, as in the Pick-a-Pic v2 mirror) are all taken.
    """
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        tars = sorted(p for p in files if p.suffix == ".tar")
        if not tars or any(p.suffix in (".parquet", ".arrow") for p in files):
            return []
        named = [p for p in tars if re.match(rf"{re.escape(split)}(?![A-Za-z_])", p.name)]
        if not named and any(p.name[0].isalpha() for p in tars):
            raise ValueError(f"{source} has no shard for split {split!r} (its shards: {', '.join(p.name for p in tars[:4])}, ...); "
                             f"pass --split NAME")
        return [str(p) for p in named or tars]
    if not re.search(r"\.tar\b", source):
        return []
    shards = []
    for name in expand_braces(source):
        shards += [name] if "://" in name else sorted(glob.glob(name))
    if not shards:
        raise FileNotFoundError(f"--dataset_name {source}: no .tar shard matches (give a folder, a glob or a {{000..099}} range)")
    return shards


def pickapic_columns(rows):
    """Pick-a-Pic column names for WebDataset fields, which are named `<column>.<extension>` (the v2 mirror's shards hold
    jpg_0.jpg, jpg_1.jpg, label_0.txt, label_1.txt and original_prompt.txt): the extension is dropped, `original_prompt`
    is the caption when there is no `caption` field."""
    from datasets import Value

    if rows.column_names is None:
        raise ValueError("the streamed dataset does not declare its columns; train.py needs jpg_0, jpg_1, label_0 and a caption")
    renames = {name: name.split(".")[0] for name in rows.column_names if "." in name}
    names = {renames.get(name, name) for name in rows.column_names}
    if "caption" not in names and "original_prompt" in names:
        renames[next(k for k in rows.column_names if renames.get(k, k) == "original_prompt")] = "caption"
    rows = rows.rename_columns(renames) if renames else rows
    for name in ("label_0", "label_1", "caption"):
        if name in rows.column_names and rows.features[name] == Value("binary"):
            raise ValueError(f"the shards' {name} field is raw bytes: WebDataset decodes text by extension, so store it "
                             f"as <key>.{'original_prompt' if name == 'caption' else name}.txt")
    return rows  # label_0 becomes a number in numeric_labels, as for every source


def filter_rows(rows, args, is_main: bool):
    """Drop ties by label value (not by the dataset's name), optionally keep Dreamlike pairs, then subsample.

    A stream is filtered lazily as it is read; --max_train_samples then keeps its first N pairs (no random access)."""
    import numpy as np
    from datasets import IterableDataset

    columns = pair_columns(args)
    needed = list(columns) + [args.caption_column]
    if args.dreamlike_pairs_only:
        needed += ["model_0", "model_1"]
    if getattr(args, "pair_weight_column", None):
        needed.append(args.pair_weight_column)
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"the dataset has no column {', '.join(missing)} (it has {rows.column_names}); train.py needs the Pick-a-Pic "
            f"columns {', '.join(columns)} and a caption column (--caption_column)"
        )
    rows = rows.select_columns(needed)
    if isinstance(rows, IterableDataset):
        rows = rows.filter(LabelFilter(), input_columns="label_0")
        if args.dreamlike_pairs_only:
            rows = rows.filter(lambda a, b: "dream" in a and "dream" in b, input_columns=["model_0", "model_1"])
        if args.max_train_samples is not None:
            rows = rows.take(args.max_train_samples)
        if is_main:
            logger.info("Streaming: split decisions (label 0.5) are dropped as the rows are read")
        return rows
    labels = np.asarray(rows["label_0"], dtype=np.float64)  # None -> nan
    decided = np.flatnonzero((labels == 0) | (labels == 1))
    split_decisions = int((labels == 0.5).sum())
    invalid = labels[(labels != 0) & (labels != 1) & (labels != 0.5)]
    if is_main:
        logger.info(f"Eliminated {split_decisions}/{len(rows)} split decisions for Pick-a-pic")
        if len(invalid):
            logger.warning(f"Dropped {len(invalid)}/{len(rows)} rows whose label_0 is not 0, 0.5 or 1 "
                           f"(e.g. {', '.join(map(str, sorted(set(invalid.tolist()), key=str)[:5]))})")
    rows = rows.select(decided)
    if args.dreamlike_pairs_only:
        keep = [i for i, (a, b) in enumerate(zip(rows["model_0"], rows["model_1"])) if "dream" in a and "dream" in b]
        rows = rows.select(keep)
    if args.max_train_samples is not None:
        rows = rows.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(rows))))
    if len(rows) == 0:
        raise ValueError("no training pairs left after dropping ties and filtering; check the dataset and filters")
    return rows


def numeric_labels(rows):
    """label_0 as float64 for every source, once, where rows are loaded: some exports store "0.0"/"1.0" as text, and a
    text label compared with 0 would silently train the rejected image as the winner. Text that is not a number is
    refused."""
    from datasets import IterableDataset, Value

    if rows.features is not None and rows.features["label_0"] == Value("float64"):
        return rows
    if isinstance(rows, IterableDataset):
        features = rows.features.copy()
        features["label_0"] = Value("float64")
        return rows.map(lambda label: {"label_0": as_label(label)}, input_columns="label_0", features=features)
    try:
        return rows.cast_column("label_0", Value("float64"))
    except Exception:  # noqa: BLE001 - find the offending value for the message
        for value in rows["label_0"]:
            as_label(value)
        raise


def as_label(value) -> float:
    """A label as a float (None -> nan, dropped with the invalid labels); text must be a number."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label_0 holds {value!r}, which is not a number; Pick-a-Pic labels are 0, 0.5 or 1 "
                         f"(fix the dataset's label_0 column)") from None


class LabelFilter:
    """Keeps decided pairs (label_0 0 or 1) of a stream; warns (once per process) about labels other than 0, 0.5, 1."""

    warned = False

    def __call__(self, label) -> bool:
        if label not in (0, 0.5, 1) and not LabelFilter.warned:
            LabelFilter.warned = True
            logger.warning(f"label_0 {label!r} is not 0, 0.5 or 1: such rows are dropped (warned once)")
        return label in (0, 1)


class UnusableCaption(ValueError):
    pass


# Why a data row is skipped (counted per reason in training_state.json's skipped_by_reason and the end summary).
SKIP_REASONS = ("undecodable image", "undecodable video", "video too short", "video too large", "unusable caption",
                "no preference signal", "bad in the latent cache")


def bad_row(rows, epoch: int, position: int, reason: str, error: Exception) -> tuple:
    """(row id, reason, message) of a skipped row. The id is the dataset's row index (a map-style dataset; `rows` is
    None for a stream: (epoch, stream position)), so that a bad row met again, as a stand-in for another row or in a
    later epoch, is counted once."""
    row_id = position % len(rows) if rows is not None else (epoch, position)
    reason = "unusable caption" if isinstance(error, UnusableCaption) else reason
    return row_id, reason, f"{type(error).__name__}: {error}"


def valid_caption(value) -> bool:
    """A caption is a string ("" included) or a non-empty list of strings (one is drawn per use)."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def decode_image(value):
    """Pick-a-Pic stores encoded image bytes; datasets may hand them over as bytes, a dict or a PIL image."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        value = Image.open(value)
    value.load()
    return value.convert("RGB")


class PairDataset(torch.utils.data.Dataset):
    """Winner-first (6, H, W) pixel pairs in [-1, 1] (SFT: the winner alone, (3, H, W)) and the (possibly dropped) caption.

    Keys come from `EpochSampler` as (seed, epoch, index); every random choice (crop, flips, caption dropout) is drawn
    from a generator seeded by that key, so a batch is the same whichever worker decodes it and after a resume.
    An undecodable image skips its row: the next decodable row takes its place and the skip is counted.
    With --choice_model the pair keeps the dataset order (jpg_0, jpg_1) and the example also carries the two decoded
    images, the full caption and the human label, for the scorer that picks the winner in the training step.
    """

    def __init__(self, rows, args):
        self.rows, self.resolution = rows, args.resolution
        self.random_crop, self.hflip = args.random_crop, not args.no_hflip
        self.proportion_empty_prompts, self.caption_column = args.proportion_empty_prompts, args.caption_column
        self.for_scorer = bool(args.choice_model)
        self.winner_only = args.train_method == "sft" and not self.for_scorer  # SFT + scorer: the step picks the winner
        self.pair_weight_column = getattr(args, "pair_weight_column", None)

    def __len__(self):
        return len(self.rows)

    def transform(self, image, rng: random.Random) -> torch.Tensor:
        """Resize the shorter side (bilinear), crop, maybe flip, scale to [-1, 1]: the official transform."""
        import torchvision.transforms.functional as TF

        size = self.resolution
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR)
        if self.random_crop:
            top, left = rng.randint(0, image.height - size), rng.randint(0, image.width - size)
            image = TF.crop(image, top, left, size, size)
        else:
            image = TF.center_crop(image, [size, size])
        if self.hflip and rng.random() < 0.5:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), [0.5], [0.5])

    def __getitem__(self, key):
        index, n = key[2], len(self.rows)
        return self.example(key, (self.rows[(index + offset) % n] for offset in range(n)))

    def example(self, key, candidates) -> dict:
        """The example for `key` = (seed, epoch, position) from the first row of `candidates` (the keyed row, then the
        rows standing in for it) whose two images decode."""
        seed, epoch, index = key
        rng = random.Random(f"{seed}-{epoch}-{index}")
        bad_rows = []
        for attempt, row in enumerate(candidates):
            try:
                if not valid_caption(row[self.caption_column]):
                    raise UnusableCaption(f"unusable caption {row[self.caption_column]!r}")
                images = [decode_image(row["jpg_0"]), decode_image(row["jpg_1"])]
                break
            except Exception as error:  # noqa: BLE001 - an undecodable image or a bad caption skips the row, the run goes on
                bad_rows.append(bad_row(self.rows, epoch, index + attempt, "undecodable image", error))
                logger.debug(f"{key}: row skipped ({error})")
        else:
            raise RuntimeError(f"no row from row {index} on has two decodable images and a caption; check the "
                               f"jpg_0/jpg_1 and {self.caption_column} columns")
        skipped = int(attempt > 0)  # the keyed row itself was bad: counted once, by its own key, not by stand-ins
        if row["label_0"] == 0 and not self.for_scorer:
            images.reverse()  # winner first
        caption = full_caption = row[self.caption_column]
        if not isinstance(caption, str):  # a list of captions: pick one
            caption = full_caption = rng.choice(list(caption))
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        if self.winner_only:
            pixels = self.transform(images[0], rng)
        else:
            pixels = torch.cat([self.transform(image, rng) for image in images])
        example = {"pixel_values": pixels, "caption": caption, "skipped": skipped, "bad_rows": bad_rows}
        if self.pair_weight_column:
            example["pair_weight"] = pair_weight_of(row, self.pair_weight_column)
        if self.for_scorer:
            example.update(images=images, prompt=full_caption, label_0=float(row["label_0"]))
        return example


def pair_weight_of(row, column: str) -> float:
    """--pair_weight_column: the row's loss weight, a finite number >= 0 (a WebDataset field holds it as text)."""
    if column not in row:
        raise ValueError(f"--pair_weight_column {column}: the dataset has no such column (it has {', '.join(row)}); "
                         f"eval.make_pairs writes pair_weight")
    try:
        weight = float(row[column])
    except (TypeError, ValueError):
        weight = float("nan")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"--pair_weight_column {column}: {row[column]!r} is not a finite weight >= 0")
    return weight


def pair_columns(args) -> tuple:
    """The pair columns rows need: jpg_0, jpg_1, label_0; for a video family mp4_0, mp4_1, label_0 (video_data.py)."""
    if FAMILIES[args.model_family].video:
        from video_data import video_columns

        return video_columns(args)  # + an image-to-video conditioning column
    return PAIR_COLUMNS


def pair_dataset(rows, args):
    """PairDataset, or for a video family video_data.VideoPairDataset (the same keys, skips and random streams)."""
    if FAMILIES[args.model_family].video:
        from video_data import VideoPairDataset

        return VideoPairDataset(rows, args)
    return PairDataset(rows, args)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (seed, epoch, index) keys: a permutation seeded by (seed, epoch) when shuffling, else dataset order.

    Its state is the seed (saved in checkpoints), so a resumed run sees exactly the same batches, and where the run
    is: `used`, the pairs of this epoch that all processes together have trained on, set by the training loop. That
    position is global (accelerate deals batch g of the permutation to process g % W), so a run resumed on another
    number of processes goes on at the same pair.
    """

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle, self.epoch, self.used = size, seed, shuffle, 0, 0

    def __len__(self):
        return self.size

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        return iter([(self.seed, self.epoch, i) for i in order.tolist()])

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "used": self.used}

    def load_state_dict(self, state):
        self.seed = state["seed"]
        self.epoch, self.used = state.get("epoch", 0), state.get("used", 0)  # absent in older checkpoints


class PairStream(torch.utils.data.IterableDataset):
    """PairDataset's examples from a stream (--streaming, WebDataset shards), with exact resume and no random access.

    Per epoch the filtered rows form one sequence (shuffled by a buffer seeded with (seed, epoch) when `shuffle`).
    From `start` on, row p belongs to batch g = (p - start) // B, and batch g to process g % W, as accelerate deals
    out map-style batches; a round of W batches is used only when it is complete, so every process gets the same
    number of batches. Each process and each of its DataLoader workers reads the whole sequence but decodes only its
    own batches (worker w of n takes every n-th). Examples are keyed (seed, epoch, p), so without shuffling a stream
    gives exactly PairDataset's pairs, and an undecodable row is replaced by the next one, as there.

    The state saved in checkpoints is (seed, epoch, position): `position` is where the next round starts, set by the
    training loop from the batches it has used; a resumed epoch starts there, skipping the used rows undecoded.
    """

    def __init__(self, rows, args, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.rows, self.pairs = rows, pair_dataset(None, args)
        self.seed, self.shuffle, self.buffer_size = seed, shuffle, args.shuffle_buffer_size
        self.batch_size, self.rank, self.world_size = args.train_batch_size, rank, world_size
        self.epoch, self.start, self.position = 0, 0, 0

    def ordered_rows(self):
        """This epoch's rows, undecoded. `.iter` rather than `iter()`: datasets would split the shards among the
        DataLoader workers, and here every worker needs the whole sequence."""
        rows = self.rows
        if self.shuffle:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            rows.set_epoch(self.epoch)
        for block in rows.iter(batch_size=64):
            yield from (dict(zip(block, values)) for values in zip(*block.values()))

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        rows = RowWindow(self.ordered_rows())
        per_round = self.batch_size * self.world_size
        for round_index in itertools.count():
            round_start = self.start + round_index * per_round
            rows.drop_before(round_start)
            if rows.get(round_start + per_round - 1) is None:
                return  # an incomplete last round is left out, on every process alike
            if round_index % workers != worker_id:
                continue
            first = round_start + self.rank * self.batch_size
            for position in range(first, first + self.batch_size):
                # Stand-ins for an undecodable row: the rows after it, or at the very end of the stream the round's first rows.
                later = itertools.takewhile(lambda row: row is not None, map(rows.get, itertools.count(position)))
                earlier = map(rows.get, range(round_start, position))
                example = self.pairs.example((self.seed, self.epoch, position), itertools.chain(later, earlier))
                yield dict(example, stream_position=round_start + per_round)

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        if "position" not in state:
            raise ValueError("the checkpoint comes from a run over a map-style (downloaded) dataset: resume it with the "
                             "same data source, without --streaming")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self.start = self.position


class RowWindow:
    """Random access to a window of a row iterator: rows are read as `get` asks for them and kept until dropped."""

    def __init__(self, rows):
        self.rows, self.kept, self.first = iter(rows), collections.deque(), 0

    def get(self, position: int):
        """The row at `position` (not yet dropped), or None past the end."""
        while self.first + len(self.kept) <= position:
            row = next(self.rows, None)
            if row is None:
                return None
            self.kept.append(row)
        return self.kept[position - self.first]

    def drop_before(self, position: int):
        """Forget the rows before `position`, reading past (not decoding) any not read yet."""
        while self.first < position:
            if self.kept:
                self.kept.popleft()
            elif next(self.rows, None) is None:
                return
            self.first += 1


class Collate:
    """Stacks pixels and tokenises captions with each tokenizer of the family (padded to `max_lengths`, by default each
    tokenizer's model_max_length); passes on the scorer's inputs (images, prompt, label_0) and a stream's position
    when the examples carry them."""

    def __init__(self, tokenizers, max_lengths=None):
        self.tokenizers = tokenizers
        self.max_lengths = max_lengths or [tokenizer.model_max_length for tokenizer in tokenizers]

    def __call__(self, examples):
        captions = [e["caption"] for e in examples]
        batch = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
            "captions": captions,
            "skipped": torch.tensor(sum(e["skipped"] for e in examples)),
            "bad_rows": [bad for e in examples for bad in e.get("bad_rows", ())],  # (row id, reason, message)
        }
        for i, (tokenizer, length) in enumerate(zip(self.tokenizers, self.max_lengths)):
            ids = tokenizer(captions, max_length=length, padding="max_length", truncation=True, return_tensors="pt").input_ids
            batch["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids
        if "images" in examples[0]:
            batch.update(images=[e["images"] for e in examples], prompts=[e["prompt"] for e in examples],
                         label_0=torch.tensor([e["label_0"] for e in examples]))
        if "stream_position" in examples[0]:
            batch["stream_position"] = max(e["stream_position"] for e in examples)
        if "pair_weight" in examples[0]:
            batch["pair_weight"] = torch.tensor([e["pair_weight"] for e in examples], dtype=torch.float32)
        return batch

# ----------------------------------------------------------------------------------------------------------------
# Models


def load_tokenizer(path: str, subfolder: str, revision):
    """A CLIP tokenizer. Offline, transformers returns a tokenizer with no vocabulary (only its special tokens) for a
    hub id it cannot fetch, instead of raising; training with it would silently see every caption as empty."""
    from transformers import CLIPTokenizer

    fix = (f"Download it once with network access (hf download {path}), or pass --pretrained_model_name_or_path a "
           f"local folder with {subfolder}/vocab.json and merges.txt (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}).")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=subfolder, revision=revision)
    except Exception as error:  # noqa: BLE001 - OSError when absent; tokenizers raises plain Exceptions on bad files
        if Path(path).is_dir():
            raise RuntimeError(f"cannot load the tokenizer in {Path(path) / subfolder}: {error}. Its vocab.json, "
                               f"merges.txt (and tokenizer.json) must be the original model's") from None
        raise RuntimeError(f"cannot load the tokenizer of {path} ({subfolder}/): {error}. {fix}") from None
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        folder = Path(path) / subfolder
        if Path(path).is_dir():
            vocab = folder / "vocab.json"
            problem = "is missing" if not vocab.is_file() else f"holds {vocab.stat().st_size} bytes"
            raise RuntimeError(f"the tokenizer in {folder} loaded with an empty vocabulary: {vocab} {problem}. A CLIP "
                               f"tokenizer needs vocab.json and merges.txt there; copy them from the original model.")
        raise RuntimeError(
            f"the tokenizer of {path} ({subfolder}/) loaded with an empty vocabulary: the model is neither a local "
            f"folder nor in the Hugging Face cache. {fix}"
        )
    return tokenizer


def sdxl_time_ids(batch_size: int, resolution: int, device, dtype) -> torch.Tensor:
    """(original size, crop top-left, target size) = (res, res, 0, 0, res, res) for every sample, as official (Q11)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype).repeat(batch_size, 1)


def add_lora(unet, args, dtype):
    """Freeze the UNet in `dtype` and add trainable fp32 LoRA adapters (peft, through diffusers' integration).

    B starts at zero, so the adapted UNet starts as the base. The adapters are drawn under their own seed (--seed), so a
    LoRA run sees the same noise and timesteps as a full fine-tuning run with the same seed.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.nn.Module.to(unet, dtype=dtype)  # torch's own: diffusers' override warns about fp32 modules the UNet lacks
    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        if args.seed is not None:
            torch.manual_seed(args.seed)
        unet.add_adapter(config)
    for _, param in trainable_parameters(unet):
        param.data = param.data.float()


@contextlib.contextmanager
def adapters_disabled(unet):
    """Inside, the LoRA UNet is its base model: the reference of a LoRA run, with no second UNet in memory."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def trainable_parameters(unet) -> list:
    return [(name, param) for name, param in unet.named_parameters() if param.requires_grad]


def sharded_state_placements(placements, ndim: int, reduced_dim: int) -> list:
    """The placements of a gradient's mean over `reduced_dim` (a factored Adafactor moment): a dimension sharded
    before it keeps its shard, the reduced one becomes replicated (its mean spans every rank), later ones shift."""
    from torch.distributed.tensor import Replicate, Shard

    result = []
    for placement in placements:
        if isinstance(placement, Shard):
            dim = placement.dim % ndim
            placement = Replicate() if dim == reduced_dim else Shard(dim - (dim > reduced_dim))
        result.append(placement)
    return result


def make_optimizer(args, params):
    """AdamW (the official default), bitsandbytes 8-bit AdamW, or Adafactor with the official SDXL settings."""
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        class ShardableAdafactor(Adafactor):
            """transformers' Adafactor, whose state it creates as plain tensors; under FSDP2 the parameters and
            gradients are DTensors, so the state is created here as DTensors of the right placements before its
            first step. The step itself is transformers' code on DTensors: the factored second moments are means over
            the whole matrix (DTensor reduces the sharded dimension across ranks), the update clipping uses the RMS
            of the whole update, so a sharded step is the unsharded one up to float rounding. The cost: a few small
            all-reduces per parameter and step (a first dimension that does not split evenly gathers that update)."""

            @torch.no_grad()
            def step(self, closure=None):
                from torch.distributed.tensor import DTensor, zeros

                for group in self.param_groups:
                    for p in group["params"]:
                        grad, state = p.grad, self.state[p]
                        if not isinstance(grad, DTensor) or len(state) > 0:
                            continue
                        shape, mesh, placements = grad.shape, grad.device_mesh, grad.placements
                        state.update(step=0, RMS=0)
                        if len(shape) >= 2:  # the factored moments (transformers' _get_options), rows then columns
                            state["exp_avg_sq_row"] = zeros(shape[:-1], device_mesh=mesh, placements=
                                                            sharded_state_placements(placements, len(shape), len(shape) - 1))
                            state["exp_avg_sq_col"] = zeros(shape[:-2] + shape[-1:], device_mesh=mesh, placements=
                                                            sharded_state_placements(placements, len(shape), len(shape) - 2))
                        else:
                            state["exp_avg_sq"] = torch.zeros_like(grad)
                return super().step(closure)

        return ShardableAdafactor(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, clip_threshold=1.0,
                                  scale_parameter=False, relative_step=False)
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    extra = {"fused": True} if args.fused_adam else {}
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)


def apply_speed_options(args, unet, ref_unet, vae):
    """--channels_last and --torch_compile, in place. `Module.compile` keeps the module and its state-dict keys."""
    if args.channels_last:
        for module in (unet, ref_unet, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if args.torch_compile:
        for module in (unet, ref_unet):
            if module is not None:
                module.compile()


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


# ----------------------------------------------------------------------------------------------------------------
# The training step


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


def compute_loss(args, batch, unet, reference, vae, text_encoders, family, noise_process, weight_dtype,
                 log_weight_coefficients=None, choice_scorer=None, latent_config=None):
    """One micro-batch, pixels to loss: the training step that `main` runs (and benchmarks/bench_train.py times).

    Encodes images and captions with the frozen VAE and text encoders, noises the latents with the family's
    parametrisation (`noise_process`, families/noise.py: winner i and loser i share noise and timestep), runs the
    policy and the frozen reference through `family.predict`, applies the importance weights, the safeguard and the
    loss of --train_method. `reference` is the frozen reference denoiser (with LoRA: the policy with its adapters
    disabled); `log_weight_coefficients` (noise_process.log_weight_coefficients()) is needed with
    --importance_weighting; `choice_scorer` relabels the pairs (--choice_model). Returns (loss, step metrics,
    importance-weight metrics, relabelled pairs or None), all device tensors: no host synchronisation here (except
    the scorer's, with --choice_model); the caller reads them when it logs. With --latents_cache the batch holds VAE
    moments and text outputs instead of pixels and token ids (`vae` and `text_encoders` unused; `latent_config` has
    the VAE's scaling and shift factors).
    """
    preference = args.train_method in PREFERENCE_METHODS
    relabelled = None
    if "moments" in batch:  # --latents_cache: encoded once; the posterior sample is drawn here, as on the fly
        from latent_cache import latents_from_moments

        moments = batch["moments"].to(dtype=weight_dtype)  # (B, 2 or 1, 2C, h, w), winner first
        moments = torch.cat(moments.unbind(1)) if preference else moments[:, 0]
        with torch.inference_mode():
            latents = latents_from_moments(family, moments, latent_config)
        conditioning = batch["conditioning"]
    else:
        pixels = batch["pixel_values"].to(vae.device, dtype=weight_dtype)
        if choice_scorer is not None:  # AI feedback: the scorer's preferred image goes first
            pixels, relabelled = relabel_pairs(choice_scorer, batch, pixels)
            if not preference:
                pixels = pixels[:, :3]  # SFT on the scorer's winner
        if preference:  # (B, 6, H, W) -> (2B, 3, H, W), winners first
            pixels = torch.cat(pixels.chunk(2, dim=1))
        with torch.inference_mode():  # frozen, never differentiated: faster than no_grad, same values (benchmarks/RESULTS.md)
            latents = family.encode_images(vae, pixels)
        with torch.no_grad():  # not inference_mode: the policy's cross-attention saves these for its backward
            conditioning = family.encode_prompts(batch, text_encoders)

    pairs = latents.shape[0] // 2 if preference else latents.shape[0]
    noised = noise_process.sample(latents, pairs, preference, args)
    if preference:  # the loser half sees its winner's caption
        conditioning = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in conditioning.items()}
    inputs = family.model_inputs(conditioning, noised.noisy, weight_dtype)

    model_pred = family.predict(unet, noised.noisy, noised.timesteps, inputs).float()
    target = noised.target
    pair_weight, weight_metrics = None, {}
    if args.importance_weighting != "none":  # from the noise that made x_t, so q is the true posterior
        log_weight = log_importance_weight(model_pred, noised.importance_target, noised.index, log_weight_coefficients)
        if preference:  # a pair's weight: the geometric mean of its winner's and its loser's
            win_log_weight, lose_log_weight = log_weight.chunk(2)
            log_weight = 0.5 * (win_log_weight + lose_log_weight)
        pair_weight = importance_weights(log_weight, args.importance_weighting, args.is_mask_below,
                                         args.is_clip_min, args.is_clip_max)
        raw_weight = log_weight.exp()
        weight_metrics = {"is_weight_mean": raw_weight.mean(), "is_weight_min": raw_weight.min(),
                          "is_weight_max": raw_weight.max(), "is_masked_fraction": (pair_weight == 0).float().mean()}
    if "pair_weight" in batch:  # --pair_weight_column: the dataset's weight of each pair (e.g. its score gap)
        data_weight = batch["pair_weight"].to(model_pred.device)
        pair_weight = data_weight if pair_weight is None else pair_weight * data_weight
    if preference:
        with torch.inference_mode():  # as the VAE: faster than no_grad, same values
            ref_pred = family.predict(reference, noised.noisy.to(weight_dtype), noised.timesteps, inputs)
        scale = 1.0
        if args.use_winner_preserving:
            scale = winner_preserving_scale(model_pred, target, args.winner_preserving_mu,
                                            args.winner_preserving_granularity)
        loss, stats = preference_loss(args.train_method, model_pred, ref_pred, target, args.beta_dpo,
                                      dmpo_alpha=args.dmpo_alpha, sdxl=family.dspo_variant == "sdxl",
                                      loser_scale=scale, pair_weight=pair_weight)
        step_metrics = {
            "model_mse": 0.5 * (stats["model_win_loss"].mean() + stats["model_lose_loss"].mean()),
            "ref_mse": 0.5 * (stats["ref_win_loss"].mean() + stats["ref_lose_loss"].mean()),
            "implicit_acc": stats["implicit_acc"],
            "win_diff": (stats["model_win_loss"] - stats["ref_win_loss"]).mean(),
            "lose_diff": (stats["model_lose_loss"] - stats["ref_lose_loss"]).mean(),
            "lose_l_scale": torch.as_tensor(scale, device=loss.device, dtype=torch.float32).mean(),
        }
    else:
        loss = sft_loss(model_pred, target, sample_weight=pair_weight)
        step_metrics = {}
    return loss, step_metrics, weight_metrics, relabelled


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    args.mixed_precision, precision_source = resolve_mixed_precision(args.mixed_precision, os.environ)
    requested = checkpoints.run_arguments(args)  # as given (main rescales the lr and recomputes the epochs)
    started = time.time()

    import datasets
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    cpu_ranks = uses_cpu_ranks(int(os.environ.get("WORLD_SIZE", 1)))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # before Accelerator() builds the launcher's plugin
        check_fsdp_version(int(os.environ.get("FSDP_VERSION", "1")))  # (accelerate's default version is 1)
    accelerator = Accelerator(
        cpu=cpu_ranks,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=FAMILIES[args.model_family].accelerator_kwargs(args),  # wan22_a14b: DDP with unused parameters
    )
    if cpu_ranks and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        enable_fsdp_on_cpu_ranks(accelerator)
    fsdp = is_fsdp(accelerator)
    if fsdp:  # every rank loads the weights itself (from_pretrained); accelerate's rank-0-only loading path is not used
        check_fsdp_setup(args, accelerator.state.fsdp_plugin)
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger = get_logger("train")  # logs once, from the main process, unless told otherwise
    logger.info(accelerator.state, main_process_only=False)
    logger.info(f"Mixed precision {args.mixed_precision}, from {precision_source}")
    if cpu_ranks:
        logger.warning(f"{accelerator.num_processes} processes and no accelerator found: training on CPU ranks (gloo)")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir_is_shared(accelerator, output_dir)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preference = args.train_method in PREFERENCE_METHODS
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # The checkpoint to resume from, chosen (and its files and arguments checked) before any model loads.
    weight_files = weight_file_names(args)

    def problems_of(folder):
        return checkpoints.checkpoint_problems(folder, weight_files, accelerator.scaler is not None, fsdp=fsdp)

    checkpoint = checkpoints.choose_checkpoint(output_dir, args.resume_from_checkpoint, problems_of)
    resumed_state, regrouped = None, False
    if checkpoint is not None:
        resumed_state = checkpoints.read_training_state(checkpoint)
        for line in checkpoints.resumed_arguments(resumed_state["args"], requested):
            logger.info(f"Changed since {checkpoint.name}: {line}")
        regrouped = keep_global_batch(args, accelerator, checkpoint, resumed_state, logger)
    args.seed = run_seed(args.seed, resumed_state)
    set_seed(args.seed + accelerator.process_index)  # official: every rank its own noise stream (Q27)

    # Models, through the family (families/): the frozen parts in weight_dtype, the policy denoiser (`unet`, a UNet or
    # a transformer) in fp32 under autocast, the reference a frozen copy.
    base, revision = args.pretrained_model_name_or_path, args.revision
    family = make_family(args)
    family.check_components(base, revision)
    cache, latent_config = None, None
    if args.latents_cache:  # the VAE and text encoders did their work once (latent_cache.py): not loaded
        import latent_cache

        cache = latent_cache.LatentCache(args.latents_cache, args)
        latent_config = SimpleNamespace(**cache.index["latent"])
        tokenizers, text_encoders = [], []
    else:
        tokenizers, text_encoders = family.load_text(weight_dtype)  # the tokenizer first: it names a missing model's fix
    noise_process = family.load_noise()
    if args.timestep_range[1] >= noise_process.num_timesteps:
        raise ValueError(f"--timestep_range {args.timestep_range[0]} {args.timestep_range[1]}: the scheduler of {base} "
                         f"has {noise_process.num_timesteps} timesteps; HI must be at most {noise_process.num_timesteps - 1}")
    vae = family.load_vae(weight_dtype) if cache is None else None
    unet_source, unet_revision = args.unet_init or base, None if args.unet_init else revision
    unet = family.load_denoiser(unet_source, unet_revision)  # fp32 master weights
    ref_unet = None
    if args.use_lora:  # base frozen in weight_dtype, fp32 adapters; the reference is the base (adapters_disabled)
        add_lora(unet, args, torch.float32 if fsdp else weight_dtype)  # FSDP2 shards one dtype: the base sharded in fp32
    elif preference:
        ref_unet = family.load_denoiser(unet_source, unet_revision, weight_dtype)

    frozen = [m for m in (vae, *text_encoders, ref_unet) if m is not None]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        module.to(accelerator.device)
    if args.enable_xformers:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    apply_speed_options(args, unet, ref_unet, vae)

    # Checkpoints hold the UNet as unet.safetensors (a plain state dict the eval scripts read), not accelerate's default;
    # with LoRA the adapter file, and with EMA the average beside it (save_weights).
    ema = None
    checkpoint_state = {}  # filled by save_checkpoint: what training_state.json records besides the weights

    def save_model_hook(models, weights, folder):
        # unet.safetensors in every checkpoint (the eval scripts read it); under FSDP accelerate has also saved the
        # sharded model and optimizer, and every rank takes part in gathering the full weights.
        if accelerator.is_main_process or fsdp:
            save_weights(accelerator.unwrap_model(models[0]), Path(folder), args, ema, formats=("safetensors",),
                         family=family, write=accelerator.is_main_process)
        if accelerator.is_main_process:
            checkpoints.write_json_atomic(Path(folder) / checkpoints.TRAINING_STATE, checkpoint_state)
        weights.clear()

    def load_model_hook(models, folder):
        if fsdp:  # accelerate has loaded the sharded model; the EMA comes from its full file, sharded like the params
            if ema is not None:
                load_sharded_ema(accelerator.unwrap_model(unet), ema, Path(folder) / weight_files[1], family)
            return
        load_weights(accelerator.unwrap_model(models[0]), Path(folder), args, ema, family=family)
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # Optimizer
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for _, p in trainable_parameters(unet)]
    optimizer = make_optimizer(args, params)

    # Data
    if cache is not None:
        rows = None
    else:
        with accelerator.main_process_first():
            rows = filter_rows(load_rows(args), args, accelerator.is_main_process)
    data_seed = args.seed
    stream = None
    if isinstance(rows, datasets.IterableDataset):  # --streaming or WebDataset shards: PairStream shards by rank itself
        stream = PairStream(rows, args, data_seed, shuffle=args.split == "train",
                            rank=accelerator.process_index, world_size=accelerator.num_processes)
        dataloader = torch.utils.data.DataLoader(
            stream, batch_size=args.train_batch_size, collate_fn=Collate(tokenizers, family.max_lengths()),
            num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(data_seed),  # worker seeds must not draw from the global RNG (resume)
        )  # no persistent workers: every epoch they must see the stream's new epoch and start
    else:
        if cache is not None:  # the same keys, choices and order as PairDataset, moments instead of pixels
            dataset, collate = latent_cache.CachedPairDataset(cache, args), latent_cache.collate
        else:
            dataset, collate = pair_dataset(rows, args), Collate(tokenizers, family.max_lengths())
        sampler = EpochSampler(len(dataset), data_seed, shuffle=args.split == "train")
        dataloader = torch.utils.data.DataLoader(
            dataset, sampler=sampler, batch_size=args.train_batch_size, drop_last=True, collate_fn=collate,
            num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=args.dataloader_num_workers > 0,
            generator=torch.Generator().manual_seed(data_seed),  # worker seeds must not draw from the global RNG (resume)
        )
    choice_scorer = load_choice_model(args, accelerator.device) if args.choice_model else None

    if stream is None:
        unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
        updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)  # per process, after sharding
        if updates_per_epoch == 0:
            raise ValueError(f"{len(dataset)} pairs make no full batch of {args.train_batch_size} per process; lower --train_batch_size")
        args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    else:  # a stream's length is unknown until it ends: epochs run until --max_train_steps
        unet, optimizer = accelerator.prepare(unet, optimizer)
        args.num_train_epochs = sys.maxsize
    lr_scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,  # accelerate steps it once per process
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    ))
    data_state = sampler if stream is None else stream  # its state travels in training_state.json, not as a pickle
    params = [p for _, p in trainable_parameters(accelerator.unwrap_model(unet))]  # FSDP2 replaced them by shards
    if ref_unet is not None:  # what benchmarks/memory_table.py assumes: under FSDP the policy sharded, the reference whole
        logger.info(f"Denoiser weights held by this process: policy {held_bytes(accelerator.unwrap_model(unet))} bytes"
                    f"{' (its FSDP shard)' if fsdp else ''}, frozen reference {held_bytes(ref_unet)} bytes (whole)")
    if args.use_ema:  # diffusers' EMA of the trained parameters, on the training device
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay, update_after_step=args.ema_update_after_step,
                       use_ema_warmup=args.ema_power is not None, power=args.ema_power or 2 / 3)
        ema.to(accelerator.device)
    if args.use_lora:
        lora_unet = accelerator.unwrap_model(unet)

        def reference(*inputs, **kwargs):
            with adapters_disabled(lora_unet):
                return lora_unet(*inputs, **kwargs)
    else:
        reference = ref_unet

    if accelerator.is_main_process:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config)

    resolved = describe_run(args, requested, accelerator, weight_dtype, requested["learning_rate"])
    for name, value in resolved.items():
        logger.info(f"{name.replace('_', ' ').capitalize()}: {value}")
    if accelerator.is_main_process:
        checkpoints.write_json_atomic(output_dir / "training_config.json", {"arguments": requested, "resolved": resolved})

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {'streamed' if stream else len(dataset)}")
    logger.info(f"  Num Epochs = {'until the last step' if stream else args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Training method = {args.train_method}; frozen modules in {weight_dtype}")
    logger.info(f"  Timesteps {args.timestep_range[0]}..{args.timestep_range[1]}; importance weighting = {args.importance_weighting}")

    # Resume
    metrics_file = output_dir / "metrics.jsonl"
    global_step, first_epoch, skip_batches, skipped_rows_before = 0, 0, 0, 0
    skipped_by_reason_before = {}
    if checkpoint is not None:
        accelerator.print(f"Resuming from checkpoint {checkpoint}")
        accelerator.load_state(str(checkpoint))
        data_state.load_state_dict(resumed_state["data"])
        if ema is not None:
            ema.load_state_dict(resumed_state["ema"])
        global_step, skipped_rows_before = resumed_state["step"], resumed_state["skipped_rows"]
        skipped_by_reason_before = resumed_state.get("skipped_by_reason", {})  # absent in older checkpoints
        if accelerator.is_main_process:  # the steps logged after the checkpoint are logged again
            checkpoints.truncate_metrics(metrics_file, global_step)
        if stream is not None:  # the checkpoint restored its epoch and position: the used rows are skipped undecoded
            first_epoch = stream.epoch
            if args.hard_skip_resume:
                stream.start = 0
        else:
            first_epoch = global_step // updates_per_epoch
            if not args.hard_skip_resume:
                skip_batches = (global_step - first_epoch * updates_per_epoch) * args.gradient_accumulation_steps
        if regrouped:  # another process count or accumulation than the checkpoint's (keep_global_batch)
            position = regroup_resumed_state(args, accelerator, resumed_state, lr_scheduler,
                                             None if stream else sampler, None if stream else updates_per_epoch)
            if stream is None:
                first_epoch, skip_batches = position

    def save_checkpoint(step: int):
        """Every rank writes its state into a temporary folder, which is then renamed: a checkpoint is whole or absent.
        Free space is checked first; a write that fails for lack of space removes the partial folder and says so."""
        final = output_dir / f"checkpoint-{step}"
        tmp = output_dir / f".checkpoint-{step}.tmp"
        previous = next(iter(reversed(checkpoints.checkpoint_folders(output_dir))), None)
        previous = previous.name if previous is not None else None
        checkpoint_state.clear()
        checkpoint_state.update(
            format=checkpoints.STATE_FORMAT, step=step, num_processes=accelerator.num_processes,
            global_batch=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            data=data_state.state_dict(), skipped_rows=skipped_rows_before + count_skipped(),
            skipped_by_reason=skipped_by_reason(),
            ema={k: v for k, v in ema.state_dict().items() if k != "shadow_params"} if ema is not None else None,
            args=requested,
        )
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        checkpoints.check_free_space(output_dir, checkpoint_bytes(unet, optimizer, ema), f"checkpoint-{step}", previous)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
        except (OSError, RuntimeError) as error:
            if not checkpoints.is_disk_full(error):
                raise
            written = checkpoints.newest_file(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise OSError(error.errno if isinstance(error, OSError) else 28,
                          f"no space left on {checkpoints.mount_point(output_dir)} while writing "
                          f"{written or tmp}; {intact} (the partial checkpoint-{step} was removed). Free space and "
                          f"run the same command again to resume") from None
        accelerator.wait_for_everyone()  # every rank reaches the barrier (fixes SPEC B2)
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if args.checkpoints_total_limit:
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
            logger.info(f"Saved state to {final}")
        accelerator.wait_for_everyone()

    noise_process.to(accelerator.device)
    log_weight_coefficients = noise_process.log_weight_coefficients().to(accelerator.device)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)

    # Device-side accumulators between logging points: no host sync inside the step.
    zero = lambda: torch.zeros((), device=accelerator.device)  # noqa: E731
    sums, weight_history = {}, {}
    bad_update, nonfinite_in_a_row, skipped_updates = zero(), 0, 0
    last, final_logs = {}, {}
    # Bad rows, host side (no device read per micro-batch): met here and not yet shared, and counted (every rank).
    met_bad_rows, new_bad_rows, counted_bad_rows, logged_reasons = set(), [], set(), set()
    bad_row_counts = dict.fromkeys(SKIP_REASONS, 0)

    def count_skipped() -> int:
        """Bad rows (undecodable image or video, unusable caption, no preference signal) met by any rank since this
        process started, each counted once however often and wherever it was met (as a stand-in, in later epochs,
        on two ranks). One reduce per call; the row ids travel between ranks only when some rank met a new one."""
        pending = accelerator.reduce(torch.tensor(len(new_bad_rows), device=accelerator.device), reduction="sum").item()
        if pending:
            from accelerate.utils import gather_object

            for row_id, reason in gather_object(new_bad_rows) if accelerator.num_processes > 1 else new_bad_rows:
                if row_id not in counted_bad_rows:
                    counted_bad_rows.add(row_id)
                    bad_row_counts[reason] += 1
            new_bad_rows.clear()
        return sum(bad_row_counts.values())

    def skipped_by_reason() -> dict:
        """Bad rows per reason, the resumed run's included, as of the last count_skipped (for training_state.json)."""
        counts = {r: skipped_by_reason_before.get(r, 0) + bad_row_counts[r] for r in SKIP_REASONS}
        return {reason: count for reason, count in counts.items() if count}

    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:  # resuming a finished run: nothing left to train
            break
        if stream is not None:
            if epoch != first_epoch:
                stream.start = stream.position = 0
            stream.epoch = epoch
            epoch_loader = (send_to_device(batch, accelerator.device) for batch in dataloader)
        else:
            sampler.epoch = epoch
            sampler.used = skip_batches * args.train_batch_size * accelerator.num_processes if epoch == first_epoch else 0
            epoch_loader = dataloader
            if epoch == first_epoch and skip_batches:
                epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in epoch_loader:
            with accelerator.accumulate(unet):
                loss, step_metrics, weight_metrics, relabelled = compute_loss(
                    args, batch, unet, reference, vae, text_encoders, family, noise_process, weight_dtype,
                    log_weight_coefficients, choice_scorer, latent_config)
                finite = torch.isfinite(loss)
                bad_update = torch.maximum(bad_update, (~finite).float())
                loss = torch.where(finite, loss, torch.zeros_like(loss))  # a bad micro-batch contributes nothing
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    bad = accelerator.reduce(bad_update, reduction="sum").item() > 0  # one host sync per update
                    if bad:
                        optimizer.zero_grad(set_to_none=True)
                    elif args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                if not (accelerator.sync_gradients and bad):
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            # Per micro-batch: accumulate on device (official: averaged over ranks, train_loss over accumulation).
            sums["train_loss"] = sums.get("train_loss", 0) + loss.detach() / args.gradient_accumulation_steps
            if preference:
                sums["implicit_acc_accumulated"] = sums.get("implicit_acc_accumulated", 0) + \
                    step_metrics["implicit_acc"] / args.gradient_accumulation_steps
                last = step_metrics  # official: the *_unaccumulated, diff and lambda metrics of the last micro-batch
            for name, value in weight_metrics.items():
                weight_history.setdefault(name, []).append(value)
            if choice_scorer is not None:
                sums["relabelled_fraction"] = sums.get("relabelled_fraction", 0) + \
                    relabelled.float().mean() / args.gradient_accumulation_steps
            for row_id, reason, message in batch.get("bad_rows", ()):
                if row_id not in met_bad_rows:
                    if reason not in logged_reasons:  # the first of each reason in full; the end summary counts them
                        logged_reasons.add(reason)
                        logger.warning(f"row {row_id} skipped: {message} (further rows skipped for {reason} are "
                                       f"counted, not logged)", main_process_only=False)
                    met_bad_rows.add(row_id)
                    new_bad_rows.append((row_id, reason))
            if stream is not None:
                stream.position = batch["stream_position"]  # saved with the next checkpoint
            else:  # the global data position, saved with the next checkpoint; a finished epoch: the next one's start
                sampler.used += args.train_batch_size * accelerator.num_processes
                if accelerator.gradient_state.end_of_dataloader:
                    sampler.epoch, sampler.used = epoch + 1, 0

            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                if ema is not None and not bad:
                    ema.step(params)
                if bad:
                    skipped_updates += 1
                    nonfinite_in_a_row += 1
                    logger.warning(f"step {global_step}: non-finite loss, update skipped "
                                   f"({nonfinite_in_a_row} in a row, {skipped_updates} in all)")
                else:
                    nonfinite_in_a_row = 0
                bad_update = zero()

                # A skipped update has no loss: NaN here, null in metrics.jsonl (not the 0 its zeroed loss would give).
                logs = {"train_loss": torch.full_like(sums["train_loss"], math.nan) if bad else sums["train_loss"]}
                if preference:
                    logs.update({
                        "model_mse_unaccumulated": last["model_mse"], "ref_mse_unaccumulated": last["ref_mse"],
                        "implicit_acc_accumulated": sums["implicit_acc_accumulated"],
                        "avg_win_diff_loss": last["win_diff"], "avg_lose_diff_loss": last["lose_diff"],
                        "avg_lose_l_scale": last["lose_l_scale"],
                    })
                for name, values in weight_history.items():  # over the update's micro-batches, then over ranks
                    values = torch.stack(values)
                    logs[name] = values.amin() if name.endswith("_min") else values.amax() if name.endswith("_max") else values.mean()
                if choice_scorer is not None:
                    logs["relabelled_fraction"] = sums["relabelled_fraction"]
                names = list(logs)
                values = accelerator.gather(torch.stack([logs[k].float() for k in names]).unsqueeze(0))
                is_min = torch.tensor([k.endswith("_min") for k in names], device=values.device)
                is_max = torch.tensor([k.endswith("_max") for k in names], device=values.device)
                values = torch.where(is_min, values.amin(0), torch.where(is_max, values.amax(0), values.mean(0)))
                logs = dict(zip(names, values.tolist()))
                logs.update(lr=lr_scheduler.get_last_lr()[0], skipped_updates=skipped_updates,
                            skipped_rows=skipped_rows_before + count_skipped())
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps({"step": global_step, **checkpoints.finite_or_none(logs)}) + "\n")
                final_logs = logs
                postfix = {"loss": f"{logs['train_loss']:.4g}", "lr": f"{logs['lr']:.2e}"}
                if preference:
                    postfix.update(acc=f"{logs['implicit_acc_accumulated']:.2f}", lam=f"{logs['avg_lose_l_scale']:.3f}")
                progress.set_postfix(**postfix)
                sums, weight_history = {}, {}
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"the loss was non-finite for {nonfinite_in_a_row} consecutive updates (step {global_step}); "
                        f"the last good checkpoint in {output_dir} is kept. Lower --learning_rate or --beta_dpo, "
                        f"use bf16 instead of fp16, or check the data."
                    )

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(global_step)
                if global_step >= args.max_train_steps:
                    break
        if stream is not None and stream.position == 0:
            raise ValueError(f"the stream gave no full batch of {args.train_batch_size} pairs per process "
                             f"({accelerator.num_processes} processes); check the dataset, its filters and --train_batch_size")

    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and not fsdp:  # DDP keeps replicas equal; check it rather than assume it
        params = [p.detach().double() for p in unet.parameters()]
        checksum = torch.stack([sum(p.sum() for p in params), sum(p.pow(2).sum() for p in params)]).unsqueeze(0)
        checksums = accelerator.gather(checksum)
        if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
            raise RuntimeError(f"the ranks ended with different UNet weights (checksums {checksums.tolist()})")
        logger.info(f"all {accelerator.num_processes} ranks hold identical UNet weights (checksum {checksum[0, 0].item():.6f})")
    skipped_total = skipped_rows_before + count_skipped()
    final_unet = accelerator.unwrap_model(unet)
    if fsdp:  # every rank takes part in gathering the shards; rank 0 writes
        save_weights(final_unet, output_dir, args, ema, family=family, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        if skipped_total:
            reasons = ", ".join(f"{reason} {count}" for reason, count in skipped_by_reason().items())
            logger.warning(f"{skipped_total} rows were skipped ({reasons}; each replaced by the next row)")
        if not fsdp:
            final_bytes = sum(p.numel() * 4 for _, p in trainable_parameters(final_unet)) * (1 if args.use_lora else 2)
            checkpoints.check_free_space(output_dir, final_bytes * (2 if ema is not None else 1), "the final weights")
            save_weights(final_unet, output_dir, args, ema, family=family)
        written = [output_dir / name for name in final_weight_names(args)]
        if args.save_pipeline:
            if fsdp:  # the pipeline needs a whole model: the base architecture with the gathered weights
                from safetensors.torch import load_file

                final_unet = family.load_denoiser(args.unet_init or base, None if args.unet_init else revision)
                final_unet.load_state_dict(load_file(str(output_dir / f"{family.denoiser}.safetensors")))
            save_pipeline(args, final_unet, output_dir)
        write_model_card(args, output_dir, global_step, final_logs)
        log_summary(args, output_dir, global_step, time.time() - started, final_logs, written, skipped_by_reason(),
                    first_step=resumed_state["step"] if checkpoint is not None else 0)
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            create_repo(args.hub_model_id, exist_ok=True)
            upload_folder(repo_id=args.hub_model_id, folder_path=str(output_dir), ignore_patterns=["checkpoint-*", ".*"])
            logger.info(f"Uploaded {output_dir} (weights, README.md model card, training_config.json) to {args.hub_model_id}")
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # otherwise ranks can abort at exit
    return global_step


def resolved_location(name: str, revision=None) -> str:
    """Where a model actually came from: a local folder, or the hub id and its snapshot in the Hugging Face cache."""
    if Path(name).exists():
        return str(Path(name).absolute())
    try:
        from huggingface_hub import snapshot_download

        return f"{name} (cache snapshot {snapshot_download(name, revision=revision, local_files_only=True)})"
    except Exception:  # noqa: BLE001 - only a description
        return f"{name} (hub)"


def run_seed(seed: int | None, resumed_state: dict | None) -> int:
    """--seed, else the seed of the run being resumed, else one drawn now (the same on every rank). Without a fixed
    seed a resume would draw another subsample (--max_train_samples), data order and noise than the unbroken run."""
    if seed is not None:
        return seed
    if resumed_state is not None:
        return resumed_state["data"]["seed"]  # the data state records the seed the run used
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]  # the main process's draw


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


def load_choice_model(args, device):
    """The --choice_model scorer (eval.scorers, any of the five metrics), with --choice_model_path/_config options."""
    from eval.scorers import load_scorer

    options = {}
    if args.choice_model_config:
        text = args.choice_model_config
        if Path(text).is_file():
            text = Path(text).read_text()
        try:
            options = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--choice_model_config is neither a JSON object nor a .json file: {error}") from error
        if not isinstance(options, dict):
            raise ValueError(f"--choice_model_config must be a JSON object of load_scorer options, got {text!r}")
    if args.choice_model_path:
        options["model_path"] = args.choice_model_path
    return load_scorer(args.choice_model, device=args.choice_model_device or device,
                       batch_size=args.choice_model_batch_size, **options)


def relabel_pairs(scorer, batch, pixels):
    """AI feedback (the official --choice_model, fixed: any scorer, any batch size). The pairs come in dataset order
    (jpg_0, jpg_1) with their decoded images; a pair is swapped where the scorer ranks jpg_1 above jpg_0, so the
    preferred image goes first and ties keep the dataset order. Returns the pixels and, per pair, whether the scorer's
    winner differs from the human one (label_0)."""
    scores = scorer.score([prompt for prompt in batch["prompts"] for _ in range(2)],
                          [image for pair in batch["images"] for image in pair])
    scores = torch.tensor(scores, dtype=torch.float64).view(-1, 2)
    swap = (scores[:, 1] > scores[:, 0]).to(pixels.device)
    swapped = torch.cat([pixels[:, 3:], pixels[:, :3]], dim=1)
    pixels = torch.where(swap.view(-1, 1, 1, 1), swapped, pixels)
    return pixels, swap != (batch["label_0"].to(pixels.device) == 0)


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


def worker_cause(message: str) -> str:
    """torch re-raises a DataLoader worker's exception as "Caught X in DataLoader worker process N.\nOriginal
    Traceback ...": the one line worth printing is the original exception's, at the end of that traceback."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    head = message.splitlines()[0]
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith(" ")]
    cause = re.sub(r"^[A-Za-z_][\w.]*: ", "", lines[-1])  # the exception type
    return f"{cause} ({head.removeprefix('Caught ').split(' in ', 1)[-1].rstrip('.')})"


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, RuntimeError, FloatingPointError, ImportError) as error:
        message = error.strerror if isinstance(error, OSError) and error.strerror and not error.filename else error
        message = worker_cause(str(message))
        print(f"train.py: error: {message}", file=sys.stderr)  # once, and last: the cause does not scroll away
        sys.exit(1)
