"""eval.make_pairs for the video families (issue 22, item 4) on the tiny Wan2.1 model and tiny scorers (CPU, 32 px,
5 frames, 2 steps): candidates are mp4s storing their prompt (eval.generate's video for the recorded seed), a resume
regenerates only a deleted candidate, the scores are eval.score's (image metrics averaged over --frames sampled frames,
temporal over every frame), the pairs follow the image rule from the recorded scores, the rows hold the candidates'
mp4s in train.py's video schema (parquet and WebDataset), train.py trains on the folder as it is; real-versus-generated
video pairs, image-to-video pairs (Wan2.2-TI2V with a conditioning image) and CogVideoX pairs too. Before issue 22 every video family
was refused."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import train
from eval import generate as gen
from eval import make_pairs as mp
from eval.video import read_frames, sample_indices, video_info, write_mp4
from test_make_pairs import reset_accelerate, rows_of, run_pairs
from test_train import metrics, run_train

K = 3
FRAMES = 5  # wan: 4k + 1
SCORED_FRAMES = 3  # --frames: the image metrics average frames 0, 2 and 4
PROMPTS = ["a red cube", "a blue ball", "a dog on a beach"]
MIX = ["colour", "temporal=0.5", "clip=0.3"]
WEIGHTS = {"colour": 1.0, "temporal": 0.5, "clip": 0.3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny import build_wan
    from tiny.scorers import build_tiny_scorers

    root = tmp_path_factory.mktemp("video-pairs")
    config = build_tiny_scorers(root / "scorers")
    (root / "scorers.json").write_text(json.dumps(config))
    (root / "prompts.json").write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
    return {"model": build_wan(root / "wan"), "root": root, "config": config, "prompts": root / "prompts.json"}


def pair_argv(setup, out, *extra):
    return ["--prompts", str(setup["prompts"]), "--output_dir", str(out), "--pretrain_path", str(setup["model"]),
            "--height", "32", "--width", "32", "--steps", "2", "--num_frames", str(FRAMES), "--num_candidates", str(K),
            "--seed", "7", "--batch_size", "1", "--scorers", *MIX, "--scorer_config", str(setup["root"] / "scorers.json"),
            "--frames", str(SCORED_FRAMES), "--pair_rule", "margin", "--margin", "0", *extra]


@pytest.fixture(scope="module")
def built(setup):
    out = setup["root"] / "run"
    return out, run_pairs(pair_argv(setup, out, "--webdataset"))


def candidate(out, i, k) -> Path:
    return Path(out) / "candidates" / f"{i:06d}" / f"{k}.mp4"


def frames_of(path) -> np.ndarray:
    """Every decoded frame of an mp4, (F, H, W, 3) int16."""
    return np.stack([np.asarray(f, dtype=np.int16) for f in read_frames(path)])


def test_candidates_are_mp4s_storing_their_prompt_and_generate_s_video(built, setup, tmp_path):
    """Each candidate is an mp4 of --num_frames frames at wan's 16 fps storing its prompt; candidate k of prompt i is
    eval.generate's video for seed 7 + i*K + k: both sample one video per call (--batch_size 1) from the same noise
    with the same pipeline and write it with the same encoder, so the decoded frames are equal bit for bit."""
    out, summary = built
    assert summary["media"] == "video" and summary["pairs"] > 0
    for i, prompt in enumerate(PROMPTS):
        record = json.loads((out / "candidates" / f"{i:06d}" / "candidates.json").read_text())
        assert record["files"] == [f"{k}.mp4" for k in range(K)] and record["seeds"] == [7 + i * K + k for k in range(K)]
        for k in range(K):
            assert video_info(candidate(out, i, k)) == {"frames": FRAMES, "fps": 16.0, "prompt": prompt}
    prompts = tmp_path / "one.json"
    prompts.write_text(json.dumps([{"prompt": PROMPTS[2]}]))
    result = gen.generate(gen.parse_args(["--pretrain_path", str(setup["model"]), "--test_json", str(prompts),
                                          "--output_path", str(tmp_path), "--height", "32", "--width", "32",
                                          "--steps", "2", "--num_frames", str(FRAMES), "--seed", str(7 + 2 * K + 1),
                                          "--no_zip"]))
    reset_accelerate()
    made = json.loads(Path(result["manifest"]).read_text())[0]["gen_image_path"]
    assert np.array_equal(frames_of(made), frames_of(candidate(out, 2, 1)))


def test_scores_are_eval_score_s_video_scores(built, setup):
    """colour (an image metric) is the mean over the --frames evenly sampled frames, by hand; temporal is the tiny
    CLIP tower's consecutive-frame consistency over every frame, as eval.score computes it."""
    from eval.scorers import load_scorer
    from tiny import colour_score

    out, _ = built
    temporal = load_scorer("temporal", **setup["config"]["clip"])  # temporal takes clip's settings (eval.score)
    for i in range(len(PROMPTS)):
        scores = json.loads((out / "candidates" / f"{i:06d}" / "scores.json").read_text())
        for k in range(K):
            frames = read_frames(candidate(out, i, k))
            by_hand = sum(colour_score(frames[j]) for j in sample_indices(FRAMES, SCORED_FRAMES)) / SCORED_FRAMES
            assert scores["colour"]["scores"][k] == pytest.approx(float(by_hand), abs=1e-6)
            assert scores["temporal"]["scores"][k] == pytest.approx(temporal.score_videos([frames])[0], abs=1e-6)
        assert "mean of 3 evenly sampled frames" in scores["clip"]["scorer"]
        assert scores["temporal"]["scorer"].endswith("every frame")


