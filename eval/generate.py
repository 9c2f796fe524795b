"""Generate evaluation images for SD1.5 or SDXL, following the official `test_sd15.py` / `test_sdxl.py` protocol.

    python -m eval.generate --unet_path output/sd15-dpo/unet.pth --test_json prompts/papv2.json
    python -m eval.generate --sdxl --unet_path output/sdxl-dpo/unet.pth --test_json prompts/hpsv2.json
    accelerate launch -m eval.generate ...            # several GPUs: prompts are sharded across ranks

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
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXIF_IMAGE_DESCRIPTION = 0x010E
LORA_FILE = "pytorch_lora_weights.safetensors"  # what train.py --use_lora writes (diffusers' file name)
RUN_RECORD = "run.json"  # in the run's image folder: what made its images (fingerprint), how many prompts, complete


class GenerateError(Exception):
    """A problem the user can fix (missing file, wrong checkpoint, bad option); printed without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_json", default="prompts/papv2.json", help="prompt file (JSON list of {prompt, ...})")
    p.add_argument("--unet_path", default=None,
                   help="fine-tuned UNet: a .pth state dict (the released checkpoints' format), a .safetensors file, "
                        "a diffusers UNet folder, a pipeline folder with unet/, or a train.py output folder holding "
                        "unet.safetensors / unet.pth. Omit to evaluate the base UNet (then --output_path is required).")
    p.add_argument("--output_path", "--output", default=None,
                   help="where runs are written (default: --unet_path itself if a folder, else its parent folder)")
    p.add_argument("--height", type=int, default=None, help="default 512 (SD1.5) / 1024 (SDXL)")
    p.add_argument("--width", type=int, default=None, help="default 512 (SD1.5) / 1024 (SDXL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, the same for every prompt")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (see --guidance_formula)")
    p.add_argument("--guidance_formula", choices=("official", "standard"), default="official",
                   help="official: eps_c + cfg*(eps_c - eps_u) (= standard scale cfg+1); "
                        "standard: eps_u + cfg*(eps_c - eps_u) (diffusers). 'standard' runs get a '_standard' run-name suffix.")
    p.add_argument("--pretrain_path", default=None, help=f"base model (default {SD15_BASE} / {SDXL_BASE} with --sdxl)")
    p.add_argument("--sdxl", action="store_true",
                   help="SDXL mode. Without it, SDXL is detected from the base model's model_index.json _class_name")
    p.add_argument("--vae_path", default=None,
                   help=f"VAE folder/repo, or a pipeline folder with vae/ (SDXL default {SDXL_VAE}; SD1.5: the base VAE)")
    p.add_argument("--lora_path", default=None, help="LoRA adapter (train.py's output, read by pipeline.load_lora_weights)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per forward pass (results do not depend on it)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="text encoder(s) + UNet precision (default bf16 on CUDA as official, fp32 on CPU); VAE is always fp32")
    p.add_argument("--device", default="auto", help="auto = cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--max_prompts", type=int, default=None,
                   help="only the first N prompts (smoke runs, demos); running again without it completes the run, "
                        "and a run never shrinks: a manifest keeps listing the prompts it already had")
    p.add_argument("--no_zip", dest="zip", action="store_false", help="do not write <run>.zip")
    p.add_argument("--print_weights", action="store_true",
                   help="only print which weights --unet_path / --lora_path name (UNet file or folder, LoRA adapter) and exit")
    return p.parse_args(argv)


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


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the mode-dependent defaults (SD1.5 vs SDXL, size, VAE, output path) and check the inputs exist."""
    args = argparse.Namespace(**vars(args))
    if args.pretrain_path is None:
        args.pretrain_path = SDXL_BASE if args.sdxl else SD15_BASE
    else:
        is_xl = "XL" in read_model_index(args.pretrain_path).get("_class_name", "")
        if args.sdxl and not is_xl:
            raise GenerateError(f"--sdxl was given but {args.pretrain_path} is not an SDXL pipeline")
        args.sdxl = is_xl
    size = 1024 if args.sdxl else 512
    args.height = args.height or size
    args.width = args.width or size
    if args.vae_path is None and args.sdxl:
        args.vae_path = SDXL_VAE
    if args.unet_path is not None and not os.path.exists(args.unet_path):
        raise GenerateError(f"--unet_path {args.unet_path} does not exist")
    args.weights = resolve_weights(args.unet_path, args.lora_path)
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
    return name + ("_standard" if args.guidance_formula == "standard" else "")


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


def _mismatch_hint(missing: list[str], unexpected: list[str], pretrain_path: str) -> str:
    for prefix in ("module.", "unet.", "model."):
        if unexpected and all(k.startswith(prefix) for k in unexpected):
            return f"every key starts with {prefix!r} (a wrapped model or a whole-pipeline checkpoint): save unet.state_dict() itself"
    if any("lora" in k.lower() for k in unexpected):
        return "the file looks like LoRA weights: pass it with --lora_path"
    if any(k.startswith("add_embedding.") for k in unexpected):
        return f"the file holds an SDXL UNet but the base model {pretrain_path} is not SDXL: pass --sdxl (and an SDXL --pretrain_path)"
    if any(k.startswith("add_embedding.") for k in missing):
        return f"the file holds a non-SDXL (e.g. SD1.5) UNet but the base model {pretrain_path} is SDXL: use an SD1.5 --pretrain_path"
    return f"the file is not a UNet state dict of the base model {pretrain_path} (another base model?)"


def load_unet_weights(unet, path: str, pretrain_path: str) -> None:
    """Strict load of a state-dict file into the base UNet, with a readable error naming the mismatch."""
    state = read_state_dict(path)
    expected = unet.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs base {tuple(expected[k].shape)}"
                   for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"--unet_path {path} does not match the base UNet of {pretrain_path}:"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                lines.append(f"  {len(keys)} {what} keys, e.g. " + "; ".join(keys[:3]))
        lines.append("Likely cause: " + _mismatch_hint(missing, unexpected, pretrain_path))
        raise GenerateError("\n".join(lines))
    unet.load_state_dict(state)


@dataclass
class Weights:
    """What is evaluated: the UNet (a state-dict file, a diffusers UNet folder, or None for the base UNet) and an
    optional LoRA adapter applied on top."""

    unet: str | None
    lora: str | None = None

    def describe(self, pretrain_path: str) -> str:
        if self.unet is None:
            unet = f"base UNet of {pretrain_path}"
        else:
            unet = f"UNet {'folder' if os.path.isdir(self.unet) else 'file'} {self.unet}"
        return unet + (f" + LoRA adapter {self.lora}" if self.lora else "")


def resolve_weights(unet_path: str | None, lora_path: str | None) -> Weights:
    """The UNet and adapter that --unet_path / --lora_path name. A folder is read as train.py writes it: a diffusers
    UNet or pipeline (unet/), unet.safetensors / unet.pth, or, after --use_lora, pytorch_lora_weights.safetensors,
    loaded as LoRA on the base UNet (or on the folder's pipeline UNet, which --save_pipeline stores) - not ignored."""
    if unet_path is None or not os.path.isdir(unet_path):
        return Weights(unet_path, lora_path)
    folder = Path(unet_path)
    unet_dirs = [str(d) for d in (folder / "unet", folder) if (d / "config.json").is_file()]
    files = [str(folder / f) for f in ("unet.safetensors", "unet.pth") if (folder / f).is_file()]
    adapter = folder / LORA_FILE
    if adapter.is_file():
        if lora_path is not None:
            raise GenerateError(f"--unet_path folder {folder} holds a LoRA adapter ({LORA_FILE}) and --lora_path "
                                f"{lora_path} names another: pass one adapter, e.g. --unet_path UNET --lora_path ADAPTER")
        if files and not unet_dirs:
            raise GenerateError(f"--unet_path folder {folder} holds both UNet weights ({Path(files[0]).name}) and a "
                                f"LoRA adapter ({LORA_FILE}): name the one to evaluate, --unet_path {files[0]} or "
                                f"--lora_path {adapter}")
        return Weights(unet_dirs[0] if unet_dirs else None, str(adapter))
    if unet_dirs or files:
        return Weights((unet_dirs + files)[0], lora_path)
    raise GenerateError(f"--unet_path folder {folder} holds nothing to evaluate: no unet.safetensors / unet.pth, no "
                        f"UNet config.json or unet/ subfolder, and no LoRA adapter {LORA_FILE}")


def weights_of(args: argparse.Namespace) -> Weights:
    """args.weights (set by resolve_args), or resolved here for callers that build the namespace themselves."""
    return getattr(args, "weights", None) or resolve_weights(args.unet_path, getattr(args, "lora_path", None))


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


def load_scheduler(pretrain_path: str):
    """Official: Euler built from the base model's scheduler config (PNDM for SD1.5 -> Euler defaults apply)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(pretrain_path, subfolder="scheduler")


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


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Models:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def guide(eps_c: torch.Tensor, eps_u: torch.Tensor, cfg: float, formula: str) -> torch.Tensor:
    if formula == "official":
        return eps_c + cfg * (eps_c - eps_u)  # test_sd15.py:184 / test_sdxl.py:204; = standard with cfg + 1
    return eps_u + cfg * (eps_c - eps_u)


@torch.inference_mode()
def sample(models: Models, prompts: list[str], uncond, args: argparse.Namespace) -> torch.Tensor:
    """Euler sampling for a batch of prompts; returns uint8 images (B, H, W, 3) on the CPU."""
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
    latents = (initial_noise(args.seed, shape).to(models.device) * scheduler.init_noise_sigma).expand(n, -1, -1, -1)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps = models.unet(torch.cat([x, x]).to(models.dtype), t, encoder_hidden_states=emb, **extra).sample.float()
        eps_c, eps_u = eps.chunk(2)
        latents = scheduler.step(guide(eps_c, eps_u, args.cfg, args.guidance_formula), t, latents).prev_sample

    images = []
    config = models.vae.config
    for latent in latents:  # one at a time: a batch of 1024px decodes would need a lot of memory
        z = latent[None].float() / config.scaling_factor + (config.shift_factor or 0.0)
        x = models.vae.decode(z).sample
        images.append(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu())
    return torch.stack(images)


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
               "model*.safetensors", "pytorch_model*.bin", "vocab.json", "merges.txt", LORA_FILE)
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2")
MIB = 1 << 20
FINGERPRINT_NAMES = {  # fingerprint key -> what the user changed
    "model.unet": "UNet weights (--unet_path)", "model.lora": "LoRA adapter", "model.base": "base model (--pretrain_path)",
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
    return {
        "model": {"unet": source_digest(args.weights.unet), "lora": source_digest(args.weights.lora),
                  "base": source_digest(args.pretrain_path), "vae": source_digest(args.vae_path)},
        "prompts": {"count": len(prompts), "sha256": hashlib.sha256(texts.encode()).hexdigest()[:16]},
        "sampling": {"height": args.height, "width": args.width, "steps": args.steps, "cfg": float(args.cfg),
                     "seed": args.seed, "guidance_formula": args.guidance_formula,
                     "scheduler": "EulerDiscreteScheduler", "dtype": str(dtype).removeprefix("torch."), "sdxl": args.sdxl},
    }


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
    if record is None or not any(image_dir.glob("*.png")):
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
    from accelerate import PartialState
    from tqdm.auto import tqdm

    args = resolve_args(args)
    state = PartialState()
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
    paths = [os.path.join(args.output_path, name, f"{i}_{args.height}x{args.width}.png") for i in range(len(items))]
    mine = range(state.process_index, len(items), state.num_processes)
    stored = {i: stored_prompt(Path(paths[i])) for i in tqdm(mine, desc=f"checking {name}", leave=False,
                                                             disable=not state.is_main_process)}
    todo = [i for i in mine if not prompt_matches(stored[i], items[i]["prompt"])]
    wrong = [i for i in todo if stored[i] is not None]
    if wrong:
        print(f"[WARN] {len(wrong)} images in {image_dir} store another prompt (or none), e.g. {paths[wrong[0]]}: "
              "generating them again")
    if previous is None and len(todo) < len(mine) and state.is_main_process:
        print(f"[WARN] {image_dir} has no {RUN_RECORD} (an older or official run): its images are kept when their "
              "stored prompt matches, but nothing shows which model made them")
    weights = args.weights.describe(args.pretrain_path)
    record = {"run_name": name, "weights": weights, "n_prompts": n, "total_prompts": len(all_items), "complete": False,
              "fingerprint": fingerprint,
              "paths": {"unet_path": args.unet_path, "lora_path": args.weights.lora, "pretrain_path": args.pretrain_path,
                        "vae_path": args.vae_path, "test_json": args.test_json}}
    if state.is_main_process:
        write_json(image_dir / RUN_RECORD, record)  # before the first new image: a killed run keeps its fingerprint
        print(f"{name}: {weights}; {len(mine) - len(todo)} of {len(mine)} images done")

    if todo:
        models = load_models(args, device, dtype)
        if args.height % models.vae_factor or args.width % models.vae_factor:
            raise GenerateError(f"--height/--width must be multiples of the VAE factor {models.vae_factor}")
        uncond = encode(models, [""])  # real encoding of the empty prompt, not zeros (official, SDXL too)
        progress = tqdm(total=len(todo), desc=name, disable=not state.is_main_process)
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            images = sample(models, [items[i]["prompt"] for i in batch], uncond, args)
            for i, image in zip(batch, images):
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
        print(f"Wrote {len(paths)} images to {image_dir} and the manifest {manifest} ({weights})")
        if n < len(all_items):
            print(f"Partial run: {n} of {len(all_items)} prompts (--max_prompts). Run again without it to complete it.")
    return {"manifest": manifest, "run_name": name, "generated": len(todo), "skipped": len(mine) - len(todo),
            "n_prompts": n}


def describe_weights(args: argparse.Namespace) -> str:
    """The weights --unet_path / --lora_path name, in words (the eval scripts print it in their header)."""
    if args.unet_path is not None and not os.path.exists(args.unet_path):
        raise GenerateError(f"--unet_path {args.unet_path} does not exist")
    pretrain_path = args.pretrain_path or (SDXL_BASE if args.sdxl else SD15_BASE)
    return resolve_weights(args.unet_path, args.lora_path).describe(pretrain_path)


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
