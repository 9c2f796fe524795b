"""Model families: the parts of training that depend on the model, behind one small interface, so that train.py's
losses and loop never branch on a model name.

A family says which components it loads, how a caption becomes conditioning, how latents are normalised, how a clean
latent is noised and what the target is (its parametrisation, families/noise.py), how the denoiser is called, and
which pipeline saves and samples it:

| family | models | denoiser | text side | parametrisation |
|---|---|---|---|---|
| `sd` | SD1.x, SD2.x | UNet2DConditionModel | CLIP, last hidden state | DDPM, epsilon or v as the scheduler config says |
| `sdxl` | SDXL | UNet2DConditionModel | two CLIPs, penultimate states + pooled, time ids | DDPM, epsilon |
| `sd3` | SD3, SD3.5 | SD3Transformer2DModel | two CLIPs + T5, pooled CLIPs | rectified flow, the scheduler's shift |
| `flux` | FLUX.1-dev, -schnell | FluxTransformer2DModel | CLIP pooled + T5, guidance embedding | rectified flow |
| `wan` | Wan2.1-T2V 1.3B, 14B | WanTransformer3DModel | UMT5, padded states zeroed | rectified flow, the scheduler's flow_shift |
| `cogvideox` | CogVideoX-2b, -5b | CogVideoXTransformer3DModel (+ rotary) | T5, 226 tokens | DDPM v-prediction, zero terminal SNR |
| `wan22`, `wan22_a14b`, `wan_i2v` | Wan2.2-TI2V-5B; Wan2.2-T2V/I2V-A14B (two experts); Wan2.1-I2V | families/wan22.py | UMT5 (+ image) | rectified flow |

The family is read from the model's `model_index.json` (`_class_name`); `--model_family` overrides it; `--sdxl` means
`--model_family sdxl`. Each family mirrors what its diffusers pipeline does at inference (read for facts, our code).
The video families are in families/video.py, the interface in families/base.py. A new family: a `Family` subclass in
its own module under families/ (importing families.base and families.noise, not this package), imported below and
added to FAMILIES, and its pipeline class to PIPELINE_FAMILIES.
"""

from __future__ import annotations

import torch

from families.base import Family
from families.noise import DDPMNoise, FlowNoise, Noised, gaussian_path_coefficients  # noqa: F401

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
}


def model_index_class(path: str, revision=None) -> str | None:
    """The pipeline class named in the model's model_index.json (a folder, or a hub id in the cache), or None."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except Exception:  # noqa: BLE001 - no model_index.json (a bare UNet folder, a missing model): decided later
        return None


def resolve_family(args) -> str:
    """--model_family, or --sdxl, or what the model's model_index.json says (default `sd`); contradictions refused."""
    detected = PIPELINE_FAMILIES.get(model_index_class(args.pretrained_model_name_or_path, args.revision))
    from families.wan22 import detect_wan, model_index

    detected = detect_wan(model_index(args.pretrained_model_name_or_path, args.revision)) or detected  # Wan2.2, I2V
    chosen = args.model_family or ("sdxl" if args.sdxl else None)
    if args.sdxl and args.model_family not in (None, "sdxl"):
        raise ValueError(f"--sdxl contradicts --model_family {args.model_family}; drop one of them")
    if chosen and detected and chosen != detected:
        raise ValueError(f"{args.pretrained_model_name_or_path} is a {detected} model (its model_index.json), not "
                         f"{chosen}: drop {'--sdxl' if args.sdxl else '--model_family ' + chosen} or choose another model")
    return chosen or detected or "sd"


