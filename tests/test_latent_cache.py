"""latent_cache.py: the cache holds what the VAE and text encoders would compute, a run from it sees the same pairs,
flips and noise as a run that encodes on the fly, resumes exactly, and a cache made with other settings is refused."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import latent_cache
import train
from data.pairs import PairDataset
from test_train import ACCELERATE, REPO, base_unet, metrics, reset_accelerate, run_train, train_args


def build_cache(model, data, folder, *extra, dtype="float32", shard_size=16):
    try:
        return latent_cache.main(train_args(model, data, folder / "unused", *extra) + [
            "--latents_cache", str(folder), "--latents_cache_dtype", dtype, "--latents_cache_shard_size", str(shard_size)])
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def cache(tiny_sd15, pickapic, tmp_path_factory):
    return build_cache(tiny_sd15, pickapic, tmp_path_factory.mktemp("cache") / "sd15")


def test_cache_holds_the_vae_moments_of_the_same_pairs_and_flips(tiny_sd15, pickapic, cache):
    """For a key, the cached example's moments are the VAE's moments of PairDataset's (winner-first, flipped) pixels."""
    from diffusers import AutoencoderKL

    args = train.parse_args(train_args(tiny_sd15, pickapic, "unused", "--latents_cache", str(cache)))
    cached = latent_cache.CachedPairDataset(latent_cache.LatentCache(cache, args), args)
    pairs = PairDataset(train.filter_rows(train.load_rows(args), args, True), args)
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    assert len(cached) == len(pairs)
    flipped = 0
    for key in [(0, epoch, index) for epoch in range(3) for index in (0, 5, 17, 40)]:
        example, expected = cached[key], pairs[key]
        assert example["skipped"] == expected["skipped"]
        with torch.no_grad():
            moments = vae.encode(torch.cat(expected["pixel_values"].unsqueeze(0).chunk(2, dim=1))).latent_dist.parameters
        torch.testing.assert_close(example["moments"], moments, rtol=1e-4, atol=1e-4)
        unflipped = latent_cache.CachedPairDataset(latent_cache.LatentCache(cache), train.parse_args(
            train_args(tiny_sd15, pickapic, "unused", "--no_hflip")))[key]["moments"]
        flipped += not torch.equal(unflipped, example["moments"])
    assert flipped > 0  # both flips are stored and chosen per key


# AdamW's step is lr * m_hat / (sqrt(v_hat) + eps). With eps = 1, at or above every gradient here (|g| < 0.1), its
# derivative in g is at most lr / eps: a linear-like step, so gradients that differ by float rounding give steps that
# differ by float rounding. With the default eps = 1e-8 the step is about lr * sign(g), which turns a rounding
# difference of a near-zero gradient into a step of +-lr: weights after ordinary AdamW steps are the wrong thing to
# compare across two computation paths (measured: 1.4e-4 relative here, 2.3e-5 absolute, against 1.4e-6 and 1.2e-7).
LINEAR_ADAMW = ["--adam_epsilon", "1", "--adam_weight_decay", "0", "--learning_rate", "1"]


def relative_update_difference(base, a, b) -> float:
    """|(a - base) - (b - base)| / |a - base| over all weights: how much two runs' total updates differ."""
    diff = torch.sqrt(sum((a[k].double() - b[k].double()).pow(2).sum() for k in base))
    update = torch.sqrt(sum((a[k].double() - base[k].double()).pow(2).sum() for k in base))
    assert update > 0
    return (diff / update).item()


def test_training_from_the_cache_matches_encoding_on_the_fly(tiny_sd15, pickapic, cache, tmp_path, monkeypatch):
    """The two paths see the same pairs, flips, noise and timesteps; they differ only in how the VAE and the text
    encoder batch their inputs (a cache shard at once, or one training batch), so by float32 rounding of the moments and
    embeddings (within 1e-4: the test above). A loss or a linear step is then equal to that order; 1e-4 relative covers
    such rounding carried through a few hundred float32 operations, while a different pair, flip or noise moves both
    by O(1)."""
    import families
    from test_train import base_unet

    common = ["--train_method", "sft", "--checkpointing_steps", "2", *LINEAR_ADAMW]
    run_train(tiny_sd15, pickapic, tmp_path / "fly", *common, steps=3)

    def not_loaded(*args, **kwargs):
        raise AssertionError("a run from the cache loaded the VAE or a text encoder")

    monkeypatch.setattr(families.Family, "load_vae", not_loaded)
    monkeypatch.setattr(families.StableDiffusion, "load_text", not_loaded)
    run_train(tiny_sd15, pickapic, tmp_path / "cached", *common, "--latents_cache", str(cache), steps=3)
    fly, cached = metrics(tmp_path / "fly"), metrics(tmp_path / "cached")
    for a, b in zip(fly, cached):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    a, b = load_file(str(tmp_path / "fly" / "unet.safetensors")), load_file(str(tmp_path / "cached" / "unet.safetensors"))
    assert relative_update_difference(base_unet(tiny_sd15), a, b) < 1e-4


