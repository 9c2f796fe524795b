"""eval/make_pairs.py and scripts/onpolicy_rounds.py on the tiny model and tiny scorers (CPU, 32 px, 2 steps):
pairs against a hand ranking of the recorded scores, the mixing arithmetic, ties, resume after a kill, the shards
through train.py's data path and two training steps, and two on-policy rounds end to end."""

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import train
from data.pairs import PairDataset, decode_image
from eval import generate as gen
from eval import make_pairs as mp

REPO = Path(__file__).resolve().parents[1]
K = 3
PROMPTS = ["a circle on a plain background", "a square on a plain background", "a red apple", "a blue car",
           "a dog on a beach"]
MIX = ["clip", "pickscore=0.5", "colour=2"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def setup(tiny_sd15, tmp_path_factory):
    from tiny import build_tiny_scorers

    root = tmp_path_factory.mktemp("pairs")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the tiny scorers are random
    try:
        config = build_tiny_scorers(root / "scorers")
    finally:
        logging.getLogger().setLevel(level)
    (root / "scorers.json").write_text(json.dumps(config))
    (root / "prompts.json").write_text(json.dumps([{"prompt": p, "metadata": {}} for p in PROMPTS]))
    return {"model": tiny_sd15, "root": root, "config": root / "scorers.json", "prompts": root / "prompts.json"}


def pair_argv(setup, out, *extra, rule="margin", margin="0.5"):
    return ["--prompts", str(setup["prompts"]), "--output_dir", str(out), "--pretrain_path", str(setup["model"]),
            "--height", "32", "--width", "32", "--steps", "2", "--num_candidates", str(K), "--seed", "7",
            "--batch_size", "4", "--scorers", *MIX, "--scorer_config", str(setup["config"]), "--pair_rule", rule,
            "--margin", margin, *extra]


def run_pairs(argv):
    try:
        return mp.main(argv)
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def built(setup):
    out = setup["root"] / "run"
    summary = run_pairs(pair_argv(setup, out, "--webdataset", "--shard_size", "4"))
    return out, summary


def rows_of(out):
    files = sorted((Path(out) / "data").glob("train-*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def hand_pairs(out, rule, margin):
    """The pairs a person would write down from the recorded raw scores: numpy z-scores per metric over all
    candidates, the weighted sum, then the rule."""
    records = [json.loads((Path(out) / "candidates" / f"{i:06d}" / "scores.json").read_text())
               for i in range(len(PROMPTS))]
    weights = {"clip": 1.0, "pickscore": 0.5, "colour": 2.0}
    mixed = np.zeros((len(PROMPTS), K))
    for name, weight in weights.items():
        raw = np.array([r[name]["scores"] for r in records])
        mixed += weight * (raw - raw.mean()) / raw.std()
    expected = set()
    for i, s in enumerate(mixed):
        if rule == "best-worst":
            candidates = [tuple(sorted((int(np.argmax(s)), int(np.argmin(s)))))]
        else:
            candidates = [(a, b) for a in range(K) for b in range(a + 1, K)]
        for a, b in candidates:
            if abs(s[a] - s[b]) > margin:
                expected.add((i, a, b, 1.0 if s[a] > s[b] else 0.0))
    return expected, mixed


# ----------------------------------------------------------------------------------------------- the arithmetic


def test_mixing_arithmetic():
    raw = {"a": [1.0, 2.0, 3.0, 4.0], "b": [5.0, 5.0, 5.0, 5.0], "c": [0.0, 4.0, 0.0, 0.0]}
    mixed, stats = mp.mix_scores(raw, {"a": 1.0, "b": 2.0, "c": -0.5})
    za = [(x - 2.5) / math.sqrt(1.25) for x in raw["a"]]  # population std of 1..4: sqrt(1.25)
    zc = [(x - 1.0) / math.sqrt(3.0) for x in raw["c"]]  # mean 1, variance (1 + 9 + 1 + 1) / 4 = 3
    assert mixed == pytest.approx([a - 0.5 * c for a, c in zip(za, zc)])  # b is constant: z = 0
    assert stats["a"] == pytest.approx({"mean": 2.5, "std": math.sqrt(1.25), "weight": 1.0})
    assert stats["b"]["std"] == 0.0
    # one metric: the z-score keeps the order and puts the gap in standard deviations
    assert mp.mix_scores({"a": [0.2, 0.4]}, {"a": 1.0})[0] == pytest.approx([-1.0, 1.0])
    assert mp.parse_mix(["pickscore", "hps=0.5", "aes=-1", "colour=2"]) == {
        "pickscore": 1.0, "hpsv2": 0.5, "aesthetics": -1.0, "colour": 2.0}
    assert mp.mix_label({"pickscore": 1.0, "hpsv2": 0.5}) == "pickscore=1,hpsv2=0.5"
    for bad in (["nope"], ["clip=x"], ["clip=0"], ["clip", "clip=2"]):
        with pytest.raises(mp.MakePairsError):
            mp.parse_mix(bad)


def test_pair_rules_margin_and_ties():
    kept = lambda ds: [(d.a, d.b, d.label_0) for d in ds if d.kept]  # noqa: E731
    assert kept(mp.pair_candidates([0.1, 0.5, -0.2], "best-worst")) == [(1, 2, 1.0)]
    assert kept(mp.pair_candidates([0.9, 0.5, -0.2, 1.2], "best-worst")) == [(2, 3, 0.0)]
    decisions = mp.pair_candidates([0.0, 0.2, 0.2, 1.0], "margin", margin=0.25)
    assert [(d.a, d.b, d.reason) for d in decisions] == [
        (0, 1, "margin"), (0, 2, "margin"), (0, 3, "pair"), (1, 2, "tie"), (1, 3, "pair"), (2, 3, "pair")]
    assert kept(decisions) == [(0, 3, 0.0), (1, 3, 0.0), (2, 3, 0.0)]
    assert [d.reason for d in mp.pair_candidates([0.3, 0.3, 0.3], "best-worst")] == ["tie"]
    assert [d.reason for d in mp.pair_candidates([0.3, 0.3 + 1e-12], "margin")] == ["tie"]


# ----------------------------------------------------------------------------------------------------- builder


def test_pairs_match_a_hand_ranking_of_the_recorded_scores(built, setup):
    out, summary = built
    rows = rows_of(out)
    expected, mixed = hand_pairs(out, "margin", 0.5)
    got = {(r["prompt_index"], r["candidate_0"], r["candidate_1"], r["label_0"]) for r in rows}
    assert got == expected and len(rows) == len(expected) == summary["pairs"] > 0
    assert summary["pairs"] + summary["ties_dropped"] + summary["below_margin"] == len(PROMPTS) * K * (K - 1) // 2
    assert len(list((out / "data").glob("*.parquet"))) == math.ceil(len(rows) / 4)  # --shard_size 4
    for r in rows:  # provenance
        i, a, b = r["prompt_index"], r["candidate_0"], r["candidate_1"]
        assert r["caption"] == PROMPTS[i] and r["label_1"] == 1.0 - r["label_0"]
        assert (r["seed_0"], r["seed_1"]) == (7 + i * K + a, 7 + i * K + b)
        assert (r["score_0"], r["score_1"]) == pytest.approx((mixed[i, a], mixed[i, b]))
        assert r["scorer_mix"] == "clip=1,pickscore=0.5,colour=2" and r["pair_rule"] == "margin"
        assert r["model"] == f"base UNet of {setup['model']}"
        scores = json.loads((out / "candidates" / f"{i:06d}" / "scores.json").read_text())
        assert r["clip_0"] == scores["clip"]["scores"][a] and r["colour_1"] == scores["colour"]["scores"][b]
        with Image.open(__import__("io").BytesIO(r["jpg_0"])) as image:
            assert image.format == "JPEG" and image.size == (32, 32)
    assert (out / "gaps.png").is_file() and json.loads((out / "summary.json").read_text())["pairs"] == len(rows)


def test_a_candidate_is_eval_generate_s_image_for_its_seed(built, setup, tmp_path):
    """The recorded seed reproduces the candidate with eval.generate (same sampler, same noise)."""
    out, _ = built
    prompts = tmp_path / "one.json"
    prompts.write_text(json.dumps([{"prompt": PROMPTS[2]}]))
    result = gen.generate(gen.parse_args(["--pretrain_path", str(setup["model"]), "--test_json", str(prompts),
                                          "--output_path", str(tmp_path), "--height", "32", "--width", "32",
                                          "--steps", "2", "--seed", str(7 + 2 * K + 1), "--no_zip"]))
    reset_accelerate()
    made = json.loads(Path(result["manifest"]).read_text())[0]["gen_image_path"]
    a = np.asarray(Image.open(made), dtype=np.int16)
    b = np.asarray(Image.open(out / "candidates" / "000002" / "1.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() <= 0.01  # batch of 4 vs 1: float rounding at most


def test_best_worst_and_ties_dropped(built, setup, tmp_path):
    """A rerun rebuilds the pairs from the recorded candidates and scores (nothing generated or scored again);
    a prompt whose candidates all score the same gives a tie, which is dropped and counted."""
    out, _ = built
    scores_file = out / "candidates" / "000001" / "scores.json"
    original = scores_file.read_text()
    record = json.loads(original)
    for name in record:
        record[name]["scores"] = [record[name]["scores"][0]] * K
    try:
        scores_file.write_text(json.dumps(record))
        summary = run_pairs(pair_argv(setup, out, rule="best-worst", margin="0"))
        rows = rows_of(out)
        expected, _ = hand_pairs(out, "best-worst", 0.0)
        assert {(r["prompt_index"], r["candidate_0"], r["candidate_1"], r["label_0"]) for r in rows} == expected
        assert summary["ties_dropped"] == 1 and summary["pairs"] == len(PROMPTS) - 1 == len(rows)
        assert 1 not in {r["prompt_index"] for r in rows} and summary["prompts_without_pair"] == 1
    finally:
        scores_file.write_text(original)
        run_pairs(pair_argv(setup, out, "--webdataset", "--shard_size", "4"))  # restore the module's run


def test_resume_after_a_kill_gives_every_pair_once(built, setup, tmp_path, monkeypatch):
    out, _ = built
    reference = rows_of(out)
    killed = tmp_path / "killed"
    real_sample, calls = gen.sample, []

    def dying_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # after the first batch of candidates was written
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(gen, "sample", dying_sample)
    with pytest.raises(KeyboardInterrupt):
        run_pairs(pair_argv(setup, killed, "--shard_size", "4"))
    monkeypatch.setattr(gen, "sample", real_sample)
    assert 0 < len(list((killed / "candidates").rglob("*.png"))) < len(PROMPTS) * K
    assert not (killed / "data").exists()

    import pyarrow.parquet

    real_write, written = pyarrow.parquet.write_table, []

    def dying_write(table, path, *args, **kwargs):
        written.append(path)
        if len(written) == 2:
            raise KeyboardInterrupt("killed while writing the shards")
        return real_write(table, path, *args, **kwargs)

    monkeypatch.setattr(pyarrow.parquet, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_pairs(pair_argv(setup, killed, "--shard_size", "4"))
    monkeypatch.undo()
    assert len(written) == 2 and not (killed / "data").exists()  # no half-written dataset in place

    summary = run_pairs(pair_argv(setup, killed, "--shard_size", "4"))
    rows = rows_of(killed)
    key = lambda r: (r["prompt_index"], r["candidate_0"], r["candidate_1"])  # noqa: E731
    assert len(rows) == len({key(r) for r in rows}) == summary["pairs"] == len(reference)
    fields = ("prompt_index", "candidate_0", "candidate_1", "label_0", "seed_0", "seed_1", "caption")
    assert sorted(tuple(r[f] for f in fields) for r in rows) == sorted(tuple(r[f] for f in fields) for r in reference)
    by_key = {key(r): r for r in reference}
    for r in rows:  # the same images up to float rounding (the resumed batches hold other candidates)
        assert (r["score_0"], r["score_1"]) == pytest.approx((by_key[key(r)]["score_0"], by_key[key(r)]["score_1"]),
                                                              abs=1e-2)
    assert not list(killed.glob(".data*"))  # no temporary folder left behind

    with pytest.raises(SystemExit, match="candidates of another run"):  # another seed: refused, not mixed in
        run_pairs(pair_argv(setup, killed, "--seed", "8"))


def test_shards_load_through_train_py_and_train_two_steps(built, setup, tmp_path):
    out, summary = built
    rows = rows_of(out)
    for source in (out, out / "webdataset"):
        args = train.parse_args(["--pretrained_model_name_or_path", str(setup["model"]), "--dataset_name",
                                 str(source), "--resolution", "32", "--proportion_empty_prompts", "0", "--no_hflip"])
        loaded = train.filter_rows(train.load_rows(args), args, True)
        if source == out:
            assert len(loaded) == summary["pairs"]
            dataset = PairDataset(loaded, args)
            first = dataset[(0, 0, 0)]
            assert first["caption"] == rows[0]["caption"]
            images = [rows[0]["jpg_0"], rows[0]["jpg_1"]]
            winner = images[0] if rows[0]["label_0"] == 1.0 else images[1]
            assert torch.equal(first["pixel_values"][:3], dataset.transform(decode_image(winner), None))
        else:  # WebDataset shards stream
            streamed = list(loaded)
            assert sorted(r["label_0"] for r in streamed) == sorted(r["label_0"] for r in rows)
            assert {r["caption"] for r in streamed} == {r["caption"] for r in rows}
    try:
        steps = train.main(["--pretrained_model_name_or_path", str(setup["model"]), "--dataset_name", str(out),
                            "--output_dir", str(tmp_path / "trained"), "--resolution", "32", "--train_batch_size",
                            "2", "--max_train_steps", "2", "--checkpointing_steps", "100", "--mixed_precision", "no",
                            "--seed", "0", "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--report_to", "none",
                            "--importance_weighting", "clip_mask"])
    finally:
        reset_accelerate()
    assert steps == 2
    metrics = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 < m["is_weight_mean"] <= 1 for m in metrics)


# ------------------------------------------------------------------------------------------------------- rounds


def test_two_on_policy_rounds_end_to_end(setup, tmp_path):
    spec = importlib.util.spec_from_file_location("onpolicy_rounds", REPO / "scripts" / "onpolicy_rounds.py")
    rounds = sys.modules["onpolicy_rounds"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rounds)
    train_prompts = tmp_path / "train.json"
    train_prompts.write_text(json.dumps([{"prompt": p} for p in PROMPTS[:4]]))
    eval_prompts = tmp_path / "heldout.json"
    eval_prompts.write_text(json.dumps([{"prompt": p} for p in PROMPTS[4:]]))
    out = tmp_path / "rounds"
    result = rounds.main([
        "--pretrained_model_name_or_path", str(setup["model"]), "--prompts", str(train_prompts), "--eval_prompts",
        str(eval_prompts), "--rounds", "2", "--output_dir", str(out), "--num_candidates", "2", "--scorers", "colour",
        "clip=0.5", "--scorer_config", str(setup["config"]), "--eval_seeds", "2", "--height", "32", "--width", "32",
        "--steps", "2", "--n_bootstrap", "50", "--launcher", "inprocess", "--",
        "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
        "--mixed_precision", "no", "--report_to", "none", "--seed", "0", "--checkpointing_steps", "100"])
    rows = result["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["pairs"] > 0 and r["train"]["steps"] == 2
        assert set(r["ab"]) == {"Colour", "CLIPScore"} and r["ab"]["Colour"]["total_pairs"] == 2  # 1 prompt x 2 seeds
        assert (out / f"round_{r['round']}" / "compare_vs_round_0" / "summary.json").is_file()
    commands = (out / "commands.log").read_text().splitlines()
    trains = [c for c in commands if c.startswith("train.py")]
    assert "--unet_init" not in trains[0] and f"--unet_init {out / 'round_1' / 'train'}" in trains[1]
    pairs_2 = [c for c in commands if c.startswith("eval.make_pairs")][1]
    assert f"--unet_path {out / 'round_1' / 'train'}" in pairs_2  # round 2's pairs come from round 1's model
    config = json.loads((out / "round_2" / "train" / "training_config.json").read_text())
    assert str(out / "round_1" / "train") in json.dumps(config)
    table = (out / "rounds.md").read_text()
    assert "| 2 |" in table and "Colour: win rate vs round 0" in table
    assert json.loads((out / "rounds.json").read_text())["rounds"][2]["ab"]["CLIPScore"]["total_pairs"] == 2


def test_two_processes_shard_the_prompts_and_make_the_same_pairs(built, setup, tmp_path):
    """accelerate launch with two CPU ranks (gloo): each rank makes its prompts' candidates, rank 0 the pairs."""
    import os
    import subprocess

    out, _ = built
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "eval.make_pairs", *pair_argv(setup, tmp_path / "two", "--shard_size", "4")],
                          env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("make_pairs: ") == 3  # the rank-0 lines only: start, progress, result
    fields = ("prompt_index", "candidate_0", "candidate_1", "label_0", "seed_0", "seed_1")
    assert sorted(tuple(r[f] for f in fields) for r in rows_of(tmp_path / "two")) == \
        sorted(tuple(r[f] for f in fields) for r in rows_of(out))


# ------------------------------------------------------------------------------- gap weights, rebuilds, real pairs


def test_filter_and_weight_by_gap_by_hand():
    keep, weights = mp.filter_and_weight_by_gap([0.5, 0.1, 0.9, 0.1, 0.4], drop_percentile=40, power=1)
    assert keep == [True, False, True, False, True]  # floor(5 x 40%) = 2: the two smallest gaps
    assert weights == pytest.approx([0.5 / 0.6, 0.0, 0.9 / 0.6, 0.0, 0.4 / 0.6])  # mean of 0.5, 0.9, 0.4 is 0.6
    assert mp.filter_and_weight_by_gap([0.3, 0.2], power=0) == ([True, True], [1.0, 1.0])
    assert sum(not k for k in mp.filter_and_weight_by_gap([float(g) for g in range(10)], 30)[0]) == 3
    keep, weights = mp.filter_and_weight_by_gap([1.0, 3.0], power=2)  # 1 and 9, mean 5
    assert weights == pytest.approx([0.2, 1.8])


def copy_run(built, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def test_gap_filter_weights_and_a_rebuild_that_owns_the_folder(built, setup, tmp_path):
    """A rebuild with VideoDPO's gap filter and weights records them per pair (and in the WebDataset, as train.py
    streams it); a later rebuild without --webdataset removes the earlier build's shards instead of leaving them."""
    out = copy_run(built, tmp_path)
    summary = run_pairs(pair_argv(setup, out, "--webdataset", "--drop_gap_percentile", "50", "--gap_weight_power", "1"))
    expected, mixed = hand_pairs(out, "margin", 0.5)
    gaps = {(i, a, b): abs(mixed[i, a] - mixed[i, b]) for i, a, b, _ in expected}
    ranked = sorted(gaps, key=lambda key: (gaps[key], key))  # pairs are made prompt by prompt, a < b: that order
    survivors = ranked[len(ranked) // 2:]
    mean = sum(gaps[key] for key in survivors) / len(survivors)
    rows = rows_of(out)
    assert sorted((r["prompt_index"], r["candidate_0"], r["candidate_1"]) for r in rows) == sorted(survivors)
    assert summary["below_gap_percentile"] == len(ranked) // 2 and summary["pairs"] == len(survivors)
    for r in rows:
        key = (r["prompt_index"], r["candidate_0"], r["candidate_1"])
        assert r["score_gap"] == pytest.approx(gaps[key]) and r["pair_weight"] == pytest.approx(gaps[key] / mean)
    args = train.parse_args(["--pretrained_model_name_or_path", str(setup["model"]), "--dataset_name",
                             str(out / "webdataset"), "--resolution", "32", "--pair_weight_column", "pair_weight"])
    streamed = list(train.filter_rows(train.load_rows(args), args, True))
    assert sorted(float(r["pair_weight"]) for r in streamed) == pytest.approx(sorted(r["pair_weight"] for r in rows))

    summary = run_pairs(pair_argv(setup, out))  # no --webdataset, no gap options
    assert not (out / "webdataset").exists() and summary["stale_outputs_removed"] == ["webdataset"]
    assert summary["webdataset_shards"] == [] and summary["pairs"] == len(ranked)
    assert {r["pair_weight"] for r in rows_of(out)} == {1.0}


def test_real_versus_generated_pairs(built, setup, tmp_path, monkeypatch):
    """--real_winner: the prompt file's real image wins against each candidate of its prompt; no scorer is loaded."""
    out = copy_run(built, tmp_path)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    entries = []
    for i, prompt in enumerate(PROMPTS):
        Image.new("RGB", (40, 48), (40 * i, 200, 90)).save(real_dir / f"{i}.jpg", quality=90)
        entries.append({"prompt": prompt, "image": f"real/{i}.jpg"})
    prompts = tmp_path / "with_images.json"
    prompts.write_text(json.dumps(entries))

    def no_scorer(*args, **kwargs):
        raise AssertionError("a scorer was loaded")

    monkeypatch.setattr(mp, "load_pair_scorer", no_scorer)
    argv = pair_argv(setup, out)
    argv[argv.index("--prompts") + 1] = str(prompts)
    summary = run_pairs([*argv, "--real_winner"])
    rows = rows_of(out)
    assert len(rows) == summary["pairs"] == len(PROMPTS) * K and summary["pair_rule"] == "real-vs-generated"
    media = mp.ImageMedia()
    for r in rows:
        i, k = r["prompt_index"], r["candidate_1"]
        assert (r["label_0"], r["label_1"], r["caption"], r["seed_1"]) == (1.0, 0.0, PROMPTS[i], 7 + i * K + k)
        assert r["jpg_0"] == media.encode(real_dir / f"{i}.jpg")
        assert r["jpg_1"] == media.encode(out / "candidates" / f"{i:06d}" / f"{k}.png")
        assert r["real_image"] == str(real_dir / f"{i}.jpg") and r["pair_weight"] == 1.0
    assert not (out / "gaps.png").exists() and "gaps.png" in summary["stale_outputs_removed"]

    entries[2].pop("image")
    prompts.write_text(json.dumps(entries))
    with pytest.raises(SystemExit, match="entry 2 .* has no \"image\""):
        run_pairs([*argv, "--real_winner"])
