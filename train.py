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
unchanged. This file is the top of the code: the losses and the safeguard (pure functions), compute_loss (one step's
loss), then `main`, a sequence of phases over a Run. Everything it uses lives beneath it and never imports it back:
arguments.py (the flags), data/ (rows, image pairs, video pairs, the latent cache, relabelling), families/ (models,
parametrisations, tokenizers), model_setup.py (LoRA, optimizer), weights.py and checkpoints.py (what is saved and
resumed), distributed.py, report.py (what the user is told). `import train` has no side effects.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import checkpoints
from arguments import METHODS, PREFERENCE_METHODS, parse_args, resolve_mixed_precision  # noqa: F401 - tests use them
from data.latent_cache import CachedPairDataset, LatentCache, latents_from_moments
from data.latent_cache import collate as collate_cached
from data.pairs import Collate, EpochSampler, PairStream, pair_dataset, worker_cause
from data.relabel import load_choice_model, relabel_pairs
from data.rows import SKIP_REASONS, filter_rows, load_rows
from distributed import (check_fsdp_setup, check_fsdp_version, check_output_dir_is_shared, enable_fsdp_on_cpu_ranks,
                         held_bytes, is_fsdp, keep_global_batch, regroup_resumed_state, uses_cpu_ranks)
from families import make_family
from model_setup import add_lora, adapters_disabled, apply_speed_options, make_optimizer, trainable_parameters
from report import describe_run, final_weight_names, log_summary, write_model_card
from weights import checkpoint_bytes, load_sharded_ema, load_weights, prune_checkpoints, save_pipeline, save_weights
from weights import weight_file_names

logger = logging.getLogger("train")


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


# ----------------------------------------------------------------------------------------------------------------
# Data: Pick-a-Pic style rows (jpg_0, jpg_1, label_0, caption) -> winner-first pixel pairs and tokenised captions.


# ----------------------------------------------------------------------------------------------------------------
# Models


# ----------------------------------------------------------------------------------------------------------------
# The training step


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
# main: the phases of a run, in order. Each phase reads and fills the Run; nothing else is shared between them.


@dataclass
class Run:
    """The state one phase hands the next: what was resolved, loaded and prepared so far."""

    args: argparse.Namespace
    requested: dict  # the arguments as given (main rescales the lr and recomputes the epochs)
    started: float
    accelerator: object = None
    logger: object = None  # accelerate's logger: once, from the main process, unless told otherwise
    output_dir: Path = None
    fsdp: bool = False
    preference: bool = True
    weight_dtype: torch.dtype = torch.float32
    weight_files: list = None
    checkpoint: Path | None = None  # the checkpoint to resume from
    resumed_state: dict | None = None
    regrouped: bool = False
    # models
    family: object = None
    cache: object = None
    latent_config: object = None
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    noise_process: object = None
    vae: object = None
    unet: object = None  # the policy denoiser (a UNet or a transformer), later accelerate-prepared
    ref_unet: object = None
    reference: object = None  # what compute_loss calls: ref_unet, or the LoRA model with its adapters disabled
    ema: object = None
    checkpoint_state: dict = field(default_factory=dict)  # filled by save_checkpoint, written by the save hook
    optimizer: object = None
    params: list = None
    # data
    dataset: object = None
    sampler: object = None
    stream: object = None
    dataloader: object = None
    data_state: object = None  # the sampler or the stream: its state travels in training_state.json
    choice_scorer: object = None
    updates_per_epoch: int | None = None
    lr_scheduler: object = None
    # progress
    metrics_file: Path = None
    global_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0
    bad_rows: "BadRows" = None
    skipped_updates: int = 0
    final_logs: dict = field(default_factory=dict)


def main(argv=None):
    run = parse_and_resolve(argv)  # arguments, accelerator, logging, and the checkpoint to resume from
    load_models(run)
    load_data(run)
    prepare(run)  # accelerate, the lr schedule, EMA, the reference; the run described
    resume(run)
    train_loop(run)
    save_and_report(run)
    return run.global_step


