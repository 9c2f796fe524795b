"""Generate evaluation images (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1) or videos (Wan2.1, CogVideoX); SD1.5 and SDXL follow the official
`test_sd15.py` / `test_sdxl.py` protocol.

    python -m eval.generate --unet_path output/sd15-dpo/unet.pth --test_json prompts/papv2.json
    python -m eval.generate --sdxl --unet_path output/sdxl-dpo/unet.pth --test_json prompts/hpsv2.json
    python -m eval.generate --model_family sd3 --unet_path output/sd35-dpo/transformer.pth   # or a local base:
    python -m eval.generate --pretrain_path /models/FLUX.1-dev --transformer_path output/flux-dpo/transformer.pth
    accelerate launch -m eval.generate ...            # several GPUs: prompts are sharded across ranks

The family (sd, sdxl, sd3, flux, wan, cogvideox) is read from the base model's model_index.json `_class_name`, as train.py does
(families.PIPELINE_FAMILIES); `--model_family` names it when that file cannot be read, `--sdxl` means sdxl.
sd and sdxl run the hand-written official loop below: an SD2.x v-prediction model gets it too, the scheduler config's
`prediction_type` deciding how Euler reads the prediction. sd3 and flux run their diffusers pipeline
(StableDiffusion3Pipeline / FluxPipeline, FlowMatchEulerDiscreteScheduler from the base model) with the trained
transformer loaded in, the same seeded noise for every prompt, and the same outputs, run record and resume.
wan and cogvideox (Wan2.1, CogVideoX) run WanPipeline / CogVideoXPipeline with their own schedulers and write one mp4
per prompt (`--num_frames`, `--fps`), with the same names, manifest, run record and resume (docs/video.md).
wan22 (Wan2.2-TI2V-5B), wan22_a14b (Wan2.2-T2V/I2V-A14B: both experts, `--guidance_scale_2` for the low-noise one,
`--boundary_ratio` to move the switch) and wan_i2v (Wan2.1-I2V) likewise; image-to-video takes `--conditioning_image`
or an "image" path per prompt-file entry (docs/video.md).

Official protocol (SPEC Part B §4.1), kept here:
* `EulerDiscreteScheduler.from_pretrained(<base>, subfolder="scheduler")`, 50 steps. The real SD1.5 folder holds a PNDM
  config without `timestep_spacing`, so Euler's default "linspace" applies; SDXL's config says "leading".
* Text encoder(s) and UNet in bf16 (on CUDA), VAE in fp32. Unconditional branch = the real encoding of "" (SDXL too,
  pooled likewise). SDXL micro-conditioning time_ids = (H, W, 0, 0, H, W).
* Guidance eps_c + cfg * (eps_c - eps_u), i.e. standard guidance with scale cfg + 1 (so 7.5 means 8.5).
* The same seeded noise for every prompt, times the scheduler's `init_noise_sigma`.
* Decode latents / scaling_factor (+ shift_factor) in fp32, (x / 2 + 0.5) clamped, x 255, rounded to uint8.
* Outputs: `<output_path>/<run>/<index>_<H>x<W>.png` (EXIF ImageDescription = prompt), manifest `<output_path>/<run>.json`
  and `<output_path>/<run>.zip`, with run = `<prompt file stem>_seed<seed>_<H>x<W>_<steps>s_<cfg>cfg`. Added: the run
  record `<output_path>/<run>/run.json` (weights, prompts done of the file's, fingerprint checked on resume).

Deliberate differences (SPEC Part A 9-11): the initial noise is drawn in fp32 from a seeded CPU generator (the official
draws bf16 noise on a CUDA generator, so its exact images depend on the GPU), latents and the guidance/Euler update stay
fp32 (official: bf16), prompts can be batched, runs resume, several GPUs work, `--guidance_formula standard` exists,
and on CPU the default dtype is fp32 (bf16 convolutions on CPU are slow and not what the paper ran).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

if not __package__:  # run as a file (`accelerate launch eval/generate.py`): families/ is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distributed import process_state  # noqa: E402
from families import PIPELINE_FAMILIES  # noqa: E402
from flag_ranges import check_ranges  # noqa: E402
from eval.video import stored_video_prompt, write_mp4  # noqa: E402

SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
SD3_BASE = "stabilityai/stable-diffusion-3.5-medium"
FLUX_BASE = "black-forest-labs/FLUX.1-dev"
WAN_BASE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
COGVIDEOX_BASE = "THUDM/CogVideoX-2b"
WAN22_BASE = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
WAN22_A14B_BASE = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
WAN_I2V_BASE = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXIF_IMAGE_DESCRIPTION = 0x010E
LORA_FILE = "pytorch_lora_weights.safetensors"  # what train.py --use_lora writes (diffusers' file name)
RUN_RECORD = "run.json"  # in the run's image folder: what made its images (fingerprint), how many prompts, complete


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family samples with unless the command line says otherwise. `formula`: how --cfg is read by default;
    a run with another formula gets it as a run-name suffix (`_standard` for sd/sdxl, `_official` for sd3)."""

    base: str
    size: int
    steps: int
    cfg: float
    formula: str
    denoiser: str  # the trained model's subfolder and weight-file stem (train.py: unet.pth / transformer.pth)
    pipeline: str
    height: int = 0  # video families: their own height x width (0: size x size)
    width: int = 0
    num_frames: int = 0  # video families only: frames per video, the frame rule, frames per second of the mp4
    frame_multiple: int = 0
    fps: int = 0


