"""Wan2.2 and image-to-video (issue 22): the tiny TI2V-5B-like, two-expert A14B-like (T2V and I2V) and Wan2.1-I2V-like
pipelines. One training step on each side of the experts' boundary builds what diffusers' pipelines build for the
same latents and noise (noisy input, timesteps, model input, expert, target); each model trains with Diffusion-DPO,
the safeguard and importance weights, resumes bit for bit, and its output loads in its pipeline and generates."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import families
import train
from test_train import metrics, reset_accelerate, run_train
from weights import LORA_WEIGHTS

FRAMES = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny.video import build_wan22_a14b, build_wan22_ti2v, build_wan_i2v

    root = tmp_path_factory.mktemp("wan22-models")
    return {"ti2v": build_wan22_ti2v(root / "ti2v"), "a14b": build_wan22_a14b(root / "a14b"),
            "a14b_i2v": build_wan22_a14b(root / "a14b_i2v", i2v=True), "wan_i2v": build_wan_i2v(root / "wan_i2v")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from tiny import build_video_pairs

    root = tmp_path_factory.mktemp("wan22-data")
    return {"shared": build_video_pairs(root / "shared", shared_first_frame=True, webdataset=False),
            "different": build_video_pairs(root / "different", webdataset=False)}


def parse(model, *extra):
    return train.parse_args(["--pretrained_model_name_or_path", str(model), "--dataset_name", "d", "--resolution",
                             "32", "--num_frames", str(FRAMES), *extra])


def test_families_are_read_from_model_index(models, capsys):
    assert [parse(models[name]).model_family for name in ("ti2v", "a14b", "a14b_i2v", "wan_i2v")] == \
        ["wan22", "wan22_a14b", "wan22_a14b", "wan_i2v"]
    assert parse(models["a14b_i2v"]).conditioning_image == "first_frame"
    assert parse(models["ti2v"]).conditioning_image == "none" and parse(models["a14b"]).train_expert == "both"
    refused = [(models["ti2v"], "--resolution", "48"),  # 16x VAE, 2x2 patches: multiples of 32
               (models["a14b"], "--conditioning_image", "first_frame"),  # a text-to-video A14B
               (models["wan_i2v"], "--conditioning_image", "none"), (models["ti2v"], "--train_expert", "high")]
    for model, *extra in refused:
        with pytest.raises(SystemExit):
            train.parse_args(["--pretrained_model_name_or_path", str(model), "--dataset_name", "d",
                              "--num_frames", str(FRAMES), *(["--resolution", "32"] if "--resolution" not in extra else []),
                              *extra])
    assert "multiples of 32" in capsys.readouterr().err


# --- one step, as the pipelines build it -----------------------------------------------------------------------

# Noise levels (0 = least noise) of the two sides: level 990 is timestep 998 (shift 5) or 999 (shift 12), above
# both boundaries (875, 900); level 300 is timestep 682 (shift 5) or 837 (shift 12), below both.
LEVELS = {"high": 990, "low": 300}
CASES = [("ti2v", []), ("ti2v", ["--conditioning_image", "first_frame"]), ("a14b", []), ("a14b_i2v", []),
         ("wan_i2v", [])]


def calls_of(*modules):
    """Records each call's keyword arguments (and which module) of the given transformers."""
    seen = []
    hooks = [module.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: seen.append((name, {k: v for k, v in kwargs.items()})), with_kwargs=True)
        for name, module in modules]
    return seen, hooks


