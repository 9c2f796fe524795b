"""One scorer interface for the five official metrics: PickScore, HPSv2, Aesthetics, CLIP score, ImageReward.

    scorer = load_scorer("pickscore", device="cuda")
    scorer.score(["a cat", "a cat"], [image_0, image_1])   # -> [0.21, 0.23], one float per (prompt, image) pair

Each metric reproduces the official `utils/*_utils.py` of AIDC-AI/Diffusion-SDPO (SPEC Part B §4.3): same model,
same preprocessing, same score definition. PickScore, HPSv2 and CLIP score are raw cosines of L2-normalised
features (no logit scale). The same objects serve absolute scores, A/B win rates and `--choice_model` relabelling;
unlike the official selectors (bug B7) they score any number of pairs, batched, and take PIL images or paths.

Weights default to the official hub ids and files; ``model_path`` and the per-metric options point to local copies.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from eval.imagereward import MLPHead

METRICS = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")  # CLI names, in the official order
ALIASES = {"aes": "aesthetics", "hps": "hpsv2"}  # official train.py --choice_model names

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENCLIP_ARCH = "ViT-H-14"
OPENCLIP_PRETRAINED = "laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AESTHETICS_CLIP = "openai/clip-vit-large-patch14"
AESTHETICS_MLP_REPO = "camenduru/improved-aesthetic-predictor"  # hub mirror of the LAION predictor's release file
AESTHETICS_MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETICS_MLP_ENV = "SDPO_AESTHETICS_MLP"  # path to the MLP file, used when no mlp_path is given
IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"

# Modes that every preprocessing path here can resize and convert to RGB.
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


class Scorer:
    """Base class: validation and the batching loop. A metric implements only :meth:`_score_batch`."""

    name: str  # one of METRICS
    metric: str  # token of the official "FinalResults <Metric> for <group> : x" line

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image | str | os.PathLike]) -> list[float]:
        """One score per (prompt, image) pair, same order; batched internally (no_grad).

        ``images`` are PIL images (or paths to image files); each is decoded when its batch is scored, and an
        image that cannot be decoded raises a ValueError naming it.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, one per image, not a single string")
        prompts, images = list(prompts), list(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images; need one prompt per image")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, expected a string")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch = [_checked_image(image, i) for i, image in enumerate(images[start : start + self.batch_size], start)]
            scores += self._score_batch(prompts[start : start + len(batch)], batch).float().cpu().tolist()
        return scores

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The model's input tensor for decoded images in their own mode (RGBA, P, ...), converted to RGB at the
        point where the official scorer converts: transparent PNGs then give the official scores."""
        raise NotImplementedError

    def _score_batch(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """Scores, shape (len(images),), for a batch of decoded images and their prompts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, batch_size={self.batch_size})"


def _checked_image(image, index: int) -> Image.Image:
    """The decoded PIL image, or an error naming the bad input (the official selectors crashed here, bug B7)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
        except (OSError, ValueError) as error:
            raise ValueError(f"image {index} ({image}) is not a readable image file: {error}") from error
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index} is a {type(image).__name__}; expected a PIL.Image.Image or a file path")
    label = f"image {index}" + (f" ({image.filename})" if getattr(image, "filename", "") else "")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data surfaces only when decoding
        raise ValueError(f"{label} could not be decoded (corrupt or truncated?): {error}") from error
    if image.mode not in SUPPORTED_MODES:
        raise ValueError(f"{label} has unsupported mode {image.mode!r}; convert it to RGB first (image.convert('RGB'))")
    return image


def _rgb_alpha_dropped(image: Image.Image) -> Image.Image:
    """`image.convert("RGB")`, which drops alpha (and a PNG tRNS colour) without compositing, as the official
    transformers 4.30 processor did. The installed processor composites anything still marked transparent onto white,
    and PIL keeps `info["transparency"]` on an RGB image it returns unchanged, so that mark is removed here."""
    rgb = image.convert("RGB")
    rgb.info.pop("transparency", None)  # convert() returned a copy with its own info dict
    return rgb


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two feature batches, normalised as the official scorers do (x / ||x||)."""
    return ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def _locate(location: str | os.PathLike | None, filename: str, default_repo: str, option: str) -> str:
    """A weights file: a local file, ``filename`` inside a local folder, or ``filename`` from a hub repo."""
    if location is not None:
        path = Path(location)
        if path.is_file():
            return str(path)
        if path.is_dir():
            if not (path / filename).is_file():
                raise FileNotFoundError(f"{path} has no {filename}; pass the file itself as {option}=...")
            return str(path / filename)
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(location)):
            raise FileNotFoundError(f"{option}={str(location)!r} is neither an existing path nor a hub repo id")
    repo = default_repo if location is None else str(location)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as error:
        raise OSError(
            f"could not get {filename!r} from the Hugging Face hub repo {repo!r} ({type(error).__name__}: {error}). "
            f"Download it once and pass its local path as {option}=..."
        ) from error


