"""Video preference training (issue 11, training side): the tiny Wan2.1-like and CogVideoX-like pipelines load and
generate, every method and the safeguard train on each family, LoRA per family loads in its pipeline, resume is
exact per family, parquet, JSONL and WebDataset give the same pairs, bad videos are skipped and counted, frames are
sampled as specified, and the zero-terminal-SNR importance coefficient is finite and right."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import families
import train
from families.noise import importance_log_weight_coefficients
import data.video as video_data
from test_train import metrics, reset_accelerate, run_train

FRAMES = {"wan": "5", "cogvideox": "9", "cogvideox5": "9"}  # wan 4k + 1; cogvideox 8k + 1 (odd latent count)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import build_cogvideox, build_wan

    root = tmp_path_factory.mktemp("video-models")
    return {"wan": build_wan(root / "wan"), "cogvideox": build_cogvideox(root / "cogvideox", num_frames=9),
            "cogvideox5": build_cogvideox(root / "cogvideox5", rotary=True, num_frames=9)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from tiny import build_video_pairs

    return build_video_pairs(tmp_path_factory.mktemp("video-data") / "pairs")


def train_video(model_name, models, data, out, *extra, steps=2):
    return run_train(models[model_name], data, out, "--num_frames", FRAMES[model_name], *extra, steps=steps)


def parse(model, *extra):
    return train.parse_args(["--pretrained_model_name_or_path", str(model), "--dataset_name", "d", *extra])


# --- the tiny models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wan", "cogvideox", "cogvideox5"])
def test_tiny_video_pipelines_load_and_generate(models, name):
    import diffusers

    index = json.loads((models[name] / "model_index.json").read_text())
    family = families.PIPELINE_FAMILIES[index["_class_name"]]
    assert family == ("wan" if name == "wan" else "cogvideox")
    pipeline = getattr(diffusers, families.FAMILIES[family].pipeline_class).from_pretrained(models[name])
    frames = int(FRAMES[name])
    video = pipeline("a circle on a plain background", num_frames=frames, height=32, width=32, num_inference_steps=2,
                     output_type="np").frames
    assert video.shape == (1, frames, 32, 32, 3) and np.isfinite(video).all()
    if name == "wan":
        config = pipeline.scheduler.config
        assert config.prediction_type == "flow_prediction" and config.flow_shift == 3.0 and config.use_flow_sigmas
        assert len(pipeline.vae.config.latents_mean) == len(pipeline.vae.config.latents_std) == 16
    else:
        config = pipeline.scheduler.config
        assert type(pipeline.scheduler).__name__ == "CogVideoXDDIMScheduler" and config.prediction_type == "v_prediction"
        assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
        assert pipeline.transformer.config.use_rotary_positional_embeddings == (name == "cogvideox5")
        assert pipeline.tokenizer.model_max_length == 226


# --- arguments -------------------------------------------------------------------------------------------------


def test_video_defaults_and_refusals(models, capsys):
    args = parse(models["wan"])
    assert (args.model_family, args.video_size, args.num_frames, args.resolution) == ("wan", [480, 832], 81, 480)
    assert args.lora_target_modules == "to_k,to_q,to_v,to_out.0"
    args = parse(models["cogvideox"])
    assert (args.model_family, args.video_size, args.num_frames) == ("cogvideox", [480, 720], 49)
    assert parse(models["wan"], "--resolution", "32").video_size == [32, 32]
    for model, flags, message in [
        (models["wan"], ["--num_frames", "6"], "wan takes 4k + 1 frames"),
        (models["cogvideox"], ["--num_frames", "5"], "cogvideox takes 8k + 1 frames"),
        (models["wan"], ["--resolution", "32", "--video_size", "32", "48"], "not both"),
        (models["wan"], ["--video_size", "32", "40"], "multiples of 16"),
        (models["wan"], ["--target_fps", "4", "--frame_stride", "2"], "choose one way"),
        (models["wan"], ["--choice_model", "hps"], "does not take videos"),
        ("no/such-model", ["--num_frames", "5"], "sd is an image model family"),
    ]:
        with pytest.raises(SystemExit):
            parse(model, *flags)
        assert message in capsys.readouterr().err


# --- training --------------------------------------------------------------------------------------------------

# Every family x method x safeguard (SFT ignores the safeguard), and the rotary (CogVideoX-5b-like) model.
RUNS = [(name, method, safeguard) for name in ("wan", "cogvideox") for method in ("diffusion-dpo", "dspo", "dmpo", "sft")
        for safeguard in (False, True)] + [("cogvideox5", "diffusion-dpo", True)]


@pytest.mark.parametrize("name, method, safeguard", RUNS)
def test_every_method_trains_on_each_family(models, pairs, tmp_path, name, method, safeguard):
    extra = ["--train_method", method, "--dmpo_alpha", "0.01"] + (["--beta_dpo", "0.001"] if method == "dspo" else [])
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    if name == "cogvideox5":  # the memory options on the way
        extra += ["--gradient_checkpointing", "--vae_tiling"]
    save_pipeline = method == "sft" and not safeguard
    assert train_video(name, models, pairs["parquet"], tmp_path, *extra, *(["--save_pipeline"] if save_pipeline else [])) == 2
    if save_pipeline:  # the trained transformer in the model's own pipeline folder
        import diffusers

        pipeline_class = getattr(diffusers, families.FAMILIES[parse(models[name]).model_family].pipeline_class)
        saved = pipeline_class.from_pretrained(tmp_path)
        trained = load_file(str(tmp_path / "transformer.safetensors"))
        assert all(torch.equal(saved.transformer.state_dict()[k], trained[k]) for k in trained)
    logged = metrics(tmp_path)
    assert all(math.isfinite(m["train_loss"]) for m in logged)
    trained = load_file(str(tmp_path / "transformer.safetensors"))
    base = load_file(str(models[name] / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    if method != "sft":
        scale = logged[-1]["avg_lose_l_scale"]
        assert (0.0 <= scale <= 1.0) if safeguard else scale == 1.0


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_importance_weighting_and_timestep_mask_per_family(models, pairs, tmp_path, name):
    """cogvideox: the full range includes t = 999, where abar = 0 (zero terminal SNR)."""
    train_video(name, models, pairs["manifest"], tmp_path, "--importance_weighting", "full",
                *(["--timestep_range", "100", "600"] if name == "wan" else []))
    logged = metrics(tmp_path)[-1]
    assert 0 < logged["is_weight_min"] <= logged["is_weight_mean"] <= logged["is_weight_max"] <= 1


@pytest.mark.parametrize("name", ["wan", "cogvideox5"])
def test_lora_per_family_loads_in_its_pipeline(models, pairs, tmp_path, name):
    import diffusers

    train_video(name, models, pairs["parquet"], tmp_path, "--use_lora", "--use_ema", "--learning_rate", "1e-2")
    family = families.FAMILIES[parse(models[name]).model_family]
    pipeline = getattr(diffusers, family.pipeline_class).from_pretrained(models[name])
    pipeline.load_lora_weights(tmp_path)
    trained_b = [p for n, p in pipeline.transformer.named_parameters() if "lora_B" in n]
    assert trained_b and any(p.abs().sum() > 0 for p in trained_b)  # B starts at zero: the trained values arrived


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_resume_is_exact_per_family(models, pairs, tmp_path, name):
    common = ["--checkpointing_steps", "1", "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--random_crop"]
    train_video(name, models, pairs["parquet"], tmp_path / "straight", *common, steps=2)
    train_video(name, models, pairs["parquet"], tmp_path / "resumed", *common, steps=1)
    train_video(name, models, pairs["parquet"], tmp_path / "resumed", *common, steps=2)
    straight = load_file(str(tmp_path / "straight" / "transformer.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "transformer.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["train_loss"] for m in metrics(tmp_path / "straight")] == [m["train_loss"] for m in metrics(tmp_path / "resumed")]


def test_webdataset_shards_train_streamed(models, pairs, tmp_path):
    assert train_video("wan", models, pairs["webdataset"], tmp_path, "--train_method", "sft") == 2
    assert all(math.isfinite(m["train_loss"]) for m in metrics(tmp_path))


def test_bad_videos_are_skipped_and_counted_in_a_run(models, pairs, tmp_path):
    """One epoch over the 14 decided pairs (batch 2, 7 steps) meets the corrupt and the too-short video once each."""
    train_video("wan", models, pairs["parquet"], tmp_path, "--train_method", "sft", steps=7)
    assert metrics(tmp_path)[-1]["skipped_rows"] == 2


# --- data ------------------------------------------------------------------------------------------------------


def video_args(models, data, *extra, name="wan"):
    return train.parse_args(["--pretrained_model_name_or_path", str(models[name]), "--dataset_name", str(data),
                             "--output_dir", "/tmp/unused", "--resolution", "32", "--num_frames", FRAMES[name],
                             "--seed", "0", *extra])


def examples(args, keys):
    rows = train.filter_rows(train.load_rows(args), args, True)
    dataset = train.pair_dataset(rows, args)
    return rows, [dataset[key] for key in keys]


def test_parquet_manifest_and_shards_give_the_same_pairs(models, pairs):
    keys = [(0, 0, i) for i in range(14)]
    rows, from_parquet = examples(video_args(models, pairs["parquet"], "--random_crop"), keys)
    assert len(rows) == 14 and isinstance(train.pair_dataset(rows, video_args(models, pairs["parquet"])),
                                          video_data.VideoPairDataset)
    _, from_manifest = examples(video_args(models, pairs["manifest"], "--random_crop"), keys)
    for a, b in zip(from_parquet, from_manifest):
        assert a["caption"] == b["caption"] and a["skipped"] == b["skipped"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert from_parquet[0]["pixel_values"].shape == (6, 5, 32, 32)
    assert sum(e["skipped"] for e in from_parquet) == 2  # the corrupt and the too-short video, each counted once

    args = video_args(models, pairs["webdataset"], "--random_crop")  # shards stream: the same keyed examples, in order
    stream = train.PairStream(train.filter_rows(train.load_rows(args), args, True), args, 0, shuffle=False)
    for a, b in zip(from_parquet, stream):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]


def test_winner_goes_first_and_sft_keeps_it(models, pairs):
    """The toy preference: the winner is the warm (red) clip, whichever position the row gives it."""
    _, pairs_out = examples(video_args(models, pairs["parquet"], "--proportion_empty_prompts", "0"), [(0, 0, i) for i in range(14)])
    for example in pairs_out:
        winner, loser = example["pixel_values"][:3], example["pixel_values"][3:]
        assert (winner[0] - winner[2]).mean() > 0 > (loser[0] - loser[2]).mean()
    _, sft = examples(video_args(models, pairs["parquet"], "--train_method", "sft"), [(0, 0, 0)])
    assert sft[0]["pixel_values"].shape == (3, 5, 32, 32)


def test_manifest_errors_name_the_line(models, tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"caption": "a", "video_0": "a.mp4", "video_1": "b.mp4", "label_0": 1}\n{"caption": "b"}\n')
    with pytest.raises(ValueError, match="line 2: no video_0, video_1, label_0"):
        train.load_rows(video_args(models, manifest))


# --- frame sampling ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ramp():
    """12 frames at 8 fps whose grey level is 20 x the frame index: the frame a sample came from can be read off."""
    from tiny.video import encode_mp4

    return encode_mp4([np.full((16, 16, 3), 20 * i, dtype=np.uint8) for i in range(12)], fps=8)


def source_frames(clip):
    return [round(float(frame.float().mean()) / 20) for frame in clip]


def test_frame_sampling(ramp):
    decode = video_data.decode_clip
    assert source_frames(decode(ramp, 5)) == [3, 4, 5, 6, 7]  # centred: 7 possible starts, the middle one
    assert source_frames(decode(ramp, 5, stride=2)) == [1, 3, 5, 7, 9]
    assert source_frames(decode(ramp, 4, target_fps=4)) == [2, 4, 6, 8]  # 8 fps -> 4 fps: every second frame
    assert source_frames(decode(ramp, 3, target_fps=3)) == [3, 6, 8]  # steps of 8/3 frames, nearest frame
    assert source_frames(decode(ramp, 5, position=0.0)) == [0, 1, 2, 3, 4]  # --random_crop: position in [0, 1)
    assert source_frames(decode(ramp, 5, position=0.999)) == [7, 8, 9, 10, 11]
    assert decode(ramp, 12).shape == (12, 16, 16, 3)
    with pytest.raises(video_data.VideoTooShort):
        decode(ramp, 13)
    with pytest.raises(video_data.VideoTooShort):
        decode(ramp, 6, stride=3)


def test_clip_transform_covers_crops_and_flips_all_frames_alike():
    import random

    frames = torch.zeros(3, 20, 40, 3, dtype=torch.uint8)
    frames[:, :, :20] = 255  # left half white
    out = video_data.transform_clip(frames, (16, 16), random_crop=False, hflip=False, rng=random.Random(0))
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # 20 x 40 -> 16 x 32 (the shorter side to 16), centre crop: columns 8..23, white on the left half
    assert torch.allclose(out[:, :, :, :7], torch.ones(1)) and torch.allclose(out[:, :, :, 9:], -torch.ones(1))
    flipped = [video_data.transform_clip(frames, (16, 16), False, True, random.Random(seed)) for seed in range(8)]
    assert any(torch.equal(f, out.flip(-1)) for f in flipped) and any(torch.equal(f, out) for f in flipped)
    wide = video_data.transform_clip(frames, (16, 24), random_crop=True, hflip=False, rng=random.Random(1))
    assert wide.shape == (3, 3, 16, 24)


# --- parametrisation details ---------------------------------------------------------------------------------------


def test_zero_terminal_snr_v_coefficient_is_finite_and_right(models):
    """CogVideoX's schedule has abar_999 = 0: the epsilon coefficient is inf there, the v one is the limit
    abar_998 / (2 (1 - abar_998)); elsewhere the coefficients are the epsilon ones times abar, bit for bit."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler.from_pretrained(models["cogvideox"], subfolder="scheduler")
    abar = scheduler.alphas_cumprod.double()
    assert abar[-1] == 0
    coefficients = families.DDPMNoise(scheduler).log_weight_coefficients()
    assert torch.isfinite(coefficients).all() and (coefficients > 0).all()
    eps = importance_log_weight_coefficients(scheduler)
    assert not torch.isfinite(eps[-1])
    assert torch.equal(coefficients[:-1], (eps.double() * abar).float()[:-1])
    assert coefficients[-1].item() == pytest.approx(abar[-2].item() / (2 * (1 - abar[-2].item())), rel=1e-6)