def parse_and_resolve(argv) -> Run:
    args = parse_args(argv)
    args.mixed_precision, precision_source = resolve_mixed_precision(args.mixed_precision, os.environ)
    run = Run(args, checkpoints.run_arguments(args), time.time())

    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed

    output_dir = run.output_dir = Path(args.output_dir)
    cpu_ranks = uses_cpu_ranks(int(os.environ.get("WORLD_SIZE", 1)))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # before Accelerator() builds the launcher's plugin
        check_fsdp_version(int(os.environ.get("FSDP_VERSION", "1")))  # (accelerate's default version is 1)
    accelerator = run.accelerator = Accelerator(
        cpu=cpu_ranks,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=make_family(args).accelerator_kwargs(args),  # wan22_a14b: DDP with unused parameters
    )
    if cpu_ranks and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        enable_fsdp_on_cpu_ranks(accelerator)
    run.fsdp = is_fsdp(accelerator)
    if run.fsdp:  # every rank loads the weights itself (from_pretrained); accelerate's rank-0-only loading path is not used
        check_fsdp_setup(args, accelerator.state.fsdp_plugin)
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger = run.logger = get_logger("train")  # logs once, from the main process, unless told otherwise
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
    run.preference = args.train_method in PREFERENCE_METHODS
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # The checkpoint to resume from, chosen (and its files and arguments checked) before any model loads.
    run.weight_files = weight_file_names(args)

    def problems_of(folder):
        return checkpoints.checkpoint_problems(folder, run.weight_files, accelerator.scaler is not None, fsdp=run.fsdp)

    run.checkpoint = checkpoints.choose_checkpoint(output_dir, args.resume_from_checkpoint, problems_of)
    if run.checkpoint is not None:
        run.resumed_state = checkpoints.read_training_state(run.checkpoint)
        for line in checkpoints.resumed_arguments(run.resumed_state["args"], run.requested):
            logger.info(f"Changed since {run.checkpoint.name}: {line}")
        run.regrouped = keep_global_batch(args, accelerator, run.checkpoint, run.resumed_state, logger)
    args.seed = run_seed(args.seed, run.resumed_state)
    set_seed(args.seed + accelerator.process_index)  # official: every rank its own noise stream (Q27)
    return run


def load_models(run: Run):
    """Models, through the family (families/): the frozen parts in weight_dtype, the policy denoiser (`unet`, a UNet
    or a transformer) in fp32 under autocast, the reference a frozen copy; then the optimizer."""
    args, accelerator, weight_dtype = run.args, run.accelerator, run.weight_dtype
    base, revision = args.pretrained_model_name_or_path, args.revision
    family = run.family = make_family(args)
    family.check_components(base, revision)
    if args.latents_cache:  # the VAE and text encoders did their work once (latent_cache.py): not loaded
        run.cache = LatentCache(args.latents_cache, args)
        run.latent_config = SimpleNamespace(**run.cache.index["latent"])
    else:  # the tokenizer first: it names a missing model's fix
        run.tokenizers, run.text_encoders = family.load_text(weight_dtype)
    noise_process = run.noise_process = family.load_noise()
    if args.timestep_range[1] >= noise_process.num_timesteps:
        raise ValueError(f"--timestep_range {args.timestep_range[0]} {args.timestep_range[1]}: the scheduler of {base} "
                         f"has {noise_process.num_timesteps} timesteps; HI must be at most {noise_process.num_timesteps - 1}")
    run.vae = family.load_vae(weight_dtype) if run.cache is None else None
    unet_source, unet_revision = args.unet_init or base, None if args.unet_init else revision
    unet = run.unet = family.load_denoiser(unet_source, unet_revision)  # fp32 master weights
    if args.use_lora:  # base frozen in weight_dtype, fp32 adapters; the reference is the base (adapters_disabled)
        add_lora(unet, args, torch.float32 if run.fsdp else weight_dtype)  # FSDP2 shards one dtype: the base sharded in fp32
    elif run.preference:
        run.ref_unet = family.load_denoiser(unet_source, unet_revision, weight_dtype)

    frozen = [m for m in (run.vae, *run.text_encoders, run.ref_unet) if m is not None]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        module.to(accelerator.device)
    if args.enable_xformers:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    apply_speed_options(args, unet, run.ref_unet, run.vae)
    register_weight_hooks(run)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    run.params = [p for _, p in trainable_parameters(unet)]
    run.optimizer = make_optimizer(args, run.params)