class StableDiffusion(Family):
    """SD1.x and SD2.x: one CLIP text encoder (last hidden state), epsilon or v-prediction."""

    name, pipeline_class = "sd", "StableDiffusionPipeline"

    def load_text(self, dtype):
        from transformers import CLIPTextModel

        from families.conditioning import load_tokenizer

        args = self.args
        self.tokenizers = [load_tokenizer(args.pretrained_model_name_or_path, "tokenizer", args.revision)]
        encoders = [CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                  revision=args.revision, torch_dtype=dtype)]
        return self.tokenizers, encoders

    def load_noise(self):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(self.args.pretrained_model_name_or_path, subfolder="scheduler",
                                                  revision=self.args.revision)
        return DDPMNoise(scheduler)

    def encode_prompts(self, batch, text_encoders):
        return {"prompt_embeds": text_encoders[0](batch["input_ids"])[0]}

    def model_inputs(self, conditioning, noisy, dtype):
        return {"encoder_hidden_states": conditioning["prompt_embeds"].to(dtype), "added_cond_kwargs": None}

    def predict(self, model, noisy, timesteps, inputs):
        return model(noisy, timesteps, inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"]).sample

    def lora_state(self, peft_state):
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)


class StableDiffusionXL(StableDiffusion):
    """SDXL: both CLIP encoders' penultimate states concatenated, the second's projected pooled embedding, and time
    ids (res, res, 0, 0, res, res) as the official code (an empty caption is the real encoding of "")."""

    name, pipeline_class, default_resolution, dspo_variant = "sdxl", "StableDiffusionXLPipeline", 1024, "sdxl"
    components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler")

    def load_text(self, dtype):
        from transformers import CLIPTextModelWithProjection

        from families.conditioning import load_tokenizer

        args = self.args
        tokenizers, encoders = super().load_text(dtype)
        tokenizers.append(load_tokenizer(args.pretrained_model_name_or_path, "tokenizer_2", args.revision))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="text_encoder_2", revision=args.revision, torch_dtype=dtype))
        return tokenizers, encoders

    def encode_prompts(self, batch, text_encoders):
        states = []
        for i, encoder in enumerate(text_encoders):
            output = encoder(batch["input_ids" if i == 0 else f"input_ids_{i + 1}"], output_hidden_states=True)
            states.append(output.hidden_states[-2])
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled": output[0]}

    def model_inputs(self, conditioning, noisy, dtype):
        from families.conditioning import sdxl_time_ids

        added = {"text_embeds": conditioning["pooled"].to(dtype),
                 "time_ids": sdxl_time_ids(noisy.shape[0], self.args.resolution, noisy.device, dtype)}
        return {"encoder_hidden_states": conditioning["prompt_embeds"].to(dtype), "added_cond_kwargs": added}


