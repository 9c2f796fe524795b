"""Importance weights and timestep masking (our interpretation of arXiv:2505.21893): the closed-form KL against Monte
Carlo with the real DDPM scheduler, the weights, the weighted losses and their gradients by hand, and train.py end to
end with every method."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

import train
from families.noise import importance_log_weight_coefficients
from test_train import metrics, run_train

REPO = Path(__file__).resolve().parents[1]


def sd_scheduler():
    """The DDPM training schedule of SD1.5 and SDXL (scaled-linear 0.00085 -> 0.012, 1000 steps)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


def posterior_means(scheduler, t, x_t, x0, eps_hat):
    """DDPM Eq. 7 in its x_0 form (numpy, float64): the means of q(x_{t-1} | x_t, x_0) and of p_theta(x_{t-1} | x_t),
    whose x_0 is the one predicted from eps_hat, and the posterior variance (btilde_0 := btilde_1)."""
    abar = scheduler.alphas_cumprod.double().numpy()

    def coefficients(s):
        previous = abar[s - 1] if s > 0 else 1.0
        beta = 1 - abar[s] / previous
        return (np.sqrt(previous) * beta / (1 - abar[s]), np.sqrt(1 - beta) * (1 - previous) / (1 - abar[s]),
                (1 - previous) / (1 - abar[s]) * beta)

    coef_x0, coef_xt, variance = coefficients(t)
    if t == 0:
        variance = coefficients(1)[2]
    x0_hat = (x_t - np.sqrt(1 - abar[t]) * eps_hat) / np.sqrt(abar[t])
    return coef_x0 * x0 + coef_xt * x_t, coef_x0 * x0_hat + coef_xt * x_t, variance


@pytest.mark.parametrize("t", [0, 1, 7, 60, 500, 999])
def test_closed_form_kl_matches_monte_carlo(t):
    """log w = E_q[log p_theta - log q] / d, estimated with x_{t-1} drawn by diffusers' DDPMScheduler.step from q."""
    scheduler = sd_scheduler()
    coefficients = importance_log_weight_coefficients(scheduler)
    g = torch.Generator().manual_seed(t)
    shape = (1, 4, 2, 2)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    eps_hat = eps + (0.3 if t < 100 else 1.0) * torch.randn(shape, generator=g, dtype=torch.float64)
    x_t = scheduler.add_noise(x0, eps, torch.tensor([t]))
    mu_q, mu_p, variance = posterior_means(scheduler, t, x_t.numpy(), x0.numpy(), eps_hat.numpy())

    draws = 200_000
    if t > 0:  # the scheduler's own sample of q: with the true eps its predicted x_0 is x_0 itself
        x_prev = scheduler.step(eps.expand(draws, *shape[1:]), t, x_t.expand(draws, *shape[1:]), generator=g).prev_sample
        x_prev = x_prev.numpy()
        assert np.allclose(x_prev.mean(0), mu_q[0], atol=6 * np.sqrt(variance / draws))  # it really samples q
        assert x_prev.var(0).mean() == pytest.approx(variance, rel=0.02)
    else:  # diffusers adds no noise at t = 0; sample the clipped variance ourselves
        assert torch.allclose(scheduler.step(eps, 0, x_t).prev_sample, torch.from_numpy(mu_q))
        x_prev = mu_q + np.sqrt(variance) * np.random.default_rng(0).standard_normal((draws, *shape[1:]))
    log_ratio = ((x_prev - mu_q) ** 2 - (x_prev - mu_p) ** 2) / (2 * variance)  # log p_theta - log q, per element
    per_draw = log_ratio.reshape(draws, -1).mean(1)
    estimate, standard_error = per_draw.mean(), per_draw.std() / np.sqrt(draws)

    closed_form = train.log_importance_weight(eps_hat, eps, torch.tensor([t]), coefficients).item()
    assert closed_form < 0
    assert abs(estimate - closed_form) < 5 * standard_error + 1e-6 * abs(closed_form)
    assert estimate == pytest.approx(closed_form, rel=0.05)