@pytest.mark.parametrize("side", ["high", "low"])
@pytest.mark.parametrize("name, extra", CASES, ids=["ti2v-t2v", "ti2v-i2v", "a14b", "a14b-i2v", "wan21-i2v"])
def test_one_step_matches_the_pipelines(models, name, extra, side):
    import diffusers

    level = LEVELS[side]
    args = parse(models[name], *extra, "--timestep_range", str(level), str(level), "--seed", "0")
    family = families.make_family(args)
    tokenizers, encoders = family.load_text(torch.float32)
    noise_process, vae = family.load_noise(), family.load_vae(torch.float32)
    ours = family.load_denoiser(str(models[name]))
    pipeline_class = getattr(diffusers, family.pipeline_class)
    image_conditioned = getattr(family, "image_conditioned", False)
    if name == "ti2v" and image_conditioned:  # TI2V-5B's image-to-video is WanImageToVideoPipeline on its folder
        pipeline_class = diffusers.WanImageToVideoPipeline
    pipeline = pipeline_class.from_pretrained(models[name])

    # a pair whose clips share the first frame (an 8-bit image, as the pipeline gets it)
    generator = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy())
    first = pipeline.video_processor.preprocess(image, height=32, width=32)[0]
    pixels = torch.rand(1, 6, FRAMES, 32, 32, generator=generator) * 2 - 1
    pixels[:, :3, 0], pixels[:, 3:, 0] = first, first
    ids = tokenizers[0](["a red circle"], max_length=512, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
    batch = {"input_ids": ids, "pixel_values": pixels}

    # the training step's pieces, as compute_loss makes them
    torch.manual_seed(0)
    with torch.no_grad():
        latents = family.encode_images(vae, torch.cat(pixels.chunk(2, dim=1)))
        conditioning = family.encode_prompts(batch, encoders)
    noised = noise_process.sample(latents, 1, True, args)
    conditioning = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in conditioning.items()}
    inputs = family.model_inputs(conditioning, noised.noisy, torch.float32)
    experts = [("transformer", ours.transformer), ("transformer_2", ours.transformer_2)] if name.startswith("a14b") \
        else [("transformer", ours)]
    our_calls, hooks = calls_of(*experts)
    with torch.no_grad():
        family.predict(ours, noised.noisy, noised.timesteps, inputs)
    for hook in hooks:
        hook.remove()

    # the pipeline, one step from the same noise level (its own scheduler turns the training grid's unshifted
    # sigma u = (N - index) / N into its sigma and its integer timestep) with our noisy latents; the transformer's
    # output replaced by our target, so the step's x0 prediction shows whether the target is the pipeline's velocity
    index = noise_process.num_timesteps - 1 - level
    scheduler = pipeline.scheduler
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None: set_timesteps(
        device=device, sigmas=np.array([(noise_process.num_timesteps - index) / noise_process.num_timesteps]))
    modules = [(n, getattr(pipeline, n)) for n in ("transformer", "transformer_2") if getattr(pipeline, n, None) is not None]
    target = noised.target[:1]
    if name == "ti2v" and image_conditioned:  # frame 0 is the clean image: its output is overwritten after the step
        target = torch.cat([torch.zeros_like(target[:, :, :1]), target], dim=2)
    replace = [module.register_forward_hook(lambda m, a, k, out: (target.clone(),), with_kwargs=True)
               for _, module in modules]
    their_calls, hooks = calls_of(*modules)
    call = dict(prompt_embeds=conditioning["prompt_embeds"][:1], guidance_scale=1.0, latents=noised.noisy[:1].clone(),
                num_frames=FRAMES, height=32, width=32, num_inference_steps=1, output_type="latent")
    if image_conditioned:
        call["image"] = image
    with torch.no_grad():
        x0_prediction = pipeline(**call).frames
    for hook in hooks + replace:
        hook.remove()

    (our_expert, mine), = our_calls
    (their_expert, theirs), = their_calls
    sigma = float(scheduler.sigmas[0])
    timestep = theirs["timestep"]
    assert our_expert == their_expert == ("transformer" if side == "high" or not name.startswith("a14b") else "transformer_2")
    # timesteps: the same values and dtype (int64 per sample; TI2V: float per token, 0 on a clean first frame)
    assert mine["timestep"].dtype == timestep.dtype and torch.equal(mine["timestep"][:1], timestep)
    if name == "ti2v":
        per_frame = (noised.noisy.shape[3] // 2) * (noised.noisy.shape[4] // 2)  # 2x2 patches
        assert timestep.shape == (1, noised.noisy.shape[2] * per_frame) and (timestep[0, per_frame:] > 0).all()
        assert bool((timestep[0, :per_frame] == 0).all()) == image_conditioned
    # the model input, bitwise: our noisy latents with the same condition (channels or first frame), text, image
    assert torch.equal(mine["hidden_states"][:1], theirs["hidden_states"])
    assert torch.equal(mine["encoder_hidden_states"][:1], theirs["encoder_hidden_states"])
    if "encoder_hidden_states_image" in theirs and theirs["encoder_hidden_states_image"] is not None:
        assert torch.equal(mine["encoder_hidden_states_image"][:1], theirs["encoder_hidden_states_image"])
    else:
        assert mine.get("encoder_hidden_states_image") is None
    # noisy input = (1 - s) x0 + s eps at the pipeline's sigma s: ours uses the float32 training grid's s, the
    # pipeline's is the same formula in float64 cast to float32, at most an ulp apart, so the two differ by about
    # ulp(s) |eps - x0| plus float32 rounding of the sum: tolerance 8 float32 eps x the largest |x0| + |eps|.
    kept = slice(1, None) if name == "ti2v" and image_conditioned else slice(None)  # frames the loss covers
    noise = noised.target[:1] + latents[:1, :, kept]  # target = eps - x0
    tolerance = 8 * torch.finfo(torch.float32).eps * float(latents[:1].abs().max() + noise.abs().max())
    torch.testing.assert_close(noised.noisy[:1, :, kept], (1 - sigma) * latents[:1, :, kept] + sigma * noise,
                               rtol=0, atol=tolerance)
    # target: fed as the model output, the pipeline's step to sigma 0 returns x0 = x_s - s v, the clean latents
    torch.testing.assert_close(x0_prediction[:, :, kept], latents[:1, :, kept], rtol=0, atol=tolerance)
    if name == "ti2v" and image_conditioned:  # the first frame is the image latent the model was given
        assert torch.equal(x0_prediction[:, :, :1], mine["hidden_states"][:1, :, :1])
    reset_accelerate()


# --- training -------------------------------------------------------------------------------------------------

OBJECTIVE = ["--use_winner_preserving", "--winner_preserving_mu", "0.5", "--importance_weighting", "full"]
RUNS = [("ti2v", []), ("ti2v", ["--conditioning_image", "first_frame"]), ("a14b", []),
        ("a14b", ["--train_expert", "low"]), ("a14b", ["--use_lora", "--use_ema", "--learning_rate", "1e-2"]),
        ("a14b_i2v", []), ("wan_i2v", [])]


def train_wan(model, data, out, *extra, steps):
    return run_train(model, data, out, "--num_frames", str(FRAMES), "--checkpointing_steps", "1", *OBJECTIVE, *extra,
                     steps=steps)


def generate(pipeline, i2v: bool):
    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    video = pipeline(prompt="a circle", num_frames=FRAMES, height=32, width=32, num_inference_steps=2,
                     output_type="np", **({"image": image} if i2v else {})).frames
    assert video.shape == (1, FRAMES, 32, 32, 3) and np.isfinite(video).all()


@pytest.mark.parametrize("name, extra", RUNS, ids=["ti2v-t2v", "ti2v-i2v", "a14b-both", "a14b-low", "a14b-lora",
                                                    "a14b-i2v", "wan21-i2v"])
def test_trains_resumes_exactly_and_loads_in_its_pipeline(models, pairs, tmp_path, name, extra):
    """Diffusion-DPO with the safeguard and importance weights, 2 steps straight and 1 + 1 resumed: the same weights
    bit for bit (the same computation replayed from the saved state), the same losses; the output loads in the
    model's own pipeline (both experts' files, or one) and generates."""
    import diffusers

    data = pairs["shared"]["parquet"]
    lora = "--use_lora" in extra
    assert train_wan(models[name], data, tmp_path / "straight", *extra, *([] if lora else ["--save_pipeline"]), steps=2) == 2
    train_wan(models[name], data, tmp_path / "resumed", *extra, steps=1)
    train_wan(models[name], data, tmp_path / "resumed", *extra, steps=2)
    family = families.make_family(parse(models[name], *extra))
    stem = LORA_WEIGHTS if lora else "transformer"
    files = [f"{stem}{part}.safetensors" for part in family.experts]
    assert sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors")) == \
        sorted(files + ([f"{stem}{part}_ema.safetensors" for part in family.experts] if lora else []))
    for file in files:
        straight, resumed = load_file(str(tmp_path / "straight" / file)), load_file(str(tmp_path / "resumed" / file))
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    card = (tmp_path / "straight" / "README.md").read_text()  # the model card loads each trained expert's file
    assert all((f"{stem}{part}.safetensors" in card) == (part == "_2" or not lora) for part in family.experts)
    logged = metrics(tmp_path / "straight")
    assert [m["train_loss"] for m in logged] == [m["train_loss"] for m in metrics(tmp_path / "resumed")]
    assert all(math.isfinite(m["train_loss"]) and 0 < m["is_weight_min"] <= 1 and 0 <= m["avg_lose_l_scale"] <= 1
               for m in logged)

    pipeline_class = getattr(diffusers, family.pipeline_class)
    i2v = family.pipeline_class == "WanImageToVideoPipeline"
    if lora:  # an adapter file per expert; the low-noise one goes into transformer_2
        pipeline = pipeline_class.from_pretrained(models[name])
        pipeline.load_lora_weights(tmp_path / "straight")
        pipeline.load_lora_weights(tmp_path / "straight", weight_name=f"{stem}_2.safetensors", load_into_transformer_2=True)
        for expert in (pipeline.transformer, pipeline.transformer_2):
            trained_b = [p for n, p in expert.named_parameters() if "lora_B" in n]
            assert trained_b and any(p.abs().sum() > 0 for p in trained_b)  # B starts at zero
    else:  # --save_pipeline: the trained expert(s) in the pipeline folder; an untrained one is the base's
        pipeline = pipeline_class.from_pretrained(tmp_path / "straight")
        for part, folder in (("", "transformer"), ("_2", "transformer_2")):
            if getattr(pipeline, folder, None) is None:
                continue
            saved = pipeline.components[folder].state_dict()
            source = tmp_path / "straight" / f"transformer{part}.safetensors"
            expected = load_file(str(source)) if part in family.experts else \
                load_file(str(models[name] / folder / "diffusion_pytorch_model.safetensors"))
            assert all(torch.equal(saved[k], expected[k]) for k in expected)
            base = load_file(str(models[name] / folder / "diffusion_pytorch_model.safetensors"))
            assert (part in family.experts) == any(not torch.equal(base[k], expected[k]) for k in base)
    generate(pipeline, i2v)


@pytest.mark.parametrize("expert", ["high", "low"])
def test_one_expert_draws_only_its_side_of_the_boundary(models, expert):
    """--train_expert high: every drawn timestep floor(s x 1000) >= boundary_ratio x 1000 (the pipeline's
    transformer); low: every one below (transformer_2). Both sides' mass is still drawn from the density's shape."""
    args = parse(models["a14b"], "--train_expert", expert)
    family = families.make_family(args)
    noise = family.load_noise()
    torch.manual_seed(0)
    timesteps = noise.sample(torch.zeros(4000, 1, 1, 1, 1), 4000, False, args).timesteps.long()
    boundary = 0.875 * 1000
    assert (timesteps >= boundary).all() if expert == "high" else (timesteps < boundary).all()
    assert len(timesteps.unique()) > 20  # a spread, not one level
    with pytest.raises(ValueError, match="leaves none"):
        families.make_family(parse(models["a14b"], "--train_expert", expert, "--timestep_range",
                                   *(["0", "10"] if expert == "high" else ["990", "999"]))).load_noise()


def test_i2v_refuses_pairs_made_from_different_images(models, pairs, tmp_path):
    with pytest.raises(ValueError, match="begin with different frames"):
        train_wan(models["a14b_i2v"], pairs["different"]["parquet"], tmp_path, steps=1)


# --- eval.generate --------------------------------------------------------------------------------------------


def eval_generate(model, out, prompts, *extra):
    from eval.generate import generate, parse_args

    test_json = out.parent / f"{out.name}-prompts.json"
    test_json.write_text(__import__("json").dumps(prompts))
    argv = ["--pretrain_path", str(model), "--test_json", str(test_json), "--output_path", str(out), "--height", "32",
            "--width", "32", "--num_frames", str(FRAMES), "--steps", "4", "--no_zip", *extra]
    return generate(parse_args(argv)), argv


def test_eval_generate_each_model(models, pairs, tmp_path):
    """A14B: a --train_expert low output evaluates with its transformer_2 and the base's transformer, the second
    guidance scale and a moved boundary reach the pipeline (the experts' calls split where it says); I2V: the
    conditioning image (flag or per prompt) is used and fingerprinted; TI2V-5B: text-to-video, or image-to-video
    with an image."""
    from eval.generate import load_sampler, parse_args, resolve_args, sample
    from eval.video import video_info

    trained = tmp_path / "low"
    train_wan(models["a14b"], pairs["shared"]["parquet"], trained, "--train_expert", "low", steps=1)
    result, argv = eval_generate(models["a14b"], tmp_path / "a14b", [{"prompt": "a red circle"}], "--unet_path",
                                 str(trained), "--guidance_scale_2", "2.0", "--boundary_ratio", "0.95")
    assert result["run_name"].endswith("_4s_4.0cfg_2.0cfg2_boundary0.95") and result["generated"] == 1
    record = __import__("json").loads((tmp_path / "a14b" / result["run_name"] / "run.json").read_text())
    assert sorted(record["fingerprint"]["sampling"]["experts"]) == ["transformer_2.pth", "transformer_2.safetensors"]
    args = resolve_args(parse_args(argv))
    sampler, uncond = load_sampler(args, torch.device("cpu"), torch.float32)
    pipeline = sampler.pipeline
    low = load_file(str(trained / "transformer_2.safetensors"))
    high = load_file(str(models["a14b"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipeline.transformer_2.state_dict()[k], low[k]) for k in low)
    assert all(torch.equal(pipeline.transformer.state_dict()[k], high[k]) for k in high)
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(pipeline, n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in calls]
    sample(sampler, ["a red circle"], uncond, args, [0])
    for hook in hooks:
        hook.remove()
    low_steps = int((pipeline.scheduler.timesteps < 950).sum())
    assert 0 < low_steps < 4 and calls == {"transformer": 2 * (4 - low_steps), "transformer_2": 2 * low_steps}  # + CFG
    assert pipeline._guidance_scale_2 == 2.0

    image = tmp_path / "image.png"
    Image.fromarray(np.full((40, 48, 3), (200, 30, 30), dtype=np.uint8)).save(image)
    prompts = [{"prompt": "a red circle", "image": "image.png"}, {"prompt": "a blue square"}]
    for name in ("wan_i2v", "a14b_i2v", "ti2v"):
        result, _ = eval_generate(models[name], tmp_path / name, prompts, "--conditioning_image", str(image))
        manifest = __import__("json").loads(Path(result["manifest"]).read_text())
        assert result["generated"] == 2 and all(video_info(e["gen_image_path"])["frames"] == FRAMES for e in manifest)
        record = __import__("json").loads((tmp_path / name / result["run_name"] / "run.json").read_text())
        assert record["fingerprint"]["sampling"]["pipeline"] == "WanImageToVideoPipeline"
        assert record["fingerprint"]["sampling"]["conditioning_images"] is not None
    assert result["run_name"].endswith("_i2v")  # TI2V-5B with an image
    result, _ = eval_generate(models["ti2v"], tmp_path / "ti2v-t2v", [{"prompt": "a red circle"}])
    assert result["generated"] == 1 and not result["run_name"].endswith("_i2v")
    from eval.generate import GenerateError

    with pytest.raises(GenerateError, match="no \"image\""):
        eval_generate(models["wan_i2v"], tmp_path / "no-image", [{"prompt": "a red circle"}])


def test_memory_rows_say_how_many_gpus_the_a14b_pair_needs():
    """benchmarks/memory_table.py: both experts are twice one expert's parameters, and FSDP's GPU count is the
    fewest power of two with (16 B/param / N + the 2 B/param reference whole + frozen) within 80 % of 80 GB (4 B/param
    / N for LoRA's fp32 base): one expert over 16 GPUs, both never (their reference alone is 57 GB), both with LoRA 4."""
    from benchmarks.memory_table import fsdp_gpus, table

    rows = {(r["model"], r["strategy"]): r for r in table(gpus=8) if not r["latents_cache"]}
    both, one = rows[("Wan2.2-A14B, both experts", "DDP")], rows[("Wan2.2-A14B, one expert", "DDP")]
    assert both["denoiser_params"] == 2 * one["denoiser_params"] and both["frozen_params"] == one["frozen_params"]
    frozen = 2 * both["frozen_params"]

    def fixed_gb(params, n):
        return (16 * params / n + 2 * params + frozen) / 1e9

    gpus = one["fsdp_gpus_for_80gb"]
    assert fixed_gb(one["denoiser_params"], gpus) <= 64 < fixed_gb(one["denoiser_params"], gpus // 2)
    assert both["fsdp_gpus_for_80gb"] is None and (2 * both["denoiser_params"] + frozen) / 1e9 > 64
    assert rows[("Wan2.2-A14B, both experts", "LoRA")]["fsdp_gpus_for_80gb"] == 4
    assert gpus == fsdp_gpus(one["denoiser_params"], frozen, lora=False) and rows[("Wan2.2-A14B, both experts", "FSDP x8")]["fits"] == []


def test_both_experts_train_on_two_ranks_with_ddp_and_fsdp(models, pairs, tmp_path):
    """--train_expert both on two CPU ranks: every micro-batch meets one expert on all ranks (rank 0 draws the side),
    so DDP (find_unused_parameters) and FSDP2 (blocks of both experts sharded) run without waiting on each other;
    both experts are updated within 6 steps (the side of each step drawn with the density's masses: 0.7 high at
    shift 12 and boundary 0.875), and FSDP agrees with DDP to rounding (a step linear in the gradients, compared as
    tests/test_fsdp.py compares: relative update difference < 1e-4, where a rank's gradient lost or doubled is O(1))."""
    import os
    import subprocess

    from test_latent_cache import LINEAR_ADAMW, relative_update_difference
    from test_train import ACCELERATE, REPO, train_args

    fsdp = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "WanTransformerBlock", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
            "--fsdp_reshard_after_forward", "true"]
    for strategy in ("ddp", "fsdp"):
        launcher = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    *(fsdp if strategy == "fsdp" else ["--multi_gpu"])]
        argv = train_args(models["a14b"], pairs["shared"]["parquet"], tmp_path / strategy, "--num_frames", str(FRAMES),
                          "--train_batch_size", "1", "--use_winner_preserving", *LINEAR_ADAMW, steps=6)
        done = subprocess.run([*ACCELERATE, *launcher, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 0, done.stderr[-3000:]
    for folder in ("transformer", "transformer_2"):
        base = load_file(str(models["a14b"] / folder / "diffusion_pytorch_model.safetensors"))
        ddp, fsdp_weights = (load_file(str(tmp_path / s / f"{folder}.safetensors")) for s in ("ddp", "fsdp"))
        assert any(not torch.equal(ddp[k], base[k]) for k in base), folder  # met at least once
        assert relative_update_difference(base, ddp, fsdp_weights) < 1e-4, folder


def test_a_conditioning_image_column_stands_in_for_both_first_frames(models, pairs, tmp_path):
    """--conditioning_image_column: pairs whose videos begin differently (refused without it) train, each clip's
    first frame is the row's image with the clips' crop and flip, and a model without image conditioning refuses
    the column."""
    import json

    import data.video as video_data

    source = pairs["different"]["manifest"]
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    for i, line in enumerate(lines):
        Image.fromarray(np.full((40, 48, 3), (10 * i, 200, 30), dtype=np.uint8)).save(source.parent / f"image_{i}.png")
        line["image"] = f"image_{i}.png"
    manifest = source.parent / "with_images.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))

    args = train.parse_args(["--pretrained_model_name_or_path", str(models["wan_i2v"]), "--dataset_name", str(manifest),
                             "--resolution", "32", "--num_frames", str(FRAMES), "--conditioning_image_column", "image",
                             "--random_crop"])
    rows = train.filter_rows(train.load_rows(args), args, True)
    dataset = video_data.VideoPairDataset(rows, args)
    example = dataset[(0, 0, 0)]
    pixels = example["pixel_values"]
    assert torch.equal(pixels[:3, 0], pixels[3:, 0]) and not torch.equal(pixels[:3, 1], pixels[3:, 1])
    green, blue = pixels[1, 0], pixels[2, 0]  # every image is flat (r, 200, 30); the videos' background is grey 200
    assert torch.allclose(green, torch.full_like(green, 200 / 127.5 - 1), atol=0.01)
    assert torch.allclose(blue, torch.full_like(blue, 30 / 127.5 - 1), atol=0.01)
    assert train_wan(models["a14b_i2v"], manifest, tmp_path / "out", "--conditioning_image_column", "image", steps=1) == 1
    with pytest.raises(SystemExit):
        parse(models["a14b"], "--conditioning_image_column", "image")
