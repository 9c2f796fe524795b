"""Wan2.2 and Wan image-to-video families (issue 22), on the Wan2.1 family (families/video.py):

| family | models | denoiser | what differs from `wan` |
|---|---|---|---|
| `wan22` | Wan2.2-TI2V-5B (`Wan-AI/Wan2.2-TI2V-5B-Diffusers`) | WanTransformer3DModel, 48 channels | its VAE (48 latent channels, 16x spatial), per-token timesteps (WanPipeline's `expand_timesteps`); with `--conditioning_image first_frame` the first latent frame is the clean image latent, its tokens see timestep 0 and it is left out of the loss (WanImageToVideoPipeline with `expand_timesteps`) |
| `wan22_a14b` | Wan2.2-T2V-A14B, -I2V-A14B | two experts: `transformer` (high noise), `transformer_2` (low noise) | each pair's timestep goes to its expert at the pipeline's `boundary_ratio`; `--train_expert high / low / both` |
| `wan_i2v` | Wan2.1-I2V-14B-480P / -720P | WanTransformer3DModel, 36 input channels, CLIP image tokens | image latents and their mask concatenated to the noisy latents, the CLIP image embedding |

The family is read from model_index.json: WanPipeline with `expand_timesteps` is `wan22`, a pipeline with a
`boundary_ratio` is `wan22_a14b` (WanImageToVideoPipeline: its I2V model), WanImageToVideoPipeline without one is
`wan_i2v`. Every value fed to the transformer is built as diffusers 0.42's WanPipeline / WanImageToVideoPipeline
build it at sampling (read for facts, our code; tests/test_wan22.py compares them call by call), including the integer
timestep floor(s x 1000) that the pipelines' UniPC scheduler feeds (as the `wan` family, issue 19).

Image-to-video: the conditioning image is the first frame of the pair's videos (`--conditioning_image first_frame`,
the default for the I2V models): both clips then start at their video's first frame with the same crop and flip
(video_data), and a pair whose winner and loser begin with different frames is refused (they were not made from one
image, so no single condition fits both). `--conditioning_image_column` names a data column holding the image
instead, which then becomes both clips' first frame.
"""

from __future__ import annotations

import math

import torch

from families.noise import FlowNoise, Noised
from families.video import Wan

# Mean absolute difference (pixels in [-1, 1]) above which a pair's first frames are not one image: two encodes of
# the same frame differ by codec noise (a few grey levels of 255 at ordinary quality), 0.05 is about 6 grey levels
# on average, far below what two different images differ by.
FIRST_FRAME_TOLERANCE = 0.05


_MODEL_INDEX: dict = {}


def model_index(path: str, revision=None) -> dict:
    """model_index.json of a folder or a hub model ({} when it cannot be read, e.g. offline and not cached: then the
    flags decide, and it is read again next time)."""
    from diffusers import DiffusionPipeline

    key = (str(path), revision)
    if key not in _MODEL_INDEX:
        try:
            _MODEL_INDEX[key] = dict(DiffusionPipeline.load_config(path, revision=revision))
        except Exception:  # noqa: BLE001 - no model_index.json: the family is then decided by the flags
            return {}
    return _MODEL_INDEX[key]


def detect_wan(index: dict) -> str | None:
    """The Wan family a model_index.json describes, or None when it is not a Wan2.2 or I2V model."""
    kind = index.get("_class_name")
    if kind not in ("WanPipeline", "WanImageToVideoPipeline"):
        return None
    if index.get("boundary_ratio") is not None:
        return "wan22_a14b"
    if index.get("expand_timesteps"):
        return "wan22"
    return "wan_i2v" if kind == "WanImageToVideoPipeline" else None