@pytest.mark.parametrize("k", [5, 3])
def test_zero_terminal_snr_v_coefficient_matches_monte_carlo(k):
    """log w = E_{x' ~ q(x_{k-1} | x_k, x_0)} [log p_theta(x' | x_k) - log q(x' | x_k, x_0)] / d against
    -c_k mean((v_hat - v)^2) on a short zero-terminal-SNR schedule (abar_5 = 0: the step from pure noise; k = 3 an
    ordinary step), with DDPM's posterior (mean coefficients sqrt(abar_{k-1}) beta_k / (1 - abar_k) on x_0,
    sqrt(alpha_k) (1 - abar_{k-1}) / (1 - abar_k) on x_k; variance (1 - abar_{k-1}) / (1 - abar_k) beta_k) and
    x0_hat = sqrt(abar_k) x_k - sqrt(1 - abar_k) v_hat."""
    from types import SimpleNamespace

    abar = torch.tensor([0.99, 0.9, 0.7, 0.5, 0.3, 0.0], dtype=torch.float64)
    scheduler = SimpleNamespace(alphas_cumprod=abar, config=SimpleNamespace(prediction_type="v_prediction",
                                                                           num_train_timesteps=6))
    coefficient = families.DDPMNoise(scheduler).log_weight_coefficients().double()[k]
    generator = torch.Generator().manual_seed(0)
    d = 4096
    x0, noise = (torch.randn(d, generator=generator, dtype=torch.float64) for _ in range(2))
    a, a_prev = abar[k], abar[k - 1]
    beta = 1 - a / a_prev
    x = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    v_hat = v + 0.5 * torch.randn(d, generator=generator, dtype=torch.float64)
    x0_hat = a.sqrt() * x - (1 - a).sqrt() * v_hat

    def mean(x0_):
        return a_prev.sqrt() * beta / (1 - a) * x0_ + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x

    variance = (1 - a_prev) / (1 - a) * beta
    draws = mean(x0) + variance.sqrt() * torch.randn(256, d, generator=generator, dtype=torch.float64)
    monte_carlo = ((draws - mean(x0)).pow(2) - (draws - mean(x0_hat)).pow(2)).mean() / (2 * variance)
    closed = -coefficient * (v_hat - v).pow(2).mean()
    assert monte_carlo.item() == pytest.approx(closed.item(), rel=0.05)