def _clip_image_processor(path: str):
    """HF CLIP image preprocessing with the PIL backend (what transformers 4.x used), not the torchvision one."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(path)


class PickScoreScorer(Scorer):
    """PickScore: cosine of PickScore_v1's CLIP-H text and image features (official: no x100 logit scale)."""

    name, metric = "pickscore", "PickScore"

    def __init__(self, device="cpu", batch_size=32, model_path=None, *, processor_path=None):
        """``model_path``: CLIPModel folder or hub id; ``processor_path``: its processor (official: laion CLIP-H)."""
        super().__init__(device, batch_size)
        from transformers import AutoTokenizer, CLIPModel

        processor_path = processor_path or PICKSCORE_PROCESSOR
        self.model = CLIPModel.from_pretrained(model_path or PICKSCORE_MODEL, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.image_processor = _clip_image_processor(processor_path)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path)

    def pixels(self, images):
        """Official: `Image.open(path).convert("RGB")`, then the CLIP processor."""
        return self.image_processor(images=[_rgb_alpha_dropped(image) for image in images], return_tensors="pt").pixel_values

    def _score_batch(self, prompts, images):
        pixels = self.pixels(images).to(self.device)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_features = self.model.get_image_features(pixel_values=pixels).pooler_output  # projected features
        text_features = self.model.get_text_features(**text.to(self.device)).pooler_output
        return _cosine(image_features, text_features)


class _OpenCLIPScorer(Scorer):
    """Cosine of an OpenCLIP model's normalised image and text features, with its validation transform."""

    def _load(self, arch: str | os.PathLike, pretrained: str):
        """``arch``: an OpenCLIP model name, or a model-config .json file (registered under its file stem)."""
        import open_clip

        if str(arch).endswith(".json"):
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        # OpenCLIP loads `pretrained` (a tag or a file) strictly, with weights_only=True.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=self.device, precision="fp32"
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    def pixels(self, images):
        """Official: `preprocess_val(Image.open(path))`: resize and crop in the file's own mode, then RGB."""
        return torch.stack([self.preprocess(image) for image in images])

    def _score_batch(self, prompts, images):
        pixels = self.pixels(images).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (image_features * text_features).sum(-1)


class HPSv2Scorer(_OpenCLIPScorer):
    """HPSv2: OpenCLIP ViT-H-14 with the HPS checkpoint; cosine of image and text features (official: v2.0)."""

    name, metric = "hpsv2", "HPSv2"

    def __init__(self, device="cpu", batch_size=32, model_path=None, *, version="v2.0", arch=OPENCLIP_ARCH):
        """``model_path``: the HPS checkpoint file (or a folder / hub repo holding it); default from xswu/HPSv2."""
        super().__init__(device, batch_size)
        if version not in HPS_FILES:
            raise ValueError(f"unknown HPS version {version!r}; choose one of {', '.join(HPS_FILES)}")
        # The official code first loads laion2B weights, then overwrites every parameter with the HPS checkpoint;
        # loading the checkpoint strictly into the bare architecture gives the same model without the 4 GB download.
        self._load(arch, _locate(model_path, HPS_FILES[version], HPS_REPO, "model_path"))


class CLIPScoreScorer(_OpenCLIPScorer):
    """CLIP score: raw cosine of OpenCLIP ViT-H-14 laion2B-s32B-b79K features (official: no x100, no clip at 0)."""

    name, metric = "clip", "CLIPScore"

    def __init__(self, device="cpu", batch_size=32, model_path=None, *, arch=OPENCLIP_ARCH):
        """``model_path``: an OpenCLIP pretrained tag or a weights file for ``arch``."""
        super().__init__(device, batch_size)
        self._load(arch, str(model_path or OPENCLIP_PRETRAINED))