def test_a_preference_run_from_the_cache_has_the_same_mses_and_lambda(tiny_sd15, pickapic, cache, tmp_path):
    """What is equal between a float32 cache and encoding on the fly: the policy's and the reference's MSEs and the
    safeguard's lambda, to float rounding. The DPO loss is not: it is softplus((beta/2) (win_diff - lose_diff)),
    which turns the diffs' rounding into beta/2 times as much. One pair per step, so the logged diffs are the pair's."""
    common = ["--use_winner_preserving", "--winner_preserving_mu", "0.5", "--train_batch_size", "1"]
    run_train(tiny_sd15, pickapic, tmp_path / "fly", *common, steps=3)
    run_train(tiny_sd15, pickapic, tmp_path / "cached", *common, "--latents_cache", str(cache), steps=3)
    beta = train.parse_args(train_args(tiny_sd15, pickapic, tmp_path)).beta_dpo
    fly, cached = metrics(tmp_path / "fly"), metrics(tmp_path / "cached")
    assert len(fly) == len(cached) == 3
    for a, b in zip(fly, cached):
        # float32 rounding (1e-7 relative per operation) through the VAE and the denoiser stays far under 1e-4;
        # another pair, flip or noise draw would change these by O(1)
        for key in ("model_mse_unaccumulated", "ref_mse_unaccumulated", "avg_lose_l_scale"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        # softplus is 1-Lipschitz: the loss gap is at most beta/2 times the gap of the margin's two diffs
        bound = beta / 2 * (abs(a["avg_win_diff_loss"] - b["avg_win_diff_loss"])
                            + abs(a["avg_lose_diff_loss"] - b["avg_lose_diff_loss"]))
        assert abs(a["train_loss"] - b["train_loss"]) <= bound + 1e-6 * abs(a["train_loss"])  # + the loss's own rounding


def test_preference_run_from_a_float16_cache(tiny_sd15, pickapic, tmp_path):
    folder = build_cache(tiny_sd15, pickapic, tmp_path / "fp16", dtype="float16")
    run_train(tiny_sd15, pickapic, tmp_path / "fly", "--beta_dpo", "10", steps=2)
    run_train(tiny_sd15, pickapic, tmp_path / "cached", "--beta_dpo", "10", "--latents_cache", str(folder), steps=2)
    for a, b in zip(metrics(tmp_path / "fly"), metrics(tmp_path / "cached")):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)  # the stored moments' precision
        assert b["model_mse_unaccumulated"] == pytest.approx(a["model_mse_unaccumulated"], rel=1e-3)