FAMILY_DEFAULTS = {
    # the official protocol (test_sd15.py / test_sdxl.py): Euler, 50 steps, cfg 7.5 with the official formula
    "sd": FamilyDefaults(SD15_BASE, 512, 50, 7.5, "official", "unet", "StableDiffusionPipeline"),
    "sdxl": FamilyDefaults(SDXL_BASE, 1024, 50, 7.5, "official", "unet", "StableDiffusionXLPipeline"),
    # the stabilityai/stable-diffusion-3.5-medium model card's diffusers example: 40 steps, guidance_scale 4.5
    "sd3": FamilyDefaults(SD3_BASE, 1024, 40, 4.5, "standard", "transformer", "StableDiffusion3Pipeline"),
    # the black-forest-labs/FLUX.1-dev model card's diffusers example: 50 steps, guidance_scale 3.5 (the guidance
    # embedding of the guidance-distilled model: no unconditional branch)
    "flux": FamilyDefaults(FLUX_BASE, 1024, 50, 3.5, "distilled", "transformer", "FluxPipeline"),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers model card's diffusers example: 480 x 832, 81 frames, guidance_scale 5.0, and
    # WanPipeline's default 50 steps (the card passes none); 16 fps, the rate Wan2.1 generates at (its repository's
    # sample_fps; the card's export_to_video writes 15). 4k + 1 frames (causal VAE, 4x in time).
    "wan": FamilyDefaults(WAN_BASE, 480, 50, 5.0, "standard", "transformer", "WanPipeline", 480, 832, 81, 4, 16),
    # THUDM/CogVideoX-2b (and -5b) model card's example: 480 x 720, 49 frames, 50 steps, guidance_scale 6,
    # export_to_video(fps=8). 8k + 1 frames (an odd number of latent frames decodes to 4k + 1 frames).
    "cogvideox": FamilyDefaults(COGVIDEOX_BASE, 480, 50, 6.0, "standard", "transformer", "CogVideoXPipeline", 480, 720,
                                49, 8, 8),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers model card: 704 x 1280, 121 frames, 50 steps, guidance_scale 5.0, 24 fps
    "wan22": FamilyDefaults(WAN22_BASE, 704, 50, 5.0, "standard", "transformer", "WanPipeline", 704, 1280, 121, 4, 24),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers model card: 720 x 1280, 81 frames, 40 steps, guidance_scale 4.0 (high-noise
    # expert) and guidance_scale_2 3.0 (low-noise expert, WAN22_GUIDANCE_2), 16 fps
    "wan22_a14b": FamilyDefaults(WAN22_A14B_BASE, 720, 40, 4.0, "standard", "transformer", "WanPipeline", 720, 1280, 81,
                                 4, 16),
    # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers model card: 480 x 832 (the image's aspect there), 81 frames, guidance 5.0,
    # WanImageToVideoPipeline's 50 steps, 16 fps
    "wan_i2v": FamilyDefaults(WAN_I2V_BASE, 480, 50, 5.0, "standard", "transformer", "WanImageToVideoPipeline", 480,
                              832, 81, 4, 16),
}
FLOW_FAMILIES = ("sd3", "flux")  # sampled with their diffusers pipeline
WAN_FAMILIES = ("wan", "wan22", "wan22_a14b", "wan_i2v")  # WanPipeline / WanImageToVideoPipeline, AutoencoderKLWan
VIDEO_FAMILIES = ("wan", "cogvideox", "wan22", "wan22_a14b", "wan_i2v")  # their diffusers pipeline, written as mp4
WAN22_GUIDANCE_2 = {"wan22_a14b": 3.0}  # T2V-A14B's card; I2V-A14B's card passes 3.5 for both: give --guidance_scale_2


class GenerateError(Exception):
    """A problem the user can fix (missing file, wrong checkpoint, bad option); printed without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_json", default="prompts/papv2.json", help="prompt file (JSON list of {prompt, ...})")
    add_model_args(p)
    p.add_argument("--output_path", "--output", default=None,
                   help="where runs are written (default: --unet_path itself if a folder, else its parent folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, the same for every prompt")
    add_sampling_args(p)
    add_video_args(p)
    p.add_argument("--max_prompts", type=int, default=None,
                   help="only the first N prompts (smoke runs, demos); running again without it completes the run, "
                        "and a run never shrinks: a manifest keeps listing the prompts it already had")
    p.add_argument("--no_zip", dest="zip", action="store_false", help="do not write <run>.zip")
    p.add_argument("--print_weights", action="store_true",
                   help="only print which weights --unet_path / --lora_path name (UNet or transformer file or folder, "
                        "LoRA adapter) and exit")
    args = p.parse_args(argv)
    check_ranges(p, args, GENERATE_RANGES)
    return args


# Numeric flags and their ranges, checked at parse time (flag_ranges.py; tests/test_flag_ranges.py).
SAMPLING_RANGES = {"height": ">= 8", "width": ">= 8", "steps": ">= 1", "cfg": ">= 0", "batch_size": ">= 1"}
VIDEO_RANGES = {"num_frames": ">= 1", "fps": "> 0", "guidance_scale_2": ">= 0", "boundary_ratio": "(0, 1)"}  # the last two: wan22_a14b
GENERATE_RANGES = {**SAMPLING_RANGES, "seed": ">= 0", "max_prompts": ">= 1", **VIDEO_RANGES}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model to sample from: base, fine-tuned denoiser, LoRA adapter, family, VAE (shared with eval.make_pairs)."""
    p.add_argument("--unet_path", "--transformer_path", dest="unet_path", default=None,
                   help="fine-tuned UNet (sd, sdxl) or transformer (sd3, flux, wan, cogvideox): a .pth state dict (the released "
                        "checkpoints' format), a .safetensors file, a diffusers UNet/transformer folder, a pipeline "
                        "folder with unet/ or transformer/, or a train.py output folder holding unet.* / transformer.* "
                        "(or a LoRA adapter). Omit to use the base model (eval.generate then needs --output_path).")
    p.add_argument("--pretrain_path", default=None,
                   help=f"base model (default {SD15_BASE}; {SDXL_BASE} with --sdxl; {SD3_BASE} / {FLUX_BASE} with "
                        f"--model_family sd3 / flux; {WAN_BASE} / {COGVIDEOX_BASE} with --model_family wan / cogvideox)")
    p.add_argument("--sdxl", action="store_true", help="SDXL mode (= --model_family sdxl)")
    p.add_argument("--model_family", choices=tuple(FAMILY_DEFAULTS), default=None,
                   help="sd (SD1.x/2.x), sdxl, sd3 (SD3/3.5), flux (FLUX.1), wan (Wan2.1 T2V) or cogvideox "
                        "(CogVideoX). Default: read from --pretrain_path's "
                        "model_index.json _class_name; needed only when that cannot be read (a contradiction is an "
                        "error)")
    p.add_argument("--vae_path", default=None,
                   help=f"VAE folder/repo, or a pipeline folder with vae/ (SDXL default {SDXL_VAE}; others: the "
                        "base VAE)")
    p.add_argument("--lora_path", default=None, help="LoRA adapter (train.py's output, read by pipeline.load_lora_weights)")


def add_video_args(p: argparse.ArgumentParser) -> None:
    """The video families' flags: frames, frame rate, negative prompt, the Wan2.2 experts, the conditioning image
    (shared with eval.make_pairs; their defaults are filled by resolve_args)."""
    p.add_argument("--num_frames", type=int, default=None,
                   help="video families: frames per video (default: wan 81, 4k + 1; cogvideox 49, 8k + 1)")
    p.add_argument("--fps", type=float, default=None,
                   help="video families: frame rate written into the mp4 (default: wan 16, cogvideox 8); the frames "
                        "do not depend on it")
    p.add_argument("--negative_prompt", default="",
                   help="video families: the unconditional branch's prompt (default \"\", as for the image families; "
                        "Wan2.1's model card passes a long negative prompt: give it here to sample as the card does)")
    p.add_argument("--guidance_scale_2", type=float, default=None,
                   help="wan22_a14b: guidance scale of the low-noise expert (transformer_2); default 3.0 (T2V-A14B's "
                        "model card)")
    p.add_argument("--boundary_ratio", type=float, default=None,
                   help="wan22_a14b: where the experts switch, a fraction of the training timesteps (default: the "
                        "model's model_index.json, 0.875 T2V-A14B, 0.9 I2V-A14B)")
    p.add_argument("--conditioning_image", default=None,
                   help="image-to-video (wan_i2v, I2V-A14B; wan22 switches to image-to-video with it): the image every "
                        "video starts from; a prompt-file entry's own \"image\" (a path relative to the prompt file) "
                        "takes precedence")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """How images are sampled: size, steps, guidance, batch, precision, device (shared with eval.make_pairs)."""
    p.add_argument("--height", type=int, default=None, help="default 512 (sd) / 1024 (sdxl, sd3, flux) / 480 (wan, cogvideox)")
    p.add_argument("--width", type=int, default=None, help="default 512 (sd) / 1024 (sdxl, sd3, flux) / 832 (wan) / 720 (cogvideox)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; sd3: 40)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale, read as --guidance_formula says (default 7.5; sd3: 4.5; flux: 3.5, its "
                        "guidance embedding; wan: 5.0; cogvideox: 6.0)")
    p.add_argument("--guidance_formula", choices=("official", "standard"), default=None,
                   help="official: eps_c + cfg*(eps_c - eps_u) (= standard scale cfg+1), the default for sd/sdxl; "
                        "standard: eps_u + cfg*(eps_c - eps_u) (diffusers), the default for sd3. A non-default formula "
                        "is added to the run name ('_standard', '_official'). Not for flux (no unconditional branch).")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per forward pass (results do not depend on it)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="text encoder(s) + UNet/transformer precision (default bf16 on CUDA as official, fp32 on CPU); "
                        "VAE is always fp32")
    p.add_argument("--device", default="auto", help="auto = cuda (this rank's GPU) if available, else cpu")


# ----------------------------------------------------------------------------------------------------------- setup


def read_model_index(pretrain_path: str) -> dict:
    """The base model's model_index.json, from a local folder or the hub (cache works offline)."""
    local = Path(pretrain_path) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(pretrain_path).exists():
        raise GenerateError(f"{pretrain_path} has no model_index.json: --pretrain_path must be a diffusers pipeline")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(pretrain_path, "model_index.json")).read_text())
    except Exception as e:  # offline without cache, unknown repo, ...
        raise GenerateError(f"cannot read model_index.json of --pretrain_path {pretrain_path!r} ({e.__class__.__name__}: {e}). "
                            "Pass a local pipeline folder, or download it first.") from e


def resolve_family(args: argparse.Namespace) -> str:
    """--model_family, --sdxl, or what the base model's model_index.json `_class_name` says (families.PIPELINE_FAMILIES,
    as train.py reads it); without --pretrain_path the family's default base is used (sd: SD1.5). A flag that
    contradicts the model_index.json is refused."""
    chosen = getattr(args, "model_family", None)
    if args.sdxl and chosen not in (None, "sdxl"):
        raise GenerateError(f"--sdxl contradicts --model_family {chosen}: drop one of them")
    chosen = chosen or ("sdxl" if args.sdxl else None)
    if args.pretrain_path is None:
        return chosen or "sd"
    try:
        class_name = read_model_index(args.pretrain_path).get("_class_name", "")
    except GenerateError:
        if chosen:  # no readable model_index.json: the flag decides (from_pretrained names what is missing)
            return chosen
        raise
    from families.wan22 import detect_wan

    detected = detect_wan(read_model_index(args.pretrain_path)) or PIPELINE_FAMILIES.get(class_name)
    if args.sdxl and detected != "sdxl":
        raise GenerateError(f"--sdxl was given but {args.pretrain_path} is not an SDXL pipeline (its model_index.json "
                            f"names {class_name or 'no pipeline class'})")
    if detected is None:
        if chosen:
            return chosen
        raise GenerateError(f"{args.pretrain_path} is a {class_name or 'pipeline with no _class_name'}, not one of "
                            f"{', '.join(PIPELINE_FAMILIES)}: pass --model_family "
                            f"{{{','.join(FAMILY_DEFAULTS)}}} if it is one of those families")
    if chosen and chosen != detected:
        raise GenerateError(f"--model_family {chosen} was given but {args.pretrain_path} is a {detected} model "
                            f"({class_name} in its model_index.json): drop the flag or choose another --pretrain_path")
    return detected


