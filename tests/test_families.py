"""Model families (families/): detection and refusals, every family x method x safeguard end to end, LoRA and exact
resume per family, each parametrisation's target and importance weight against hand and Monte Carlo computations,
and SD1.5/SDXL steps bit-identical to the pre-family implementation."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import families
import train
from data.pairs import PairDataset
from families.conditioning import sdxl_time_ids
from families.noise import importance_log_weight_coefficients
from families import DDPMNoise, FlowNoise, gaussian_path_coefficients
from test_beyond import tiny_scorers  # noqa: F401 - a fixture
from test_train import metrics, reset_accelerate, run_train, train_args


@pytest.fixture(scope="module")
def models(tiny_sd15, tiny_sdxl, tiny_sd2v, tiny_sd3, tiny_flux):
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd2v": tiny_sd2v, "sd3": tiny_sd3, "flux": tiny_flux}


def parse(model, *extra):
    return train.parse_args(["--pretrained_model_name_or_path", str(model), "--dataset_name", "d", *extra])


# --- detection and refusals --------------------------------------------------------------------------------------


def test_family_is_read_from_model_index(models):
    expected = {"sd15": "sd", "sdxl": "sdxl", "sd2v": "sd", "sd3": "sd3", "flux": "flux"}
    for name, family in expected.items():
        args = parse(models[name])
        assert args.model_family == family and args.sdxl == (family == "sdxl")
    args = parse(models["sd3"])
    assert args.resolution == 1024 and "add_k_proj" in args.lora_target_modules and "ff.net.2" in args.lora_target_modules
    assert parse("no/such-model").model_family == "sd"  # nothing to read: the official default
    assert parse("no/such-model", "--sdxl").model_family == "sdxl"


@pytest.mark.parametrize("flags, message", [
    (["--sdxl"], "is a sd3 model (its model_index.json), not sdxl: drop --sdxl"),
    (["--model_family", "flux"], "is a sd3 model (its model_index.json), not flux"),
    (["--sdxl", "--model_family", "sd3"], "--sdxl contradicts --model_family sd3"),
    (["--resolution", "40"], "must be a multiple of 16 for sd3"),
])
def test_contradictions_are_refused(models, capsys, flags, message):
    with pytest.raises(SystemExit):
        parse(models["sd3"], *flags)
    assert message in capsys.readouterr().err


def test_missing_component_is_named(models, pickapic, tmp_path):
    import shutil

    model = tmp_path / "sd3"
    shutil.copytree(models["sd3"], model)
    shutil.rmtree(model / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match="has no text_encoder_3/ folder: a sd3 model needs"):
        run_train(model, pickapic, tmp_path / "out")


# --- every family trains ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd2v", "sd3", "flux"])
@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo", "sft"])
@pytest.mark.parametrize("safeguard", [False, True], ids=["plain", "safeguard"])
def test_every_family_and_method_trains(models, pickapic, tmp_path, name, method, safeguard):
    extra = ["--train_method", method, "--dmpo_alpha", "0.01"] + (["--beta_dpo", "0.001"] if method == "dspo" else [])
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    assert run_train(models[name], pickapic, tmp_path, *extra) == 2
    logged = metrics(tmp_path)
    assert all(math.isfinite(m["train_loss"]) for m in logged)
    stem = "unet" if name == "sd2v" else "transformer"
    trained = load_file(str(tmp_path / f"{stem}.safetensors"))
    base = load_file(str(models[name] / stem / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    if method != "sft":
        scale = logged[-1]["avg_lose_l_scale"]
        assert (0.0 <= scale <= 1.0) if safeguard else scale == 1.0


@pytest.mark.parametrize("name", ["sd2v", "sd3", "flux"])
def test_importance_weighting_and_timestep_range_per_family(models, pickapic, tmp_path, name):
    run_train(models[name], pickapic, tmp_path, "--importance_weighting", "full", "--timestep_range", "100", "600")
    logged = metrics(tmp_path)[-1]
    assert 0 < logged["is_weight_min"] <= logged["is_weight_mean"] <= logged["is_weight_max"] <= 1


@pytest.mark.parametrize("name", ["sd2v", "sd3", "flux"])
def test_lora_per_family_loads_in_its_pipeline(models, pickapic, tmp_path, name):
    import diffusers

    run_train(models[name], pickapic, tmp_path, "--use_lora", "--use_ema", "--learning_rate", "1e-2")
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    pipeline_class = getattr(diffusers, families.FAMILIES[parse(models[name]).model_family].pipeline_class)
    pipeline = pipeline_class.from_pretrained(models[name])
    denoiser = pipeline.unet if name == "sd2v" else pipeline.transformer
    pipeline.load_lora_weights(tmp_path)
    trained_b = [p for n, p in denoiser.named_parameters() if "lora_B" in n]
    assert trained_b and any(p.abs().sum() > 0 for p in trained_b)  # B starts at zero: the trained values arrived


@pytest.mark.parametrize("name", ["sd2v", "sd3", "flux"])
def test_resume_is_exact_per_family(models, pickapic, tmp_path, name):
    common = ["--max_train_samples", "8", "--checkpointing_steps", "2", "--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    run_train(models[name], pickapic, tmp_path / "straight", *common, steps=4)
    run_train(models[name], pickapic, tmp_path / "resumed", *common, steps=2)
    run_train(models[name], pickapic, tmp_path / "resumed", *common, steps=4)
    stem = "unet" if name == "sd2v" else "transformer"
    straight = load_file(str(tmp_path / "straight" / f"{stem}.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / f"{stem}.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["train_loss"] for m in metrics(tmp_path / "straight")] == [m["train_loss"] for m in metrics(tmp_path / "resumed")]


def test_run_description_names_the_family(models, pickapic, tmp_path):
    run_train(models["flux"], pickapic, tmp_path)
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["resolved"]["family"] == "flux" and "transformer/" in config["resolved"]["denoiser"]
    assert "FluxPipeline" in (tmp_path / "README.md").read_text()


# --- SD1.5 / SDXL unchanged ---------------------------------------------------------------------------------------


def legacy_step(args, batch, unet, reference, vae, text_encoders, alphas_cumprod, weight_dtype, coefficients):
    """The epsilon step as train.compute_loss computed it before the family layer (a frozen copy of its logic)."""
    preference = args.train_method in train.PREFERENCE_METHODS
    pixels = batch["pixel_values"].to(vae.device, dtype=weight_dtype)
    if preference:
        pixels = torch.cat(pixels.chunk(2, dim=1))
    with torch.inference_mode():
        latents = vae.encode(pixels).latent_dist.sample().float() * vae.config.scaling_factor
    with torch.no_grad():
        if not args.sdxl:
            prompt_embeds, pooled = text_encoders[0](batch["input_ids"])[0], None
        else:
            states = []
            for i, encoder in enumerate(text_encoders):
                output = encoder(batch["input_ids" if i == 0 else f"input_ids_{i + 1}"], output_hidden_states=True)
                states.append(output.hidden_states[-2])
            prompt_embeds, pooled = torch.cat(states, dim=-1), output[0]
    pairs = latents.shape[0] // 2 if preference else latents.shape[0]
    noise = torch.randn(pairs, *latents.shape[1:], device=latents.device)
    timesteps = torch.randint(args.timestep_range[0], args.timestep_range[1] + 1, (pairs,), device=latents.device)
    noise_in = noise
    if preference:
        noise, noise_in, timesteps = noise.repeat(2, 1, 1, 1), noise_in.repeat(2, 1, 1, 1), timesteps.repeat(2)
        prompt_embeds = prompt_embeds.repeat(2, 1, 1)
        pooled = pooled.repeat(2, 1) if pooled is not None else None
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise_in
    added = None
    if args.sdxl:
        added = {"text_embeds": pooled.to(weight_dtype),
                 "time_ids": sdxl_time_ids(noisy.shape[0], args.resolution, noisy.device, weight_dtype)}
    cond = prompt_embeds.to(weight_dtype)
    model_pred = unet(noisy, timesteps, cond, added_cond_kwargs=added).sample.float()
    log_weight = train.log_importance_weight(model_pred, noise_in, timesteps, coefficients)
    if not preference:
        return train.sft_loss(model_pred, noise), log_weight
    with torch.inference_mode():
        ref_pred = reference(noisy.to(weight_dtype), timesteps, cond, added_cond_kwargs=added).sample
    scale = train.winner_preserving_scale(model_pred, noise, 0.5)
    loss, _ = train.preference_loss(args.train_method, model_pred, ref_pred, noise, args.beta_dpo, sdxl=args.sdxl,
                                    loser_scale=scale)
    return loss, log_weight


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "sft"])
def test_sd15_and_sdxl_steps_are_bit_identical_to_the_pre_family_code(models, pickapic, name, method):
    from accelerate.utils import set_seed

    model = models[name]
    args = train.parse_args(train_args(model, pickapic, "/tmp/unused", "--train_method", method, "--beta_dpo", "0.01",
                                       "--use_winner_preserving", "--winner_preserving_mu", "0.5",
                                       sdxl=name == "sdxl"))
    family = families.make_family(args)
    tokenizers, encoders = family.load_text(torch.float32)
    noise = family.load_noise()
    vae, unet = family.load_vae(torch.float32), family.load_denoiser(str(model))
    reference = family.load_denoiser(str(model))
    rows = train.filter_rows(train.load_rows(args), args, True)
    dataset = PairDataset(rows, args)
    batch = train.Collate(tokenizers, family.max_lengths())([dataset[(0, 0, i)] for i in range(2)])
    coefficients = noise.log_weight_coefficients()
    results = []
    for step in ("new", "legacy"):
        set_seed(3)
        unet.zero_grad()
        if step == "new":
            loss, *_ = train.compute_loss(args, batch, unet, reference, vae, encoders, family, noise, torch.float32, coefficients)
            log_weight = None
        else:
            loss, log_weight = legacy_step(args, batch, unet, reference, vae, encoders, noise.alphas_cumprod,
                                           torch.float32, coefficients)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in unet.parameters()]))
    (new_loss, new_grads), (old_loss, old_grads) = results
    assert torch.equal(new_loss, old_loss)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))
    reset_accelerate()


# --- parametrisations ----------------------------------------------------------------------------------------------


class Flags:
    noise_offset, input_perturbation, timestep_range = 0.0, 0.0, [0, 999]
    weighting_scheme, logit_mean, logit_std, mode_scale = "logit_normal", 0.0, 1.0, 1.29


def test_v_prediction_target_is_get_velocity(models):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(models["sd2v"], subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    process, latents = DDPMNoise(scheduler), torch.randn(4, 4, 8, 8)
    torch.manual_seed(0)
    noised = process.sample(latents, 2, True, Flags())
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    torch.testing.assert_close(noised.target, scheduler.get_velocity(latents, noise, noised.timesteps), rtol=0, atol=1e-6)
    torch.testing.assert_close(noised.noisy, scheduler.add_noise(latents, noise, noised.timesteps), rtol=0, atol=1e-6)
    assert torch.equal(noised.timesteps[:2], noised.timesteps[2:])  # winner and loser share t


def test_flow_noising_and_target_by_hand(models):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(models["sd3"], subfolder="scheduler")
    process, latents = FlowNoise(scheduler, Flags()), torch.randn(6, 16, 8, 8)
    torch.manual_seed(1)
    noised = process.sample(latents, 3, True, Flags())
    torch.manual_seed(1)
    noise = torch.randn(3, 16, 8, 8)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(3,)))
    index = (u * 1000).long().repeat(2)
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    noise = noise.repeat(2, 1, 1, 1)
    torch.testing.assert_close(noised.noisy, (1 - sigma) * latents + sigma * noise, rtol=0, atol=0)
    torch.testing.assert_close(noised.target, noise - latents, rtol=0, atol=0)
    assert torch.equal(noised.timesteps, scheduler.timesteps[index])  # what the SD3 transformer sees: s * 1000
    # scheduler.scale_noise is the same interpolation
    torch.testing.assert_close(noised.noisy, scheduler.scale_noise(latents, noised.timesteps, noise), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_flow_timestep_range_restricts_the_noise_levels(models, scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    flags = Flags()
    flags.timestep_range, flags.weighting_scheme = [200, 399], scheme
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(models["sd3"], subfolder="scheduler")
    noised = FlowNoise(scheduler, flags).sample(torch.randn(4096, 1, 1, 1), 4096, False, flags)
    assert 200 <= int(noised.index.min()) and int(noised.index.max()) <= 399 and len(set(noised.index.tolist())) > 100
    flags.weighting_scheme = "mode"
    with pytest.raises(ValueError, match="mode density cannot be restricted"):
        FlowNoise(scheduler, flags)


def test_gaussian_path_coefficients_give_the_ddpm_ones(models):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(models["sd15"], subfolder="scheduler")
    abar = scheduler.alphas_cumprod.double()
    general = gaussian_path_coefficients(abar.sqrt(), (1 - abar).sqrt()) * (1 - abar) / abar  # x0 error -> eps error
    ddpm = importance_log_weight_coefficients(scheduler).double()
    torch.testing.assert_close(general[1:], ddpm[1:], rtol=1e-5, atol=0)


def test_v_prediction_coefficients_are_epsilons_times_abar(models):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(models["sd2v"], subfolder="scheduler")
    coefficients = DDPMNoise(scheduler).log_weight_coefficients()
    eps = importance_log_weight_coefficients(scheduler)
    torch.testing.assert_close(coefficients, eps * scheduler.alphas_cumprod, rtol=1e-6, atol=0)


def test_flow_importance_weight_matches_monte_carlo(models):
    """log w = E_{x' ~ q(x_{k-1}|x_k, x_0)} [log p_theta(x'|x_k) - log q(x'|x_k, x_0)] / d for the ancestral step of the
    Gaussian path alpha = 1 - s, sigma = s (docs/importance.md), against -c mean((v_hat - v)^2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(models["sd3"], subfolder="scheduler")
    process = FlowNoise(scheduler, Flags())
    coefficients = process.log_weight_coefficients().double()
    sigmas = scheduler.sigmas.double().flip(0)  # ascending noise, index 0 least noise
    generator = torch.Generator().manual_seed(0)
    d = 4096
    for k in (5, 300, 700, 900):  # near s = 1 the KL vanishes (1 - s -> 0) below the Monte Carlo noise
        s, s_prev = sigmas[k], sigmas[k - 1]
        x0, eps = torch.randn(d, generator=generator, dtype=torch.float64), torch.randn(d, generator=generator, dtype=torch.float64)
        x = (1 - s) * x0 + s * eps
        v_hat = (eps - x0) + 4 * torch.randn(d, generator=generator, dtype=torch.float64)  # large: MC noise ~ 1/sqrt(KL)
        x0_hat = x - s * v_hat
        a_step = (1 - s) / (1 - s_prev)
        step_var = s**2 - a_step**2 * s_prev**2
        var = step_var * s_prev**2 / s**2

        def mean(x0_):
            return a_step * s_prev**2 / s**2 * x + (1 - s_prev) * step_var / s**2 * x0_

        draws = mean(x0) + var.sqrt() * torch.randn(1024, d, generator=generator, dtype=torch.float64)
        log_p = -0.5 * (draws - mean(x0_hat)).pow(2) / var
        log_q = -0.5 * (draws - mean(x0)).pow(2) / var
        monte_carlo = (log_p - log_q).mean().item()  # per element
        closed = -(coefficients[k] * (v_hat - (eps - x0)).pow(2).mean()).item()
        assert monte_carlo == pytest.approx(closed, rel=0.05), k


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_safeguard_guarantee_in_every_parametrisation(models, kind):
    """<-g_w + lambda g_l, g_w> <= -mu ||g_w||^2 in output space, g = gradient of the MSE proxies, on predictions
    around each parametrisation's real targets."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "flow":
        process = FlowNoise(FlowMatchEulerDiscreteScheduler.from_pretrained(models["sd3"], subfolder="scheduler"), Flags())
    else:
        process = DDPMNoise(DDPMScheduler.from_pretrained(models["sd2v"], subfolder="scheduler"))
    generator = torch.Generator().manual_seed(0)
    for trial in range(100):
        noised = process.sample(torch.randn(8, 4, 4, 4, generator=generator), 4, True, Flags())
        prediction = noised.target + torch.randn(8, 4, 4, 4, generator=generator) * (0.1 + trial / 50)
        prediction[4:] += 0.5 * (prediction[:4] - noised.target[:4])  # correlated residuals: lambda < 1 happens
        mu = trial / 100
        lam = train.winner_preserving_scale(prediction, noised.target, mu)
        residual = (prediction - noised.target).double()
        g_w, g_l = residual[:4].flatten(), residual[4:].flatten()
        assert torch.dot(-g_w + lam.double() * g_l, g_w) <= -mu * g_w.pow(2).sum() + 1e-6 * g_w.pow(2).sum()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_checkpointing_relabelling_and_streaming_per_family(models, pickapic, tiny_scorers, tmp_path, name):
    """Gradient checkpointing, --choice_model relabelling and a streamed source on a transformer family."""
    config = tmp_path / "scorer.json"
    config.write_text(json.dumps(tiny_scorers["hpsv2"]))
    run_train(models[name], pickapic, tmp_path / "run", "--gradient_checkpointing", "--choice_model", "hps",
              "--choice_model_config", str(config), "--choice_model_device", "cpu", "--streaming", steps=1)
    assert 0.0 <= metrics(tmp_path / "run")[0]["relabelled_fraction"] <= 1.0