def register_weight_hooks(run: Run):
    """Checkpoints hold the UNet as unet.safetensors (a plain state dict the eval scripts read), not accelerate's
    default; with LoRA the adapter file, and with EMA the average beside it (save_weights)."""
    accelerator, args, family = run.accelerator, run.args, run.family

    def save_model_hook(models, weights, folder):
        # unet.safetensors in every checkpoint (the eval scripts read it); under FSDP accelerate has also saved the
        # sharded model and optimizer, and every rank takes part in gathering the full weights.
        if accelerator.is_main_process or run.fsdp:
            save_weights(accelerator.unwrap_model(models[0]), Path(folder), args, run.ema, formats=("safetensors",),
                         family=family, write=accelerator.is_main_process)
        if accelerator.is_main_process:
            checkpoints.write_json_atomic(Path(folder) / checkpoints.TRAINING_STATE, run.checkpoint_state)
        weights.clear()

    def load_model_hook(models, folder):
        if run.fsdp:  # accelerate has loaded the sharded model; the EMA comes from its full file, sharded like the params
            if run.ema is not None:
                load_sharded_ema(accelerator.unwrap_model(run.unet), run.ema, Path(folder) / run.weight_files[1], family)
            return
        load_weights(accelerator.unwrap_model(models[0]), Path(folder), args, run.ema, family=family)
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def load_data(run: Run):
    """The pairs and their loader: a map-style dataset with EpochSampler, a PairStream (--streaming, WebDataset
    shards), or the latent cache; and the --choice_model scorer."""
    import datasets

    args, accelerator, family = run.args, run.accelerator, run.family
    if run.cache is not None:
        rows = None
    else:
        with accelerator.main_process_first():
            rows = filter_rows(load_rows(args), args, accelerator.is_main_process)
    data_seed = args.seed
    if isinstance(rows, datasets.IterableDataset):  # --streaming or WebDataset shards: PairStream shards by rank itself
        run.stream = PairStream(rows, args, data_seed, shuffle=args.split == "train",
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
        run.dataloader = torch.utils.data.DataLoader(
            run.stream, batch_size=args.train_batch_size, collate_fn=Collate(run.tokenizers, family.max_lengths()),
            num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(data_seed),  # worker seeds must not draw from the global RNG (resume)
        )  # no persistent workers: every epoch they must see the stream's new epoch and start
    else:
        if run.cache is not None:  # the same keys, choices and order as PairDataset, moments instead of pixels
            run.dataset, collate = CachedPairDataset(run.cache, args), collate_cached
        else:
            run.dataset, collate = pair_dataset(rows, args), Collate(run.tokenizers, family.max_lengths())
        run.sampler = EpochSampler(len(run.dataset), data_seed, shuffle=args.split == "train")
        run.dataloader = torch.utils.data.DataLoader(
            run.dataset, sampler=run.sampler, batch_size=args.train_batch_size, drop_last=True, collate_fn=collate,
            num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=args.dataloader_num_workers > 0,
            generator=torch.Generator().manual_seed(data_seed),  # worker seeds must not draw from the global RNG (resume)
        )
    run.choice_scorer = load_choice_model(args, accelerator.device) if args.choice_model else None


def prepare(run: Run):
    """accelerate's prepare, the lr schedule, EMA and the reference; then the run described (log, trackers,
    training_config.json)."""
    from diffusers.optimization import get_scheduler

    args, accelerator, logger = run.args, run.accelerator, run.logger
    if run.stream is None:
        run.unet, run.optimizer, run.dataloader = accelerator.prepare(run.unet, run.optimizer, run.dataloader)
        run.updates_per_epoch = math.ceil(len(run.dataloader) / args.gradient_accumulation_steps)  # per process, after sharding
        if run.updates_per_epoch == 0:
            raise ValueError(f"{len(run.dataset)} pairs make no full batch of {args.train_batch_size} per process; lower --train_batch_size")
        args.num_train_epochs = math.ceil(args.max_train_steps / run.updates_per_epoch)
    else:  # a stream's length is unknown until it ends: epochs run until --max_train_steps
        run.unet, run.optimizer = accelerator.prepare(run.unet, run.optimizer)
        args.num_train_epochs = sys.maxsize
    run.lr_scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler, optimizer=run.optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,  # accelerate steps it once per process
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    ))
    run.data_state = run.sampler if run.stream is None else run.stream  # its state travels in training_state.json, not as a pickle
    run.params = [p for _, p in trainable_parameters(accelerator.unwrap_model(run.unet))]  # FSDP2 replaced them by shards
    if run.ref_unet is not None:  # what benchmarks/memory_table.py assumes: under FSDP the policy sharded, the reference whole
        logger.info(f"Denoiser weights held by this process: policy {held_bytes(accelerator.unwrap_model(run.unet))} bytes"
                    f"{' (its FSDP shard)' if run.fsdp else ''}, frozen reference {held_bytes(run.ref_unet)} bytes (whole)")
    if args.use_ema:  # diffusers' EMA of the trained parameters, on the training device
        from diffusers.training_utils import EMAModel

        run.ema = EMAModel(run.params, decay=args.ema_decay, update_after_step=args.ema_update_after_step,
                           use_ema_warmup=args.ema_power is not None, power=args.ema_power or 2 / 3)
        run.ema.to(accelerator.device)
    if args.use_lora:
        lora_unet = accelerator.unwrap_model(run.unet)

        def reference(*inputs, **kwargs):
            with adapters_disabled(lora_unet):
                return lora_unet(*inputs, **kwargs)
        run.reference = reference
    else:
        run.reference = run.ref_unet
    describe(run)


