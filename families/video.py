"""Video model families: Wan2.1 text-to-video (`wan`) and CogVideoX (`cogvideox`), behind the image families'
interface (families/__init__.py), so the losses, the safeguard, the importance options, LoRA, EMA and exact resume
work unchanged on (N, C, F, H, W) video latents.

| family | models | denoiser | text side | parametrisation |
|---|---|---|---|---|
| `wan` | Wan2.1-T2V-1.3B, -14B (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) | WanTransformer3DModel | UMT5, 512 tokens, states past the caption zeroed | rectified flow, the scheduler's flow_shift |
| `cogvideox` | CogVideoX-2b, -5b (`THUDM/CogVideoX-2b`) | CogVideoXTransformer3DModel, rotary embeddings where its config asks | T5, 226 tokens | DDPM v-prediction on the scheduler's (zero-terminal-SNR) alphas_cumprod |

Latents stay channel-second, (N, C, F, H, W), for the noise processes and the losses (the noise offset is per channel
there, as for images); the CogVideoX transformer's (N, F, C, H, W) layout is made in `predict` and undone after.
Each family mirrors what its diffusers pipeline does at inference (WanPipeline, CogVideoXPipeline; read for facts,
our code), and the frozen VAE encodes one video at a time (slicing; --vae_tiling adds spatial tiles).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from families.base import Family
from families.noise import DDPMNoise, FlowNoise


class VideoFamily(Family):
    """What the video families share: a transformer denoiser, one T5-like text encoder, a video VAE."""

    video = True
    denoiser = "transformer"
    lora_targets = "to_k,to_q,to_v,to_out.0"  # diffusers' CogVideoX LoRA example (examples/cogvideo) targets these
    components = ("tokenizer", "text_encoder", "vae", "scheduler")
    default_resolution = 480
    default_video_size = (480, 832)
    default_num_frames = 81
    frame_multiple, frame_rule = 4, "the VAE compresses time 4x, causally: 4k + 1 frames make k + 1 latent frames"
    text_length = 512
    vae_class_name = ""
    encoder_class_name = ""

    def vae_class(self):
        import diffusers

        return getattr(diffusers, self.vae_class_name)

    def load_vae(self, dtype):
        args = self.args
        if args.pretrained_vae_model_name_or_path:
            vae = self.vae_class().from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=dtype)
        else:
            vae = self.vae_class().from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                                   revision=args.revision, torch_dtype=dtype)
        vae.enable_slicing()  # one video at a time through the encoder: the same latents, a pair's worth less memory
        if getattr(args, "vae_tiling", False):
            vae.enable_tiling()
        self.vae_config = vae.config
        return vae

    def load_text(self, dtype):
        import transformers
        from transformers import AutoTokenizer

        args = self.args
        base, revision = args.pretrained_model_name_or_path, args.revision
        try:
            tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision)
        except Exception as error:  # noqa: BLE001 - OSError offline, ValueError for broken files
            raise RuntimeError(f"cannot load the tokenizer of {base} (tokenizer/): {error}") from None
        self.tokenizers = [tokenizer]
        encoder = getattr(transformers, self.encoder_class_name).from_pretrained(
            base, subfolder="text_encoder", revision=revision, torch_dtype=dtype)
        return self.tokenizers, [encoder]

    def max_lengths(self):
        return [self.text_length]

    def model_inputs(self, conditioning, noisy, dtype):
        return {"encoder_hidden_states": conditioning["prompt_embeds"].to(dtype)}


class Wan(VideoFamily):
    """Wan2.1 text-to-video: UMT5 states of the caption (512 tokens, the positions past the caption set to zero, as
    WanPipeline pads them), latents normalised per channel with the VAE's latents_mean / latents_std, rectified flow
    with the scheduler's shift; the transformer sees the integer timestep floor(s x 1000), as WanPipeline gives it
    (docs/video.md: UniPCMultistepScheduler.set_timesteps casts its flow timesteps s x 1000 to int64)."""

    name, pipeline_class = "wan", "WanPipeline"
    default_video_size, default_num_frames = (480, 832), 81  # WanPipeline's defaults (480 x 832, 81 frames)
    text_length = 512  # WanPipeline.__call__'s max_sequence_length
    vae_class_name, encoder_class_name = "AutoencoderKLWan", "UMT5EncoderModel"

    def denoiser_class(self):
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def load_noise(self):
        """FlowNoise on a FlowMatchEulerDiscreteScheduler grid with the model's shift: Wan2.1's scheduler/ is a
        UniPCMultistepScheduler (prediction_type flow_prediction, use_flow_sigmas, flow_shift 3.0 for
        Wan2.1-T2V-1.3B-Diffusers as far as we know), a sampler of the same flow: its sigmas are
        shift s / (1 + (shift - 1) s), as FlowMatchEulerDiscreteScheduler's with `shift`. An older conversion that
        ships FlowMatchEulerDiscreteScheduler itself is read as it is."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        args = self.args
        config = FlowMatchEulerDiscreteScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                             revision=args.revision)
        kind = config.get("_class_name")
        if kind == "FlowMatchEulerDiscreteScheduler":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        else:
            if config.get("prediction_type") != "flow_prediction" or not config.get("use_flow_sigmas", False):
                raise ValueError(f"{args.pretrained_model_name_or_path}: its scheduler ({kind}) is not a flow-matching "
                                 f"sampler (prediction_type {config.get('prediction_type')!r}, use_flow_sigmas "
                                 f"{config.get('use_flow_sigmas')!r}); wan trains rectified flow")
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                                        shift=config.get("flow_shift", 1.0))
        return FlowNoise(scheduler, args)

    def load_text(self, dtype):
        tokenizers, encoders = super().load_text(dtype)
        self.pad_id = tokenizers[0].pad_token_id
        return tokenizers, encoders

    def encode_prompts(self, batch, text_encoders):
        ids = batch["input_ids"]
        mask = ids != self.pad_id  # the tokenizer's attention mask: T5's pad id appears only as padding
        states = text_encoders[0](ids, attention_mask=mask.long()).last_hidden_state
        return {"prompt_embeds": states.masked_fill(~mask[..., None], 0)}

    def encode_images(self, vae, pixels):
        """(N, 3, F, H, W) in [-1, 1] -> (z - latents_mean) / latents_std per channel, fp32 (WanPipeline decodes
        latents * std + mean)."""
        latents = vae.encode(pixels).latent_dist.sample().float()
        shape = (1, -1) + (1,) * (latents.dim() - 2)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return (latents - mean) / std

    def predict(self, model, noisy, timesteps, inputs):
        # Sampling feeds int64 timesteps (UniPCMultistepScheduler with use_flow_sigmas: (sigmas * 1000) cast to int64,
        # i.e. truncated; FlowMatchEulerDiscreteScheduler's float s * 1000 is not what the model meets): the same here.
        return model(hidden_states=noisy, timestep=timesteps.long(), return_dict=False, **inputs)[0]