def test_closed_form_equals_gaussian_kl_at_every_timestep():
    """-c_t mean((eps_hat - eps)^2) == -mean((mu_p - mu_q)^2) / (2 btilde_t) for all 1000 t (exact, no sampling)."""
    scheduler = sd_scheduler()
    coefficients = importance_log_weight_coefficients(scheduler)
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    eps_hat = eps + 0.5 * noise
    for t in range(1000):
        x_t = scheduler.add_noise(x0, eps, torch.tensor([t])).numpy()
        mu_q, mu_p, variance = posterior_means(scheduler, t, x_t, x0.numpy(), eps_hat.numpy())
        expected = -np.mean((mu_p - mu_q) ** 2) / (2 * variance)
        got = train.log_importance_weight(eps_hat, eps, torch.tensor([t]), coefficients).item()
        assert got == pytest.approx(expected, rel=2e-5), t


def test_log_weight_has_no_gradient_and_is_per_sample():
    coefficients = importance_log_weight_coefficients(sd_scheduler())
    pred = torch.randn(3, 4, 2, 2, requires_grad=True)
    noise = torch.zeros(3, 4, 2, 2)
    log_weight = train.log_importance_weight(pred, noise, torch.tensor([0, 10, 999]), coefficients)
    assert log_weight.shape == (3,) and not log_weight.requires_grad
    expected = -coefficients[[0, 10, 999]] * pred.detach().pow(2).flatten(1).mean(1)
    torch.testing.assert_close(log_weight, expected)


# --- the weights --------------------------------------------------------------------------------------------------


def test_clip_mask_weights():
    w = torch.tensor([0.05, 0.5, 0.8999, 0.9, 0.95, 1.0])
    weights = train.importance_weights(w.log(), "clip_mask", mask_below=0.9)
    assert weights.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert (weights == 0).float().mean().item() == pytest.approx(0.5)  # the masked fraction train.py logs
    assert train.importance_weights(w.log(), "clip_mask", mask_below=0.0).tolist() == [1.0] * 6
    assert train.importance_weights(w.log(), "clip_mask", mask_below=1.0).tolist() == [0.0] * 5 + [1.0]


def test_full_weights_are_clipped_and_normalised():
    g = torch.Generator().manual_seed(0)
    log_weight = -3 * torch.rand(64, generator=g)  # w in (0.05, 1]
    weights = train.importance_weights(log_weight, "full", clip_min=0.2, clip_max=0.9)
    clipped = np.clip(np.exp(log_weight.numpy()), 0.2, 0.9)
    np.testing.assert_allclose(weights.numpy(), clipped / clipped.mean(), rtol=1e-6)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.min() > 0 and (weights.max() / weights.min()).item() <= 0.9 / 0.2 + 1e-5
    same = train.importance_weights(torch.full((4,), -0.7), "full", clip_min=0.1, clip_max=1.0)
    assert same.tolist() == pytest.approx([1.0] * 4)
    with pytest.raises(ValueError, match="clip_mask' or 'full"):
        train.importance_weights(log_weight, "none")


# --- the weighted losses by hand ------------------------------------------------------------------------------------