class StableDiffusion3(Family):
    """SD3 / SD3.5: CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to T5's width) followed by T5's
    states along the sequence; pooled = both CLIPs' projected embeddings; rectified flow with the scheduler's shift."""

    name, denoiser, pipeline_class, default_resolution = "sd3", "transformer", "StableDiffusion3Pipeline", 1024
    lora_targets = ("to_k,to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out,"
                    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2")
    components = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "vae", "scheduler")
    t5_length = 256  # StableDiffusion3Pipeline's max_sequence_length default

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def load_text(self, dtype):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        from families.conditioning import load_tokenizer

        base, revision = self.args.pretrained_model_name_or_path, self.args.revision
        self.tokenizers = [load_tokenizer(base, "tokenizer", revision), load_tokenizer(base, "tokenizer_2", revision),
                           AutoTokenizer.from_pretrained(base, subfolder="tokenizer_3", revision=revision)]
        encoders = [CLIPTextModelWithProjection.from_pretrained(base, subfolder=f"text_encoder{s}", revision=revision,
                                                                torch_dtype=dtype) for s in ("", "_2")]
        encoders.append(T5EncoderModel.from_pretrained(base, subfolder="text_encoder_3", revision=revision, torch_dtype=dtype))
        return self.tokenizers, encoders

    def max_lengths(self):
        return [self.tokenizers[0].model_max_length, self.tokenizers[1].model_max_length, self.t5_length]

    def load_noise(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.args.pretrained_model_name_or_path,
                                                                    subfolder="scheduler", revision=self.args.revision)
        return FlowNoise(scheduler, self.args)

    def encode_prompts(self, batch, text_encoders):
        clip_states, pooled = [], []
        for key, encoder in zip(("input_ids", "input_ids_2"), text_encoders[:2]):
            output = encoder(batch[key], output_hidden_states=True)
            clip_states.append(output.hidden_states[-2])
            pooled.append(output[0])
        t5_states = text_encoders[2](batch["input_ids_3"])[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def model_inputs(self, conditioning, noisy, dtype):
        return {"encoder_hidden_states": conditioning["prompt_embeds"].to(dtype),
                "pooled_projections": conditioning["pooled"].to(dtype)}

    def predict(self, model, noisy, timesteps, inputs):
        return model(hidden_states=noisy, timestep=timesteps, return_dict=False, **inputs)[0]


class Flux(Family):
    """FLUX.1: CLIP's pooled output and T5's states; 2x2-packed latent tokens with their image ids (text ids 0);
    the guidance embedding of FLUX.1-dev (--guidance_scale, for policy and reference alike); rectified flow, the
    transformer seeing s (timestep / 1000)."""

    name, denoiser, pipeline_class, default_resolution = "flux", "transformer", "FluxPipeline", 1024
    lora_targets = ("to_k,to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out,"
                    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,proj_mlp")
    components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler")
    t5_length = 512  # FluxPipeline's max_sequence_length default (FLUX.1-schnell: at most 256)

    def denoiser_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def load_text(self, dtype):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from families.conditioning import load_tokenizer

        base, revision = self.args.pretrained_model_name_or_path, self.args.revision
        self.tokenizers = [load_tokenizer(base, "tokenizer", revision),
                           AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=revision)]
        encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=revision, torch_dtype=dtype),
                    T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2", revision=revision, torch_dtype=dtype)]
        return self.tokenizers, encoders

    def max_lengths(self):
        return [self.tokenizers[0].model_max_length, self.t5_length]

    def load_denoiser(self, source, revision=None, dtype=None):
        model = super().load_denoiser(source, revision, dtype)
        self.guidance_embeds = bool(model.config.guidance_embeds)  # FLUX.1-dev: yes; -schnell: no
        return model

    def load_noise(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.args.pretrained_model_name_or_path,
                                                                    subfolder="scheduler", revision=self.args.revision)
        return FlowNoise(scheduler, self.args)

    def encode_prompts(self, batch, text_encoders):
        pooled = text_encoders[0](batch["input_ids"], output_hidden_states=False).pooler_output
        return {"prompt_embeds": text_encoders[1](batch["input_ids_2"], output_hidden_states=False)[0], "pooled": pooled}

    def model_inputs(self, conditioning, noisy, dtype):
        batch, _, height, width = noisy.shape
        image_ids = torch.zeros(height // 2, width // 2, 3)
        image_ids[..., 1] = torch.arange(height // 2)[:, None]
        image_ids[..., 2] = torch.arange(width // 2)[None, :]
        prompt_embeds = conditioning["prompt_embeds"].to(dtype)
        inputs = {"encoder_hidden_states": prompt_embeds, "pooled_projections": conditioning["pooled"].to(dtype),
                  "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=dtype),
                  "img_ids": image_ids.reshape(-1, 3).to(noisy.device, dtype)}
        inputs["guidance"] = (torch.full((batch,), self.args.guidance_scale, device=noisy.device, dtype=torch.float32)
                              if self.guidance_embeds else None)
        return inputs

    def predict(self, model, noisy, timesteps, inputs):
        batch, channels, height, width = noisy.shape
        packed = noisy.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
        out = model(hidden_states=packed, timestep=timesteps / 1000, return_dict=False, **inputs)[0]
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)


from families.video import CogVideoX, Wan  # noqa: E402 - they subclass Family
from families.wan22 import Wan22, Wan22Experts, WanI2V  # noqa: E402

FAMILIES = {family.name: family for family in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, Wan, CogVideoX,
                                               Wan22, Wan22Experts, WanI2V)}


def make_family(args) -> Family:
    return FAMILIES[args.model_family](args)
