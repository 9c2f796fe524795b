"""The interface every family implements (families/__init__.py registers them): what train.py asks of a model."""

from __future__ import annotations

import torch


class Family:
    """The interface train.py uses; one subclass per family. `denoiser` names the trained model's subfolder and the
    file stem of its weights (`unet.safetensors`, `transformer.safetensors`)."""

    name = ""
    denoiser = "unet"
    pipeline_class = ""
    default_resolution = 512
    lora_targets = "to_k,to_q,to_v,to_out.0"
    dspo_variant = "sd"  # the official DSPO loss has a separate SDXL form (train.dspo_loss)
    video = False  # video families (families/video.py): mp4 pairs, (N, C, F, H, W) latents
    components = ("tokenizer", "text_encoder", "vae", "scheduler")
    experts = ("",)  # file-name suffix of each trained denoiser (wan22_a14b: "" transformer, "_2" transformer_2)

    def __init__(self, args):
        self.args = args

    @classmethod
    def check_args(cls, parser, args):
        """Family-specific refusals and defaults, in arguments.parse_args (after the video checks)."""
        for flag in ("train_expert", "conditioning_image", "conditioning_image_column"):
            if getattr(args, flag, None) not in (None, "none"):
                parser.error(f"--{flag} is for the Wan2.2 / image-to-video families, not {args.model_family}")

    # --- loading -----------------------------------------------------------------------------------------------
    def check_components(self, base: str, revision=None):
        """A local model folder missing a component is named before anything loads (hub ids: from_pretrained says)."""
        from pathlib import Path

        folder = Path(base)
        if folder.is_dir() and (folder / "model_index.json").exists():
            missing = [name for name in (*self.components, self.denoiser) if not (folder / name).is_dir()]
            if missing:
                raise FileNotFoundError(f"{base} has no {', '.join(f'{m}/' for m in missing)} folder: a {self.name} "
                                        f"model needs {', '.join(f'{c}/' for c in (*self.components, self.denoiser))}")

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def load_denoiser(self, source: str, revision=None, dtype=None):
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        return self.denoiser_class().from_pretrained(source, subfolder=self.denoiser, revision=revision, **kwargs)

    def load_vae(self, dtype):
        from diffusers import AutoencoderKL

        args = self.args
        if args.pretrained_vae_model_name_or_path:
            return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=dtype)
        return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                             revision=args.revision, torch_dtype=dtype)

    def load_text(self, dtype) -> tuple[list, list]:
        raise NotImplementedError

    def load_noise(self):
        raise NotImplementedError

    # --- one micro-batch ---------------------------------------------------------------------------------------
    def max_lengths(self) -> list[int]:
        """Token sequence length per tokenizer (data.pairs.Collate pads to it in the DataLoader workers)."""
        return [tokenizer.model_max_length for tokenizer in self.tokenizers]

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents in fp32 of a posterior sample of the frozen VAE."""
        return self.normalise_latents(vae.encode(pixels).latent_dist.sample().float(), vae.config)

    def normalise_latents(self, sample: torch.Tensor, config) -> torch.Tensor:
        """(sample - shift_factor) * scaling_factor, from the VAE config (no shift for SD/SDXL)."""
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            sample = sample - shift
        return sample * config.scaling_factor

    def encode_prompts(self, batch: dict, text_encoders: list) -> dict:
        """Conditioning tensors, batch first (repeated for the loser half by the caller)."""
        raise NotImplementedError

    def model_inputs(self, conditioning: dict, noisy: torch.Tensor, dtype) -> dict:
        """Keyword arguments of the denoiser besides the noisy latents and the timesteps."""
        raise NotImplementedError

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def accelerator_kwargs(cls, args) -> list:
        """accelerate kwargs handlers the family needs (train.main passes them to Accelerator)."""
        return []

    # --- saving ------------------------------------------------------------------------------------------------
    def expert_states(self, state: dict) -> dict:
        """{file suffix: state} of what is saved: the denoiser alone; two experts split (families/wan22.py)."""
        return {"": state}

    def joined_state(self, states: dict) -> dict:
        """The inverse of expert_states."""
        return states[""]

    def pipeline_denoisers(self, model) -> dict:
        """The pipeline components the trained denoiser stands for."""
        return {self.denoiser: model}

    def card_usage(self, usage: str, base: str) -> str:
        """The model card's loading lines (report.write_model_card writes the one-denoiser ones)."""
        return usage

    def lora_state(self, peft_state: dict) -> dict:
        """The adapter state in the format the family's pipeline.load_lora_weights reads."""
        return peft_state

    def save_lora(self, folder, state: dict, weight_name: str, metadata: dict):
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(
            folder, weight_name=weight_name, **{f"{self.denoiser}_lora_layers": state,
                                                f"{self.denoiser}_lora_adapter_metadata": metadata})
