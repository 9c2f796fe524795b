"""The losses and the safeguard against hand computations (numpy, written from the equations, not from train.py)."""

import math

import numpy as np
import pytest
import torch

import train

B, C, H, W = 3, 2, 2, 2


def fixed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, C, H, W, generator=g).repeat(2, 1, 1, 1)  # winner i and loser i share the noise
    model_pred = target + 0.5 * torch.randn(2 * B, C, H, W, generator=g)
    ref_pred = target + 0.5 * torch.randn(2 * B, C, H, W, generator=g)
    return model_pred.double(), ref_pred.double(), target.double()


def np_terms(model_pred, ref_pred, target, beta, lam=1.0):
    """Per-sample MSEs, margins and the analytic d u_i / d model_pred, all in numpy."""
    mp, rp, t = (x.detach().numpy().astype(np.float64) for x in (model_pred, ref_pred, target))
    n = C * H * W
    mse = ((mp - t) ** 2).reshape(2 * B, -1).mean(1)
    ref = ((rp - t) ** 2).reshape(2 * B, -1).mean(1)
    u = -beta / 2 * ((mse[:B] - mse[B:]) - (ref[:B] - ref[B:]))
    du = np.zeros((B,) + mp.shape)  # du_i/dpred: winners -(beta/2) 2R/n, losers +(beta/2) lam 2R/n
    for i in range(B):
        du[i, i] = -beta / 2 * 2 * (mp[i] - t[i]) / n
        du[i, B + i] = beta / 2 * lam * 2 * (mp[B + i] - t[B + i]) / n
    return mse, ref, u, du


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g.numpy()


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_diffusion_dpo_value_and_gradient(lam):
    model_pred, ref_pred, target = fixed_inputs()
    model_pred.requires_grad_(True)
    beta = 2.0
    loss, stats = train.preference_loss("diffusion-dpo", model_pred, ref_pred, target, beta, loser_scale=lam)
    mse, ref, u, du = np_terms(model_pred, ref_pred, target, beta, lam)
    assert loss.item() == pytest.approx(np.mean(-np.log(sigmoid(u))), rel=1e-6)
    # d/dpred mean_i -log sigmoid(u_i) = mean_i -(1 - sigmoid(u_i)) du_i
    expected = np.mean([-(1 - sigmoid(u[i])) * du[i] for i in range(B)], axis=0)
    np.testing.assert_allclose(grad_of(loss, model_pred), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(stats["margin"].numpy(), u, rtol=1e-6)  # lambda leaves values unchanged
    assert stats["implicit_acc"].item() == pytest.approx(np.mean(u > 0))
    np.testing.assert_allclose(stats["model_win_loss"].numpy(), mse[:B], rtol=1e-6)
    np.testing.assert_allclose(stats["ref_lose_loss"].numpy(), ref[B:], rtol=1e-6)


def test_dmpo_value_and_gradient():
    model_pred, ref_pred, target = fixed_inputs(1)
    model_pred.requires_grad_(True)
    beta, alpha = 3.0, 0.01
    loss, _ = train.preference_loss("dmpo", model_pred, ref_pred, target, beta, dmpo_alpha=alpha)
    _, _, u, du = np_terms(model_pred, ref_pred, target, beta)
    p, q = sigmoid(u), 1 - alpha
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert loss.item() == pytest.approx(kl.mean(), rel=1e-6)
    # dKL/du = p (1 - p) (u - logit q)
    dkl = p * (1 - p) * (u - math.log(q / (1 - q)))
    expected = np.mean([dkl[i] * du[i] for i in range(B)], axis=0)
    np.testing.assert_allclose(grad_of(loss, model_pred), expected, rtol=1e-5, atol=1e-12)


def test_dmpo_minimum_at_target_margin():
    u = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    losses = train.dmpo_loss(u, alpha=0.01)
    assert u[losses.argmin()].item() == pytest.approx(math.log(0.99 / 0.01), abs=0.02)


def test_dspo_sd15_value_and_gradient():
    model_pred, ref_pred, target = fixed_inputs(2)
    model_pred.requires_grad_(True)
    beta = 0.5
    loss, _ = train.preference_loss("dspo", model_pred, ref_pred, target, beta)
    mp, rp, t = (x.detach().numpy() for x in (model_pred, ref_pred, target))
    _, _, u, du = np_terms(model_pred, ref_pred, target, beta)
    w = 1 - sigmoid(u)
    inner = [(mp[i] - t[i]) - beta * w[i] * (mp[i] - rp[i]) for i in range(B)]
    assert loss.item() == pytest.approx(np.mean([np.mean(x**2) for x in inner]), rel=1e-6)
    # d/dpred of mean(inner_i^2): direct part on the winner, plus the dependence through w_i = 1 - sigmoid(u_i)
    n = C * H * W
    expected = np.zeros_like(mp)
    for i in range(B):
        expected[i] += 2 * inner[i] * (1 - beta * w[i]) / n / B
        dw = -sigmoid(u[i]) * (1 - sigmoid(u[i])) * du[i]
        expected += np.sum(2 * inner[i] * (-beta) * (mp[i] - rp[i])) / n / B * dw
    np.testing.assert_allclose(grad_of(loss, model_pred), expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("drift", [0.05, 1.0])  # both branches of the SDXL rule (threshold 0.1 on mean D^2)
def test_dspo_sdxl_branches(drift):
    model_pred, _, target = fixed_inputs(3)
    ref_pred = model_pred.clone()
    ref_pred[:B] -= drift
    beta = 0.5
    loss, _ = train.preference_loss("dspo", model_pred, ref_pred, target, beta, sdxl=True)
    _, _, u, _ = np_terms(model_pred, ref_pred, target, beta)
    w = 1 - sigmoid(u)
    d2 = drift**2
    expected = np.mean(w**2 * d2) if d2 >= 0.1 else np.mean(w**2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sft_loss():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert train.sft_loss(pred, target).item() == 1.0


def test_losses_are_fp32_from_bf16_inputs():
    model_pred, ref_pred, target = (x.to(torch.bfloat16) for x in fixed_inputs(4))
    loss, stats = train.preference_loss("diffusion-dpo", model_pred, ref_pred, target, 5000.0)
    assert loss.dtype == torch.float32 and stats["ref_win_loss"].dtype == torch.float32


def test_pair_weight_multiplies_each_pair():
    model_pred, ref_pred, target = fixed_inputs(5)
    weights = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    loss, _ = train.preference_loss("diffusion-dpo", model_pred, ref_pred, target, 2.0, pair_weight=weights)
    _, _, u, _ = np_terms(model_pred, ref_pred, target, 2.0)
    assert loss.item() == pytest.approx(np.mean(weights.numpy() * -np.log(sigmoid(u))), rel=1e-6)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        train.preference_loss("ipo", *fixed_inputs(), 1.0)


# --- the safeguard -------------------------------------------------------------------------------------------


def np_lambda(model_pred, target, mu, per_sample=False):
    r = (model_pred - target).numpy()
    rw, rl = r[:B], r[B:]
    if per_sample:
        return np.array([np_lambda_from(rw[i], rl[i], mu) for i in range(B)])
    return np_lambda_from(rw, rl, mu)


def np_lambda_from(rw, rl, mu):
    n = rw.size
    num, den = (1 - mu) * 4 * np.sum(rw * rw) / n**2, 4 * np.sum(rl * rw) / n**2
    return 1.0 if den <= 0 else float(np.clip(num / (den + 1e-9), 0, 1))


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_lambda_against_hand_computation(mu, granularity):
    model_pred, _, target = fixed_inputs(6)
    model_pred[B:] = target[B:] + 0.8 * (model_pred[:B] - target[:B]) + 0.1  # losers aligned with winners
    lam = train.winner_preserving_scale(model_pred, target, mu, granularity)
    expected = np_lambda(model_pred, target, mu, per_sample=granularity == "sample")
    assert lam.shape == (() if granularity == "batch" else (B,))
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-6)
    assert not lam.requires_grad


def test_lambda_corner_cases():
    target = torch.zeros(2, 1, 2, 2)
    win = torch.ones(1, 1, 2, 2)
    # Non-positive alignment <R_l, R_w> <= 0 gives 1, whatever mu.
    assert train.winner_preserving_scale(torch.cat([win, -win]), target, 0.9).item() == 1.0
    assert train.winner_preserving_scale(torch.cat([win, torch.zeros_like(win)]), target, 0.9).item() == 1.0
    # A loser residual much smaller than the winner's: the bound exceeds 1 and is clamped.
    assert train.winner_preserving_scale(torch.cat([win, 0.01 * win]), target, 0.0).item() == 1.0
    # Equal residuals: lambda = 1 - mu (up to the 1e-9 in the denominator); mu = 1 forbids any loser push.
    assert train.winner_preserving_scale(torch.cat([win, win]), target, 0.0).item() == pytest.approx(1.0, abs=1e-6)
    assert train.winner_preserving_scale(torch.cat([win, win]), target, 0.25).item() == pytest.approx(0.75, abs=1e-6)
    assert train.winner_preserving_scale(torch.cat([win, win]), target, 1.0).item() == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train.winner_preserving_scale(torch.cat([win, win]), target, 1.5)
    with pytest.raises(ValueError, match="granularity"):
        train.winner_preserving_scale(torch.cat([win, win]), target, 0.5, "pixel")


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_first_order_guarantee(granularity):
    """<-g_w + lambda g_l, g_w> <= -mu ||g_w||^2 in output space (g = residual), on many random cases."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        mu = float(torch.rand((), generator=g))
        target = torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64)
        r_w = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
        mix = torch.rand((), generator=g) * 3 - 1  # from anti-aligned to strongly aligned losers
        r_l = mix * r_w + torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * torch.rand((), generator=g)
        lam = train.winner_preserving_scale(target + torch.cat([r_w, r_l]), target, mu, granularity)
        lam = lam.view(-1, 1, 1, 1) if granularity == "sample" else lam
        dims = (1, 2, 3) if granularity == "sample" else (0, 1, 2, 3)
        lhs = ((-r_w + lam * r_l) * r_w).sum(dims)
        rhs = -mu * (r_w * r_w).sum(dims)
        slack = 1e-5 * (r_w * r_w).sum(dims)  # lambda is computed in fp32
        assert torch.all(lhs <= rhs + slack), (trial, lhs, rhs)


def test_safeguard_scales_only_the_loser_gradient():
    model_pred, ref_pred, target = fixed_inputs(7)
    model_pred.requires_grad_(True)
    full = grad_of(train.preference_loss("diffusion-dpo", model_pred, ref_pred, target, 2.0)[0], model_pred)
    lam = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    scaled = grad_of(train.preference_loss("diffusion-dpo", model_pred, ref_pred, target, 2.0, loser_scale=lam)[0],
                     model_pred)
    np.testing.assert_allclose(scaled[:B], full[:B], rtol=1e-5)  # winners untouched (u unchanged in value)
    np.testing.assert_allclose(scaled[B:], full[B:] * lam.view(-1, 1, 1, 1).numpy(), rtol=1e-5, atol=1e-12)


def winner_change_along_the_update(method, off_w, off_l, ref_pred, target, mu, granularity, beta, alpha=0.01):
    """First-order change of the winners' summed denoising loss along -grad of the safeguarded loss, for a model
    whose pair i outputs theta_i + offset for winner and loser alike: its parameter gradients are the residuals (up to
    2/N), the setting in which the safeguard's inequality is stated. Returns (change, margins)."""
    theta = torch.zeros_like(off_w, requires_grad=True)
    pred = torch.cat([theta + off_w, theta + off_l])
    lam = train.winner_preserving_scale(pred, target, mu, granularity)
    lam = lam.double()
    loss, stats = train.preference_loss(method, pred, ref_pred, target, beta, dmpo_alpha=alpha, loser_scale=lam)
    (grad,) = torch.autograd.grad(loss, theta)
    (winner_grad,) = torch.autograd.grad(train.per_sample_mse(pred, target)[: len(off_w)].sum(), theta)
    return float((-grad * winner_grad).sum()), stats["margin"]


def test_diffusion_dpo_winner_loss_does_not_rise_per_pair():
    """Diffusion-DPO's loss falls in every margin (its derivative is -(1 - sigmoid(u)) < 0), so with one lambda per
    pair each winner's loss falls to first order: on random cases, with pairs of very different scales."""
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        scale = torch.exp(1.5 * torch.randn(B, 1, 1, 1, generator=g, dtype=torch.float64))
        target = torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64)
        off_w = target[:B] + scale * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
        off_l = target[B:] + scale * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
        ref = target + scale.repeat(2, 1, 1, 1) * torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64)
        change, _ = winner_change_along_the_update("diffusion-dpo", off_w, off_l, ref, target, 0.5, "sample", 1000.0)
        assert change <= 1e-9, (trial, change)