class TemporalConsistencyScorer(CLIPScoreScorer):
    """Temporal consistency of a video: the mean cosine similarity of consecutive frames' image embeddings from the
    CLIP score model's image tower (OpenCLIP ViT-H-14 laion2B-s32B-b79K by default, the same weights and transform as
    CLIPScoreScorer). 1 for a static video; the prompt is not used. A one-frame video scores 1."""

    name, metric = "temporal", "TemporalConsistency"
    video_metric = True

    @torch.no_grad()
    def embed(self, frames: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings of frames, (len(frames), dim), `batch_size` frames per forward."""
        chunks = []
        for start in range(0, len(frames), self.batch_size):
            batch = [_checked_image(f, i) for i, f in enumerate(frames[start : start + self.batch_size], start)]
            chunks.append(self.model.encode_image(self.pixels(batch).to(self.device), normalize=True).float())
        return torch.cat(chunks)

    def score_videos(self, videos: Sequence[Sequence[Image.Image]]) -> list[float]:
        """One score per video (a sequence of frames, in order)."""
        scores = []
        for frames in videos:
            if len(frames) < 2:
                scores.append(1.0)
                continue
            features = self.embed(list(frames))
            scores.append(float((features[:-1] * features[1:]).sum(-1).mean()))
        return scores

    def _score_batch(self, prompts, images):
        raise ValueError("temporal consistency scores videos (score_videos), not single images")


def load_aesthetic_mlp(path: str | os.PathLike | None = None) -> MLPHead:
    """The LAION aesthetic MLP, loaded strictly with ``weights_only=True``; input size read from the weights.

    ``path`` (a file, a folder holding it, or a hub repo), else ``$SDPO_AESTHETICS_MLP``, else the hub mirror.
    """
    path = path or os.environ.get(AESTHETICS_MLP_ENV)
    file = _locate(path, AESTHETICS_MLP_FILE, AESTHETICS_MLP_REPO, "mlp_path")
    return MLPHead.from_state_dict(torch.load(file, map_location="cpu", weights_only=True))  # saved from CUDA


class AestheticsScorer(Scorer):
    """LAION aesthetic score: MLP on L2-normalised CLIP ViT-L/14 image features; the prompt is not used."""

    name, metric = "aesthetics", "AesScore"

    def __init__(self, device="cpu", batch_size=32, model_path=None, *, mlp_path=None):
        """``model_path``: the CLIP backbone (folder or hub id); ``mlp_path``: see :func:`load_aesthetic_mlp`."""
        super().__init__(device, batch_size)
        from transformers import CLIPModel

        model_path = model_path or AESTHETICS_CLIP
        self.model = CLIPModel.from_pretrained(model_path, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.image_processor = _clip_image_processor(model_path)
        self.mlp = load_aesthetic_mlp(mlp_path).to(self.device)

    def pixels(self, images):
        """RGB first, as the official A/B scorer does (its absolute scorer left that to transformers 4.30's processor,
        which did the same `convert("RGB")`), then the CLIP processor."""
        return self.image_processor(images=[_rgb_alpha_dropped(image) for image in images], return_tensors="pt").pixel_values

    def _score_batch(self, prompts, images):
        pixels = self.pixels(images).to(self.device)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output  # projected, 768 for ViT-L/14
        return self.mlp(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)


class ImageRewardScorer(Scorer):
    """ImageReward-v1.0 normalised reward, on transformers' BLIP modules (see eval/imagereward.py)."""

    name, metric = "imagereward", "ImageReward"

    def __init__(self, device="cpu", batch_size=32, model_path=None, *, med_config=None,
                 tokenizer=IMAGEREWARD_TOKENIZER, vision_heads=None):
        """``model_path``: ImageReward.pt, a folder holding it (and med_config.json), or a hub repo.

        ``med_config``: BLIP's text config (default: beside the checkpoint); ``tokenizer``: BERT uncased folder or id;
        ``vision_heads``: ViT head count (default width // 64, right for the released model).
        """
        super().__init__(device, batch_size)
        from eval import imagereward

        checkpoint = _locate(model_path, "ImageReward.pt", IMAGEREWARD_REPO, "model_path")
        if med_config is None:
            local = model_path is not None and Path(model_path).exists()
            source = Path(checkpoint).parent if local else model_path
            med_config = _locate(source, "med_config.json", IMAGEREWARD_REPO, "med_config")
        self.model = imagereward.load_model(checkpoint, med_config, vision_heads, device=self.device)
        self.transform = imagereward.image_transform(self.model.visual_encoder.config.image_size)
        self.tokenizer = imagereward.load_tokenizer(tokenizer)

    def pixels(self, images):
        """The package's `preprocess(Image.open(path))`: resize and crop in the file's own mode, then RGB."""
        return torch.stack([self.transform(image) for image in images])

    def _score_batch(self, prompts, images):
        from eval.imagereward import MAX_TEXT_LENGTH

        pixels = self.pixels(images).to(self.device)
        text = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        ).to(self.device)
        return self.model(pixels, text.input_ids, text.attention_mask)


_SCORERS = {cls.name: cls for cls in (PickScoreScorer, HPSv2Scorer, AestheticsScorer, CLIPScoreScorer,
                                      ImageRewardScorer, TemporalConsistencyScorer)}
VIDEO_METRICS = ("temporal",)  # videos only: TemporalConsistencyScorer


class WeightsUnavailable(OSError):
    """Scorer weights that are neither local nor downloadable now (check_hub_weights)."""