def describe(run: Run):
    args, accelerator, logger = run.args, run.accelerator, run.logger
    if accelerator.is_main_process:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config)

    resolved = describe_run(args, run.requested, accelerator, run.weight_dtype, run.requested["learning_rate"])
    for name, value in resolved.items():
        logger.info(f"{name.replace('_', ' ').capitalize()}: {value}")
    if accelerator.is_main_process:
        checkpoints.write_json_atomic(run.output_dir / "training_config.json",
                                      {"arguments": run.requested, "resolved": resolved})

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {'streamed' if run.stream else len(run.dataset)}")
    logger.info(f"  Num Epochs = {'until the last step' if run.stream else args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Training method = {args.train_method}; frozen modules in {run.weight_dtype}")
    logger.info(f"  Timesteps {args.timestep_range[0]}..{args.timestep_range[1]}; importance weighting = {args.importance_weighting}")


def resume(run: Run):
    """The checkpoint's state restored (weights, optimizer, data position, EMA, counters), and where the loop starts."""
    args, accelerator = run.args, run.accelerator
    run.metrics_file = run.output_dir / "metrics.jsonl"
    skipped_rows_before, skipped_by_reason_before = 0, {}
    if run.checkpoint is not None:
        state, stream = run.resumed_state, run.stream
        accelerator.print(f"Resuming from checkpoint {run.checkpoint}")
        accelerator.load_state(str(run.checkpoint))
        run.data_state.load_state_dict(state["data"])
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
        run.global_step, skipped_rows_before = state["step"], state["skipped_rows"]
        skipped_by_reason_before = state.get("skipped_by_reason", {})  # absent in older checkpoints
        if accelerator.is_main_process:  # the steps logged after the checkpoint are logged again
            checkpoints.truncate_metrics(run.metrics_file, run.global_step)
        if stream is not None:  # the checkpoint restored its epoch and position: the used rows are skipped undecoded
            run.first_epoch = stream.epoch
            if args.hard_skip_resume:
                stream.start = 0
        else:
            run.first_epoch = run.global_step // run.updates_per_epoch
            if not args.hard_skip_resume:
                run.skip_batches = (run.global_step - run.first_epoch * run.updates_per_epoch) * args.gradient_accumulation_steps
        if run.regrouped:  # another process count or accumulation than the checkpoint's (keep_global_batch)
            position = regroup_resumed_state(args, accelerator, state, run.lr_scheduler,
                                             None if stream else run.sampler, None if stream else run.updates_per_epoch)
            if stream is None:
                run.first_epoch, run.skip_batches = position
    run.bad_rows = BadRows(run.accelerator, skipped_rows_before, skipped_by_reason_before)