def test_rows_hold_the_candidates_and_follow_the_mixed_score_rule(built):
    """The pairs a person would write down from the recorded raw scores (numpy z-scores over all candidates, the
    weighted sum, every two candidates whose gap is not a tie), and each row's mp4_0 / mp4_1 are the candidates' files
    as they are, decoding to the candidates' frames through train.py's decoder."""
    from data.video import decode_clip

    out, summary = built
    records = [json.loads((out / "candidates" / f"{i:06d}" / "scores.json").read_text()) for i in range(len(PROMPTS))]
    mixed = np.zeros((len(PROMPTS), K))
    for name, weight in WEIGHTS.items():
        raw = np.array([r[name]["scores"] for r in records])
        mixed += weight * (raw - raw.mean()) / raw.std()
    expected = {(i, a, b, 1.0 if mixed[i, a] > mixed[i, b] else 0.0)
                for i in range(len(PROMPTS)) for a in range(K) for b in range(a + 1, K) if abs(mixed[i, a] - mixed[i, b]) > 1e-9}
    rows = rows_of(out)
    assert {(r["prompt_index"], r["candidate_0"], r["candidate_1"], r["label_0"]) for r in rows} == expected
    assert len(rows) == summary["pairs"] == len(expected)
    for r in rows:
        i, a, b = r["prompt_index"], r["candidate_0"], r["candidate_1"]
        assert r["caption"] == PROMPTS[i] and r["label_1"] == 1.0 - r["label_0"] and r["scorer_mix"] == mp.mix_label(WEIGHTS)
        assert r["score_0"] == pytest.approx(mixed[i, a]) and r["score_1"] == pytest.approx(mixed[i, b])
        assert r["colour_0"] == records[i]["colour"]["scores"][a] and r["seed_1"] == 7 + i * K + b
        assert r["mp4_0"] == candidate(out, i, a).read_bytes() and r["mp4_1"] == candidate(out, i, b).read_bytes()
        clip = decode_clip(r["mp4_1"], FRAMES, 1, None, None)  # (F, H, W, 3) uint8, as train.py decodes a row
        assert np.array_equal(np.asarray(clip, dtype=np.int16), frames_of(candidate(out, i, b)))
    with tarfile.open(out / "webdataset" / "train-00000.tar") as tar:
        names = set(tar.getnames())
        first = rows[0]
        key = f"{first['prompt_index']:06d}_{first['candidate_0']}_{first['candidate_1']}"
        assert {f"{key}.mp4_0.mp4", f"{key}.mp4_1.mp4", f"{key}.label_0.txt", f"{key}.original_prompt.txt"} <= names
        assert tar.extractfile(f"{key}.mp4_0.mp4").read() == first["mp4_0"]


def test_train_py_trains_on_the_folder_as_it_is(built, setup, tmp_path):
    """`train.py --dataset_name <output_dir>` on the tiny Wan model: the parquet shards, two steps; the WebDataset
    shards stream the same pairs."""
    out, summary = built
    assert run_train(setup["model"], out, tmp_path / "trained", "--num_frames", str(FRAMES)) == 2
    assert all(np.isfinite(m["train_loss"]) for m in metrics(tmp_path / "trained"))
    args = train.parse_args(["--pretrained_model_name_or_path", str(setup["model"]), "--dataset_name",
                             str(out / "webdataset"), "--resolution", "32", "--num_frames", str(FRAMES)])
    streamed = list(train.filter_rows(train.load_rows(args), args, True))
    raw = [{k: v["bytes"] if isinstance(v, dict) else v for k, v in r.items()} for r in streamed]  # {"bytes": ...}
    assert sorted((r["mp4_0"], r["mp4_1"], float(r["label_0"])) for r in raw) == \
        sorted((r["mp4_0"], r["mp4_1"], r["label_0"]) for r in rows_of(out)) and len(streamed) == summary["pairs"]


