"""Parametrisations: how a clean latent is noised, what the denoiser is trained to predict, and the importance-weight
coefficients of each. The losses never see which one is used: they take a prediction, its target and the
reference's prediction, and L = mean((prediction - target)^2) per sample.

- `DDPMNoise` (SD1.x, SDXL: epsilon; SD2.x-768: v-prediction, as the scheduler config says):
  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t an integer DDPM index drawn uniformly from --timestep_range;
  target eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (diffusers' `scheduler.get_velocity`).
- `FlowNoise` (SD3, FLUX: rectified flow): x_s = (1 - s) x_0 + s eps with s a sigma of the scheduler's training grid,
  its index drawn from --weighting_scheme's density (SD3's logit-normal by default) as diffusers' SD3/FLUX training
  scripts draw it; target eps - x_0.

Winner i and loser i share their noise and timestep in every parametrisation. Importance weights (docs/importance.md):
log w = -c mean((prediction - target)^2) per sample, with c per training timestep from `log_weight_coefficients`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Noised:
    """One micro-batch's noised latents. `timesteps` go to the denoiser; `index` (0..N-1) indexes the coefficient
    table; `importance_target` is the target built from the noise that actually made `noisy` (with
    --input_perturbation it differs from `target`, which the official loss keeps on the unperturbed noise)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    index: torch.Tensor
    target: torch.Tensor
    importance_target: torch.Tensor


def ones(latents: torch.Tensor) -> tuple[int, ...]:
    """(1,) * (latents.dim() - 1): broadcasts a per-sample value over a latent of any rank, (N, C, H, W) images or
    (N, C, F, H, W) videos; for images exactly the former (1, 1, 1), so image runs draw and compute as before."""
    return (1,) * (latents.dim() - 1)