class BadRows:
    """Bad rows, host side (no device read per micro-batch): met here and not yet shared, and counted (every rank)."""

    def __init__(self, accelerator, skipped_before: int, by_reason_before: dict):
        self.accelerator, self.skipped_before, self.by_reason_before = accelerator, skipped_before, by_reason_before
        self.met, self.new, self.counted, self.logged_reasons = set(), [], set(), set()
        self.counts = dict.fromkeys(SKIP_REASONS, 0)

    def note(self, batch, logger):
        for row_id, reason, message in batch.get("bad_rows", ()):
            if row_id not in self.met:
                if reason not in self.logged_reasons:  # the first of each reason in full; the end summary counts them
                    self.logged_reasons.add(reason)
                    logger.warning(f"row {row_id} skipped: {message} (further rows skipped for {reason} are "
                                   f"counted, not logged)", main_process_only=False)
                self.met.add(row_id)
                self.new.append((row_id, reason))

    def count(self) -> int:
        """Bad rows (undecodable image or video, unusable caption, no preference signal) met by any rank since this
        process started, each counted once however often and wherever it was met (as a stand-in, in later epochs,
        on two ranks). One reduce per call; the row ids travel between ranks only when some rank met a new one."""
        accelerator = self.accelerator
        pending = accelerator.reduce(torch.tensor(len(self.new), device=accelerator.device), reduction="sum").item()
        if pending:
            from accelerate.utils import gather_object

            for row_id, reason in gather_object(self.new) if accelerator.num_processes > 1 else self.new:
                if row_id not in self.counted:
                    self.counted.add(row_id)
                    self.counts[reason] += 1
            self.new.clear()
        return sum(self.counts.values())

    def total(self) -> int:
        """The resumed run's bad rows and this process's, counted now."""
        return self.skipped_before + self.count()

    def by_reason(self) -> dict:
        """Bad rows per reason, the resumed run's included, as of the last count (for training_state.json)."""
        counts = {r: self.by_reason_before.get(r, 0) + self.counts[r] for r in SKIP_REASONS}
        return {reason: count for reason, count in counts.items() if count}


def save_checkpoint(run: Run, step: int):
    """Every rank writes its state into a temporary folder, which is then renamed: a checkpoint is whole or absent.
    Free space is checked first; a write that fails for lack of space removes the partial folder and says so."""
    args, accelerator, output_dir, ema = run.args, run.accelerator, run.output_dir, run.ema
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    previous = next(iter(reversed(checkpoints.checkpoint_folders(output_dir))), None)
    previous = previous.name if previous is not None else None
    run.checkpoint_state.clear()
    run.checkpoint_state.update(
        format=checkpoints.STATE_FORMAT, step=step, num_processes=accelerator.num_processes,
        global_batch=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        data=run.data_state.state_dict(), skipped_rows=run.bad_rows.total(),
        skipped_by_reason=run.bad_rows.by_reason(),
        ema={k: v for k, v in ema.state_dict().items() if k != "shadow_params"} if ema is not None else None,
        args=run.requested,
    )
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    checkpoints.check_free_space(output_dir, checkpoint_bytes(run.unet, run.optimizer, ema), f"checkpoint-{step}", previous)
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
        run.logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()