class CogVideoX(VideoFamily):
    """CogVideoX-2b / -5b: T5 states of the caption (226 tokens, no mask, as CogVideoXPipeline), latents
    z x scaling_factor, DDPM v-prediction on the scheduler's alphas_cumprod (CogVideoXDDIMScheduler: SNR-shifted,
    rescaled to zero terminal SNR), the 3D rotary embeddings CogVideoXPipeline computes when the transformer's config
    asks (the 5b), integer timesteps. diffusers' CogVideoX training example weights an x0 loss by 1 / (1 - abar_t);
    that is exactly the v-prediction MSE used here (x0_hat - x_0 = -sqrt(1 - abar_t) (v_hat - v))."""

    name, pipeline_class = "cogvideox", "CogVideoXPipeline"
    default_video_size, default_num_frames = (480, 720), 49  # CogVideoXPipeline's defaults
    frame_multiple = 8
    frame_rule = ("the VAE compresses time 4x and decodes an odd number of latent frames to 4k + 1 frames "
                  "(49 -> 13 latent frames), an even number to 4x as many")
    text_length = 226  # CogVideoXPipeline's max_sequence_length; the transformer's max_text_seq_length
    vae_class_name, encoder_class_name = "AutoencoderKLCogVideoX", "T5EncoderModel"

    def denoiser_class(self):
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel

    def load_denoiser(self, source, revision=None, dtype=None):
        model = super().load_denoiser(source, revision, dtype)
        if model.config.patch_size_t is not None:
            raise ValueError(f"{source}: a CogVideoX 1.5 transformer (patch_size_t {model.config.patch_size_t}); "
                             f"the cogvideox family trains CogVideoX 1.0 (2b, 5b)")
        self.transformer_config = model.config
        self.rotary_cache = {}
        return model

    def load_noise(self):
        import diffusers

        args = self.args
        config = diffusers.DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                     revision=args.revision)
        scheduler_class = getattr(diffusers, config.get("_class_name", "CogVideoXDDIMScheduler"))
        scheduler = scheduler_class.from_config(config)
        noise = DDPMNoise(scheduler)
        zero = (scheduler.alphas_cumprod[args.timestep_range[0] : args.timestep_range[1] + 1] == 0).any()
        if noise.prediction_type == "epsilon" and bool(zero) and args.importance_weighting != "none":
            raise ValueError("--importance_weighting with an epsilon-prediction model on a zero-terminal-SNR schedule: "
                             "at abar = 0 the reverse step cannot depend on eps_hat, so the weight has no meaning there; "
                             "restrict --timestep_range below the last timestep or drop --importance_weighting")
        return noise

    def encode_prompts(self, batch, text_encoders):
        return {"prompt_embeds": text_encoders[0](batch["input_ids"])[0]}

    def encode_images(self, vae, pixels):
        """(N, 3, F, H, W) in [-1, 1] -> z x scaling_factor, (N, C, F', H', W') fp32 (the transformer's frame-first
        layout is made in `predict`)."""
        return vae.encode(pixels).latent_dist.sample().float() * vae.config.scaling_factor

    def rotary(self, noisy):
        """(cos, sin) as CogVideoXPipeline._prepare_rotary_positional_embeddings computes them for this latent size
        (its own method, called on the model's configs), cached per size and device."""
        from diffusers import CogVideoXPipeline

        frames, height, width = noisy.shape[2], noisy.shape[3], noisy.shape[4]
        key = (frames, height, width, str(noisy.device))
        if key not in self.rotary_cache:
            spatial = 2 ** (len(self.vae_config.block_out_channels) - 1)
            pipeline = SimpleNamespace(vae_scale_factor_spatial=spatial,
                                       transformer=SimpleNamespace(config=self.transformer_config))
            self.rotary_cache[key] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                pipeline, height * spatial, width * spatial, frames, noisy.device)
        return self.rotary_cache[key]

    def model_inputs(self, conditioning, noisy, dtype):
        inputs = super().model_inputs(conditioning, noisy, dtype)
        use_rotary = self.transformer_config.use_rotary_positional_embeddings
        inputs["image_rotary_emb"] = self.rotary(noisy) if use_rotary else None
        return inputs

    def predict(self, model, noisy, timesteps, inputs):
        frames_first = noisy.permute(0, 2, 1, 3, 4)  # (N, F, C, H, W), as CogVideoXPipeline's latents
        out = model(hidden_states=frames_first, timestep=timesteps, return_dict=False, **inputs)[0]
        return out.permute(0, 2, 1, 3, 4)