def two_pair_case():
    """Pair 0: a small winner residual, a loser residual aligned with it, and a low margin (large loss weight);
    pair 1: a large winner residual, an orthogonal loser, a high margin (small weight)."""
    e = torch.eye(C * H * W, dtype=torch.float64).view(-1, C, H, W)
    target = torch.zeros(4, C, H, W, dtype=torch.float64)
    off_w, off_l = torch.stack([0.1 * e[0], 3.0 * e[1]]), torch.stack([1.0 * e[0], 3.0 * e[2]])
    ref = torch.stack([0 * e[0], 10 * e[4], 10 * e[3], 0 * e[0]])
    return off_w, off_l, ref, target


def test_diffusion_dpo_batch_lambda_holds_for_the_sum_of_residuals_not_for_every_weighting():
    """One lambda per micro-batch (the default, official) bounds the unweighted sum of <-g_w + lambda g_l, g_w>; the
    loss weighs pairs by their margins, so with two pairs of very different margins the winners' loss can rise:
    the guarantee is per pair, or for a micro-batch of one pair (docs/training.md, "The safeguard")."""
    off_w, off_l, ref, target = two_pair_case()
    batch, margins = winner_change_along_the_update("diffusion-dpo", off_w, off_l, ref, target, 0.5, "batch", 1.0)
    per_pair, _ = winner_change_along_the_update("diffusion-dpo", off_w, off_l, ref, target, 0.5, "sample", 1.0)
    assert margins[0] < -5 and margins[1] > 5
    assert batch > 0 > per_pair


def test_dmpo_winner_loss_can_rise_with_the_safeguard():
    """DMPO's loss is minimised at u = logit(1 - alpha): above it its derivative is positive, the update pulls the
    margin down through the winner's own term, and lambda, which scales only the loser's term, cannot stop the
    winner's loss from rising (the official code behaves the same); below it the winner's loss falls."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    off_w = target[:1] + 0.1 * torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    off_l = target[1:] + 0.1 * torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    target_margin = math.log(0.99 / 0.01)  # logit(1 - alpha), alpha 0.01
    for ref_win_error, above in ((3.0, True), (0.0, False)):  # a bad reference winner: a high margin
        ref = target + torch.cat([ref_win_error * torch.ones(1, C, H, W, dtype=torch.float64),
                                  0.1 * torch.randn(1, C, H, W, generator=g, dtype=torch.float64)])
        for granularity in ("batch", "sample"):
            change, margins = winner_change_along_the_update("dmpo", off_w, off_l, ref, target, 0.9, granularity, 10.0)
            assert (float(margins[0]) > target_margin) == above
            assert (change > 0) == above, (ref_win_error, granularity, change, margins)