def add_wan22_arguments(parser):
    group = parser.add_argument_group("Wan2.2 and image-to-video (wan22, wan22_a14b, wan_i2v; docs/video.md)")
    group.add_argument("--train_expert", type=str, default=None, choices=["high", "low", "both"],
                       help="wan22_a14b: train the high-noise expert (transformer), the low-noise one (transformer_2), "
                            "or both; one expert's timesteps are drawn only from its side of the boundary. Default both.")
    group.add_argument("--conditioning_image", type=str, default=None, choices=["none", "first_frame"],
                       help="Image-to-video: condition on the first frame the pair's videos share (default for the I2V "
                            "models; wan22 (TI2V-5B): none, text-to-video).")
    group.add_argument("--conditioning_image_column", type=str, default=None,
                       help="Image-to-video: a column of the pair data (manifest: a path relative to it; parquet: image "
                            "bytes or a path) holding the image both videos were made from; it becomes both clips' "
                            "first frame (same crop and flip). Default: the videos' shared first frame.")


def check_image_column(parser, args):
    """--conditioning_image_column needs image-to-video (and a source with columns: parquet or a manifest)."""
    if args.conditioning_image_column and args.conditioning_image != "first_frame":
        parser.error(f"--conditioning_image_column {args.conditioning_image_column}: {args.model_family} is not trained "
                     f"image-to-video here; add --conditioning_image first_frame (TI2V-5B) or use an I2V model")


