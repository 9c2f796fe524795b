"""Scorers: every metric loads and scores offline; scores match hand computations; ImageReward matches the original.

The tiny models come from tiny/scorers.py (random weights, real file layouts). ImageReward parity uses the fixture
that the original `image-reward` package produced (shared/models/imagereward, see shared/notes).
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval import imagereward as ir
from eval.scorers import AESTHETICS_MLP_ENV, METRICS, load_aesthetic_mlp, load_scorer
from tiny.scorers import build_tiny_scorers

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = ["a red cat", "an astronaut riding a horse", "a photo of a blue dog", "portrait, painting", "x"]


def _images():
    """Five RGB images of different sizes and aspect ratios (the scorers resize and crop them)."""
    rs = np.random.RandomState(0)
    sizes = [(48, 48), (40, 70), (300, 260), (33, 33), (90, 45)]
    return [Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_scorers(tmp_path_factory.mktemp("tiny-scorers"))


@pytest.fixture(scope="module")
def scorers(tiny):
    return {name: load_scorer(name, **tiny[name]) for name in METRICS}


def _clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Hand preprocessing for a square image: bicubic resize to size (no crop needed), CLIP mean/std."""
    assert image.width == image.height
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy((x - CLIP_MEAN) / CLIP_STD).permute(2, 0, 1)[None]


# --- interface -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METRICS)
def test_every_scorer_scores_a_batch(scorers, name):
    scorer = scorers[name]
    assert scorer.name == name and scorer.batch_size == 32 and scorer.device == torch.device("cpu")
    assert scorer.metric == {"pickscore": "PickScore", "hpsv2": "HPSv2", "aesthetics": "AesScore",
                             "clip": "CLIPScore", "imagereward": "ImageReward"}[name]
    scores = scorer.score(PROMPTS, _images())
    assert len(scores) == 5 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 5
    # One caption, two images -> two scores (the official --choice_model selectors returned one: bug B7).
    assert len(scorer.score(["a cat", "a cat"], _images()[:2])) == 2
    assert scorer.score([], []) == []


@pytest.mark.parametrize("name", METRICS)
def test_batch_size_does_not_change_scores(scorers, name):
    scorer = scorers[name]
    scorer.batch_size = 4
    batched = scorer.score(PROMPTS, _images())
    scorer.batch_size = 1
    single = scorer.score(PROMPTS, _images())
    scorer.batch_size = 32
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", METRICS)
def test_prompt_dependence(scorers, name):
    image = _images()[0]
    a, b = scorers[name].score(["a red cat", "a blue dog riding a horse"], [image, image])
    if name == "aesthetics":  # the LAION predictor ignores the prompt
        assert a == b
    else:
        assert a != b


def test_metric_names_and_aliases(tiny):
    assert METRICS == ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")
    assert load_scorer("aes", **tiny["aesthetics"]).name == "aesthetics"
    assert load_scorer("hps", batch_size=3, **tiny["hpsv2"]).batch_size == 3
    with pytest.raises(ValueError, match="pickscore, hpsv2, aesthetics, clip, imagereward"):
        load_scorer("pick_score")
    with pytest.raises(TypeError, match="accepts: mlp_path"):
        load_scorer("aesthetics", mlp_pth="x.pth")
    with pytest.raises(ValueError, match="v2.0, v2.1"):
        load_scorer("hpsv2", version="v3", **{k: v for k, v in tiny["hpsv2"].items() if k != "version"})
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_scorer("hpsv2", model_path="/does-not-exist/HPS.pt", arch=tiny["hpsv2"]["arch"])


# --- score definitions, against hand computations ---------------------------------------------------------------

def test_pickscore_is_the_raw_cosine(scorers):
    scorer, image = scorers["pickscore"], _images()[0]
    model = scorer.model
    text = scorer.tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                    pixel_values=_clip_pixels(image, 32))
    expected = (out.logits_per_image[0] / model.logit_scale.exp()).tolist()  # cosines, without the logit scale
    np.testing.assert_allclose(scorer.score(PROMPTS[:2], [image, image]), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["clip", "hpsv2"])
def test_openclip_scores_are_cosines_of_the_checkpoint(scorers, tiny, name):
    import open_clip

    state = torch.load(tiny[name]["model_path"], map_location="cpu", weights_only=True)
    state = state["state_dict"] if name == "hpsv2" else state  # HPS checkpoints wrap the state dict
    model = open_clip.create_model("tiny-openclip-vit").eval()
    model.load_state_dict(state)
    image = _images()[0]
    with torch.no_grad():
        image_features, text_features, _ = model(_clip_pixels(image, 32), open_clip.tokenize(PROMPTS[:2]))
    expected = (text_features @ image_features[0]).tolist()
    np.testing.assert_allclose(scorers[name].score(PROMPTS[:2], [image, image]), expected, atol=1e-5)