def epoch_batches(run: Run, epoch: int):
    """The batches of one epoch: the stream from its position, or the sampler's order past the resumed batches."""
    from accelerate.utils import send_to_device

    args, accelerator, stream, sampler = run.args, run.accelerator, run.stream, run.sampler
    if stream is not None:
        if epoch != run.first_epoch:
            stream.start = stream.position = 0
        stream.epoch = epoch
        return (send_to_device(batch, accelerator.device) for batch in run.dataloader)
    sampler.epoch = epoch
    sampler.used = run.skip_batches * args.train_batch_size * accelerator.num_processes if epoch == run.first_epoch else 0
    if epoch == run.first_epoch and run.skip_batches:
        return accelerator.skip_first_batches(run.dataloader, run.skip_batches)
    return run.dataloader


def train_loop(run: Run):
    """The updates: compute_loss per micro-batch, a non-finite update skipped, device-side sums logged per update
    (log_update), checkpoints every --checkpointing_steps."""
    from tqdm.auto import tqdm

    args, accelerator, unet, optimizer = run.args, run.accelerator, run.unet, run.optimizer
    noise_process = run.noise_process
    noise_process.to(accelerator.device)
    log_weight_coefficients = noise_process.log_weight_coefficients().to(accelerator.device)
    progress = tqdm(range(args.max_train_steps), initial=run.global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)

    # Device-side accumulators between logging points: no host sync inside the step.
    zero = lambda: torch.zeros((), device=accelerator.device)  # noqa: E731
    sums, weight_history = {}, {}
    bad_update, nonfinite_in_a_row = zero(), 0
    last = {}

    for epoch in range(run.first_epoch, args.num_train_epochs):
        if run.global_step >= args.max_train_steps:  # resuming a finished run: nothing left to train
            break
        for batch in epoch_batches(run, epoch):
            with accelerator.accumulate(unet):
                loss, step_metrics, weight_metrics, relabelled = compute_loss(
                    args, batch, unet, run.reference, run.vae, run.text_encoders, run.family, noise_process,
                    run.weight_dtype, log_weight_coefficients, run.choice_scorer, run.latent_config)
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
                run.lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            # Per micro-batch: accumulate on device (official: averaged over ranks, train_loss over accumulation).
            sums["train_loss"] = sums.get("train_loss", 0) + loss.detach() / args.gradient_accumulation_steps
            if run.preference:
                sums["implicit_acc_accumulated"] = sums.get("implicit_acc_accumulated", 0) + \
                    step_metrics["implicit_acc"] / args.gradient_accumulation_steps
                last = step_metrics  # official: the *_unaccumulated, diff and lambda metrics of the last micro-batch
            for name, value in weight_metrics.items():
                weight_history.setdefault(name, []).append(value)
            if run.choice_scorer is not None:
                sums["relabelled_fraction"] = sums.get("relabelled_fraction", 0) + \
                    relabelled.float().mean() / args.gradient_accumulation_steps
            run.bad_rows.note(batch, run.logger)
            if run.stream is not None:
                run.stream.position = batch["stream_position"]  # saved with the next checkpoint
            else:  # the global data position, saved with the next checkpoint; a finished epoch: the next one's start
                run.sampler.used += args.train_batch_size * accelerator.num_processes
                if accelerator.gradient_state.end_of_dataloader:
                    run.sampler.epoch, run.sampler.used = epoch + 1, 0

            if accelerator.sync_gradients:
                nonfinite_in_a_row = finish_update(run, bad, nonfinite_in_a_row, sums, last, weight_history, progress)
                bad_update = zero()
                sums, weight_history = {}, {}
                if run.global_step >= args.max_train_steps:
                    break
        if run.stream is not None and run.stream.position == 0:
            raise ValueError(f"the stream gave no full batch of {args.train_batch_size} pairs per process "
                             f"({accelerator.num_processes} processes); check the dataset, its filters and --train_batch_size")