def family_of(args: argparse.Namespace) -> str:
    """args.model_family (set by resolve_args), or sd/sdxl from --sdxl for callers that build the namespace
    themselves."""
    return getattr(args, "model_family", None) or ("sdxl" if args.sdxl else "sd")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the family-dependent defaults (base model, size, steps, cfg, guidance formula, VAE, output path) and
    check the inputs exist."""
    args = argparse.Namespace(**vars(args))
    args.model_family = family = resolve_family(args)
    args.sdxl = family == "sdxl"
    defaults = FAMILY_DEFAULTS[family]
    args.pretrain_path = args.pretrain_path or defaults.base
    args.height = args.height or defaults.height or defaults.size
    args.width = args.width or defaults.width or defaults.size
    if family in VIDEO_FAMILIES:
        args.num_frames = getattr(args, "num_frames", None) or defaults.num_frames
        args.fps = getattr(args, "fps", None) or defaults.fps
        args.negative_prompt = getattr(args, "negative_prompt", "") or ""
        if args.num_frames < 1 or (args.num_frames - 1) % defaults.frame_multiple:
            rule = ("4k + 1 (Wan's causal VAE compresses time 4x)" if family in WAN_FAMILIES else
                    "8k + 1 (CogVideoX decodes an odd number of latent frames to 4k + 1 frames)")
            raise GenerateError(f"--num_frames {args.num_frames}: {family} needs {rule}, e.g. "
                                f"{defaults.num_frames} or 9")
        if args.fps <= 0:
            raise GenerateError("--fps must be > 0")
        resolve_wan22_args(args, family)
    elif getattr(args, "num_frames", None) is not None or getattr(args, "fps", None) is not None:
        raise GenerateError(f"--num_frames / --fps are for the video families (wan, cogvideox), not {family}")
    args.steps = defaults.steps if args.steps is None else args.steps
    args.cfg = defaults.cfg if args.cfg is None else args.cfg
    if family == "flux" and args.guidance_formula is not None:
        raise GenerateError("--guidance_formula does not apply to flux: FLUX.1-dev is guidance-distilled (--cfg is the "
                            "value of its guidance embedding, one forward pass, no unconditional branch), and "
                            "FLUX.1-schnell ignores guidance")
    args.guidance_formula = args.guidance_formula or defaults.formula
    if args.vae_path is None and args.sdxl:
        args.vae_path = SDXL_VAE
    if args.unet_path is not None and not os.path.exists(args.unet_path):
        raise GenerateError(f"--unet_path {args.unet_path} does not exist")
    args.weights = (resolve_expert_weights(args.unet_path, args.lora_path) if family == "wan22_a14b" else
                    resolve_weights(args.unet_path, args.lora_path, defaults.denoiser))
    if args.output_path is None:
        if args.unet_path is None:
            raise GenerateError("--output_path is required when no --unet_path is given")
        args.output_path = args.unet_path if os.path.isdir(args.unet_path) else os.path.dirname(args.unet_path)
    if not os.path.isfile(args.test_json):
        raise GenerateError(f"prompt file {args.test_json} not found. Build the prompt files with "
                            "`python prompts/build.py` (from their public sources) or "
                            "`python prompts/build.py --from_dir DIR` (from a local copy); see prompts/README.md")
    if args.batch_size < 1 or args.steps < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise GenerateError("--batch_size, --steps and --max_prompts must be >= 1")
    return args


def run_name(args: argparse.Namespace) -> str:
    """Official run name, e.g. `papv2_seed0_512x512_50s_7.5cfg` (cfg printed as a Python float)."""
    name = f"{Path(args.test_json).stem}_seed{args.seed}_{args.height}x{args.width}_{args.steps}s_{float(args.cfg)}cfg"
    default = FAMILY_DEFAULTS[family_of(args)].formula  # sd/sdxl: official (the official names), sd3: standard
    return name + ("" if args.guidance_formula == default else f"_{args.guidance_formula}") + wan22_run_suffix(args)


def load_prompts(path: str, max_prompts: int | None = None) -> list[dict]:
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list) or not all(isinstance(x, dict) and isinstance(x.get("prompt"), str) for x in items):
        raise GenerateError(f"{path} must be a JSON list of objects with a string 'prompt' (see prompts/README.md)")
    return items[:max_prompts] if max_prompts is not None else items


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A UNet state dict from .safetensors, or from .pth/.pt/.bin/.ckpt with torch.load(weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenerateError(f"cannot read {path} as a weights-only torch state dict ({e.__class__.__name__}: {e})") from e
    if not isinstance(state, dict):
        raise GenerateError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _mismatch_hint(missing: list[str], unexpected: list[str], pretrain_path: str, denoiser: str = "unet") -> str:
    for prefix in ("module.", "unet.", "transformer.", "model."):
        if unexpected and all(k.startswith(prefix) for k in unexpected):
            return (f"every key starts with {prefix!r} (a wrapped model or a whole-pipeline checkpoint): save "
                    f"{denoiser}.state_dict() itself")
    if any("lora" in k.lower() for k in unexpected):
        return "the file looks like LoRA weights: pass it with --lora_path"
    unet_keys = any(k.startswith(("conv_in.", "down_blocks.")) for k in unexpected)
    transformer_keys = any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.",
                                         "pos_embed.")) for k in unexpected)
    if denoiser == "transformer" and unet_keys:
        return (f"the file holds a UNet (SD/SDXL) but the base model {pretrain_path} is an SD3/FLUX transformer model: "
                "pass the UNet's base model as --pretrain_path")
    if denoiser == "unet" and transformer_keys:
        return (f"the file holds an SD3/FLUX transformer but the base model {pretrain_path} is a UNet model: pass the "
                "transformer's base model as --pretrain_path (or --model_family sd3/flux)")
    if denoiser == "transformer":
        return (f"the file is not a transformer state dict of the base model {pretrain_path} (SD3 vs FLUX, another "
                "size?)")
    if any(k.startswith("add_embedding.") for k in unexpected):
        return f"the file holds an SDXL UNet but the base model {pretrain_path} is not SDXL: pass --sdxl (and an SDXL --pretrain_path)"
    if any(k.startswith("add_embedding.") for k in missing):
        return f"the file holds a non-SDXL (e.g. SD1.5) UNet but the base model {pretrain_path} is SDXL: use an SD1.5 --pretrain_path"
    return f"the file is not a UNet state dict of the base model {pretrain_path} (another base model?)"


def _check_keys(expected: dict, shapes: dict, path: str, pretrain_path: str, denoiser: str) -> None:
    """Strict key and shape check of a weights file (`shapes`: key -> shape) against the base model's state dict."""
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong_shape = [f"{k}: file {tuple(shapes[k])} vs base {tuple(expected[k].shape)}"
                   for k in sorted(expected.keys() & shapes.keys()) if tuple(shapes[k]) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        lines = [f"--unet_path {path} does not match the base {DENOISER_NAMES[denoiser]} of {pretrain_path}:"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                lines.append(f"  {len(keys)} {what} keys, e.g. " + "; ".join(keys[:3]))
        lines.append("Likely cause: " + _mismatch_hint(missing, unexpected, pretrain_path, denoiser))
        raise GenerateError("\n".join(lines))


def load_unet_weights(unet, path: str, pretrain_path: str) -> None:
    """Strict load of a state-dict file into the base UNet, with a readable error naming the mismatch."""
    state = read_state_dict(path)
    _check_keys(unet.state_dict(), {k: v.shape for k, v in state.items()}, path, pretrain_path, "unet")
    unet.load_state_dict(state)


def load_transformer_weights(transformer, path: str, pretrain_path: str) -> None:
    """Strict load of a state-dict file into the base transformer, one tensor at a time: a FLUX.1 transformer file
    in fp32 (what train.py writes) is 48 GB, so it is memory-mapped (.pth) or read lazily (.safetensors) and copied
    into the model's own (e.g. bf16) parameters, never held in memory whole."""
    expected = transformer.state_dict()  # tensors sharing the parameters' storage
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            _check_keys(expected, {k: f.get_slice(k).get_shape() for k in f.keys()}, path, pretrain_path, "transformer")
            with torch.no_grad():
                for key, target in expected.items():
                    target.copy_(f.get_tensor(key))
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file (mmap needs one): read it whole
        state = read_state_dict(path)
    if not isinstance(state, dict):
        raise GenerateError(f"{path} holds a {type(state).__name__}, not a state dict")
    _check_keys(expected, {k: v.shape for k, v in state.items()}, path, pretrain_path, "transformer")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


DENOISER_NAMES = {"unet": "UNet", "transformer": "transformer"}


@dataclass
class Weights:
    """What is evaluated: the denoiser (a state-dict file, a diffusers UNet/transformer folder, or None for the base
    model's) and an optional LoRA adapter applied on top. `denoiser`: "unet" (sd, sdxl) or "transformer" (sd3, flux)."""

    unet: str | None
    lora: str | None = None
    denoiser: str = "unet"

    def describe(self, pretrain_path: str) -> str:
        name = DENOISER_NAMES[self.denoiser]
        if self.unet is None:
            unet = f"base {name} of {pretrain_path}"
        else:
            unet = f"{name} {'folder' if os.path.isdir(self.unet) else 'file'} {self.unet}"
        return unet + (f" + LoRA adapter {self.lora}" if self.lora else "")


def resolve_weights(unet_path: str | None, lora_path: str | None, denoiser: str = "unet") -> Weights:
    """The denoiser and adapter that --unet_path / --lora_path name. A folder is read as train.py writes it: a
    diffusers UNet/transformer or pipeline (unet/ or transformer/), unet.* or transformer.* (.safetensors / .pth),
    or, after --use_lora, pytorch_lora_weights.safetensors, loaded as LoRA on the base model's denoiser (or on the
    folder's pipeline denoiser, which --save_pipeline stores) - not ignored."""
    if unet_path is None or not os.path.isdir(unet_path):
        return Weights(unet_path, lora_path, denoiser)
    folder, name = Path(unet_path), DENOISER_NAMES[denoiser]
    unet_dirs = [str(d) for d in (folder / denoiser, folder) if (d / "config.json").is_file()]
    files = [str(folder / f) for f in (f"{denoiser}.safetensors", f"{denoiser}.pth") if (folder / f).is_file()]
    adapter = folder / LORA_FILE
    if adapter.is_file():
        if lora_path is not None:
            raise GenerateError(f"--unet_path folder {folder} holds a LoRA adapter ({LORA_FILE}) and --lora_path "
                                f"{lora_path} names another: pass one adapter, e.g. --unet_path UNET --lora_path ADAPTER")
        if files and not unet_dirs:
            raise GenerateError(f"--unet_path folder {folder} holds both {name} weights ({Path(files[0]).name}) and a "
                                f"LoRA adapter ({LORA_FILE}): name the one to evaluate, --unet_path {files[0]} or "
                                f"--lora_path {adapter}")
        return Weights(unet_dirs[0] if unet_dirs else None, str(adapter), denoiser)
    if unet_dirs or files:
        return Weights((unet_dirs + files)[0], lora_path, denoiser)
    other = "transformer" if denoiser == "unet" else "unet"
    hint = ""
    if any((folder / f).is_file() for f in (f"{other}.safetensors", f"{other}.pth")) or (folder / other).is_dir():
        hint = (f". It holds {DENOISER_NAMES[other]} weights ({other}.*): is --pretrain_path (or --model_family) the "
                "model they were trained from?")
    raise GenerateError(f"--unet_path folder {folder} holds nothing to evaluate: no {denoiser}.safetensors / "
                        f"{denoiser}.pth, no {name} config.json or {denoiser}/ subfolder, and no LoRA adapter "
                        f"{LORA_FILE}{hint}")


def weights_of(args: argparse.Namespace) -> Weights:
    """args.weights (set by resolve_args), or resolved here for callers that build the namespace themselves."""
    return getattr(args, "weights", None) or resolve_weights(args.unet_path, getattr(args, "lora_path", None),
                                                            FAMILY_DEFAULTS[family_of(args)].denoiser)


def load_unet(args: argparse.Namespace):
    """The UNet to evaluate: a diffusers folder as is, or the base UNet architecture with the file's weights."""
    from diffusers import UNet2DConditionModel

    path = weights_of(args).unet
    if path is not None and os.path.isdir(path):
        return UNet2DConditionModel.from_pretrained(path)
    unet = UNet2DConditionModel.from_pretrained(args.pretrain_path, subfolder="unet")
    if path is not None:
        load_unet_weights(unet, path, args.pretrain_path)
    return unet


def load_vae(vae_path: str | None, pretrain_path: str):
    from diffusers import AutoencoderKL

    if vae_path is None:
        return AutoencoderKL.from_pretrained(pretrain_path, subfolder="vae")
    if (Path(vae_path) / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(vae_path, subfolder="vae")
    try:
        return AutoencoderKL.from_pretrained(vae_path)
    except OSError:
        if Path(vae_path).exists():
            raise
        return AutoencoderKL.from_pretrained(vae_path, subfolder="vae")  # a hub pipeline repo


def load_scheduler(pretrain_path: str, revision: str | None = None):
    """Official: Euler built from the base model's scheduler config (PNDM for SD1.5 -> Euler defaults apply).
    train.py --save_pipeline saves this scheduler, so the saved pipeline samples as evaluated."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(pretrain_path, subfolder="scheduler", revision=revision)


@dataclass
class Models:
    unet: object
    vae: object
    scheduler: object
    tokenizers: list
    text_encoders: list
    sdxl: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_factor(self) -> int:
        """Spatial compression of the VAE (8 for the real ones), read from its config."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return self.vae_factor


@dataclass
class PipelineModels:
    """sd3 / flux: their diffusers pipeline (transformer and text encoders in `dtype`, trained weights loaded in) and
    the VAE in fp32, which decodes outside the pipeline as for sd/sdxl."""

    pipeline: object
    vae: object
    family: str
    device: torch.device
    dtype: torch.dtype
    max_sequence_length: int

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """SD3: the VAE factor x the transformer's patch size; FLUX.1: x 2 (2x2-packed latents)."""
        patch = self.pipeline.transformer.config.patch_size if self.family == "sd3" else 2
        return self.vae_factor * patch

    @property
    def latent_channels(self) -> int:
        channels = self.pipeline.transformer.config.in_channels
        return channels // 4 if self.family == "flux" else channels


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Models | PipelineModels:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family_of(args) in FLOW_FAMILIES:
        return load_pipeline_models(args, device, dtype)

    names = [("tokenizer", "text_encoder", CLIPTextModel)]
    if args.sdxl:
        names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    tokenizers = [CLIPTokenizer.from_pretrained(args.pretrain_path, subfolder=t) for t, _, _ in names]
    encoders = [cls.from_pretrained(args.pretrain_path, subfolder=e) for _, e, cls in names]
    unet, vae = load_unet(args), load_vae(args.vae_path, args.pretrain_path)
    scheduler = load_scheduler(args.pretrain_path)
    if weights_of(args).lora is not None:
        load_lora(args, unet, vae, scheduler, tokenizers, encoders)
    for module, module_dtype in [(unet, dtype), (vae, torch.float32)] + [(e, dtype) for e in encoders]:
        # torch's own .to(): diffusers' override warns about fp32 modules even when a model has none
        torch.nn.Module.to(module, device=device, dtype=module_dtype).eval().requires_grad_(False)
    return Models(unet, vae, scheduler, tokenizers, encoders, args.sdxl, device, dtype)


def load_lora(args, unet, vae, scheduler, tokenizers, encoders) -> None:
    """Attach a LoRA adapter to the UNet (and text encoders if it has layers for them) via the pipeline loader."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if args.sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    adapter = Path(weights_of(args).lora)
    try:  # a file is passed as folder + weight_name, which diffusers also reads offline
        if adapter.is_file():
            pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
        else:
            pipe.load_lora_weights(str(adapter))
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the LoRA adapter {adapter}: {e}") from e


def load_transformer(args: argparse.Namespace, dtype: torch.dtype):
    """The transformer to evaluate, in `dtype`: a diffusers folder as is, or the base model's transformer with the
    file's weights (loaded in `dtype` first, so that a FLUX.1 transformer is never held in fp32)."""
    import diffusers

    cls = getattr(diffusers, {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
                              "cogvideox": "CogVideoXTransformer3DModel"}.get(family_of(args), "WanTransformer3DModel"))
    path = weights_of(args).unet
    if path is not None and os.path.isdir(path):
        return cls.from_pretrained(path, torch_dtype=dtype)
    transformer = cls.from_pretrained(args.pretrain_path, subfolder="transformer", torch_dtype=dtype)
    if path is not None:
        load_transformer_weights(transformer, path, args.pretrain_path)
    return transformer


def load_transformer_pipeline(args: argparse.Namespace, transformer, vae, device: torch.device, dtype: torch.dtype):
    """The family's diffusers pipeline from the base model with the trained transformer, a LoRA adapter if one was
    given (pipeline.load_lora_weights), everything on `device` in `dtype` but the VAE, kept in fp32."""
    import diffusers

    experts = transformer if isinstance(transformer, dict) else {"transformer": transformer}  # wan22_a14b: both
    pipe = getattr(diffusers, pipeline_name(args)).from_pretrained(args.pretrain_path, vae=vae, torch_dtype=dtype,
                                                                    **experts)
    pipe.set_progress_bar_config(disable=True)
    adapter = weights_of(args).lora
    if adapter is not None:
        adapter = Path(adapter)
        try:
            if adapter.is_file() and adapter.name != LOW_NOISE_LORA:
                pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
            elif not adapter.is_file():
                pipe.load_lora_weights(str(adapter))
            low_noise = (adapter.parent if adapter.is_file() else adapter) / LOW_NOISE_LORA
            if family_of(args) == "wan22_a14b" and low_noise.is_file():  # train.py's adapter of transformer_2
                pipe.load_lora_weights(str(low_noise.parent), weight_name=low_noise.name, load_into_transformer_2=True)
        except (OSError, ValueError, KeyError) as e:
            raise GenerateError(f"cannot load the LoRA adapter {adapter}: {e}") from e
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module_dtype = torch.float32 if name == "vae" else dtype
            torch.nn.Module.to(module, device=device, dtype=module_dtype).eval().requires_grad_(False)
    return pipe


def load_pipeline_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> PipelineModels:
    """StableDiffusion3Pipeline / FluxPipeline from the base model, with the trained transformer (and a LoRA adapter,
    through pipeline.load_lora_weights) and the VAE in fp32; the scheduler is the base model's
    (FlowMatchEulerDiscreteScheduler)."""
    family = family_of(args)
    transformer = load_transformer(args, dtype)
    vae = load_vae(args.vae_path, args.pretrain_path)
    pipe = load_transformer_pipeline(args, transformer, vae, device, dtype)
    # T5 tokens: the pipelines' defaults (SD3 256, FLUX.1-dev 512); FLUX.1-schnell (no guidance embedding) takes at
    # most 256, as its model card and diffusers' documentation say
    if family == "sd3":
        max_sequence_length = 256
    else:
        max_sequence_length = 512 if transformer.config.guidance_embeds else 256
    return PipelineModels(pipe, vae, family, device, dtype, max_sequence_length)


# -------------------------------------------------------------------------------------------------------- sampling


@torch.inference_mode()
def encode(models: Models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the official scripts build them.

    SD1.5: last hidden state of the text encoder. SDXL: penultimate hidden states of both encoders concatenated, and
    the projected pooled output of the second encoder. Tokens are padded to 77 and truncated.
    """
    hidden = []
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(models.device)
        out = encoder(ids, output_hidden_states=models.sdxl)
        if not models.sdxl:
            return out.last_hidden_state, None
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds  # pooled: the second (projection) encoder's


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Official protocol: re-seeded for every prompt, so every prompt starts from this same noise. fp32, CPU generator."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def batch_noise(seed: int, seeds: list[int] | None, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of a batch of n images, shape (n, *shape[1:]): `initial_noise(seed)` for every image (official
    protocol), or, with `seeds` (one per image, eval.make_pairs' candidates), image j starts from
    `initial_noise(seeds[j])`, the noise `--seed seeds[j]` would give it."""
    if seeds is None:
        return initial_noise(seed, shape).expand(n, *shape[1:])
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return torch.cat([initial_noise(s, shape) for s in seeds])


def guide(eps_c: torch.Tensor, eps_u: torch.Tensor, cfg: float, formula: str) -> torch.Tensor:
    if formula == "official":
        return eps_c + cfg * (eps_c - eps_u)  # test_sd15.py:184 / test_sdxl.py:204; = standard with cfg + 1
    return eps_u + cfg * (eps_c - eps_u)


@torch.inference_mode()
def sample(models: Models | PipelineModels, prompts: list[str], uncond, args: argparse.Namespace,
           seeds: list[int] | None = None, images: list | None = None) -> torch.Tensor:
    """Euler sampling for a batch of prompts; returns uint8 images (B, H, W, 3) on the CPU.

    Every image starts from the noise of `args.seed` (official), or with `seeds` image j from that of `seeds[j]`
    (`batch_noise`); an image does not depend on the others in its batch.

    The model's prediction is guided and handed to EulerDiscreteScheduler.step, which reads it as the scheduler
    config's `prediction_type` says: epsilon (SD1.5, SDXL) or v_prediction (SD2.x-768: x0 = x/(σ²+1) - v·σ/√(σ²+1)
    in Euler's scaled-sample terms). Guidance is linear, so guiding v equals guiding ε. sd3/flux: `sample_pipeline`."""
    if isinstance(models, VideoModels):
        return sample_video(models, prompts, args, seeds, images)
    if isinstance(models, PipelineModels):
        return sample_pipeline(models, prompts, args, seeds)
    n, f = len(prompts), models.vae_factor
    cond_emb, cond_pooled = encode(models, prompts)
    uncond_emb, uncond_pooled = uncond
    emb = torch.cat([cond_emb, uncond_emb.expand(n, -1, -1)]).to(models.dtype)  # [cond; uncond], as official
    extra = {}
    if models.sdxl:
        time_ids = torch.tensor([args.height, args.width, 0, 0, args.height, args.width], device=models.device)
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.cat([cond_pooled, uncond_pooled.expand(n, -1)]).to(models.dtype),
            "time_ids": time_ids.to(models.dtype).expand(2 * n, -1),
        }

    scheduler = models.scheduler
    scheduler.set_timesteps(args.steps, device=models.device)
    shape = (1, models.unet.config.in_channels, args.height // f, args.width // f)
    if seeds is None:  # the official protocol, as it always was
        latents = (initial_noise(args.seed, shape).to(models.device) * scheduler.init_noise_sigma).expand(n, -1, -1, -1)
    else:
        latents = batch_noise(args.seed, seeds, n, shape).to(models.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        pred = models.unet(torch.cat([x, x]).to(models.dtype), t, encoder_hidden_states=emb, **extra).sample.float()
        pred_c, pred_u = pred.chunk(2)  # epsilon or v, as the scheduler config's prediction_type says
        latents = scheduler.step(guide(pred_c, pred_u, args.cfg, args.guidance_formula), t, latents).prev_sample
    return decode(models.vae, latents)


@torch.inference_mode()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """latents / scaling_factor (+ shift_factor), decoded in fp32, (x/2 + 0.5) clamped, x 255, rounded to uint8."""
    images = []
    config = vae.config
    for latent in latents:  # one at a time: a batch of 1024px decodes would need a lot of memory
        z = latent[None].float() / config.scaling_factor + (config.shift_factor or 0.0)
        x = vae.decode(z).sample
        images.append(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu())
    return torch.stack(images)


@torch.inference_mode()
def sample_pipeline(models: PipelineModels, prompts: list[str], args: argparse.Namespace,
                    seeds: list[int] | None = None) -> torch.Tensor:
    """sd3 / flux: the pipeline's own sampler (FlowMatchEulerDiscreteScheduler, its shift or FLUX.1's resolution-
    dependent shift) on the same seeded fp32 CPU noise for every prompt as sd/sdxl (flow models start at sigma 1, the
    noise itself), passed in as `latents` so that images do not depend on the batch; decoded by `decode` (VAE fp32).

    sd3: classifier-free guidance with the real encoding of "" as the negative prompt (the pipeline's default
    formula, eps_u + cfg(eps_c - eps_u); `--guidance_formula official` passes cfg + 1). flux: --cfg is the
    guidance-embedding value (FLUX.1-dev), one forward pass per step; FLUX.1-schnell ignores it."""
    from diffusers import FluxPipeline

    pipe, n, f = models.pipeline, len(prompts), models.vae_factor
    height, width = args.height // f, args.width // f
    noise = batch_noise(args.seed, seeds, n, (1, models.latent_channels, height, width)).contiguous()
    kwargs = {"height": args.height, "width": args.width, "num_inference_steps": args.steps,
              "max_sequence_length": models.max_sequence_length, "output_type": "latent", "return_dict": False}
    if models.family == "flux":
        noise = FluxPipeline._pack_latents(noise, n, models.latent_channels, height, width)
        kwargs["guidance_scale"] = float(args.cfg)
    else:
        kwargs["negative_prompt"] = ""
        kwargs["guidance_scale"] = float(args.cfg) + (1.0 if args.guidance_formula == "official" else 0.0)
    latents = pipe(prompts, latents=noise.to(models.device), **kwargs)[0]
    if models.family == "flux":
        latents = FluxPipeline._unpack_latents(latents, args.height, args.width, f)
    return decode(models.vae, latents)


# ----------------------------------------------------------------------------------------------------------- video


@dataclass
class VideoModels:
    """wan / cogvideox: their diffusers pipeline (transformer and text encoder in `dtype`, trained weights loaded in,
    the base model's own scheduler) and the video VAE in fp32, which decodes outside the pipeline."""

    pipeline: object
    vae: object
    family: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_factor(self) -> int:
        return self.pipeline.vae_scale_factor_spatial

    @property
    def size_multiple(self) -> int:
        """The VAE factor x the transformer's spatial patch size (wan (1, 2, 2), cogvideox 2): 16 for both."""
        patch = self.pipeline.transformer.config.patch_size
        return self.vae_factor * (patch[-1] if isinstance(patch, (list, tuple)) else patch)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """One video's initial noise in the layout the pipeline takes as `latents`: wan (1, C, F', h, w),
        cogvideox frame-first (1, F', C, h, w); F' = (num_frames - 1) / 4 + 1 (the VAE's temporal factor)."""
        frames = (num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1
        channels = self.pipeline.transformer.config.in_channels
        if self.family in WAN_FAMILIES:  # the noise has the VAE's channels (I2V transformers take 36: + mask + image)
            channels = self.pipeline.vae.config.z_dim
        h, w = height // self.vae_factor, width // self.vae_factor
        return (1, channels, frames, h, w) if self.family in WAN_FAMILIES else (1, frames, channels, h, w)


def video_seeds(items: list[dict], seed: int) -> list[int]:
    """The noise seed of each prompt-file entry: `seed` for a prompt's first occurrence (every prompt starts from the
    same noise, as for images), seed + k for its k-th repetition, so that a prompt file listing a prompt five times
    (VBench's five samples per prompt) gets five different videos."""
    seen: dict[str, int] = {}
    seeds = []
    for item in items:
        k = seen.get(item["prompt"], 0)
        seen[item["prompt"]] = k + 1
        seeds.append(seed + k)
    return seeds


def load_video_vae(args: argparse.Namespace):
    import diffusers

    cls = getattr(diffusers, "AutoencoderKLCogVideoX" if family_of(args) == "cogvideox" else "AutoencoderKLWan")
    location = args.vae_path or args.pretrain_path
    subfolder = "vae" if args.vae_path is None or (Path(location) / "vae" / "config.json").is_file() else None
    return cls.from_pretrained(location, subfolder=subfolder, torch_dtype=torch.float32)


def load_video_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> VideoModels:
    """WanPipeline / CogVideoXPipeline from the base model, with the trained transformer (or a LoRA adapter through
    pipeline.load_lora_weights), its own scheduler (Wan2.1: UniPCMultistepScheduler with flow sigmas and the model's
    flow_shift; CogVideoX-2b: CogVideoXDDIMScheduler, -5b: CogVideoXDPMScheduler) and the VAE in fp32."""
    family = family_of(args)
    transformer = load_wan_experts(args, dtype) if family == "wan22_a14b" else load_transformer(args, dtype)
    vae = load_video_vae(args)
    pipe = load_transformer_pipeline(args, transformer, vae, device, dtype)
    if getattr(args, "boundary_ratio", None) is not None:  # sampling reads it from the pipeline's config
        pipe.register_to_config(boundary_ratio=args.boundary_ratio)
    return VideoModels(pipe, vae, family, device, dtype)


@torch.inference_mode()
def sample_video(models: VideoModels, prompts: list[str], args: argparse.Namespace,
                 seeds: list[int] | None = None, images: list | None = None) -> torch.Tensor:
    """wan / cogvideox: the pipeline's own sampler and guidance (standard formula, the negative prompt's real
    encoding as the unconditional branch; `--guidance_formula official` passes cfg + 1), from the seeded fp32 CPU noise
    of each video (`batch_noise`), passed in as `latents`, and one seeded CPU generator per video for a stochastic
    scheduler (CogVideoX-5b's DPM), so that a video depends neither on its batch nor on the device's generator.
    Decoded one video at a time by the fp32 VAE: wan z * latents_std + latents_mean, cogvideox z / scaling_factor.
    Returns uint8 frames (B, F, H, W, 3) on the CPU."""
    pipe, n = models.pipeline, len(prompts)
    seeds = seeds if seeds is not None else [args.seed] * n
    noise = batch_noise(args.seed, seeds, n, models.latent_shape(args.num_frames, args.height, args.width))
    kwargs = {"height": args.height, "width": args.width, "num_frames": args.num_frames,
              "num_inference_steps": args.steps, "negative_prompt": [args.negative_prompt] * n,
              "guidance_scale": float(args.cfg) + (1.0 if args.guidance_formula == "official" else 0.0),
              "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
              "max_sequence_length": 512 if models.family in WAN_FAMILIES else 226,  # the pipelines' defaults
              "output_type": "latent", "return_dict": False}
    if getattr(args, "guidance_scale_2", None) is not None:
        kwargs["guidance_scale_2"] = args.guidance_scale_2
    if images is not None:  # image-to-video: the pipeline repeats one image's condition over its batch: one at a time
        latents = torch.cat([pipe(prompt=prompt, image=image, latents=noise[i : i + 1].contiguous().to(models.device),
                                  **{**kwargs, "negative_prompt": args.negative_prompt,
                                     "generator": kwargs["generator"][i]})[0]
                             for i, (prompt, image) in enumerate(zip(prompts, images))])
        return decode_video(models.vae, latents, models.family)
    latents = pipe(prompts, latents=noise.contiguous().to(models.device), **kwargs)[0]
    if models.family == "cogvideox":
        latents = latents.permute(0, 2, 1, 3, 4)  # (B, F', C, h, w) -> (B, C, F', h, w)
    return decode_video(models.vae, latents, models.family)


@torch.inference_mode()
def decode_video(vae, latents: torch.Tensor, family: str) -> torch.Tensor:
    """(B, C, F', h, w) latents -> uint8 (B, F, H, W, 3): denormalised as the family's pipeline does, decoded in
    fp32 one video at a time, (x / 2 + 0.5) clamped, x 255, rounded."""
    config, videos = vae.config, []
    for latent in latents:
        z = latent[None].float().to(next(vae.parameters()).device)
        if family in WAN_FAMILIES:
            mean = torch.tensor(config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
            std = torch.tensor(config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
            z = z * std + mean
        else:
            z = z / config.scaling_factor
        x = vae.decode(z).sample  # (1, 3, F, H, W)
        videos.append(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 3, 0).cpu())
    return torch.stack(videos)


# ------------------------------------------------------------------------------------ Wan2.2 and image-to-video

LOW_NOISE_LORA = "pytorch_lora_weights_2.safetensors"  # train.py's adapter of transformer_2 (wan22_a14b)


def prompt_items(path: str) -> list[dict]:
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # resolve_args / load_prompts name the problem
    return items if isinstance(items, list) else []


def resolve_wan22_args(args: argparse.Namespace, family: str) -> None:
    """--guidance_scale_2 and --boundary_ratio (two experts only), and whether a run is image-to-video: always for
    wan_i2v and an I2V-A14B base, for wan22 when an image is given; an I2V run needs an image for every prompt."""
    guidance_2, boundary = getattr(args, "guidance_scale_2", None), getattr(args, "boundary_ratio", None)
    image = getattr(args, "conditioning_image", None)
    if family != "wan22_a14b" and (guidance_2 is not None or boundary is not None):
        raise GenerateError(f"--guidance_scale_2 / --boundary_ratio are for the two-expert wan22_a14b models, not {family}")
    if family == "wan22_a14b":
        args.guidance_scale_2 = WAN22_GUIDANCE_2[family] if guidance_2 is None else guidance_2
        if boundary is not None and not 0 < boundary < 1:
            raise GenerateError(f"--boundary_ratio must be in (0, 1), got {boundary}")
    if family not in ("wan22", "wan22_a14b", "wan_i2v"):
        if image is not None:
            raise GenerateError(f"--conditioning_image is for the image-to-video models, not {family}")
        args.image_to_video = False
        return
    items = prompt_items(args.test_json)
    per_prompt = any(isinstance(item, dict) and "image" in item for item in items)
    if family == "wan22_a14b":
        args.image_to_video = read_model_index(args.pretrain_path).get("_class_name") == "WanImageToVideoPipeline"
        if not args.image_to_video and (image is not None or per_prompt):
            raise GenerateError(f"{args.pretrain_path} is a text-to-video A14B model: it takes no conditioning image")
    else:
        args.image_to_video = family == "wan_i2v" or image is not None or per_prompt
    if not args.image_to_video:
        return
    if image is not None and not os.path.isfile(image):
        raise GenerateError(f"--conditioning_image {image} does not exist")
    missing = [i for i, item in enumerate(items) if isinstance(item, dict) and "image" not in item]
    if image is None and missing:
        raise GenerateError(f"image-to-video ({family}): prompt {missing[0]} of {args.test_json} has no \"image\" and no "
                            f"--conditioning_image was given; give one of them")


def wan22_run_suffix(args: argparse.Namespace) -> str:
    """The run-name part of the Wan2.2 settings: the low-noise guidance, a moved boundary, image-to-video on wan22."""
    family = family_of(args)
    suffix = ""
    if family == "wan22_a14b":
        suffix += f"_{float(args.guidance_scale_2)}cfg2"
        if getattr(args, "boundary_ratio", None) is not None:
            suffix += f"_boundary{args.boundary_ratio}"
    if family == "wan22" and getattr(args, "image_to_video", False):
        suffix += "_i2v"
    return suffix


def pipeline_name(args: argparse.Namespace) -> str:
    """The pipeline class that samples: WanImageToVideoPipeline for an image-to-video run (also on the TI2V-5B's
    WanPipeline folder), else the family's."""
    return "WanImageToVideoPipeline" if getattr(args, "image_to_video", False) else FAMILY_DEFAULTS[family_of(args)].pipeline


def image_paths(args: argparse.Namespace, items: list[dict]) -> list[str]:
    folder = Path(args.test_json).parent
    return [str(folder / item["image"]) if "image" in item else args.conditioning_image for item in items]


def conditioning_images(args: argparse.Namespace, items: list[dict]) -> list | None:
    """Each prompt's conditioning image (RGB) for an image-to-video run, else None."""
    if not getattr(args, "image_to_video", False):
        return None
    from PIL import Image

    images = []
    for path in image_paths(args, items):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def wan22_fingerprint(args: argparse.Namespace, items: list[dict]) -> dict:
    """What else decides a Wan2.2 / I2V video: the second guidance scale, the boundary, the images' contents."""
    if family_of(args) not in ("wan22", "wan22_a14b", "wan_i2v"):
        return {}  # wan / cogvideox records stay as they were
    images = None
    if getattr(args, "image_to_video", False):
        lines = "".join(f"{file_digest(Path(path))}\n" for path in image_paths(args, items))
        images = hashlib.sha256(lines.encode()).hexdigest()[:16]
    experts = None
    if args.weights.unet is not None and os.path.isdir(args.weights.unet):  # train.py's per-expert files
        experts = {f.name: file_digest(f) for f in sorted(Path(args.weights.unet).glob("transformer*.*"))
                   if f.suffix in (".safetensors", ".pth")}
    return {"experts": experts, "guidance_scale_2": getattr(args, "guidance_scale_2", None),
            "boundary_ratio": getattr(args, "boundary_ratio", None), "conditioning_images": images,
            "pipeline": pipeline_name(args)}


def resolve_expert_weights(unet_path: str | None, lora_path: str | None) -> Weights:
    """wan22_a14b: a train.py output folder may hold one expert's weights or adapter (transformer_2.* or
    pytorch_lora_weights_2.safetensors alone, after --train_expert low); the other expert is then the base's."""
    if unet_path is None or not os.path.isdir(unet_path):
        return Weights(unet_path, lora_path, "transformer")
    folder = Path(unet_path)
    trained = [f for stem in ("transformer", "transformer_2") for f in (f"{stem}.safetensors", f"{stem}.pth",
                                                                        f"{stem}/config.json") if (folder / f).is_file()]
    adapters = [folder / name for name in (LORA_FILE, LOW_NOISE_LORA) if (folder / name).is_file()]
    if lora_path is None and adapters:
        lora_path = str(adapters[0])
    if not trained and lora_path is None:
        raise GenerateError(f"--unet_path folder {folder} holds nothing to evaluate: no transformer.* / "
                            f"transformer_2.* weights, no transformer/ or transformer_2/ folder, no LoRA adapter")
    return Weights(str(folder) if trained else None, lora_path, "transformer")


def load_wan_experts(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """wan22_a14b: both experts in `dtype`, each the base's with the trained weights a --unet_path folder holds for
    it (transformer.* / transformer_2.*, or transformer/ / transformer_2/ of a saved pipeline); a file is the expert
    its name says (transformer_2.* the low-noise one)."""
    from diffusers import WanTransformer3DModel

    path = weights_of(args).unet
    experts = {}
    for name in ("transformer", "transformer_2"):
        folder = Path(path) / name if path is not None and os.path.isdir(path) else None
        if folder is not None and (folder / "config.json").is_file():
            experts[name] = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
            continue
        experts[name] = WanTransformer3DModel.from_pretrained(args.pretrain_path, subfolder=name, torch_dtype=dtype)
        if path is None:
            continue
        if os.path.isdir(path):
            files = [Path(path) / f"{name}.{ext}" for ext in ("safetensors", "pth") if (Path(path) / f"{name}.{ext}").is_file()]
        else:
            files = [Path(path)] if Path(path).name.split(".")[0] == name else []
        if files:
            load_transformer_weights(experts[name], str(files[0]), args.pretrain_path)
    return experts


# --------------------------------------------------------------------------------------------------------- outputs


def stored_prompt(path: Path) -> str | None:
    """The prompt in a PNG's EXIF if the file decodes completely ("" when it has none); None when the file is missing
    or does not decode (a truncated file from a killed run), so that it is generated again."""
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return _decode_description(image.getexif().get(EXIF_IMAGE_DESCRIPTION, ""))
    except Exception:
        return None


def prompt_matches(stored: str | None, prompt: str) -> bool:
    """Ours store the prompt as UTF-8; the official script stored it as ASCII with '?' for other characters."""
    return stored is not None and stored in (prompt, prompt.encode("ascii", "replace").decode("ascii"))


def save_png(array: torch.Tensor, prompt: str, path: Path) -> None:
    """Write atomically, with the prompt as EXIF ImageDescription (official). Read it back with `read_prompt`."""
    from PIL import Image

    image = Image.fromarray(array.numpy())
    exif = Image.Exif()
    # UTF-8 bytes: the same as the official for ASCII prompts; PIL would turn other characters into "?"
    exif[EXIF_IMAGE_DESCRIPTION] = prompt.encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", exif=exif)
    os.replace(tmp, path)


def read_prompt(path) -> str:
    """The prompt stored in an image's EXIF ImageDescription (PIL reads the UTF-8 bytes as Latin-1)."""
    from PIL import Image

    with Image.open(path) as image:
        return _decode_description(image.getexif()[EXIF_IMAGE_DESCRIPTION])


def _decode_description(raw: str | bytes) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8 bytes: written by another tool
        return raw


def write_outputs(items: list[dict], paths: list[str], output_path: str, name: str, make_zip: bool) -> Path:
    """Manifest `<output_path>/<run>.json` in prompt order, and the `<run>.zip` of the images (official formats)."""
    manifest = [
        {"prompt": item["prompt"], "gen_image_path": path, "raw_image_path": item.get("raw_image_path", ""),
         "metadata": item.get("metadata", {})}
        for item, path in zip(items, paths)
    ]
    manifest_path = Path(output_path) / f"{name}.json"
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, manifest_path)
    if make_zip:
        zip_path = Path(output_path) / f"{name}.zip"
        tmp = zip_path.with_name(zip_path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # PNGs are already compressed
            for path in paths:
                archive.write(path, arcname=os.path.basename(path))
        os.replace(tmp, zip_path)
    return manifest_path


# ------------------------------------------------------------------------------------------------------ run record

# files that loading reads from a model folder (and from its pipeline parts); other files there (manifests, images,
# logs of the runs written into a train.py output folder) must not change the fingerprint
MODEL_FILES = ("config.json", "scheduler_config.json", "model_index.json", "diffusion_pytorch_model*",
               "model*.safetensors", "pytorch_model*.bin", "vocab.json", "merges.txt", "spiece.model", LORA_FILE)
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2",
                  "transformer", "text_encoder_3", "tokenizer_3")  # (the last three: sd3/flux folders only)
MIB = 1 << 20
FINGERPRINT_NAMES = {  # fingerprint key -> what the user changed
    "model.unet": "UNet weights (--unet_path)", "model.transformer": "transformer weights (--unet_path)",
    "model.lora": "LoRA adapter", "model.base": "base model (--pretrain_path)",
    "model.vae": "VAE (--vae_path)", "prompts.count": "number of prompts in --test_json",
    "prompts.sha256": "prompts of --test_json", "sampling.dtype": "precision (--dtype)",
}


def file_digest(path: Path) -> str:
    """sha256 of a weights file: all of it up to 64 MiB, else its size and four 1 MiB samples (start, thirds, end).
    That tells checkpoints apart in milliseconds, and a moved or copied file still matches."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 64 * MIB:
            digest.update(f.read())
        else:
            for offset in (0, size // 3, 2 * size // 3, size - MIB):
                f.seek(offset)
                digest.update(f.read(MIB))
    return digest.hexdigest()[:16]


def source_digest(location: str | None) -> str | None:
    """Fingerprint of a model location: its file's digest, the digest of the files loading reads from a folder, or
    `hub:<id>` for a hub id (None: not used)."""
    if location is None:
        return None
    path = Path(location)
    if path.is_file():
        return "sha256:" + file_digest(path)
    if not path.is_dir():
        return f"hub:{location}"
    files = sorted({f for folder in [path] + [path / part for part in PIPELINE_PARTS]
                    for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    lines = "".join(f"{f.relative_to(path).as_posix()} {file_digest(f)}\n" for f in files)
    return f"sha256:{hashlib.sha256(lines.encode()).hexdigest()[:16]} ({len(files)} files)"


def run_fingerprint(args: argparse.Namespace, prompts: list[dict], dtype: torch.dtype) -> dict:
    """What decides the images: the weights, the whole prompt file (so that --max_prompts runs of it match) and the
    sampling settings. The batch size and the device do not (up to float rounding)."""
    texts = json.dumps([item["prompt"] for item in prompts], ensure_ascii=False)
    family = family_of(args)
    video = family in VIDEO_FAMILIES
    flow = family in FLOW_FAMILIES or video  # sd/sdxl keep the keys they always had, so their older records resume
    fingerprint = {
        "model": {"transformer" if flow else "unet": source_digest(args.weights.unet),
                  "lora": source_digest(args.weights.lora),
                  "base": source_digest(args.pretrain_path), "vae": source_digest(args.vae_path)},
        "prompts": {"count": len(prompts), "sha256": hashlib.sha256(texts.encode()).hexdigest()[:16]},
        "sampling": {"height": args.height, "width": args.width, "steps": args.steps, "cfg": float(args.cfg),
                     "seed": args.seed, "guidance_formula": args.guidance_formula,
                     "scheduler": (f"{FAMILY_DEFAULTS[family].pipeline}'s (the base model's scheduler/)" if video
                                   else "FlowMatchEulerDiscreteScheduler" if flow else "EulerDiscreteScheduler"),
                     "dtype": str(dtype).removeprefix("torch."), "sdxl": args.sdxl},
    }
    if flow:
        fingerprint["sampling"]["family"] = family
    if video:  # the noise of a repeated prompt's k-th copy is --seed + k (see video_seeds)
        fingerprint["sampling"].update(num_frames=args.num_frames, fps=float(args.fps),
                                       negative_prompt=args.negative_prompt, seeds="seed + repetition")
        fingerprint["sampling"].update(wan22_fingerprint(args, prompts))
    return fingerprint


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """One line per setting that differs, named as the user knows it."""
    lines = []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key) if isinstance(old.get(section), dict) else None
            if before != value:
                name = FINGERPRINT_NAMES.get(f"{section}.{key}", f"--{key}")
                lines.append(f"{name}: was {before}, now {value}")
    return lines


def read_run_record(image_dir: Path) -> dict | None:
    path = image_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerateError(f"the run record {path} cannot be read ({e}). Delete it to keep the images whose stored "
                            f"prompt matches, or delete {image_dir} to generate the run afresh") from e
    return record if isinstance(record, dict) else None


def check_same_run(image_dir: Path, manifest: Path, fingerprint: dict) -> dict | None:
    """Refuse to resume a folder whose images another model, prompt file or sampling setting made (they would be
    reused under the same names). Returns the folder's run record (None: none, or no image to protect)."""
    record = read_run_record(image_dir)
    if record is None or not (any(image_dir.glob("*.png")) or any(image_dir.glob("*.mp4"))):
        return None
    differences = fingerprint_differences(record.get("fingerprint") or {}, fingerprint)
    if differences:
        raise GenerateError(
            f"{image_dir} holds images of another run under the same name:\n  " + "\n  ".join(differences)
            + f"\nResuming would reuse them as this run's images. Write this run elsewhere with another --output_path, "
            f"or delete {image_dir} and {manifest} to generate it afresh."
        )
    return record


def listed_prompts(manifest: Path) -> int:
    """How many entries an existing manifest lists (0 when there is none or it does not read as a list)."""
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return len(entries) if isinstance(entries, list) else 0


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------ main


def generate(args: argparse.Namespace) -> dict:
    """Generate (or complete) one run. Returns {"manifest", "run_name", "generated", "skipped", "n_prompts"} (counts:
    this rank's).

    Resuming keeps an image only if the folder's run record has the same fingerprint (else: an error) and the image
    decodes and stores this prompt. Under `accelerate launch`, rank r takes the prompts with index % world_size == r;
    after a barrier rank 0 checks that every image exists and writes the manifest, the zip and the run record.
    """
    from tqdm.auto import tqdm

    args = resolve_args(args)
    state = process_state()
    device = torch.device(state.device if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    all_items = load_prompts(args.test_json)
    name = run_name(args)
    image_dir = Path(args.output_path) / name
    manifest = Path(args.output_path) / f"{name}.json"
    fingerprint = run_fingerprint(args, all_items, dtype)
    previous = check_same_run(image_dir, manifest, fingerprint)
    n = len(all_items) if args.max_prompts is None else min(args.max_prompts, len(all_items))
    listed = min(listed_prompts(manifest), len(all_items))
    if listed > n:  # never shrink a run: a smoke run must not hide the prompts already done
        if state.is_main_process:
            print(f"{manifest} already lists {listed} prompts: keeping them (--max_prompts only limits a run that "
                  "holds fewer)")
        n = listed
    items = all_items[:n]
    image_dir.mkdir(parents=True, exist_ok=True)
    video = args.model_family in VIDEO_FAMILIES
    suffix = ".mp4" if video else ".png"
    paths = [os.path.join(args.output_path, name, f"{i}_{args.height}x{args.width}{suffix}") for i in range(len(items))]
    mine = range(state.process_index, len(items), state.num_processes)
    read_stored = stored_video_prompt if video else stored_prompt
    stored = {i: read_stored(Path(paths[i])) for i in tqdm(mine, desc=f"checking {name}", leave=False,
                                                           disable=not state.is_main_process)}
    todo = [i for i in mine if not prompt_matches(stored[i], items[i]["prompt"])]
    wrong = [i for i in todo if stored[i] is not None]
    if wrong:
        print(f"[WARN] {len(wrong)} {'videos' if video else 'images'} in {image_dir} store another prompt (or none), e.g. {paths[wrong[0]]}: "
              "generating them again")
    if previous is None and len(todo) < len(mine) and state.is_main_process:
        print(f"[WARN] {image_dir} has no {RUN_RECORD} (an older or official run): its images are kept when their "
              "stored prompt matches, but nothing shows which model made them")
    weights = args.weights.describe(args.pretrain_path)
    record = {"run_name": name, "weights": weights, "family": args.model_family, "n_prompts": n,
              "total_prompts": len(all_items), "complete": False, "fingerprint": fingerprint,
              "paths": {"unet_path": args.unet_path, "lora_path": args.weights.lora, "pretrain_path": args.pretrain_path,
                        "vae_path": args.vae_path, "test_json": args.test_json}}
    if state.is_main_process:
        write_json(image_dir / RUN_RECORD, record)  # before the first new image: a killed run keeps its fingerprint
        print(f"{name}: {weights}; {len(mine) - len(todo)} of {len(mine)} {'videos' if video else 'images'} done")

    if todo:
        models, uncond = load_sampler(args, device, dtype)
        progress = tqdm(total=len(todo), desc=name, disable=not state.is_main_process)
        seeds = video_seeds(all_items, args.seed) if video else None
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            prompts = [items[i]["prompt"] for i in batch]
            if video:
                images = conditioning_images(args, [items[i] for i in batch])
                for i, frames in zip(batch, sample(models, prompts, uncond, args, [seeds[i] for i in batch], images)):
                    write_mp4(frames, paths[i], args.fps, items[i]["prompt"])
            else:
                for i, image in zip(batch, sample(models, prompts, uncond, args)):
                    save_png(image, items[i]["prompt"], Path(paths[i]))
            progress.update(len(batch))
        progress.close()

    state.wait_for_everyone()
    if state.is_main_process:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise GenerateError(f"{len(missing)} images are missing after generation (e.g. {missing[0]}); re-run to resume")
        manifest = write_outputs(items, paths, args.output_path, name, args.zip)
        write_json(image_dir / RUN_RECORD, {**record, "complete": n == len(all_items)})
        print(f"Wrote {len(paths)} {'videos' if video else 'images'} to {image_dir} and the manifest {manifest} ({weights})")
        if n < len(all_items):
            print(f"Partial run: {n} of {len(all_items)} prompts (--max_prompts). Run again without it to complete it.")
    return {"manifest": manifest, "run_name": name, "generated": len(todo), "skipped": len(mine) - len(todo),
            "n_prompts": n}


def load_sampler(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(models, uncond) for `sample`: the models of a resolved namespace (resolve_args), the image size checked against
    them, and the real encoding of the empty prompt (official, SDXL too; None for sd3/flux, whose pipeline encodes)."""
    if family_of(args) in VIDEO_FAMILIES:
        models = load_video_models(args, device, dtype)
    else:
        models = load_models(args, device, dtype)
    if args.height % models.size_multiple or args.width % models.size_multiple:
        what = ("the VAE factor" if models.size_multiple == models.vae_factor
                else f"the VAE factor {models.vae_factor} x the {args.model_family} patch size")
        raise GenerateError(f"--height/--width must be multiples of {what} {models.size_multiple}")
    uncond = None if isinstance(models, (PipelineModels, VideoModels)) else encode(models, [""])
    return models, uncond


def describe_weights(args: argparse.Namespace) -> str:
    """The weights --unet_path / --lora_path name, in words (the eval scripts print it in their header)."""
    if args.unet_path is not None and not os.path.exists(args.unet_path):
        raise GenerateError(f"--unet_path {args.unet_path} does not exist")
    try:
        family = resolve_family(args)
    except GenerateError:  # no readable model_index.json here (a hub id not in the cache): the weights' names decide
        family = getattr(args, "model_family", None) or ("sdxl" if args.sdxl else None)
    if family is None:
        path = Path(args.unet_path or "")
        transformer = (path.name.startswith("transformer") if path.is_file() else
                       any((path / f).exists() for f in ("transformer", "transformer.safetensors", "transformer.pth")))
        family = "sd3" if transformer else "sd"
    defaults = FAMILY_DEFAULTS[family]
    pretrain_path = args.pretrain_path or defaults.base
    return resolve_weights(args.unet_path, args.lora_path, defaults.denoiser).describe(pretrain_path)


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        if args.print_weights:
            print(describe_weights(args))
            return
        generate(args)
    except GenerateError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