def test_resume_regenerates_only_a_deleted_candidate(built, setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(built[0], out)
    deleted = candidate(out, 1, 2)
    before = deleted.read_bytes()
    kept = {p: p.stat().st_mtime_ns for p in (out / "candidates").rglob("*.mp4") if p != deleted}
    deleted.unlink()
    sampled = []
    real_sample = gen.sample

    def counting_sample(models, prompts, *args, **kwargs):
        sampled.extend(zip(prompts, kwargs["seeds"]))
        return real_sample(models, prompts, *args, **kwargs)

    monkeypatch.setattr(gen, "sample", counting_sample)
    summary = run_pairs(pair_argv(setup, out, "--webdataset"))
    assert sampled == [(PROMPTS[1], 7 + 1 * K + 2)]
    assert deleted.read_bytes() == before  # the same seed, one video per call: the same frames and encoding
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert summary["pairs"] == built[1]["pairs"]


def test_refusals(setup, tmp_path):
    """temporal scores videos only; image encoding flags do not apply to video pairs."""
    assert mp.parse_mix(["colour", "temporal=0.5"], video=True) == {"colour": 1.0, "temporal": 0.5}
    with pytest.raises(mp.MakePairsError, match="scores videos"):
        mp.parse_mix(["temporal"])
    with pytest.raises(SystemExit, match="--image_format"):
        run_pairs(pair_argv(setup, tmp_path / "x", "--image_format", "png"))


def test_real_versus_generated_video_pairs(setup, tmp_path, monkeypatch):
    """--real_winner: each entry's real "video" is video 0 and the winner against each candidate, stored as it is."""
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i, prompt in enumerate(PROMPTS[:2]):
        write_mp4(rng.integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8), real / f"{i}.mp4", fps=16)
        entries.append({"prompt": prompt, "video": f"real/{i}.mp4"})
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(entries))
    monkeypatch.setattr(mp, "load_pair_scorer", lambda *a, **k: pytest.fail("a scorer was loaded"))
    out = tmp_path / "out"
    argv = pair_argv(setup, out)
    argv[argv.index("--prompts") + 1] = str(prompts)
    argv[argv.index("--num_candidates") + 1] = "1"
    summary = run_pairs([*argv, "--real_winner"])
    rows = rows_of(out)
    assert len(rows) == summary["pairs"] == 2 and summary["pair_rule"] == "real-vs-generated"
    for r in rows:
        i = r["prompt_index"]
        assert (r["label_0"], r["candidate_0"], r["real_video"]) == (1.0, -1, str(real / f"{i}.mp4"))
        assert r["mp4_0"] == (real / f"{i}.mp4").read_bytes() and r["mp4_1"] == candidate(out, i, 0).read_bytes()


def test_image_to_video_pairs_carry_their_conditioning_image(setup, tmp_path):
    """Wan2.2-TI2V with an "image" per entry samples image-to-video (as eval.generate does); the pairs hold that
    image in `conditioning_image`, and train.py trains on them with --conditioning_image_column conditioning_image."""
    from PIL import Image

    from tiny.video import build_wan22_ti2v

    model = build_wan22_ti2v(tmp_path / "ti2v")
    Image.fromarray(np.full((32, 32, 3), (200, 40, 40), dtype=np.uint8)).save(tmp_path / "cond.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": p, "image": "cond.png"} for p in PROMPTS[:2]]))
    out = tmp_path / "out"
    argv = pair_argv(setup, out)
    argv[argv.index("--prompts") + 1], argv[argv.index("--pretrain_path") + 1] = str(prompts), str(model)
    argv[argv.index("--num_candidates") + 1] = "2"
    argv[argv.index("--scorers") + 1 : argv.index("--scorer_config")] = ["colour"]
    summary = run_pairs([*argv, "--webdataset"])
    assert summary["train_command"].endswith("--conditioning_image_column conditioning_image ...")
    rows = rows_of(out)
    assert rows and all(r["conditioning_image"] == (tmp_path / "cond.png").read_bytes() for r in rows)
    record = json.loads((out / "run.json").read_text())
    assert record["fingerprint"]["sampling"]["pipeline"] == "WanImageToVideoPipeline"
    with tarfile.open(out / "webdataset" / "train-00000.tar") as tar:
        assert any(name.endswith(".conditioning_image.png") for name in tar.getnames())
    assert run_train(model, out, tmp_path / "trained", "--num_frames", str(FRAMES), "--conditioning_image_column",
                     "conditioning_image", steps=1) == 1


def test_cogvideox_pairs_train(setup, tmp_path):
    """CogVideoX (its own pipeline, 8k + 1 frames, 8 fps): video pairs that train.py trains on, one step."""
    from tiny import build_cogvideox

    model = build_cogvideox(tmp_path / "cogvideox", num_frames=9)
    out = tmp_path / "out"
    argv = pair_argv(setup, out)
    argv[argv.index("--pretrain_path") + 1], argv[argv.index("--num_frames") + 1] = str(model), "9"
    argv[argv.index("--num_candidates") + 1] = "2"
    argv[argv.index("--scorers") + 1 : argv.index("--scorer_config")] = ["colour"]
    summary = run_pairs(argv)
    assert summary["pairs"] == len(PROMPTS)  # each prompt's two candidates: no colour tie on random videos
    assert video_info(candidate(out, 0, 1)) == {"frames": 9, "fps": 8.0, "prompt": PROMPTS[0]}
    assert run_train(model, out, tmp_path / "trained", "--num_frames", "9", steps=1) == 1