def test_latent_normalisation_inverts_as_the_pipelines_decode(models):
    """wan: (z - mean) / std, undone by WanPipeline's z * std + mean; cogvideox: z x scaling_factor, undone by
    CogVideoXPipeline.decode_latents' 1 / scaling_factor; shapes (N, C, F', H', W') with F' = (F - 1) / 4 + 1."""
    for name in ("wan", "cogvideox"):
        args = parse(models[name], "--resolution", "32", "--vae_tiling")
        family = families.make_family(args)
        vae = family.load_vae(torch.float32)
        assert vae.use_slicing and vae.use_tiling  # tiles only above the VAE's tile size: not at 32 px
        pixels = torch.rand(2, 3, int(FRAMES[name]), 32, 32) * 2 - 1
        torch.manual_seed(0)
        latents = family.encode_images(vae, pixels)
        torch.manual_seed(0)
        raw = vae.encode(pixels).latent_dist.sample()
        assert latents.shape == (2, 16, (int(FRAMES[name]) - 1) // 4 + 1, 4, 4)
        if name == "wan":
            mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
            torch.testing.assert_close(latents * std + mean, raw)
        else:
            torch.testing.assert_close(latents / vae.config.scaling_factor, raw)


def test_predictions_match_the_pipelines_calls(models):
    """family.predict on channel-second latents equals the transformer called as the pipeline calls it: CogVideoX
    frame-first with the pipeline's own rotary embeddings (5b-like), Wan with timestep s x 1000."""
    from diffusers import CogVideoXPipeline

    pipeline = CogVideoXPipeline.from_pretrained(models["cogvideox5"])
    args = parse(models["cogvideox5"], "--resolution", "32")
    family = families.make_family(args)
    family.load_vae(torch.float32)
    model = family.load_denoiser(str(models["cogvideox5"]))
    noisy, states = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 226, 32)
    timesteps = torch.tensor([10, 999])
    inputs = family.model_inputs({"prompt_embeds": states}, noisy, torch.float32)
    ours = family.predict(model, noisy, timesteps, inputs)
    rotary = pipeline._prepare_rotary_positional_embeddings(32, 32, 3, torch.device("cpu"))
    theirs = model(hidden_states=noisy.permute(0, 2, 1, 3, 4), encoder_hidden_states=states, timestep=timesteps,
                   image_rotary_emb=rotary, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    assert torch.equal(ours, theirs)
    reset_accelerate()


def test_wan_prompt_states_are_zero_past_the_caption(models):
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(models["wan"])
    args = parse(models["wan"], "--resolution", "32")
    family = families.make_family(args)
    tokenizers, encoders = family.load_text(torch.float32)
    captions = ["a circle on a plain background", ""]
    ids = tokenizers[0](captions, max_length=512, padding="max_length", truncation=True, return_tensors="pt").input_ids
    ours = family.encode_prompts({"input_ids": ids}, encoders)["prompt_embeds"]
    theirs = pipeline._get_t5_prompt_embeds(captions, max_sequence_length=512, device=torch.device("cpu"))
    torch.testing.assert_close(ours, theirs)


def test_video_memory_tracker_counts_what_is_alive():
    """benchmarks/video_memory.py's PeakMemory on fake tensors: new storages counted once while alive, views and the
    given modules' parameters not at all, freed storages released (docs/video.md's memory table rests on it)."""
    import gc

    from benchmarks import video_memory

    with video_memory.fake_cuda():
        torch.empty(1000)  # before: not counted
        linear = torch.nn.Linear(10, 10)
        with video_memory.PeakMemory(linear) as tracker:
            first = torch.empty(250)  # 1000 bytes
            second = first * 2  # 1000 bytes
            second[:10], linear.weight.t()  # noqa: B018 - views
            del first
            gc.collect()
            third = torch.empty(500)  # 2000 bytes, after the first was freed
    assert (tracker.peak, tracker.live) == (3000, 3000)
    assert second.shape == (250,) and third.shape == (500,)
    fixed = video_memory.fixed_bytes({"transformer": 10, "lora": 1, "text_encoder": 3, "vae": 2})
    assert fixed["full"] == {"weights": 40, "gradients": 40, "optimizer": 80, "reference": 20, "frozen": 10}
    assert fixed["lora"] == {"weights": 24, "gradients": 4, "optimizer": 8, "reference": 0, "frozen": 10}


# --- display rotation --------------------------------------------------------------------------------------------


def rotated_mp4(path, rotation):
    """4 frames stored 16 high x 32 wide, a white block in the stored top-left corner, with a display matrix that
    turns them `rotation` degrees counter-clockwise (PyAV 18's set_display_rotation; -90 is what phones write)."""
    import av

    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:8, :8] = 255
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.height, stream.width, stream.pix_fmt, stream.bit_rate = 16, 32, "yuv420p", 4_000_000
        stream.set_display_rotation(rotation)
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def stored_frames(path):
    """The frames as stored, no rotation applied (what decoding gave before)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_display_rotation_is_applied_in_training_and_scoring(tmp_path):
    """A phone-style mp4 (display rotation -90: turn 90 degrees clockwise to show it) decodes upright for training
    (video_data.decode_clip) and scoring (eval.video.read_frames): 32 high x 16 wide, the stored top-left block now
    top-right. Compared with the stored frames turned by np.rot90: the same decoded pixels, so equal bitwise."""
    from eval.video import display_rotation, read_frames

    path = rotated_mp4(tmp_path / "phone.mp4", -90)
    import av

    with av.open(str(path)) as container:
        assert display_rotation(next(container.decode(video=0))) == 270  # -90 read back from the display matrix
    stored = stored_frames(path)
    assert stored[0].shape == (16, 32, 3)
    upright = np.rot90(stored[0], k=-1)  # clockwise
    clip = video_data.decode_clip(str(path), 4).numpy()
    assert clip.shape == (4, 32, 16, 3) and np.array_equal(clip[0], upright)
    scored = np.asarray(read_frames(path)[0])
    assert np.array_equal(scored, upright)
    assert scored[:8, -8:].mean() > 200 and scored[:8, :8].mean() < 50  # the block went top-right
    plain = rotated_mp4(tmp_path / "plain.mp4", 0)  # no rotation: frames as stored
    assert np.array_equal(video_data.decode_clip(str(plain), 4).numpy()[0], stored_frames(plain)[0])


def test_wan_sees_the_integer_timesteps_its_sampler_feeds(models):
    """WanPipeline (UniPCMultistepScheduler, use_flow_sigmas) calls the transformer with int64 timesteps
    floor(s x 1000); training's family.predict turns its float s x 1000 (877.59) into the same kind (877)."""
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(models["wan"])
    seen = []
    hook = pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    pipeline("a circle", num_frames=5, height=32, width=32, num_inference_steps=3, output_type="latent")
    sigmas = pipeline.scheduler.sigmas[:3].double()
    assert all(t.dtype == torch.int64 for t in seen)
    assert sorted({int(t[0]) for t in seen}, reverse=True) == [int(s * 1000) for s in sigmas]
    seen.clear()
    args = parse(models["wan"], "--resolution", "32")
    family = families.make_family(args)
    inputs = family.model_inputs({"prompt_embeds": torch.randn(1, 512, 32)}, None, torch.float32)
    family.predict(pipeline.transformer, torch.randn(1, 16, 2, 4, 4), torch.tensor([877.59]), inputs)
    hook.remove()
    assert seen[0].dtype == torch.int64 and seen[0].tolist() == [877]
    reset_accelerate()