def hub_downloads(name: str, model_path=None, **options) -> list[tuple[str, tuple[str, ...], str]]:
    """What loading metric ``name`` with these load_scorer options would fetch from the hub: (repo, the file that
    shows it is cached (alternatives), the option that names a local copy instead). Local paths fetch nothing."""
    def remote(location) -> bool:
        return location is not None and not Path(str(location)).exists()

    key = ALIASES.get(str(name).lower(), str(name).lower())
    path = f"--{key}_path"
    wanted = []
    if key == "pickscore":
        wanted += [(model_path or PICKSCORE_MODEL, ("config.json",), path),
                   (options.get("processor_path") or PICKSCORE_PROCESSOR, ("preprocessor_config.json",),
                    'processor_path (--scorer_config \'{"pickscore": {"processor_path": DIR}}\')')]
    elif key == "hpsv2":
        wanted.append((model_path or HPS_REPO, (HPS_FILES.get(options.get("version", "v2.0"), ""),), path))
    elif key == "aesthetics":
        mlp = options.get("mlp_path") or os.environ.get(AESTHETICS_MLP_ENV) or AESTHETICS_MLP_REPO
        wanted += [(model_path or AESTHETICS_CLIP, ("config.json",), path),
                   (mlp, (AESTHETICS_MLP_FILE,), f"${AESTHETICS_MLP_ENV} or mlp_path (--scorer_config)")]
    elif key in ("clip", "temporal"):
        tag = str(model_path or OPENCLIP_PRETRAINED)
        if remote(tag):  # an OpenCLIP pretrained tag: its hub repo
            import open_clip

            repo = (open_clip.get_pretrained_cfg(str(options.get("arch", OPENCLIP_ARCH)), tag) or {}).get("hf_hub", "")
            if repo:
                wanted.append((repo.strip("/"), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), path))
    elif key == "imagereward":
        wanted += [(model_path or IMAGEREWARD_REPO, ("ImageReward.pt",), path),
                   (options.get("tokenizer") or IMAGEREWARD_TOKENIZER, ("vocab.txt",), "tokenizer (--scorer_config)")]
    return [(repo, files, option) for repo, files, option in wanted
            if remote(repo) and re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", str(repo))]


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host: seconds, where a download would retry for about a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_weights(settings: dict[str, dict]) -> None:
    """Before any scorer loads: every hub download the metrics need is in the local Hugging Face cache, or the hub
    can be reached. Otherwise one WeightsUnavailable (OSError) line naming the option for a local copy and the `hf download` command,
    at once instead of a minute of retries and a connection traceback. ``settings``: metric -> load_scorer kwargs."""
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for name, kwargs in settings.items():
        options = {k: v for k, v in kwargs.items() if k not in ("device", "batch_size")}
        for repo, files, option in hub_downloads(name, **options):
            if not any(isinstance(try_to_load_from_cache(repo, file), str) for file in files):
                missing.append((name, repo, files, option))
    if not missing:
        return
    offline = hub_offline()
    if not offline and hub_reachable():
        return  # downloaded on first use
    from huggingface_hub import constants

    state = "offline (HF_HUB_OFFLINE)" if offline else f"unreachable ({constants.ENDPOINT})"
    commands = " && ".join(dict.fromkeys(f"hf download {repo}" + (f" {files[-1]}" if files[0] not in
                                                                   ("config.json", "preprocessor_config.json", "vocab.txt")
                                                                   else "") for _, repo, files, _ in missing))
    needs = "; ".join(f"{name} needs {repo} (or a local copy: {option})" for name, repo, _, option in missing)
    raise WeightsUnavailable(f"the Hugging Face hub is {state} and the scorer weights are not in the local cache: {needs}. "
                  f"Download them on a machine with access: {commands}")


def load_scorer(name: str, device: str | torch.device = "cpu", batch_size: int = 32, model_path: str | None = None,
                **options) -> Scorer:
    """The scorer for metric ``name`` (one of METRICS, or the train.py aliases "aes" / "hps").

    ``model_path`` and ``options`` locate the weights (defaults: the official hub ids); per metric:
    pickscore ``processor_path``; hpsv2 ``version`` ("v2.0" | "v2.1"), ``arch``; aesthetics ``mlp_path``;
    clip and temporal (videos: consecutive frames' CLIP image embeddings) ``arch``; imagereward ``med_config``, ``tokenizer``, ``vision_heads``.
    """
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _SCORERS:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(METRICS + VIDEO_METRICS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    cls = _SCORERS[key]
    common = ("self", "device", "batch_size", "model_path")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in common]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{key} scorer got unknown option(s) {unknown}; it accepts: {', '.join(accepted) or 'none'}")
    check_hub_weights({key: {"model_path": model_path, **options}})  # offline without them: one line, no retries
    return cls(device=device, batch_size=batch_size, model_path=model_path, **options)