class WanImageConditioned(Wan):
    """What the I2V families share: the conditioning image (the pair's shared first frame), encoded from the batch's
    pixels by the frozen VAE that load_vae keeps."""

    image_conditioned = False  # set per model in __init__

    def load_vae(self, dtype):
        self.vae = super().load_vae(dtype)  # the image condition is encoded in encode_prompts
        return self.vae

    def conditioning_frames(self, batch) -> torch.Tensor:
        """The winner's first frame, (B, 3, H, W) in [-1, 1]; refused where the loser's first frame differs."""
        pixels = batch["pixel_values"]
        first = pixels[:, :3, 0]
        if pixels.shape[1] == 6:
            difference = (first.float() - pixels[:, 3:, 0].float()).abs().flatten(1).mean(1)
            if (difference > FIRST_FRAME_TOLERANCE).any():
                raise ValueError(
                    f"--conditioning_image first_frame: a pair's winner and loser begin with different frames (mean "
                    f"absolute difference {difference.max().item():.3f} > {FIRST_FRAME_TOLERANCE} on [-1, 1]): they "
                    f"were not made from one image, so image-to-video has no condition for both; keep only pairs "
                    f"generated from the same image")
        return first

    def encode_image_latents(self, video_condition: torch.Tensor) -> torch.Tensor:
        """(N, 3, F, H, W) pixels -> the VAE posterior's mode, normalised as WanImageToVideoPipeline.prepare_latents
        does it, (z - mean) x (1 / std) (not / std: the same rounding), fp32."""
        latents = self.vae.encode(video_condition.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        shape = (1, -1) + (1,) * (latents.dim() - 2)
        mean = torch.tensor(self.vae.config.latents_mean, device=latents.device).view(shape)
        inverse_std = 1.0 / torch.tensor(self.vae.config.latents_std, device=latents.device).view(shape)
        return (latents - mean) * inverse_std

    def encode_prompts(self, batch, text_encoders):
        conditioning = super().encode_prompts(batch, text_encoders[:1])
        if self.image_conditioned:
            conditioning.update(self.encode_condition(self.conditioning_frames(batch), text_encoders[1:]))
        return conditioning


class ChannelConditioned(WanImageConditioned):
    """Wan2.1-I2V and Wan2.2-I2V-A14B: [noisy latents, 4 mask channels, image latents] along the channels, as
    WanImageToVideoPipeline.prepare_latents builds the condition: the image followed by F - 1 zero frames (mid-grey on
    [-1, 1], as the pipeline pads) through the VAE (the posterior's mode), normalised; the mask 1 on the first latent
    frame's 4 channels (the first pixel frame repeated 4x, then 4 pixel frames per latent frame), 0 elsewhere.
    Wan2.1-I2V's transformer also takes the image encoder's penultimate hidden states (`encoder_hidden_states_image`)."""

    def encode_condition(self, image, image_encoders):
        frames = self.args.num_frames
        video = torch.cat([image[:, :, None], image.new_zeros(image.shape[0], 3, frames - 1, *image.shape[-2:])], dim=2)
        latents = self.encode_image_latents(video)
        mask = torch.zeros(latents.shape[0], 4, *latents.shape[2:], device=latents.device)
        mask[:, :, 0] = 1
        condition = {"image_condition": torch.cat([mask, latents], dim=1)}
        if image_encoders:
            condition["image_embeds"] = self.clip_embedding(image, image_encoders[0])
        return condition

    def clip_embedding(self, image, image_encoder):
        """WanImageToVideoPipeline.encode_image: the image processor on the image as 8-bit RGB (what the pipeline
        gets), then the penultimate hidden states."""
        rgb = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pixel_values = self.image_processor(images=list(rgb), return_tensors="pt").pixel_values
        output = image_encoder(pixel_values=pixel_values.to(image_encoder.device, image_encoder.dtype),
                               output_hidden_states=True)
        return output.hidden_states[-2]

    def model_inputs(self, conditioning, noisy, dtype):
        inputs = super().model_inputs(conditioning, noisy, dtype)
        if self.image_conditioned:
            inputs["image_condition"] = conditioning["image_condition"]
            inputs["encoder_hidden_states_image"] = (conditioning["image_embeds"].to(dtype)
                                                     if "image_embeds" in conditioning else None)
        return inputs

    def predict(self, model, noisy, timesteps, inputs):
        # The integer timestep floor(s x 1000) the pipelines' UniPC scheduler feeds (as `wan` since issue 19).
        if not self.image_conditioned:
            return model(hidden_states=noisy, timestep=timesteps.long(), return_dict=False, **inputs)[0]
        hidden = torch.cat([noisy, inputs["image_condition"].to(noisy.dtype)], dim=1)
        return model(hidden_states=hidden, timestep=timesteps.long(), return_dict=False,
                     encoder_hidden_states=inputs["encoder_hidden_states"],
                     encoder_hidden_states_image=inputs["encoder_hidden_states_image"])[0]


class WanI2V(ChannelConditioned):
    """Wan2.1-I2V-14B: the channel condition and the CLIP image embedding (image_encoder/, image_processor/)."""

    name, pipeline_class = "wan_i2v", "WanImageToVideoPipeline"
    components = ("tokenizer", "text_encoder", "vae", "scheduler", "image_encoder", "image_processor")
    image_conditioned = True

    @classmethod
    def check_args(cls, parser, args):
        if args.conditioning_image == "none":
            parser.error(f"{args.model_family} is an image-to-video model: it needs --conditioning_image first_frame")
        args.conditioning_image = "first_frame"
        check_image_column(parser, args)
        if args.train_expert is not None:
            parser.error(f"--train_expert is for the two-expert wan22_a14b models, not {args.model_family}")

    def load_text(self, dtype):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        tokenizers, encoders = super().load_text(dtype)
        base, revision = self.args.pretrained_model_name_or_path, self.args.revision
        self.image_processor = CLIPImageProcessor.from_pretrained(base, subfolder="image_processor", revision=revision)
        encoders.append(CLIPVisionModel.from_pretrained(base, subfolder="image_encoder", revision=revision,
                                                        torch_dtype=dtype))
        return tokenizers, encoders


class FirstFrameClean(FlowNoise):
    """FlowNoise whose targets leave out the first latent frame: with an image condition on Wan2.2-TI2V-5B that frame
    is the clean image latent (timestep 0), which sampling overwrites after every step, so it has nothing to learn."""

    def sample(self, latents, pairs, preference, args):
        noised = super().sample(latents, pairs, preference, args)
        return Noised(noised.noisy, noised.timesteps, noised.index, noised.target[:, :, 1:],
                      noised.importance_target[:, :, 1:])


class Wan22(WanImageConditioned):
    """Wan2.2-TI2V-5B: Wan2.1's text side and flow, its own VAE (48 channels, 16x spatial: the video size a multiple of
    32), and per-token timesteps: WanPipeline with `expand_timesteps` feeds every latent token (frame x H/2 x W/2,
    the transformer's 2x2 patches) the timestep, (N, tokens). With `--conditioning_image first_frame`
    (WanImageToVideoPipeline with `expand_timesteps`): the first latent frame of the model's input is the image
    latent (the image alone through the VAE, the posterior's mode, normalised), its tokens see timestep 0, and the
    loss covers the other frames."""

    name, pipeline_class = "wan22", "WanPipeline"
    default_video_size, default_num_frames = (704, 1280), 121  # Wan2.2-TI2V-5B: 720p (704 x 1280), 121 frames, 24 fps
    size_multiple = 32  # 16x VAE, then 2x2 patches

    def __init__(self, args):
        super().__init__(args)
        self.image_conditioned = getattr(args, "conditioning_image", None) == "first_frame"

    @classmethod
    def check_args(cls, parser, args):
        height, width = args.video_size
        if height % cls.size_multiple or width % cls.size_multiple:
            parser.error(f"the video size must be multiples of {cls.size_multiple} for {args.model_family} (16x VAE, "
                         f"then 2x2 patches), got {height} x {width}")
        if args.conditioning_image is None:
            args.conditioning_image = "first_frame" if args.conditioning_image_column else "none"
        check_image_column(parser, args)
        if args.train_expert is not None:
            parser.error(f"--train_expert is for the two-expert wan22_a14b models, not {args.model_family}")

    def load_denoiser(self, source, revision=None, dtype=None):
        model = super().load_denoiser(source, revision, dtype)
        self.patch_size = tuple(model.config.patch_size)
        return model

    def load_noise(self):
        noise = super().load_noise()
        return FirstFrameClean(noise.scheduler, self.args) if self.image_conditioned else noise

    def encode_condition(self, image, image_encoders):
        return {"image_latents": self.encode_image_latents(image[:, :, None])}

    def model_inputs(self, conditioning, noisy, dtype):
        inputs = super().model_inputs(conditioning, noisy, dtype)
        if self.image_conditioned:
            inputs["image_latents"] = conditioning["image_latents"]
        return inputs

    def token_timesteps(self, noisy, timesteps):
        """(N, tokens) float: each token's integer timestep (0 on a clean first frame), as the pipelines' mask x t."""
        _, patch_h, patch_w = self.patch_size
        frames, height, width = noisy.shape[2], noisy.shape[3] // patch_h, noisy.shape[4] // patch_w
        per_frame = timesteps.long().float()[:, None].expand(-1, frames).clone()
        if self.image_conditioned:
            per_frame[:, 0] = 0
        return per_frame[:, :, None].expand(-1, -1, height * width).reshape(noisy.shape[0], -1)

    def predict(self, model, noisy, timesteps, inputs):
        hidden = noisy
        if self.image_conditioned:
            hidden = torch.cat([inputs["image_latents"].to(noisy.dtype), noisy[:, :, 1:]], dim=2)
        out = model(hidden_states=hidden, timestep=self.token_timesteps(noisy, timesteps), return_dict=False,
                    encoder_hidden_states=inputs["encoder_hidden_states"])[0]
        return out[:, :, 1:] if self.image_conditioned else out


class SharedSideFlowNoise(FlowNoise):
    """--train_expert both on several processes: each micro-batch, every rank meets the same expert, so that DDP's
    and FSDP's collectives see the same modules on all ranks. Rank 0 draws the side (high with the density's mass
    above the boundary, from its own random stream, broadcast), then every rank draws its u from the density cut to
    that side: a mixture with the sides' masses as weights, so each pair's timestep still has the whole density."""

    def __init__(self, scheduler, args, high_levels: int):
        from types import SimpleNamespace

        super().__init__(scheduler, args)
        n, (low, high) = self.num_timesteps, args.timestep_range
        if self.scheme == "mode":
            raise ValueError("--train_expert both on several processes draws each side's timesteps from the density "
                             "cut at the boundary, which --weighting_scheme mode cannot do exactly; use logit_normal "
                             "or uniform")
        ranges = {"high": (max(low, n - high_levels), high), "low": (low, min(high, n - high_levels - 1))}
        self.sides = {side: FlowNoise(scheduler, SimpleNamespace(**{**vars(args), "timestep_range": [a, b]}))
                      for side, (a, b) in ranges.items() if a <= b}
        mass = {side: self.mass(*noise.u_range) for side, noise in self.sides.items()}
        self.p_high = mass.get("high", 0.0) / sum(mass.values())

    def mass(self, a: float, b: float) -> float:
        """The density's probability of u in [a, b)."""
        if self.scheme == "uniform":
            return b - a

        def cdf(u):
            if u <= 0 or u >= 1:
                return float(u >= 1)
            z = (math.log(u / (1 - u)) - self.args.logit_mean) / (self.args.logit_std * math.sqrt(2))
            return 0.5 * (1 + math.erf(z))

        return cdf(b) - cdf(a)

    def to(self, device):
        for noise in self.sides.values():
            noise.to(device)
        return super().to(device)

    def draw_u(self, pairs, device):
        high = (torch.rand(1, device=device) < self.p_high).float()
        torch.distributed.broadcast(high, src=0)
        return self.sides["high" if bool(high.item()) else "low"].draw_u(pairs, device)


def _diffusers_model_base():
    from diffusers import ModelMixin
    from diffusers.loaders import PeftAdapterMixin

    return ModelMixin, PeftAdapterMixin


class WanExperts(*_diffusers_model_base()):
    """Wan2.2-A14B's two experts as one denoiser: each sample's timestep goes to `transformer` (high noise) when it is
    >= the boundary timestep (boundary_ratio x num_train_timesteps, as WanPipeline switches), else to `transformer_2`.
    A winner and its loser share their timestep, so a pair always meets one expert. One module, so the reference copy,
    LoRA (adapters in both; disabled together for the reference), EMA, the optimizer and checkpoints need nothing
    new; its state dict is the two experts' under `transformer.` and `transformer_2.`. Routing reads the timesteps on
    the host (one sync per call)."""

    _supports_gradient_checkpointing = True

    def __init__(self, transformer, transformer_2, boundary_timestep: float):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_timestep = boundary_timestep

    def forward(self, hidden_states, timestep, return_dict=False, **kwargs):
        high = timestep >= self.boundary_timestep
        if bool(high.all()):
            return self.transformer(hidden_states=hidden_states, timestep=timestep, return_dict=False, **kwargs)
        if not bool(high.any()):
            return self.transformer_2(hidden_states=hidden_states, timestep=timestep, return_dict=False, **kwargs)
        out = None
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            part = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == rows.shape else v for k, v in kwargs.items()}
            prediction = expert(hidden_states=hidden_states[rows], timestep=timestep[rows], return_dict=False, **part)[0]
            if out is None:
                out = prediction.new_empty(hidden_states.shape[0], *prediction.shape[1:])
            out[rows] = prediction
        return (out,)