def test_manifest_labels_are_cast_per_line(models, tmp_path, pairs):
    """label_0 1 on one line and "0" on another (Arrow alone refuses the mixed column, naming no line): cast per line
    as parquet labels are; a label that is not a number names its line."""
    manifest = tmp_path / "pairs.jsonl"
    video = str(next(pairs["manifest"].parent.rglob("*.mp4")))
    lines = [{"caption": "a", "video_0": video, "video_1": video, "label_0": 1},
             {"caption": "b", "video_0": video, "video_1": video, "label_0": "0"},
             {"caption": "c", "video_0": video, "video_1": video, "label_0": "0.5"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = train.load_rows(video_args(models, manifest))
    assert rows["label_0"] == [1.0, 0.0, 0.5]
    lines[1]["label_0"] = "left"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 2: label_0 holds 'left', which is not a number"):
        train.load_rows(video_args(models, manifest))


def decodes(path) -> bool:
    try:
        video_data.decode_clip(str(path), int(FRAMES["wan"]))
        return True
    except Exception:  # noqa: BLE001 - the tiny set's corrupt and too-short clips
        return False


def no_signal_manifest(pairs, out):
    """6 rows: 0 winner and loser one file, 1 a missing loser, 2 two files with the same frames (three bad rows in a
    row), then 3 good decided pairs taken from the tiny set's manifest."""
    import shutil

    source = pairs["manifest"]
    good = [json.loads(line) for line in source.read_text().splitlines()]
    good = [e for e in good if e["label_0"] in (0, 1) and all(decodes(source.parent / e[f"video_{side}"]) for side in (0, 1))]
    out.mkdir(parents=True, exist_ok=True)
    for entry in good[:6]:  # copy the videos next to the new manifest
        for side in (0, 1):
            (out / entry[f"video_{side}"]).parent.mkdir(exist_ok=True)
            shutil.copy(source.parent / entry[f"video_{side}"], out / entry[f"video_{side}"])
    first = good[3]["video_0"]
    shutil.copy(out / first, out / "videos" / "copy.mp4")
    lines = [dict(good[3], video_1=first), dict(good[4], video_1="videos/missing.mp4"),
             dict(good[5], video_1="videos/copy.mp4", video_0=first)] + good[:3]
    manifest = out / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return manifest


def test_pairs_without_preference_signal_are_skipped_and_each_bad_row_met_is_reported(models, pairs, tmp_path):
    """Row 0 (the same file twice) stands in through rows 1 and 2 (a missing file, identical frames in two files)
    to row 3: the example reports all three bad rows with their reasons, not "1 skipped"."""
    manifest = no_signal_manifest(pairs, tmp_path / "data")
    args = video_args(models, manifest, "--proportion_empty_prompts", "0")
    _, out = examples(args, [(0, 0, 0), (0, 0, 1)])
    assert out[0]["skipped"] == 1
    assert [(row, reason) for row, reason, _ in out[0]["bad_rows"]] == [
        (0, "no preference signal"), (1, "undecodable video"), (2, "no preference signal")]
    assert "same file" in out[0]["bad_rows"][0][2] and "missing.mp4" in out[0]["bad_rows"][1][2]
    assert "same frames" in out[0]["bad_rows"][2][2]
    assert [row for row, _, _ in out[1]["bad_rows"]] == [1, 2]  # met again as stand-ins: the run counts each once


def test_bad_rows_are_counted_once_per_reason_in_a_run(models, pairs, tmp_path):
    """Two epochs over the 6 rows (batch 1): the 3 bad rows are met as keys and as stand-ins, twice each epoch, and
    counted 3 times in all, per reason in training_state.json."""
    manifest = no_signal_manifest(pairs, tmp_path / "data")
    train_video("wan", models, manifest, tmp_path / "out", "--train_method", "sft", "--train_batch_size", "1",
                "--checkpointing_steps", "12", steps=12)
    assert metrics(tmp_path / "out")[-1]["skipped_rows"] == 3
    state = json.loads((tmp_path / "out" / "checkpoint-12" / "training_state.json").read_text())
    assert state["skipped_rows"] == 3
    assert state["skipped_by_reason"] == {"undecodable video": 1, "no preference signal": 2}


def test_a_run_whose_rows_all_fail_names_the_video_and_the_reason(models, pairs, tmp_path):
    """81 frames from 12-frame clips: every row fails; the error names the row, the video and why (raised in a
    DataLoader worker, it reaches the user as that cause, train.worker_cause)."""
    with pytest.raises(RuntimeError) as caught:
        run_train(models["wan"], pairs["manifest"], tmp_path, "--num_frames", "81", "--dataloader_num_workers", "1")
    message = train.worker_cause(str(caught.value))
    assert message.startswith("row ") and ".mp4: video too short (12 frames, the clip needs 81)" in message
    assert message.endswith("(DataLoader worker process 0)") and "\n" not in message


def test_video_run_states_its_clip_and_points_to_its_evaluation(models, pairs, tmp_path, caplog):
    """The log and training_config.json give frames, size and spacing; the model card is tagged text-to-video with
    them; the summary names test_wan.sh; after a resume it says which steps this launch trained."""
    import logging

    caplog.set_level(logging.INFO, logger="train")
    train_video("wan", models, pairs["parquet"], tmp_path, "--use_lora", steps=2)
    clip = "5 frames of 32 x 32 px, consecutive source frames (the source's fps)"
    assert json.loads((tmp_path / "training_config.json").read_text())["resolved"]["video"] == clip
    card = (tmp_path / "README.md").read_text()
    assert "tags: [text-to-video," in card and clip in card
    assert f"Video: {clip}" in caplog.text
    assert f"Evaluate: PRETRAIN={models['wan']} bash scripts/eval/test_wan.sh {tmp_path}" in caplog.text
    assert "no evaluation script" not in caplog.text and "Finished 2 steps in" in caplog.text
    caplog.clear()
    train_video("wan", models, pairs["parquet"], tmp_path, "--use_lora", steps=3)
    assert "Finished at step 3: steps 3..3 (1) in this launch" in caplog.text and "resumed from step 2" in caplog.text