def finish_update(run: Run, bad: bool, nonfinite_in_a_row: int, sums: dict, last: dict, weight_history: dict,
                  progress) -> int:
    """After an optimizer update (or a skipped one): the step counted, EMA, the update logged, a run of non-finite
    updates stopped, a checkpoint when due. Returns the number of non-finite updates in a row."""
    args = run.args
    run.global_step += 1
    progress.update(1)
    if run.ema is not None and not bad:
        run.ema.step(run.params)
    if bad:
        run.skipped_updates += 1
        nonfinite_in_a_row += 1
        run.logger.warning(f"step {run.global_step}: non-finite loss, update skipped "
                           f"({nonfinite_in_a_row} in a row, {run.skipped_updates} in all)")
    else:
        nonfinite_in_a_row = 0
    log_update(run, bad, sums, last, weight_history, progress)
    if nonfinite_in_a_row >= args.max_nonfinite_steps:
        raise FloatingPointError(
            f"the loss was non-finite for {nonfinite_in_a_row} consecutive updates (step {run.global_step}); "
            f"the last good checkpoint in {run.output_dir} is kept. Lower --learning_rate or --beta_dpo, "
            f"use bf16 instead of fp16, or check the data."
        )
    if run.global_step % args.checkpointing_steps == 0:
        save_checkpoint(run, run.global_step)
    return nonfinite_in_a_row


def log_update(run: Run, bad: bool, sums: dict, last: dict, weight_history: dict, progress):
    """One update's metrics, reduced over ranks: to the trackers, metrics.jsonl and the progress bar."""
    accelerator = run.accelerator
    # A skipped update has no loss: NaN here, null in metrics.jsonl (not the 0 its zeroed loss would give).
    logs = {"train_loss": torch.full_like(sums["train_loss"], math.nan) if bad else sums["train_loss"]}
    if run.preference:
        logs.update({
            "model_mse_unaccumulated": last["model_mse"], "ref_mse_unaccumulated": last["ref_mse"],
            "implicit_acc_accumulated": sums["implicit_acc_accumulated"],
            "avg_win_diff_loss": last["win_diff"], "avg_lose_diff_loss": last["lose_diff"],
            "avg_lose_l_scale": last["lose_l_scale"],
        })
    for name, values in weight_history.items():  # over the update's micro-batches, then over ranks
        values = torch.stack(values)
        logs[name] = values.amin() if name.endswith("_min") else values.amax() if name.endswith("_max") else values.mean()
    if run.choice_scorer is not None:
        logs["relabelled_fraction"] = sums["relabelled_fraction"]
    names = list(logs)
    values = accelerator.gather(torch.stack([logs[k].float() for k in names]).unsqueeze(0))
    is_min = torch.tensor([k.endswith("_min") for k in names], device=values.device)
    is_max = torch.tensor([k.endswith("_max") for k in names], device=values.device)
    values = torch.where(is_min, values.amin(0), torch.where(is_max, values.amax(0), values.mean(0)))
    logs = dict(zip(names, values.tolist()))
    logs.update(lr=run.lr_scheduler.get_last_lr()[0], skipped_updates=run.skipped_updates,
                skipped_rows=run.bad_rows.total())
    accelerator.log(logs, step=run.global_step)
    if accelerator.is_main_process:
        with open(run.metrics_file, "a") as f:
            f.write(json.dumps({"step": run.global_step, **checkpoints.finite_or_none(logs)}) + "\n")
    run.final_logs = logs
    postfix = {"loss": f"{logs['train_loss']:.4g}", "lr": f"{logs['lr']:.2e}"}
    if run.preference:
        postfix.update(acc=f"{logs['implicit_acc_accumulated']:.2f}", lam=f"{logs['avg_lose_l_scale']:.3f}")
    progress.set_postfix(**postfix)