class Wan22Experts(ChannelConditioned):
    """Wan2.2-T2V-A14B and -I2V-A14B: two experts switched at the pipeline's boundary_ratio. `--train_expert high`
    trains `transformer` alone, its timesteps drawn only where floor(s x 1000) >= boundary (the rest of the density
    cut off, as --timestep_range cuts it); `low` trains `transformer_2` on the other side; `both` trains a
    WanExperts module, each pair's timestep drawn from the whole density and routed to its expert. The saved weights
    are the pipeline's: transformer.safetensors / transformer_2.safetensors (LoRA: pytorch_lora_weights.safetensors
    and pytorch_lora_weights_2.safetensors, the second loaded with load_into_transformer_2=True)."""

    name = "wan22_a14b"

    def __init__(self, args):
        super().__init__(args)
        index = model_index(args.pretrained_model_name_or_path, args.revision)
        self.boundary_ratio = index.get("boundary_ratio")
        if not index:  # not readable (yet): the flags say which kind of A14B model it is
            index = {"_class_name": "WanImageToVideoPipeline" if getattr(args, "conditioning_image", None) == "first_frame"
                     else "WanPipeline"}
        self.pipeline_class = index["_class_name"]
        self.image_conditioned = self.pipeline_class == "WanImageToVideoPipeline"
        if index and self.image_conditioned != (getattr(args, "conditioning_image", None) == "first_frame"):
            raise ValueError(f"{args.pretrained_model_name_or_path} is a {self.pipeline_class}: "
                             f"{'--conditioning_image first_frame' if self.image_conditioned else 'no conditioning image'}"
                             f" is what it takes")
        self.expert = getattr(args, "train_expert", None) or "both"
        self.experts = {"high": ("",), "low": ("_2",), "both": ("", "_2")}[self.expert]
        needed = {"high": ("transformer",), "low": ("transformer_2",), "both": ("transformer", "transformer_2")}
        self.components = ("tokenizer", "text_encoder", "vae", "scheduler", *needed[self.expert][1:])

    @classmethod
    def check_args(cls, parser, args):
        import os

        args.train_expert = args.train_expert or "both"
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # set by `accelerate launch --use_fsdp`
        if fsdp and args.train_expert == "both" and (args.use_ema or args.save_pipeline):
            parser.error("--use_ema / --save_pipeline with both wan22_a14b experts under FSDP are not supported yet (the "
                         "sharded EMA and the gathered pipeline read one denoiser file); drop them, or train one "
                         "expert (--train_expert high / low)")
        index = model_index(args.pretrained_model_name_or_path, args.revision)
        if not index:  # not readable yet (a hub id offline): --conditioning_image says whether it is an I2V model
            args.conditioning_image = args.conditioning_image or ("first_frame" if args.conditioning_image_column else "none")
            check_image_column(parser, args)
            return
        if index.get("boundary_ratio") is None:
            parser.error(f"{args.pretrained_model_name_or_path}: its model_index.json has no boundary_ratio, so it is "
                         f"not a two-expert Wan2.2 model; wan22_a14b needs one")
        i2v = index.get("_class_name") == "WanImageToVideoPipeline"
        if args.conditioning_image == "none" and i2v:
            parser.error("an I2V-A14B model needs --conditioning_image first_frame")
        if args.conditioning_image == "first_frame" and not i2v:
            parser.error("--conditioning_image first_frame: this is a text-to-video A14B model (WanPipeline); use an "
                         "I2V-A14B model to condition on an image")
        args.conditioning_image = "first_frame" if i2v else "none"
        check_image_column(parser, args)

    # --- the experts ---------------------------------------------------------------------------------------------
    def boundary_timestep(self) -> float:
        """boundary_ratio x num_train_timesteps, as WanPipeline computes it."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = FlowMatchEulerDiscreteScheduler.load_config(self.args.pretrained_model_name_or_path,
                                                             subfolder="scheduler", revision=self.args.revision)
        if self.boundary_ratio is None:
            raise ValueError(f"{self.args.pretrained_model_name_or_path}: no boundary_ratio in its model_index.json; "
                             f"wan22_a14b needs the two-expert pipeline's")
        return self.boundary_ratio * config.get("num_train_timesteps", 1000)

    def load_denoiser(self, source, revision=None, dtype=None):
        from diffusers import WanTransformer3DModel

        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        load = lambda folder: WanTransformer3DModel.from_pretrained(source, subfolder=folder, revision=revision,  # noqa: E731
                                                                    **kwargs)
        if self.expert == "high":
            return load("transformer")
        if self.expert == "low":
            return load("transformer_2")
        return WanExperts(load("transformer"), load("transformer_2"), self.boundary_timestep())

    def load_noise(self):
        """The Wan flow; for one expert, --timestep_range narrowed to that expert's noise levels (noise level
        j = N - 1 - index on the scheduler's descending grid, the integer timestep floor(timesteps[index]))."""
        from types import SimpleNamespace

        noise = super().load_noise()
        boundary = self.boundary_timestep()
        high_levels = int((noise.timesteps.floor() >= boundary).sum())  # indices 0 .. k-1: levels N - k .. N - 1
        if self.expert == "both":
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            if distributed and torch.distributed.get_world_size() > 1:
                return SharedSideFlowNoise(noise.scheduler, self.args, high_levels)
            return noise
        n = noise.num_timesteps
        side = (n - high_levels, n - 1) if self.expert == "high" else (0, n - high_levels - 1)
        low, high = max(side[0], self.args.timestep_range[0]), min(side[1], self.args.timestep_range[1])
        if low > high:
            raise ValueError(f"--train_expert {self.expert} trains noise levels {side[0]}..{side[1]} (boundary "
                             f"timestep {boundary:g}); --timestep_range {self.args.timestep_range[0]} "
                             f"{self.args.timestep_range[1]} leaves none of them")
        restricted = SimpleNamespace(**{**vars(self.args), "timestep_range": [low, high]})
        return FlowNoise(noise.scheduler, restricted)

    @classmethod
    def accelerator_kwargs(cls, args) -> list:
        """DDP with both experts: an update may meet one expert on every rank, the other's parameters unused."""
        from accelerate.utils import DistributedDataParallelKwargs

        return [DistributedDataParallelKwargs(find_unused_parameters=True)] if args.train_expert == "both" else []

    def expert_states(self, state: dict) -> dict:
        """{file suffix: that expert's state}: "" the high-noise expert (transformer), "_2" the low-noise one."""
        if self.expert != "both":
            return {self.experts[0]: state}
        return {part: {k.removeprefix(f"{folder}."): v for k, v in state.items() if k.startswith(f"{folder}.")}
                for part, folder in (("", "transformer"), ("_2", "transformer_2"))}

    def joined_state(self, states: dict) -> dict:
        if self.expert != "both":
            return states[self.experts[0]]
        return {f"{folder}.{k}": v for part, folder in (("", "transformer"), ("_2", "transformer_2"))
                for k, v in states[part].items()}

    def card_usage(self, usage, base):
        lines = [f"pipe = {self.pipeline_class}.from_pretrained(\"{base}\")"]
        if self.pipeline_class != type(self).pipeline_class:  # the card imports the family's WanPipeline
            lines.insert(0, f"from diffusers import {self.pipeline_class}")
        if getattr(self.args, "use_lora", False):
            lines += ["pipe.load_lora_weights(\"<this folder or repo>\")" if part == "" else
                      "pipe.load_lora_weights(\"<this folder or repo>\", weight_name=\"pytorch_lora_weights_2.safetensors\", "
                      "load_into_transformer_2=True)" for part in self.experts]
        else:
            lines.insert(0, "from safetensors.torch import load_file")
            lines += [f"pipe.transformer{part}.load_state_dict(load_file(\"transformer{part}.safetensors\"))"
                      for part in self.experts]
        return "\n".join(lines)

    def pipeline_denoisers(self, model) -> dict:
        if self.expert == "both":
            return {"transformer": model.transformer, "transformer_2": model.transformer_2}
        return {"transformer" if self.expert == "high" else "transformer_2": model}