def test_hps_and_clip_load_different_weights(scorers):
    assert not np.allclose(scorers["hpsv2"].score(PROMPTS, _images()), scorers["clip"].score(PROMPTS, _images()))


def test_aesthetics_is_the_mlp_of_normalised_projected_features(scorers, tiny):
    scorer, image = scorers["aesthetics"], _images()[3]
    clip = scorer.model
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=_clip_pixels(image, 32)).pooler_output
        x = pooled @ clip.visual_projection.weight.T
        x = x / x.norm(dim=-1, keepdim=True)
        weights = torch.load(tiny["aesthetics"]["mlp_path"], weights_only=True)
        for i in (0, 2, 4, 6, 7):  # linear layers only; the dropouts are inactive
            x = x @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
    assert scorer.score(["unused"], [image])[0] == pytest.approx(x.item(), abs=1e-5)
    rgba = image.convert("RGBA")
    assert scorer.score([""], [rgba]) == scorer.score([""], [rgba.convert("RGB")])  # converted to RGB first


def test_aesthetics_mlp_path_from_environment(tiny, monkeypatch):
    monkeypatch.setenv(AESTHETICS_MLP_ENV, tiny["aesthetics"]["mlp_path"])
    scorer = load_scorer("aesthetics", model_path=tiny["aesthetics"]["model_path"])
    assert scorer.mlp.layers[0].in_features == 16


def test_real_aesthetics_mlp_loads_strictly(shared_dir):
    path = shared_dir / "models" / "aesthetics" / "sac+logos+ava1-l14-linearMSE.pth"
    head = load_aesthetic_mlp(path)  # strict, weights_only=True, from a file saved on CUDA
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert head.layers[0].in_features == 768 and not head.training
    assert set(head.state_dict()) == {"layers." + k for k in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                                              "4.bias", "6.weight", "6.bias", "7.weight", "7.bias")}
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[key])
    x = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    with torch.no_grad():
        assert torch.equal(head(x), head(x)) and head(x).shape == (3, 1)


# --- ImageReward parity with the original package ---------------------------------------------------------------

def _original_shapes(shared_dir):
    shapes = {}
    for line in (shared_dir / "models" / "imagereward" / "keys_full_original.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return shapes


def test_imagereward_key_map_covers_the_released_model(shared_dir):
    shapes = _original_shapes(shared_dir)
    assert len(shapes) == 625
    med = json.loads((shared_dir / "models" / "imagereward" / "med_config_blip_base.json").read_text())
    model = ir.build_model(shapes, med, device="meta")  # full size, no memory
    vision = model.visual_encoder.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size) == (
        1024, 24, 16, 224)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {}
    for key, shape in shapes.items():
        new = ir.map_original_key(key)
        if new is None:
            assert key.startswith(ir.UNUSED_ORIGINAL_KEYS)
            continue
        assert new in ours, f"{key} -> {new}: no such parameter"
        assert ours[new] == shape, f"{key} -> {new}: shape {ours[new]} != {shape}"
        mapped[new] = key
    assert len(mapped) == 620 and set(mapped) == set(ours)  # nothing of ours is left unmapped
    assert ir.to_original_state_dict(dict.fromkeys(ours)).keys() == set(mapped.values())  # the map is invertible
    with pytest.raises(KeyError, match="no mapping"):
        ir.map_original_key("blip.visual_encoder.blocks.0.attn.q.weight")


def test_imagereward_reproduces_the_original_outputs(shared_dir, tmp_path):
    fx = torch.load(shared_dir / "models" / "imagereward" / "ir_tiny_fixture.pt", weights_only=True)
    torch.save(fx["state_dict"], tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(fx["med_config"]))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text(fx["vocab"])

    model = ir.load_model(tmp_path / "ImageReward.pt", tmp_path / "med_config.json",
                          vision_heads=fx["vision"]["num_heads"])
    with torch.no_grad():
        image_embeds, text_cls = model.encode(fx["pixel_values"], fx["input_ids"], fx["attention_mask"])
        reward = model(fx["pixel_values"], fx["input_ids"], fx["attention_mask"])
    torch.testing.assert_close(image_embeds, fx["image_embeds"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_cls, fx["text_cls"], atol=1e-5, rtol=1e-5)
    assert reward.item() == pytest.approx(fx["reward"], abs=1e-5)

    raw = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 260, 3), dtype=np.uint8))
    torch.testing.assert_close(ir.image_transform()(raw)[None], fx["pixel_values"], atol=1e-6, rtol=0)
    text = ir.load_tokenizer(tmp_path / "tokenizer")(fx["prompt"], padding="max_length", truncation=True,
                                                     max_length=ir.MAX_TEXT_LENGTH, return_tensors="pt")
    assert torch.equal(text.input_ids, fx["input_ids"]) and torch.equal(text.attention_mask, fx["attention_mask"])

    # End to end: raw image and prompt through load_scorer.
    scorer = load_scorer("imagereward", model_path=tmp_path, tokenizer=tmp_path / "tokenizer",
                         vision_heads=fx["vision"]["num_heads"])
    assert scorer.score([fx["prompt"]], [raw])[0] == pytest.approx(fx["reward"], abs=1e-5)


