"""A baseline micro-step that makes the official implementation's choices, written from SPEC Part B §3.

Only for benchmarks/bench_train.py (`--step official`): it is what train.compute_loss replaces, kept so the speed
difference can be measured on the same models and batch. Differences from train.compute_loss, all official:

* latents, noise and the noised input stay in weight_dtype (bf16): `randn_like(latents)` draws noise for all 2B
  images and the loser half is thrown away; `DDPMScheduler.add_noise` (§3.2);
* SDXL captions are tokenised inside the step (§2.6; ours are tokenised by the DataLoader workers);
* lambda comes from an autograd pass on a detached leaf, and `if den > 0` is a Python branch: a host sync (§3.4);
* reference losses are computed and rounded in bf16 (B10); the SDXL DSPO branch is a Python `if` (host sync, §3.5);
* every micro-step gathers seven metrics and reads the loss and accuracy on the host for the progress bar (§3.6).

The official policy runs xFormers attention; here both steps use the same attention, so the ratio isolates the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import train
from families.conditioning import sdxl_time_ids


def official_lose_scale(pred_eps: torch.Tensor, true_eps: torch.Tensor, mu: float, eps: float = 1e-9,
                        max_lambda: float = 1.0) -> torch.Tensor:
    """`get_adaptive_lose_l_scale` as SPEC Part B §3.4 describes it: gradients of the two mean-squared proxies by
    autograd, then lambda = (1 - mu) ||g_A||^2 / (<g_B, g_A> + eps) if <g_B, g_A> > 0 else max_lambda, clamped."""
    assert 0.0 <= mu <= 1.0
    with torch.enable_grad():
        pred = pred_eps.detach().clone().requires_grad_(True)
        pred_win, pred_lose = pred.chunk(2)
        true_win, true_lose = true_eps.chunk(2)
        proxy_win = F.mse_loss(pred_win, true_win.to(pred.dtype))
        proxy_lose = F.mse_loss(pred_lose, true_lose.to(pred.dtype))
        grad_win = torch.autograd.grad(proxy_win, pred, retain_graph=True)[0].chunk(2)[0]
        grad_lose = torch.autograd.grad(proxy_lose, pred)[0].chunk(2)[1]
    numerator = grad_win.pow(2).sum()
    denominator = (grad_lose * grad_win).sum()
    if denominator > 0:  # a Python branch on a device value: host sync
        scale = (1.0 - mu) * numerator / (denominator + eps)
    else:
        scale = torch.tensor(max_lambda, device=pred.device)
    return scale.clamp(0.0, max_lambda).detach().to(pred_eps.dtype)


def _encode_prompt_sdxl(captions, text_encoders, tokenizers, device):
    """SDXL prompt encoding at step time (official `encode_prompt_sdxl`): tokenise, both encoders' penultimate
    states concatenated, pooled = the second encoder's projected output."""
    states = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1), output[0]


def official_compute_loss(args, batch, unet, ref_unet, vae, text_encoders, noise_scheduler, weight_dtype, accelerator,
                          tokenizers=None):
    """One official-style micro-step, pixels to loss (same inputs as train.compute_loss); returns (loss, logs)."""
    preference = args.train_method in train.PREFERENCE_METHODS
    pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
    if preference:
        pixels = torch.cat(pixels.chunk(2, dim=1))
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor  # stays in weight_dtype
    noise = torch.randn_like(latents)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    if preference:  # pair sharing: the first half's noise and timesteps, repeated
        timesteps = timesteps.chunk(2)[0].repeat(2)
        noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    added = None
    with torch.no_grad():
        if args.sdxl:
            prompt_embeds, pooled = _encode_prompt_sdxl(batch["captions"], text_encoders, tokenizers, accelerator.device)
            time_ids = sdxl_time_ids(latents.shape[0], args.resolution, latents.device, weight_dtype)
            if preference:
                prompt_embeds, pooled = prompt_embeds.repeat(2, 1, 1), pooled.repeat(2, 1)
            added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids}
        else:
            prompt_embeds = text_encoders[0](batch["input_ids"])[0]
            if preference:
                prompt_embeds = prompt_embeds.repeat(2, 1, 1)

    model_pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample  # fp32 (accelerate autocast)
    target = noise
    logs = {}
    if preference:
        model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
        model_win, model_lose = model_losses.chunk(2)
        scale = official_lose_scale(model_pred, target, args.winner_preserving_mu) if args.use_winner_preserving else 1.0
        model_lose_scaled = model_lose.detach() + scale * (model_lose - model_lose.detach())
        model_diff = model_win - model_lose_scaled
        with torch.no_grad():
            ref_pred = ref_unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample.detach()
            ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])  # in weight_dtype (B10)
            ref_win, ref_lose = ref_losses.chunk(2)
            ref_diff = ref_win - ref_lose
        margin = -0.5 * args.beta_dpo * (model_diff - ref_diff)
        implicit_acc = (margin > 0).sum().float() / margin.size(0)
        if args.train_method == "diffusion-dpo":
            loss = -F.logsigmoid(margin).mean()
        elif args.train_method == "dmpo":
            loss = train.dmpo_loss(margin, args.dmpo_alpha).mean()
        elif not args.sdxl:
            win_pred, win_ref = model_pred.chunk(2)[0], ref_pred.chunk(2)[0]
            weight = (1 - torch.sigmoid(margin)).view(-1, 1, 1, 1)
            loss = ((win_pred - target.chunk(2)[0]) - args.beta_dpo * weight * (win_pred - win_ref)).pow(2).mean()
        else:
            drift = model_pred.chunk(2)[0] - ref_pred.chunk(2)[0]
            if drift.pow(2).mean() >= 0.1:  # Python branch: host sync
                loss = ((1 - torch.sigmoid(margin)).pow(2) * drift.pow(2).mean(dim=[1, 2, 3])).mean()
            else:
                loss = (1 - torch.sigmoid(margin)).pow(2).mean()
        batch_size = args.train_batch_size
        gathered = {  # official: each metric repeated B times, gathered across ranks, averaged
            "avg_loss": loss, "avg_model_mse": 0.5 * (model_win.mean() + model_lose.mean()),
            "avg_ref_mse": ref_losses.mean(), "avg_acc": implicit_acc,
            "avg_win_diff_loss": (model_win - ref_win).mean(), "avg_lose_diff_loss": (model_lose - ref_lose).mean(),
            "avg_lose_l_scale": torch.as_tensor(scale, device=loss.device, dtype=torch.float32),
        }
        logs = {k: accelerator.gather(v.detach().float().repeat(batch_size)).mean() for k, v in gathered.items()}
        logs["postfix"] = {"step_loss": loss.detach().item(), "implicit_acc": logs["avg_acc"].item()}  # host syncs
    else:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        logs["postfix"] = {"step_loss": loss.detach().item()}
    return loss, logs