def save_and_report(run: Run):
    """The final weights (and pipeline), the model card, the summary, the hub upload; the ranks checked equal first."""
    args, accelerator, logger, output_dir, fsdp = run.args, run.accelerator, run.logger, run.output_dir, run.fsdp
    unet, ema, family = run.unet, run.ema, run.family
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and not fsdp:  # DDP keeps replicas equal; check it rather than assume it
        params = [p.detach().double() for p in unet.parameters()]
        checksum = torch.stack([sum(p.sum() for p in params), sum(p.pow(2).sum() for p in params)]).unsqueeze(0)
        checksums = accelerator.gather(checksum)
        if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
            raise RuntimeError(f"the ranks ended with different UNet weights (checksums {checksums.tolist()})")
        logger.info(f"all {accelerator.num_processes} ranks hold identical UNet weights (checksum {checksum[0, 0].item():.6f})")
    skipped_total = run.bad_rows.total()
    final_unet = accelerator.unwrap_model(unet)
    if fsdp:  # every rank takes part in gathering the shards; rank 0 writes
        save_weights(final_unet, output_dir, args, ema, family=family, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        if skipped_total:
            reasons = ", ".join(f"{reason} {count}" for reason, count in run.bad_rows.by_reason().items())
            logger.warning(f"{skipped_total} rows were skipped ({reasons}; each replaced by the next row)")
        if not fsdp:
            final_bytes = sum(p.numel() * 4 for _, p in trainable_parameters(final_unet)) * (1 if args.use_lora else 2)
            checkpoints.check_free_space(output_dir, final_bytes * (2 if ema is not None else 1), "the final weights")
            save_weights(final_unet, output_dir, args, ema, family=family)
        written = [output_dir / name for name in final_weight_names(args)]
        if args.save_pipeline:
            if fsdp:  # the pipeline needs a whole model: the base architecture with the gathered weights
                from safetensors.torch import load_file

                base, revision = args.pretrained_model_name_or_path, args.revision
                final_unet = family.load_denoiser(args.unet_init or base, None if args.unet_init else revision)
                final_unet.load_state_dict(load_file(str(output_dir / f"{family.denoiser}.safetensors")))
            save_pipeline(args, final_unet, output_dir)
        write_model_card(args, output_dir, run.global_step, run.final_logs)
        log_summary(args, output_dir, run.global_step, time.time() - run.started, run.final_logs, written,
                    run.bad_rows.by_reason(), first_step=run.resumed_state["step"] if run.checkpoint is not None else 0)
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            create_repo(args.hub_model_id, exist_ok=True)
            upload_folder(repo_id=args.hub_model_id, folder_path=str(output_dir), ignore_patterns=["checkpoint-*", ".*"])
            logger.info(f"Uploaded {output_dir} (weights, README.md model card, training_config.json) to {args.hub_model_id}")
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # otherwise ranks can abort at exit


def run_seed(seed: int | None, resumed_state: dict | None) -> int:
    """--seed, else the seed of the run being resumed, else one drawn now (the same on every rank). Without a fixed
    seed a resume would draw another subsample (--max_train_samples), data order and noise than the unbroken run."""
    if seed is not None:
        return seed
    if resumed_state is not None:
        return resumed_state["data"]["seed"]  # the data state records the seed the run used
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]  # the main process's draw


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, RuntimeError, FloatingPointError, ImportError) as error:
        message = error.strerror if isinstance(error, OSError) and error.strerror and not error.filename else error
        message = worker_cause(str(message))
        print(f"train.py: error: {message}", file=sys.stderr)  # once, and last: the cause does not scroll away
        sys.exit(1)