def test_imagereward_load_is_strict(tiny, tmp_path):
    state = torch.load(f"{tiny['imagereward']['model_path']}/ImageReward.pt", weights_only=True)
    del state["blip.visual_encoder.blocks.1.norm2.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(RuntimeError, match="layer_norm2.bias"):
        ir.load_model(tmp_path / "ImageReward.pt", f"{tiny['imagereward']['model_path']}/med_config.json", 4)


# --- input errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METRICS)
def test_bad_images_are_named(scorers, name, tmp_path):
    scorer = scorers[name]
    good = tmp_path / "good.png"
    _images()[0].save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="image 1 .*truncated.png.* could not be decoded"):
        scorer.score(["a", "b"], [Image.open(good), Image.open(truncated)])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="garbage.jpg"):
        scorer.score(["a"], [garbage])
    with pytest.raises(TypeError, match="image 1 is a ndarray"):
        scorer.score(["a", "b"], [_images()[0], np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="unsupported mode 'I;16'"):
        scorer.score(["a"], [Image.new("I;16", (8, 8))])
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        scorer.score(["a", "b"], [_images()[0]])
    with pytest.raises(TypeError, match="single string"):
        scorer.score("a", [_images()[0]])
    assert scorer.score(["a"], [good]) == scorer.score(["a"], [Image.open(good)])  # paths are accepted too


# --- transparent inputs: converted to RGB where the official scorers convert -------------------------------------

def _transparent_pngs(folder) -> dict:
    """40x40 PNGs whose transparent pixels hold bright, non-black colours: RGBA and LA (alpha 0, 128 or 255), P with a
    transparent palette entry, and RGB with a tRNS colour."""
    rs = np.random.RandomState(1)
    rgb = rs.randint(64, 256, (40, 40, 3), dtype=np.uint8)
    alpha = rs.choice(np.array([0, 128, 255], dtype=np.uint8), (40, 40))
    files = {mode: folder / f"{mode}.png" for mode in ("RGBA", "LA", "P", "RGB")}
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(files["RGBA"])
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(files["LA"])
    Image.fromarray(rgb).quantize(16).save(files["P"], transparency=0)
    Image.fromarray(rgb).save(files["RGB"], transparency=tuple(int(v) for v in rgb[0, 0]))
    for mode, path in files.items():
        with Image.open(path) as image:
            assert image.mode == mode and (mode in ("RGBA", "LA") or "transparency" in image.info)
    return files


def _official_transform(size: int):
    """OpenCLIP's validation transform and ImageReward's `_transform` as the official versions wrote them: resize and
    crop the opened file in its own mode, then convert("RGB")."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda image: image.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN.tolist(), CLIP_STD.tolist())])


@pytest.mark.parametrize("name", METRICS)
def test_transparent_pngs_get_the_official_pixels(scorers, name, tmp_path):
    """The manifest scoring path (eval.manifest.load_image, then the scorer) gives each metric the tensor its official
    scorer builds: PickScore/Aesthetics `processor(Image.open(p).convert("RGB"))` (transformers 4.30 dropped alpha,
    no compositing), HPSv2/CLIP/ImageReward `preprocess(Image.open(p))` (resize first, alpha premultiplied)."""
    from eval.manifest import Item, load_image

    scorer = scorers[name]
    for mode, path in _transparent_pngs(tmp_path).items():
        ours = scorer.pixels([load_image(Item(0, "p", str(path), path))])
        if name in ("pickscore", "aesthetics"):
            plain = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # no transparency left to composite
            official = _clip_pixels(plain, 32)
            composited = scorer.image_processor(images=[Image.open(path)], return_tensors="pt").pixel_values
            assert not torch.allclose(ours, composited, atol=1e-3), mode  # the installed processor's own conversion
        else:
            size = 224 if name == "imagereward" else 32
            official = _official_transform(size)(Image.open(path))[None]
            if mode in ("RGBA", "LA"):  # converting before the resize (what the loader did) loses the premultiplication
                converted = _official_transform(size)(Image.open(path).convert("RGB"))[None]
                assert not torch.allclose(ours, converted, atol=1e-3), mode
        torch.testing.assert_close(ours, official, atol=1e-5, rtol=0, msg=f"{name} {mode}")