B, C, H, W = 3, 2, 2, 2


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_weighted_dpo_loss_and_gradient_by_hand():
    """Weights from the policy's own prediction enter as constants: grad = mean_i v_i (-(1 - sigmoid(u_i))) du_i."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).repeat(2, 1, 1, 1)
    model_pred = (target + 0.5 * torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref_pred = target + 0.5 * torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([1, 3, 2]).repeat(2)  # small t: weights far from 1 and from each other
    coefficients = importance_log_weight_coefficients(sd_scheduler())
    log_weight = train.log_importance_weight(model_pred, target, timesteps, coefficients)
    win, lose = log_weight.chunk(2)
    weights = train.importance_weights(0.5 * (win + lose), "full", clip_min=0.1, clip_max=1.0)
    beta = 2.0
    loss, _ = train.preference_loss("diffusion-dpo", model_pred, ref_pred, target, beta, pair_weight=weights)

    mp, rp, t = (x.detach().numpy() for x in (model_pred, ref_pred, target))
    n = C * H * W
    mse, ref = ((mp - t) ** 2).reshape(2 * B, n).mean(1), ((rp - t) ** 2).reshape(2 * B, n).mean(1)
    c = coefficients[[1, 3, 2]].double().numpy()
    pair_w = np.exp(0.5 * (-c * mse[:B] - c * mse[B:]))
    v = np.clip(pair_w, 0.1, 1.0) / np.clip(pair_w, 0.1, 1.0).mean()
    assert len(set(np.round(v, 6))) == B  # the weights matter in this case
    u = -beta / 2 * ((mse[:B] - mse[B:]) - (ref[:B] - ref[B:]))
    assert loss.item() == pytest.approx(np.mean(v * -np.log(sigmoid(u))), rel=1e-6)
    expected = np.zeros_like(mp)
    for i in range(B):
        dloss_du = -(1 - sigmoid(u[i])) * v[i] / B
        expected[i] = dloss_du * (-beta / 2) * 2 * (mp[i] - t[i]) / n
        expected[B + i] = dloss_du * (beta / 2) * 2 * (mp[B + i] - t[B + i]) / n
    (grad,) = torch.autograd.grad(loss, model_pred)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-12)  # the weights are fp32


def test_weighted_sft_loss_and_gradient_by_hand():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    model_pred = (target + torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).requires_grad_(True)
    weights = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    loss = train.sft_loss(model_pred, target, sample_weight=weights)
    r = (model_pred - target).detach().numpy()
    n = C * H * W
    # the losses are fp32, as in training
    assert loss.item() == pytest.approx(np.mean(weights.numpy() * (r**2).reshape(B, n).mean(1)), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, model_pred)
    np.testing.assert_allclose(grad.numpy(), weights.numpy().reshape(B, 1, 1, 1) * 2 * r / (n * B), rtol=1e-6)
    unweighted = train.sft_loss(model_pred, target, sample_weight=torch.ones(B, dtype=torch.float64))
    assert unweighted.item() == pytest.approx(train.sft_loss(model_pred, target).item(), rel=1e-6)


# --- arguments -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--timestep_range", "500", "100"], "0 <= LO <= HI"),
    (["--timestep_range", "-1", "100"], "0 <= LO <= HI"),
    (["--importance_weighting", "full", "--train_batch_size", "1"], "every weight is 1"),
    (["--is_clip_min", "0.5", "--is_clip_max", "0.2"], "0 < min <= max"),
    (["--is_clip_min", "0"], "0 < min <= max"),
    (["--is_mask_below", "1.5"], "is_mask_below"),
])
def test_bad_arguments_are_named(extra, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "y", *extra])
    assert message in capsys.readouterr().err


def test_timestep_range_beyond_the_scheduler_is_an_error(tiny_sd15, pickapic, tmp_path):
    with pytest.raises(ValueError, match="HI must be at most 999"):
        run_train(tiny_sd15, pickapic, tmp_path, "--timestep_range", "0", "1000", steps=1)


# --- end to end ------------------------------------------------------------------------------------------------------


@pytest.fixture
def unet_timesteps(monkeypatch):
    """Records the timesteps every UNet forward receives (the real forward still runs)."""
    seen = []
    forward = UNet2DConditionModel.forward

    def recording_forward(self, sample, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).flatten().cpu())
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    return seen


@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo", "sft"])
@pytest.mark.parametrize("mode", ["clip_mask", "full"])
def test_every_method_trains_with_importance_weights(tiny_sd15, pickapic, tmp_path, method, mode, unet_timesteps):
    extra = ["--train_method", method, "--dmpo_alpha", "0.01", "--importance_weighting", mode,
             "--timestep_range", "100", "899", "--gradient_accumulation_steps", "2", "--is_mask_below", "0.97"]
    if method == "dspo":
        extra += ["--beta_dpo", "0.001"]
    if method != "sft":
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    assert run_train(tiny_sd15, pickapic, tmp_path, *extra, steps=1) == 1

    seen = torch.cat(unet_timesteps)
    assert len(seen) > 0 and seen.min() >= 100 and seen.max() <= 899
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [1]
    for m in logged:
        assert np.isfinite(m["train_loss"])
        assert 0 < m["is_weight_min"] <= m["is_weight_mean"] <= m["is_weight_max"] <= 1
        assert 0 <= m["is_masked_fraction"] <= 1
        if mode == "full":
            assert m["is_masked_fraction"] == 0
    assert (tmp_path / "unet.safetensors").exists()


def test_sdxl_trains_with_importance_weights(tiny_sdxl, pickapic, tmp_path):
    run_train(tiny_sdxl, pickapic, tmp_path, "--importance_weighting", "full", "--use_winner_preserving",
              "--winner_preserving_mu", "0.5", steps=1, sdxl=True)
    assert all(0 < m["is_weight_mean"] <= 1 for m in metrics(tmp_path))


def test_timestep_range_drives_the_mask(tiny_sd15, pickapic, tmp_path, unet_timesteps):
    """On the untrained tiny UNet (eps-MSE about 1): at t = 0 (c_0 = 1) w is about e^-1 and every pair is masked, so
    the loss is 0; at t in [400, 600] (c_t < 0.004) w > 0.99 and nothing is; with no mask the loss is unchanged."""
    run_train(tiny_sd15, pickapic, tmp_path / "t0", "--timestep_range", "0", "0", "--importance_weighting", "clip_mask",
              steps=1)
    assert torch.cat(unet_timesteps).unique().tolist() == [0]
    assert all(m["is_masked_fraction"] == 1 and m["train_loss"] == 0 for m in metrics(tmp_path / "t0"))
    assert all(m["is_weight_max"] < 0.9 for m in metrics(tmp_path / "t0"))

    common = ["--timestep_range", "400", "600"]
    run_train(tiny_sd15, pickapic, tmp_path / "mid", *common, "--importance_weighting", "clip_mask", steps=1)
    run_train(tiny_sd15, pickapic, tmp_path / "plain", *common, steps=1)
    weighted, plain = metrics(tmp_path / "mid"), metrics(tmp_path / "plain")
    assert all(m["is_masked_fraction"] == 0 and m["is_weight_min"] > 0.99 for m in weighted)
    assert [m["train_loss"] for m in weighted] == [m["train_loss"] for m in plain]  # weights of 1 change nothing
    assert "is_weight_mean" not in plain[0]


# --- the analysis script ---------------------------------------------------------------------------------------------


def test_analysis_script_on_the_tiny_model(tiny_sd15, pickapic, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("analyze_importance", REPO / "scripts" / "analyze_importance.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "analysis"
    script.main(["--pretrained_model_name_or_path", str(tiny_sd15), "--dataset_name", str(pickapic), "--resolution", "32",
                 "--max_pairs", "4", "--num_bins", "4", "--batch_size", "4", "--output_dir", str(out), "--device", "cpu"])
    summary = json.loads((out / "importance.json").read_text())
    bins = summary["bins"]
    assert [b["t_low"] for b in bins] == [0, 250, 500, 750] and bins[-1]["t_high"] == 999
    for b in bins:
        assert b["count"] == 4
        for who in ("win", "lose"):
            assert b[f"mean_log_w_{who}"] < 0 and 0 < b[f"mean_w_{who}"] <= 1
            assert b[f"mean_w_{who}"] >= np.exp(b[f"mean_log_w_{who}"]) - 1e-9  # Jensen
    # the untrained UNet predicts eps about equally badly everywhere, so w follows c_t: lowest near t = 0
    assert bins[0]["mean_log_w_win"] < min(b["mean_log_w_win"] for b in bins[1:])
    assert (out / "importance.csv").read_text().splitlines()[0].startswith("t_low,t_high,count")
    from PIL import Image

    assert Image.open(out / "importance.png").size[0] > 100
