"""tiny.build_sd2v / build_sd3 / build_flux: each folder loads with its real pipeline class, generates an image of the
right size in 2 steps on CPU, carries the real configs' key values, and its tokenizers round-trip a caption."""

import json

import pytest
import torch

CAPTION = "a circle on a plain background"


def _read(path):
    return json.loads(path.read_text())


def _generate(pipe, **kwargs):
    return pipe(CAPTION, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images[0]


@pytest.fixture(scope="module")
def sd2v(tmp_path_factory):
    from tiny import build_sd2v

    return build_sd2v(tmp_path_factory.mktemp("families") / "tiny-sd2v")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny import build_sd3

    return build_sd3(tmp_path_factory.mktemp("families") / "tiny-sd3")


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    from tiny import build_flux

    return build_flux(tmp_path_factory.mktemp("families") / "tiny-flux-dev")


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory):
    from tiny import build_flux

    return build_flux(tmp_path_factory.mktemp("families") / "tiny-flux-schnell", guidance_embeds=False)


def _assert_clip_round_trip(tokenizer):
    ids = tokenizer(CAPTION).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # <|startoftext|> ... <|endoftext|>, the real CLIP ids
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == CAPTION


def _assert_t5(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    for text in (CAPTION, "A Red Square, 2x bigger!"):
        ids = tokenizer(text).input_ids
        assert ids[-1] == 1 and 2 not in ids, ids  # "</s>" appended, no <unk> for ASCII text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    padded = tokenizer(CAPTION, padding="max_length", max_length=40).input_ids
    assert len(padded) == 40 and padded[-1] == 0


def test_sd2v_layout_config_and_generation(sd2v, tiny_sd15):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert sorted(p.name for p in sd2v.iterdir()) == sorted(p.name for p in tiny_sd15.iterdir())
    assert _read(sd2v / "model_index.json")["scheduler"] == ["diffusers", "DDIMScheduler"]
    raw = _read(sd2v / "scheduler" / "scheduler_config.json")
    assert raw["prediction_type"] == "v_prediction"
    assert "timestep_spacing" not in raw and "rescale_betas_zero_snr" not in raw  # as the real SD2.1 config
    pipe = StableDiffusionPipeline.from_pretrained(sd2v, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    config = pipe.scheduler.config
    assert (config.timestep_spacing, config.rescale_betas_zero_snr, config.steps_offset) == ("leading", False, 1)
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    _assert_clip_round_trip(pipe.tokenizer)
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    assert _generate(pipe).size == (32, 32)


def test_sd3_config_tokenizers_and_generation(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

    assert _read(sd3 / "model_index.json")["tokenizer_3"] == ["transformers", "T5TokenizerFast"]
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    t = pipe.transformer.config
    assert (t.in_channels, t.out_channels, t.patch_size) == (16, 16, 2)
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    clip_widths = pipe.text_encoder.config.projection_dim, pipe.text_encoder_2.config.projection_dim
    assert t.pooled_projection_dim == sum(clip_widths)
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert t.qk_norm == "rms_norm" and list(t.dual_attention_layers) == [0]
    _assert_clip_round_trip(pipe.tokenizer)
    _assert_clip_round_trip(pipe.tokenizer_2)
    _assert_t5(pipe.tokenizer_3)
    _assert_t5(T5TokenizerFast.from_pretrained(sd3, subfolder="tokenizer_3"))
    assert _generate(pipe).size == (32, 32)  # the default size: transformer sample_size x vae factor
    assert _generate(pipe, height=48, width=64, guidance_scale=1.0).size == (64, 48)


def test_sd3_transformer_forward_for_training(sd3):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer")
    latents = torch.randn(2, 16, 16, 16)
    out = transformer(
        hidden_states=latents, encoder_hidden_states=torch.randn(2, 7, transformer.config.joint_attention_dim),
        pooled_projections=torch.randn(2, transformer.config.pooled_projection_dim),
        timestep=torch.tensor([999.0, 10.0]),  # SD3: the scheduler's timesteps, sigma * 1000, as they are
    ).sample
    assert out.shape == latents.shape


def test_flux_dev_config_tokenizers_and_generation(flux_dev):
    from diffusers import FluxPipeline
    from transformers import T5TokenizerFast

    assert _read(flux_dev / "model_index.json")["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    pipe = FluxPipeline.from_pretrained(flux_dev)
    s = pipe.scheduler.config
    assert (s.shift, s.use_dynamic_shifting, s.base_shift, s.max_shift) == (3.0, True, 0.5, 1.15)
    assert (s.base_image_seq_len, s.max_image_seq_len) == (256, 4096)
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    t = pipe.transformer.config
    assert t.guidance_embeds and t.in_channels == 16 * 4 and t.patch_size == 1
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    _assert_clip_round_trip(pipe.tokenizer)
    _assert_t5(pipe.tokenizer_2)
    _assert_t5(T5TokenizerFast.from_pretrained(flux_dev, subfolder="tokenizer_2"))
    assert _generate(pipe, height=32, width=32).size == (32, 32)
    assert _generate(pipe, height=24, width=40, max_sequence_length=32).size == (40, 24)  # multiples of 2 x vae 2


def test_flux_schnell_variant(flux_schnell):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_schnell)
    assert not pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert _generate(pipe, height=32, width=32, guidance_scale=0.0).size == (32, 32)


def test_flux_packing_and_transformer_forward_for_training(flux_dev):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(flux_dev, subfolder="transformer")
    vae_factor = 2
    batch, height, width = 2, 32, 48  # pixels; latents 16 x 24, packed into 8 x 12 tokens of 64 channels
    latents = torch.randn(batch, 16, height // vae_factor, width // vae_factor)
    packed = FluxPipeline._pack_latents(latents, batch, 16, *latents.shape[2:])
    assert packed.shape == (batch, 8 * 12, 64)
    assert torch.equal(FluxPipeline._unpack_latents(packed, height, width, vae_factor), latents)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, 8, 12, "cpu", torch.float32)
    assert img_ids.shape == (8 * 12, 3)
    text_len = 5
    text_states = torch.randn(batch, text_len, transformer.config.joint_attention_dim)
    out = transformer(
        hidden_states=packed, encoder_hidden_states=text_states,
        pooled_projections=torch.randn(batch, transformer.config.pooled_projection_dim),
        timestep=torch.tensor([1.0, 0.5]),  # FLUX: sigma in [0, 1]; the model multiplies by 1000 itself
        img_ids=img_ids, txt_ids=torch.zeros(text_len, 3), guidance=torch.full((batch,), 3.5),
    ).sample
    assert out.shape == packed.shape


def test_t5_tokenizer_is_deterministic(tmp_path):
    from tiny import build_t5_tokenizer

    a, b = build_t5_tokenizer(tmp_path / "a"), build_t5_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert a(CAPTION).input_ids == b(CAPTION).input_ids
