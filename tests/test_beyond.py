"""Beyond the official code: LoRA, streaming and WebDataset sources, AI-feedback relabelling, EMA (docs/beyond.md)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
import data.pairs as pair_data
from data.pairs import PairDataset, decode_image
from data.rows import expand_braces, webdataset_shards
from test_train import base_unet, metrics, run_train

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory) -> Path:
    """The `pickapic` fixture's rows as WebDataset shards (16 pairs each) in the Pick-a-Pic v2 mirror's layout."""
    from tiny import build_pickapic_webdataset

    return build_pickapic_webdataset(tmp_path_factory.mktemp("data") / "pickapic-wds", n_pairs=64)


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory) -> dict:
    from tiny import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("tiny-scorers"))


def unet_inputs(unet, batch=2, size=8):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, unet.config.in_channels, size, size, generator=generator), torch.tensor([10, 700]),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator))


# --- LoRA ---------------------------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_the_saved_adapter_reloads(tiny_sd15, pickapic, shared_dir, tmp_path,
                                                                      monkeypatch):
    from diffusers import StableDiffusionPipeline

    from eval.generate import generate, parse_args

    saved, save_weights = [], train.save_weights  # keep the UNet that train.py saves last, to inspect it
    monkeypatch.setattr(train, "save_weights", lambda unet, *a, **k: (saved.append(unet), save_weights(unet, *a, **k)))

    run_train(tiny_sd15, pickapic, tmp_path, "--use_lora", "--lora_rank", "4", "--lora_alpha", "8",
              "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--use_ema")
    assert (tmp_path / LORA_FILE).exists() and (tmp_path / "checkpoint-2" / LORA_FILE).exists()
    assert (tmp_path / "pytorch_lora_weights_ema.safetensors").exists()
    assert not (tmp_path / "unet.safetensors").exists()  # no full UNet copy: the adapter is the output

    trained, base = saved[-1], base_unet(tiny_sd15)
    lora = {name: p for name, p in trained.named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name), "the adapters did not train"
    for name, param in trained.named_parameters():
        if "lora_" not in name:
            assert not param.requires_grad and torch.equal(param, base[name.replace(".base_layer", "")]), name

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    pipe.load_lora_weights(tmp_path)  # rank 4, alpha 8: the scale comes from the file's adapter metadata
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        assert torch.equal(pipe.unet(*inputs).sample, trained(*inputs).sample)

    # The evaluation generator takes the adapter folder, or the EMA adapter file.
    for name, lora_path in (("adapter", tmp_path), ("ema", tmp_path / "pytorch_lora_weights_ema.safetensors")):
        argv = ["--pretrain_path", str(tiny_sd15), "--test_json", str(shared_dir / "prompts" / "papv2.json"),
                "--height", "32", "--width", "32", "--steps", "2", "--max_prompts", "1", "--no_zip",
                "--output_path", str(tmp_path / name), "--lora_path", str(lora_path)]
        manifest = json.loads(Path(generate(parse_args(argv))["manifest"]).read_text())
        assert len(manifest) == 1 and Path(manifest[0]["gen_image_path"]).exists()


def test_lora_reference_is_the_base_unet(tiny_sd15, pickapic, tmp_path):
    from diffusers import UNet2DConditionModel

    args = train.parse_args(["--pretrained_model_name_or_path", str(tiny_sd15), "--dataset_name", "x", "--use_lora",
                             "--mixed_precision", "no"])
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    train.add_lora(unet, args, torch.float32)
    for name, param in train.trainable_parameters(unet):
        param.data.normal_()  # trained-looking adapters
    inputs = unet_inputs(unet)
    with torch.no_grad():
        adapted = unet(*inputs).sample
        with train.adapters_disabled(unet):
            reference = unet(*inputs).sample
        assert not torch.equal(adapted, reference)
        assert torch.equal(reference, base(*inputs).sample)
        assert torch.equal(unet(*inputs).sample, adapted)  # switched back on
    assert all(p.requires_grad for _, p in train.trainable_parameters(unet)) and train.trainable_parameters(unet)

    # In training: a LoRA run's reference losses are those of the full run's separate reference UNet, step by step.
    common = ["--train_method", "dspo", "--beta_dpo", "0.001"]
    run_train(tiny_sd15, pickapic, tmp_path / "full", *common)
    run_train(tiny_sd15, pickapic, tmp_path / "lora", *common, "--use_lora")
    full, lora = metrics(tmp_path / "full"), metrics(tmp_path / "lora")
    assert [m["ref_mse_unaccumulated"] for m in full] == [m["ref_mse_unaccumulated"] for m in lora]
    assert full[0]["model_mse_unaccumulated"] == lora[0]["model_mse_unaccumulated"]  # both start at the base


def test_lora_sdxl_with_dmpo_safeguard_importance_and_saved_pipeline(tiny_sdxl, pickapic, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run_train(tiny_sdxl, pickapic, tmp_path, "--use_lora", "--train_method", "dmpo", "--dmpo_alpha", "0.01",
              "--use_winner_preserving", "--winner_preserving_mu", "0.6", "--winner_preserving_granularity", "sample",
              "--importance_weighting", "full", "--timestep_range", "100", "900", "--save_pipeline", sdxl=True)
    logged = metrics(tmp_path)
    assert 0.0 <= logged[-1]["avg_lose_l_scale"] <= 1.0
    assert all(0 < m["is_weight_min"] <= m["is_weight_mean"] <= m["is_weight_max"] <= 1 for m in logged)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path)  # the base pipeline, saved beside the adapter
    base = base_unet(tiny_sdxl)
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())
    inputs = unet_inputs(pipe.unet)
    config = pipe.unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, text_dim), "time_ids": torch.ones(2, 6)}
    with torch.no_grad():
        before = pipe.unet(*inputs, added_cond_kwargs=added).sample
        pipe.load_lora_weights(tmp_path)
        after = pipe.unet(*inputs, added_cond_kwargs=added).sample
    assert not torch.equal(before, after)


# --- streaming and WebDataset --------------------------------------------------------------------------------------


def data_args(source, *extra):
    return train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(source), "--resolution", "32",
                             "--random_crop", "--proportion_empty_prompts", "0.3", "--train_batch_size", "2", *extra])


def stream_of(source, *extra, shuffle=False, epoch=0, rank=0, world_size=1):
    args = data_args(source, *extra)
    rows = train.filter_rows(train.load_rows(args), args, True)
    stream = train.PairStream(rows, args, seed=0, shuffle=shuffle, rank=rank, world_size=world_size)
    stream.epoch = epoch
    return stream


def same(a, b):
    return (torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
            and a["skipped"] == b["skipped"])


def test_stream_and_webdataset_sources_give_the_parquet_pairs(pickapic, webdataset, monkeypatch):
    """Same rows, same filtering (ties), same stand-in for the corrupt image, same keyed augmentations."""
    args = data_args(pickapic)
    parquet = PairDataset(train.filter_rows(train.load_rows(args), args, True), args)
    expected = [parquet[(0, 0, i)] for i in range(len(parquet))]
    usable = len(expected) // 2 * 2  # whole batches of 2
    assert sum(e["skipped"] for e in expected[:usable]) == 1

    sources = {
        "streaming": (pickapic, "--streaming"),
        "glob": (webdataset / "train-*.tar",),
        "range": (str(webdataset / "train-{00000..00003}.tar"),),
        "folder": (webdataset,),  # train-*.tar only: test_unique-*.tar is another split
    }
    for name, source in sources.items():
        got = list(stream_of(*source))
        assert len(got) == usable and all(same(g, e) for g, e in zip(got, expected)), name

    stream = stream_of(webdataset)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=list)
    assert all(same(g, e) for g, e in zip([e for batch in loader for e in batch], expected[:usable]))  # workers split

    for rank in range(2):  # batch g goes to rank g % 2, as accelerate deals out map-style batches
        got = list(stream_of(webdataset, rank=rank, world_size=2))
        mine = [e for g in range(usable // 2) if g % 2 == rank for e in expected[2 * g : 2 * g + 2]]
        assert len(got) == usable // 4 * 2  # complete rounds only: both ranks get the same number of batches
        assert all(same(a, b) for a, b in zip(got, mine))

    resumed, decoded, decode = stream_of(webdataset), [], pair_data.decode_image
    resumed.load_state_dict({"seed": 0, "epoch": 0, "position": 10})
    monkeypatch.setattr(pair_data, "decode_image", lambda value: (decoded.append(value), decode(value))[1])
    got = list(resumed)
    assert len(got) == usable - 10 and all(same(g, e) for g, e in zip(got, expected[10:]))
    assert len(decoded) == 2 * len(got)  # the 10 rows before the resume position were skipped undecoded

    first, again, next_epoch = (list(stream_of(webdataset, shuffle=True, epoch=e)) for e in (0, 0, 1))
    assert all(same(a, b) for a, b in zip(first, again))  # a seeded buffer: the same order for the same (seed, epoch)
    assert not all(same(a, b) for a, b in zip(first, next_epoch))
    assert not all(same(a, b) for a, b in zip(first, expected))


def test_webdataset_source_names(webdataset, tmp_path):
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/s-{8..9}.tar") == ["x/s-8.tar", "x/s-9.tar", "y/s-8.tar", "y/s-9.tar"]
    assert webdataset_shards(str(webdataset), "test_unique") == [str(webdataset / "test_unique-00000.tar")]
    assert webdataset_shards("hf://datasets/org/pairs/{00..01}.tar", "train") == [
        "hf://datasets/org/pairs/00.tar", "hf://datasets/org/pairs/01.tar"]
    with pytest.raises(ValueError, match="no shard for split 'validation'"):
        webdataset_shards(str(webdataset), "validation")
    with pytest.raises(FileNotFoundError, match="no .tar shard matches"):
        webdataset_shards(str(tmp_path / "none-*.tar"), "train")
    rows = train.load_rows(data_args(webdataset / "train-*.tar"))
    assert {"jpg_0", "jpg_1", "label_0", "label_1", "caption", "model_0"} <= set(rows.column_names)
    assert next(iter(rows))["label_0"] in (0.0, 0.5, 1.0)

    import io
    import tarfile

    with tarfile.open(tmp_path / "bare-labels.tar", "w") as tar:  # label_0 without .txt: bytes, not a number
        for key in range(5):
            for field, data in (("jpg_0.jpg", b"0"), ("jpg_1.jpg", b"1"), ("label_0", b"1.0"), ("caption.txt", b"a")):
                member = tarfile.TarInfo(f"{key}.{field}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"label_0 field is raw bytes.*<key>.label_0.txt"):
        train.load_rows(data_args(tmp_path / "bare-labels.tar"))


def test_stream_training_equals_parquet_training(tiny_sd15, pickapic, webdataset, tmp_path):
    """No shuffling (--split test_unique): the three sources train to the same weights, across an epoch boundary.
    Bitwise by construction: the same rows in the same order make the same batches; only the reading differs."""
    common = ["--split", "test_unique", "--checkpointing_steps", "10", "--train_batch_size", "4"]  # 8 pairs: 2 steps an epoch
    run_train(tiny_sd15, pickapic, tmp_path / "parquet", *common, steps=3)
    run_train(tiny_sd15, pickapic, tmp_path / "streaming", *common, "--streaming", steps=3)
    run_train(tiny_sd15, webdataset / "test_unique-*.tar", tmp_path / "webdataset", *common, steps=3)
    expected = load_file(str(tmp_path / "parquet" / "unet.safetensors"))
    for name in ("streaming", "webdataset"):
        got = load_file(str(tmp_path / name / "unet.safetensors"))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
        assert [m["train_loss"] for m in metrics(tmp_path / name)] == [m["train_loss"] for m in metrics(tmp_path / "parquet")]


@pytest.mark.parametrize("source, extra", [
    ("streaming", ["--streaming", "--use_ema", "--ema_decay", "0.9"]),
    ("webdataset", ["--use_lora", "--train_method", "sft"]),
    ("parquet", ["--use_lora", "--use_ema", "--ema_decay", "0.9"]),
])
def test_resume_is_exact_for_every_source(tiny_sd15, pickapic, webdataset, tmp_path, source, extra):
    """4 steps straight == 2 steps, stop, resume, 2 more: same weights (adapter, EMA) bit for bit. 6 pairs in micro-
    batches of 2, 2 per update: an epoch ends mid-update and the resumed run starts inside the second epoch."""
    data = webdataset / "train-*.tar" if source == "webdataset" else pickapic
    common = ["--max_train_samples", "6", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
              "--shuffle_buffer_size", "4", "--random_crop", *extra]
    run_train(tiny_sd15, data, tmp_path / "straight", *common, steps=4)
    run_train(tiny_sd15, data, tmp_path / "resumed", *common, steps=2)
    assert (tmp_path / "resumed" / "checkpoint-2").exists()
    run_train(tiny_sd15, data, tmp_path / "resumed", *common, steps=4)
    files = [p.name for p in (tmp_path / "straight").glob("*.safetensors")]
    assert len(files) == 1 + ("--use_ema" in extra)
    for name in files:
        straight, resumed = (load_file(str(tmp_path / run / name)) for run in ("straight", "resumed"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
    assert [m["train_loss"] for m in metrics(tmp_path / "straight")] == [m["train_loss"] for m in metrics(tmp_path / "resumed")]


# --- AI-feedback relabelling ---------------------------------------------------------------------------------------


class ConstantScorer:
    """Ranks every image the same: every pair is a tie."""

    def score(self, prompts, images):
        return [0.25] * len(images)


def scored_batch(pickapic, size=6):
    args = data_args(pickapic, "--choice_model", "pickscore", "--no_hflip")
    dataset = PairDataset(train.filter_rows(train.load_rows(args), args, True), args)
    return train.Collate([])([dataset[(0, 0, i)] for i in range(size)])


@pytest.mark.parametrize("name", ["pickscore", "hps", "aes", "clip", "imagereward"])
def test_relabelling_flips_exactly_the_pairs_the_scorer_ranks_the_other_way(pickapic, tiny_scorers, name):
    from eval.scorers import ALIASES, load_scorer

    scorer = load_scorer(name, batch_size=4, **tiny_scorers[ALIASES.get(name, name)])  # 12 images in batches of 4
    batch = scored_batch(pickapic)
    pixels = batch["pixel_values"]
    relabelled_pixels, relabelled = train.relabel_pairs(scorer, batch, pixels)
    for i, ((image_0, image_1), prompt) in enumerate(zip(batch["images"], batch["prompts"])):
        score_0, score_1 = scorer.score([prompt] * 2, [image_0, image_1])  # this pair alone
        expected = torch.cat([pixels[i, 3:], pixels[i, :3]]) if score_1 > score_0 else pixels[i]
        assert torch.equal(relabelled_pixels[i], expected), i
        assert bool(relabelled[i]) == ((score_1 > score_0) != (batch["label_0"][i] == 0)), i

    tied, relabelled = train.relabel_pairs(ConstantScorer(), batch, pixels)
    assert torch.equal(tied, pixels)  # ties keep the dataset order
    assert torch.equal(relabelled, batch["label_0"] == 0)


@pytest.mark.parametrize("source", ["parquet", "streaming"])
def test_choice_model_training_logs_the_relabelled_fraction(tiny_sd15, pickapic, tiny_scorers, tmp_path, source):
    """Batch size 4 (the official allowed 1) and the official alias `hps`; the logged fraction is the one computed by
    hand for the first 4 pairs of the unshuffled split."""
    from eval.scorers import load_scorer

    config = tmp_path / "scorer.json"
    config.write_text(json.dumps(tiny_scorers["hpsv2"]))
    run_train(tiny_sd15, pickapic, tmp_path / "run", "--choice_model", "hps", "--choice_model_config", str(config),
              "--choice_model_device", "cpu", "--split", "test_unique", "--train_batch_size", "4",
              *(["--streaming"] if source == "streaming" else []), steps=1)
    logged = metrics(tmp_path / "run")[0]

    args = data_args(pickapic, "--split", "test_unique", "--choice_model", "hps")
    dataset = PairDataset(train.filter_rows(train.load_rows(args), args, True), args)
    scorer = load_scorer("hps", **tiny_scorers["hpsv2"])
    flips = []
    for i in range(4):
        example = dataset[(0, 0, i)]
        score_0, score_1 = scorer.score([example["prompt"]] * 2, example["images"])
        flips.append((score_1 > score_0) != (example["label_0"] == 0))
    assert logged["relabelled_fraction"] == pytest.approx(sum(flips) / 4)


def test_choice_model_errors_are_actionable(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d", "--choice_model", "pickscor"])
    assert "--choice_model pickscor: not a scorer" in capsys.readouterr().err
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d", "--choice_model", "clip",
                             "--choice_model_config", "{not json"])
    with pytest.raises(ValueError, match="--choice_model_config is neither a JSON object"):
        train.load_choice_model(args, "cpu")


# --- EMA -----------------------------------------------------------------------------------------------------------


def test_ema_update_arithmetic(tiny_sd15, pickapic, tmp_path):
    """checkpoint-k holds the weights w_k and the average a_k = d_k a_(k-1) + (1 - d_k) w_k, with diffusers' schedule:
    t = k - update_after_step - 1; d_k = 0 for t <= 0, else min(1 - (1 + t)^-power, decay)."""
    run_train(tiny_sd15, pickapic, tmp_path, "--use_ema", "--ema_decay", "0.7", "--ema_power", "1",
              "--ema_update_after_step", "1", "--checkpointing_steps", "1", steps=5)
    average = None
    for k in range(1, 6):
        weights = load_file(str(tmp_path / f"checkpoint-{k}" / "unet.safetensors"))
        t = k - 1 - 1
        decay = 0.0 if t <= 0 else min(1 - (1 + t) ** -1.0, 0.7)  # k=3: 0.5, k=4: 0.667, k=5: 0.7 (the cap)
        average = {n: decay * (average[n] if average else 0) + (1 - decay) * w for n, w in weights.items()}
        got = load_file(str(tmp_path / f"checkpoint-{k}" / "unet_ema.safetensors"))
        assert all(torch.allclose(got[n], average[n], rtol=0, atol=1e-6) for n in weights), k
        if k >= 3:
            assert any(not torch.equal(got[n], weights[n]) for n in weights), k
    final = load_file(str(tmp_path / "unet_ema.safetensors"))
    assert all(torch.equal(final[n], got[n]) for n in got)
    pth = torch.load(tmp_path / "unet_ema.pth", weights_only=True)
    assert all(torch.equal(pth[n], final[n]) for n in final)