def test_resume_from_the_cache_is_exact(tiny_sd15, pickapic, cache, tmp_path):
    common = ["--latents_cache", str(cache), "--checkpointing_steps", "2", "--use_winner_preserving",
              "--winner_preserving_mu", "0.5"]
    run_train(tiny_sd15, pickapic, tmp_path / "straight", *common, steps=4)
    run_train(tiny_sd15, pickapic, tmp_path / "resumed", *common, steps=2)
    run_train(tiny_sd15, pickapic, tmp_path / "resumed", *common, steps=4)
    a, b = load_file(str(tmp_path / "straight" / "unet.safetensors")), load_file(str(tmp_path / "resumed" / "unet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "64"], "--resolution: 32 in the cache, 64 now"),
    (["--no_hflip"], "--no_hflip: False in the cache, True now"),
    (["--max_train_samples", "8"], "--max_train_samples: None in the cache, 8 now"),
])
def test_a_cache_with_other_settings_is_refused(tiny_sd15, pickapic, cache, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        run_train(tiny_sd15, pickapic, tmp_path, "--latents_cache", str(cache), *flags)


def test_a_cache_is_keyed_on_the_files_not_their_names(tiny_sd15, pickapic, tmp_path, monkeypatch):
    """The same model and data by relative paths use the cache; a model rebuilt at the same path with other weights,
    or data rewritten in place, are refused, and so is a build resumed over shards of another model."""
    from tiny import build_sd15

    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_sd15, model)
    shutil.copytree(pickapic, data, copy_function=shutil.copy2)  # times kept: the same data
    folder = build_cache(tiny_sd15, pickapic, tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    run_train("model", "data", tmp_path / "relative", "--latents_cache", str(folder), steps=1)  # accepted
    build_sd15(model, seed=1)  # rebuilt in place: other VAE and text encoder weights, the same file names
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path: its files differ"):
        run_train("model", "data", tmp_path / "rebuilt", "--latents_cache", str(folder), steps=1)
    with pytest.raises(ValueError, match="holds shards made with other settings"):
        build_cache(model, data, folder)
    parquet = next(data.rglob("*.parquet"))
    os.utime(parquet, ns=(parquet.stat().st_atime_ns, parquet.stat().st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(ValueError, match="--dataset_name: its files differ"):
        run_train(tiny_sd15, "data", tmp_path / "rewritten", "--latents_cache", str(folder), steps=1)


def test_settings_a_cache_cannot_hold_are_refused(tiny_sd15, pickapic, capsys, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(train_args(tiny_sd15, pickapic, tmp_path, "--latents_cache", "x", "--random_crop"))
    assert "random crops differ every epoch" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no index.json"):
        run_train(tiny_sd15, pickapic, tmp_path, "--latents_cache", str(tmp_path / "absent"))


def test_an_interrupted_cache_build_resumes_at_the_missing_shard(tiny_sd15, pickapic, cache, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(cache, folder)
    (folder / "shard-00001.safetensors").unlink()
    (folder / "index.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    build_cache(tiny_sd15, pickapic, folder)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    assert {k: v for k, v in after.items() if k in before} == before and "shard-00001.safetensors" in after
    assert json.loads((folder / "index.json").read_text()) == json.loads((cache / "index.json").read_text())
    rebuilt, original = load_file(str(folder / "shard-00001.safetensors")), load_file(str(cache / "shard-00001.safetensors"))
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_two_processes_build_the_same_cache(tiny_sd15, pickapic, cache, tmp_path):
    import subprocess

    launcher = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--multi_gpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([*ACCELERATE, *launcher, str(REPO / "latent_cache.py"),
                             *train_args(tiny_sd15, pickapic, tmp_path / "unused"), "--latents_cache", str(tmp_path / "two"),
                             "--latents_cache_dtype", "float32", "--latents_cache_shard_size", "16"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "index.json").read_text()) == json.loads((cache / "index.json").read_text())
    for shard in cache.glob("shard-*"):
        a, b = load_file(str(shard)), load_file(str(tmp_path / "two" / shard.name))
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.parametrize("damage", ["truncated shard-00001.safetensors", "missing empty.safetensors"])
def test_a_damaged_cache_is_named_before_training(tiny_sd15, pickapic, cache, tmp_path, damage):
    """A shard cut short (a full disk, a copy interrupted) or gone: named with the fix before any model loads,
    instead of a safetensors error from a DataLoader worker mid-run."""
    folder = tmp_path / "copy"
    shutil.copytree(cache, folder)
    kind, name = damage.split()
    path = folder / name
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    else:
        path.unlink()
    with pytest.raises(ValueError, match=f"{path} is (truncated|missing).*Delete it and run latent_cache.py again"):
        run_train(tiny_sd15, pickapic, tmp_path / "run", "--latents_cache", str(folder))
    assert not (tmp_path / "run" / "unet.safetensors").exists()


def test_a_cache_of_another_model_is_refused(tiny_sd15, pickapic, cache, tmp_path):
    """The same architecture under another path with other weights (another VAE and text encoder): refused, naming the
    model. (A copy of the same model elsewhere is accepted: the cache is keyed on the files' contents.)"""
    from tiny import build_sd15

    other = build_sd15(tmp_path / "other-sd15", seed=1)
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path: its files differ"):
        run_train(other, pickapic, tmp_path / "run", "--latents_cache", str(cache))