def gaussian_path_coefficients(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c_k with KL(q(x_{k-1}|x_k, x_0) || p_theta(x_{k-1}|x_k)) / d = c_k mean((x0_hat - x_0)^2), float64.

    For a Gaussian path x_k = alpha_k x_0 + sigma_k eps on a grid ordered by increasing noise (k = 0 least noise;
    alpha_{-1} = 1, sigma_{-1} = 0), the Markov forward step k-1 -> k has alpha_{k|k-1} = alpha_k / alpha_{k-1} and
    sigma_{k|k-1}^2 = sigma_k^2 - alpha_{k|k-1}^2 sigma_{k-1}^2 (Kingma et al., VDM, 2021). The ancestral reverse step
    p_theta is the posterior with x_0 replaced by the model's x0_hat, so the two Gaussians share their variance
    sigma_{k|k-1}^2 sigma_{k-1}^2 / sigma_k^2 and their means differ by
    (alpha_{k-1} sigma_{k|k-1}^2 / sigma_k^2) (x0_hat - x_0), which gives

        c_k = alpha_{k-1}^2 sigma_{k|k-1}^2 / (2 sigma_k^2 sigma_{k-1}^2).

    At k = 0 the posterior variance is 0 (sigma_{-1} = 0); c_0 := c_1, as DDPM clips its first posterior variance.
    """
    alpha, sigma = alpha.double(), sigma.double()
    alpha_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha[:-1]])
    sigma_prev = torch.cat([torch.zeros(1, dtype=torch.float64), sigma[:-1]])
    step_variance = sigma.pow(2) - (alpha / alpha_prev).pow(2) * sigma_prev.pow(2)
    coefficients = alpha_prev.pow(2) * step_variance / (2 * sigma.pow(2) * sigma_prev.pow(2))
    coefficients[0] = coefficients[1]
    return coefficients


class DDPMNoise:
    """The discrete DDPM forward process of SD1.x/SD2.x/SDXL, epsilon or v-prediction."""

    def __init__(self, scheduler, prediction_type: str | None = None):
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r}: the DDPM families train 'epsilon' or "
                             f"'v_prediction' (sample prediction is not supported)")
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.float()

    def to(self, device):
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def sample(self, latents: torch.Tensor, pairs: int, preference: bool, args) -> Noised:
        """Noise and timesteps for `pairs` (winner and loser share both), in the official draw order: noise, the
        offset noise, timesteps, then the input perturbation."""
        noise = torch.randn(pairs, *latents.shape[1:], device=latents.device)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn(pairs, latents.shape[1], *ones(latents)[1:], device=latents.device)
        timesteps = torch.randint(args.timestep_range[0], args.timestep_range[1] + 1, (pairs,), device=latents.device)
        noise_in = noise
        if args.input_perturbation:  # perturb after sharing, so winner and loser get the same noise (B5)
            noise_in = noise + args.input_perturbation * torch.randn_like(noise)
        if preference:
            noise, noise_in, timesteps = noise.repeat(2, *ones(noise)), noise_in.repeat(2, *ones(noise)), timesteps.repeat(2)
        abar = self.alphas_cumprod[timesteps].view(-1, *ones(latents))
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise_in  # DDPM q(x_t | x_0) in fp32
        if self.prediction_type == "epsilon":
            target, importance_target = noise, noise_in
        else:  # v = sqrt(abar) eps - sqrt(1 - abar) x_0, as scheduler.get_velocity
            target = abar.sqrt() * noise - (1 - abar).sqrt() * latents
            importance_target = abar.sqrt() * noise_in - (1 - abar).sqrt() * latents
        return Noised(noisy, timesteps, timesteps, target, importance_target)

    def log_weight_coefficients(self) -> torch.Tensor:
        """c per DDPM index for the residual of what is predicted: epsilon c_t (see
        importance_log_weight_coefficients below); v: eps_hat - eps = sqrt(abar_t) (v_hat - v), so c_t abar_t."""
        coefficients = importance_log_weight_coefficients(self.scheduler)
        if self.prediction_type == "v_prediction":
            abar = self.scheduler.alphas_cumprod.double()
            coefficients = coefficients.double() * abar
            # A zero-terminal-SNR schedule (CogVideoX: rescale_betas_zero_snr) has abar_T = 0, where the epsilon
            # coefficient divides by alpha_T = 0 and c_T abar_T is inf * 0. The v coefficient itself is finite:
            # c_t abar_t = beta_t abar_{t-1} / (2 (1 - abar_{t-1})) (c_t = beta_t / (2 alpha_t (1 - abar_{t-1})),
            # abar_t = alpha_t abar_{t-1}), at T (beta_T = 1) abar_{T-1} / (2 (1 - abar_{T-1})): from pure noise the
            # reverse step is q(x_{T-1} | x_0) = N(sqrt(abar_{T-1}) x_0, 1 - abar_{T-1}) against the same Gaussian
            # around x0_hat, and x0_hat - x_0 = -(v_hat - v) there. Only the non-finite entries are replaced, so
            # schedules without a zero abar keep their numbers bit for bit.
            previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
            limit = (1 - abar / previous) * previous / (2 * (1 - previous))
            coefficients = torch.where(torch.isfinite(coefficients), coefficients, limit).float()
        return coefficients


class FlowNoise:
    """Rectified flow on the scheduler's sigma grid (FlowMatchEulerDiscreteScheduler, its shift included): as diffusers'
    SD3 and FLUX training scripts, u is drawn from the --weighting_scheme density, index = floor(u N), s = sigmas[index]
    (sigmas descend, so a small u is much noise), and the denoiser sees timestep s N (FLUX: s, see the family)."""

    def __init__(self, scheduler, args):
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.sigmas = scheduler.sigmas.float()[: self.num_timesteps]
        self.timesteps = scheduler.timesteps.float()[: self.num_timesteps]
        self.scheme, self.args = args.weighting_scheme, args
        low, high = args.timestep_range
        self.restricted = (low, high) != (0, self.num_timesteps - 1)
        if self.restricted and self.scheme == "mode":
            raise ValueError("--timestep_range with --weighting_scheme mode: the mode density cannot be restricted "
                             "exactly; use logit_normal or uniform")
        # --timestep_range counts noise levels from the least noisy (0), as for DDPM: noise level j = N - 1 - index.
        self.u_range = ((self.num_timesteps - 1 - high) / self.num_timesteps, (self.num_timesteps - low) / self.num_timesteps)

    def to(self, device):
        self.sigmas, self.timesteps = self.sigmas.to(device), self.timesteps.to(device)
        return self

    def draw_u(self, pairs: int, device) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        args = self.args
        if not self.restricted:
            return compute_density_for_timestep_sampling(self.scheme, pairs, args.logit_mean, args.logit_std,
                                                         args.mode_scale, device=device)
        low, high = self.u_range
        if self.scheme == "uniform":
            return low + (high - low) * torch.rand(pairs, device=device)
        # logit-normal truncated to [low, high): inverse CDF of the normal between the two logits
        def cdf(u):
            if u <= 0:
                return 0.0
            if u >= 1:
                return 1.0
            return 0.5 * (1 + math.erf((math.log(u / (1 - u)) - args.logit_mean) / (args.logit_std * math.sqrt(2))))

        a, b = cdf(low), cdf(high)
        z = args.logit_mean + args.logit_std * torch.special.ndtri(a + (b - a) * torch.rand(pairs, device=device))
        return torch.sigmoid(z)

    def sample(self, latents: torch.Tensor, pairs: int, preference: bool, args) -> Noised:
        noise = torch.randn(pairs, *latents.shape[1:], device=latents.device)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn(pairs, latents.shape[1], *ones(latents)[1:], device=latents.device)
        u = self.draw_u(pairs, latents.device)
        index = (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)
        noise_in = noise
        if args.input_perturbation:
            noise_in = noise + args.input_perturbation * torch.randn_like(noise)
        if preference:
            noise, noise_in, index = noise.repeat(2, *ones(noise)), noise_in.repeat(2, *ones(noise)), index.repeat(2)
        sigma = self.sigmas[index].view(-1, *ones(latents))
        noisy = (1 - sigma) * latents + sigma * noise_in
        # The coefficient table runs from the least noise (0) up, the scheduler's grid from the most: flip the index.
        return Noised(noisy, self.timesteps[index], self.num_timesteps - 1 - index, noise - latents, noise_in - latents)

    def log_weight_coefficients(self) -> torch.Tensor:
        """c per noise level (0 = least noise) for the velocity residual: the Gaussian path alpha = 1 - s, sigma = s on
        the scheduler's grid with gaussian_path_coefficients, times s^2 (x0_hat - x_0 = -s (v_hat - v))."""
        sigmas = self.sigmas.double().cpu().flip(0)  # ascending noise
        return (gaussian_path_coefficients(1 - sigmas, sigmas) * sigmas.pow(2)).float()


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
