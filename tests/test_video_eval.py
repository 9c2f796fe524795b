"""Video evaluation (issue 11): eval.generate on the tiny Wan2.1 / CogVideoX models (mp4, manifest, run record,
resume), frame-averaged image metrics and temporal consistency against hand computations, eval.compare on video
manifests, the VBench bridge (file layout, a recorded-format results file, the runner with a stand-in VBench) and
`prompts/build.py vbench`. Offline, CPU, tiny."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval.compare import main as compare_main  # noqa: E402
from eval.generate import GenerateError, generate, load_sampler, parse_args, resolve_args, sample  # noqa: E402
from eval.manifest import ManifestError, load_frames, read_manifest  # noqa: E402
from eval.score import default_metrics, gather_scores, score_manifests  # noqa: E402
from eval.scorers import load_scorer  # noqa: E402
from eval.video import read_frames, sample_indices, video_info, write_mp4  # noqa: E402

PROMPTS = [{"prompt": "a red cube"}, {"prompt": "a blue ball"}]
FRAMES = {"wan": 5, "cogvideox": 9}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import build_cogvideox, build_wan

    root = tmp_path_factory.mktemp("video-models")
    return {"wan": build_wan(root / "wan"), "cogvideox": build_cogvideox(root / "cogvideox")}


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    from tiny.scorers import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("scorers"))


def _generate(model, family, out, prompts=PROMPTS, **extra):
    test_json = Path(out).parent / f"{Path(out).name}-prompts.json"
    test_json.write_text(json.dumps(prompts))
    argv = ["--pretrain_path", str(model), "--test_json", str(test_json), "--output_path", str(out), "--height", "32",
            "--width", "32", "--num_frames", str(FRAMES[family]), "--steps", "2", "--no_zip"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return generate(parse_args(argv))


def _decoded(path):
    return np.stack([np.asarray(f, dtype=np.int16) for f in read_frames(path)])


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_generate_mp4_manifest_resume(models, tmp_path, family):
    out = tmp_path / "run"
    result = _generate(models[family], family, out, batch_size=2)
    assert result["generated"] == 2 and result["n_prompts"] == 2
    manifest = json.loads(Path(result["manifest"]).read_text())
    name = result["run_name"]
    assert name == f"run-prompts_seed0_32x32_2s_{5.0 if family == 'wan' else 6.0}cfg"  # the image runs' naming
    assert [e["prompt"] for e in manifest] == [p["prompt"] for p in PROMPTS]
    for i, entry in enumerate(manifest):
        assert entry["gen_image_path"].endswith(f"{name}/{i}_32x32.mp4")
        info = video_info(entry["gen_image_path"])
        assert info["frames"] == FRAMES[family] and info["prompt"] == entry["prompt"]
        assert info["fps"] == (16.0 if family == "wan" else 8.0)  # the model-card defaults
        assert read_frames(entry["gen_image_path"])[0].size == (32, 32)
    record = json.loads((out / name / "run.json").read_text())
    assert record["complete"] and record["family"] == family
    assert record["fingerprint"]["sampling"]["num_frames"] == FRAMES[family]

    again = _generate(models[family], family, out, batch_size=2)  # resume: nothing to do
    assert again["generated"] == 0 and again["skipped"] == 2
    first = Path(manifest[0]["gen_image_path"])
    first.write_bytes(first.read_bytes()[:100])  # a file truncated by a killed run is generated again
    assert _generate(models[family], family, out)["generated"] == 1

    # batch-invariant: a batch of two gives each video's frames alone, up to float rounding (before the codec,
    # which can turn a 1-level difference into a larger one)
    args = resolve_args(parse_args(["--pretrain_path", str(models[family]), "--test_json", str(out.parent / "run-prompts.json"),
                                    "--output_path", str(out), "--height", "32", "--width", "32",
                                    "--num_frames", str(FRAMES[family]), "--steps", "2"]))
    sampler, uncond = load_sampler(args, torch.device("cpu"), torch.float32)
    prompts = [p["prompt"] for p in PROMPTS]
    both = sample(sampler, prompts, uncond, args, [0, 0]).short()
    alone = torch.cat([sample(sampler, [p], uncond, args, [0]) for p in prompts]).short()
    assert both.shape == (2, FRAMES[family], 32, 32, 3) and (both - alone).abs().max() <= 1

    with pytest.raises(GenerateError, match="--fps: was"):  # another setting under the same name: one error
        _generate(models[family], family, out, fps=24)


def test_generate_refuses_bad_frames_and_image_flags(models, tmp_path):
    with pytest.raises(GenerateError, match="4k \\+ 1"):
        _generate(models["wan"], "wan", tmp_path / "a", num_frames=6)
    with pytest.raises(GenerateError, match="8k \\+ 1"):
        _generate(models["cogvideox"], "cogvideox", tmp_path / "b", num_frames=5)


def test_repeated_prompt_gets_next_seed(models, tmp_path):
    """A prompt listed twice (VBench's samples) gets seed and seed + 1: different videos; the first copy equals a
    run of the prompt alone."""
    prompts = [{"prompt": "a red cube"}, {"prompt": "a red cube"}]
    result = _generate(models["cogvideox"], "cogvideox", tmp_path / "rep", prompts=prompts)
    a, b = (e["gen_image_path"] for e in json.loads(Path(result["manifest"]).read_text()))
    other_seed = np.abs(_decoded(a) - _decoded(b)).mean()
    alone = _generate(models["cogvideox"], "cogvideox", tmp_path / "alone", prompts=prompts[:1])
    same_seed = np.abs(_decoded(a) - _decoded(json.loads(Path(alone["manifest"]).read_text())[0]["gen_image_path"])).mean()
    # mp4 is lossy: float-level batch differences can move a few pixels by several levels, so compare means
    assert same_seed < 1.0 and other_seed > 5 * same_seed


def _video_manifest(folder: Path, videos: dict[str, np.ndarray], name="set_seed0.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (prompt, frames) in enumerate(videos.items()):
        path = folder / f"{i}_32x32.mp4"
        write_mp4(frames, path, fps=8, prompt=prompt)
        entries.append({"prompt": prompt, "gen_image_path": str(path), "raw_image_path": "", "metadata": {}})
    manifest = folder / name
    manifest.write_text(json.dumps(entries))
    return manifest


def _static(value=120, n=6):
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[8:24, 8:24] = value
    return np.repeat(frame[None], n, axis=0)


def _changing(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(n)])


def test_frame_averaged_and_temporal_scores(tiny_scorers, tmp_path):
    manifest = _video_manifest(tmp_path / "v", {"a red cube": _static(), "a blue ball": _changing()})
    pick = load_scorer("pickscore", **tiny_scorers["pickscore"])
    temporal = load_scorer("temporal", **tiny_scorers["clip"])  # the CLIP score model's image tower
    result = score_manifests([manifest], [pick, temporal], frames=3)
    items = read_manifest(manifest)
    assert sample_indices(6, 3) == [0, 2, 5] and sample_indices(81, 8)[-1] == 80 and sample_indices(2, 5) == [0, 1]
    for item, got in zip(items, result[0]["scores"]["pickscore"]):
        frames = [read_frames(item.path)[i] for i in (0, 2, 5)]  # by hand: 3 evenly spaced frames, scored, averaged
        assert got == pytest.approx(float(np.mean(pick.score([item.prompt] * 3, frames))), abs=1e-6)
    static, changing = result[0]["scores"]["temporal"]
    assert static == pytest.approx(1.0, abs=1e-5)
    assert changing < 0.999
    features = temporal.embed(load_frames(items[1]))  # by hand: consecutive cosines of normalised embeddings
    expected = float(np.mean([float(features[i] @ features[i + 1]) for i in range(len(features) - 1)]))
    assert changing == pytest.approx(expected, abs=1e-5)
    # the per-item file and the table, with the metric names
    per_item = json.loads((manifest.parent / (manifest.stem + "_temporal_consistency.json")).read_text())
    assert per_item[0]["temporal_consistency"] == pytest.approx(static)
    table = json.loads((manifest.parent / (manifest.stem + "_scores.json")).read_text())
    assert [r["predictor"] for r in table["table"]] == ["PickScore", "TemporalConsistency"]
    assert default_metrics([manifest])[-1] == "temporal"

    image_manifest = tmp_path / "img.json"  # temporal on images: one clear error
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    image_manifest.write_text(json.dumps([{"prompt": "p", "gen_image_path": str(tmp_path / "x.png")}]))
    with pytest.raises(ManifestError, match="images"):
        score_manifests([image_manifest], [temporal])
    assert "temporal" not in default_metrics([image_manifest])


def test_compare_cli_on_video_manifests(tiny_scorers, tmp_path):
    a = _video_manifest(tmp_path / "a", {"a red cube": _static(200), "a blue ball": _static(90)})
    b = _video_manifest(tmp_path / "b", {"a red cube": _changing(seed=1), "a blue ball": _changing(seed=2)})
    config = tmp_path / "scorers.json"
    config.write_text(json.dumps({"pickscore": tiny_scorers["pickscore"], "clip": tiny_scorers["clip"]}))
    compare_main(["--json_a", str(a), "--json_b", str(b), "--label_a", "A", "--label_b", "B", "--outdir",
                  str(tmp_path / "out"), "--metrics", "pickscore", "clip", "temporal", "--device", "cpu",
                  "--scorer_config", str(config), "--frames", "2", "--n_bootstrap", "20"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [m["metric"] for m in summary["metrics"]] == ["PickScore", "CLIPScore", "TemporalConsistency"]
    temporal = json.loads((tmp_path / "out" / "pair_temporal.json").read_text())
    assert temporal["wins_a"] == 2 and temporal["total_pairs"] == 2  # static beats changing
    assert temporal["results"][0]["image_a"].endswith(".mp4")


# ------------------------------------------------------------------------------------------------------ VBench


def test_vbench_layout_results_and_runner(tmp_path, monkeypatch):
    from eval import vbench

    folder = tmp_path / "gen"
    folder.mkdir()
    entries = []
    for i, prompt in enumerate(["a cat", "a cat", "a dog"]):
        path = folder / f"{i}_32x32.mp4"
        write_mp4(_static(40 * i + 10, 2), path, fps=8, prompt=prompt)
        entries.append({"prompt": prompt, "gen_image_path": str(path)})
    manifest = tmp_path / "vbench_seed0_32x32_2s_5.0cfg.json"
    manifest.write_text(json.dumps(entries))

    done = vbench.layout(manifest, tmp_path / "vb")
    names = sorted(p.name for p in (tmp_path / "vb").iterdir())
    assert names == ["a cat-0.mp4", "a cat-1.mp4", "a dog-0.mp4"]  # VBench's <prompt>-<index>.mp4
    assert os.path.realpath(tmp_path / "vb" / "a cat-1.mp4") == os.path.realpath(folder / "1_32x32.mp4")
    assert done["short"] == ["a cat", "a dog"]  # fewer than VBench's 5 samples: warned
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a/b", "gen_image_path": str(folder / "0_32x32.mp4")}]))
    with pytest.raises(ManifestError, match="file name"):
        vbench.layout(bad, tmp_path / "vb2")

    # a results file in VBench's recorded format: {dimension: [mean, [{"video_path", "video_results"}, ...]]}
    results = tmp_path / "res_eval_results.json"
    per_video = [{"video_path": str(tmp_path / "vb" / n), "video_results": 0.9} for n in names]
    results.write_text(json.dumps({"subject_consistency": [0.95, per_video], "motion_smoothness": [0.98, per_video]}))
    rows = vbench.read_results(results)
    assert rows == [("subject_consistency", 0.95, 3), ("motion_smoothness", 0.98, 3)]
    stem = vbench.write_summary(rows, manifest, results)
    gathered = gather_scores([f"{stem}.json"])  # joins eval.score's tables
    assert gathered == [("vbench", "VBench:subject_consistency", "0.9500", "3"),
                        ("vbench", "VBench:motion_smoothness", "0.9800", "3")]
    results.write_text(json.dumps({"color": "n/a"}))
    with pytest.raises(ManifestError, match="numeric"):
        vbench.read_results(results)

    # the runner end to end, with a stand-in for .venv-vbench's python that writes a results file as VBench does
    fake = tmp_path / "fake-python"
    fake.write_text("#!/usr/bin/env bash\n# args: -c RUNNER videos output name device mode full_info dimensions\n"
                    "mkdir -p \"$4\"; n=$(ls \"$3\" | wc -l)\n"
                    "echo \"{\\\"dynamic_degree\\\": [0.5, [$(for i in $(seq $n); do printf '{},'; done | sed 's/,$//')]]}\""
                    " > \"$4/$5_eval_results.json\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(SystemExit, match="setup_vbench.sh"):
        vbench.main(["run", "--json_path", str(manifest), "--vbench_python", str(tmp_path / "none")])
    vbench.main(["run", "--json_path", str(manifest), "--vbench_python", str(fake), "--dimensions", "dynamic_degree",
                 "--device", "cpu"])
    table = json.loads((tmp_path / "vbench_seed0_32x32_2s_5.0cfg_vbench_scores.json").read_text())
    assert table["table"] == [{"prompt": "vbench", "predictor": "VBench:dynamic_degree", "score": 0.5, "n": 3}]


def test_prompts_build_vbench(tmp_path):
    sys.path.insert(0, str(ROOT / "prompts"))
    import build

    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([
        {"prompt_en": "a cat", "dimension": ["subject_consistency", "dynamic_degree"]},
        {"prompt_en": "a red car", "dimension": ["color"]},
        {"prompt_en": "a dog running", "dimension": ["dynamic_degree"]},
    ]))
    out = tmp_path / "prompts"
    build.main(["vbench", "--from_file", str(info), "--out_dir", str(out), "--samples_per_prompt", "2"])
    items = json.loads((out / "vbench.json").read_text())
    assert [i["prompt"] for i in items] == ["a cat", "a cat", "a red car", "a red car", "a dog running", "a dog running"]
    assert items[1]["metadata"] == {"dimension": ["subject_consistency", "dynamic_degree"], "sample": 1}
    assert set(items[0]) == {"prompt", "gen_image_path", "raw_image_path", "metadata"}
    build.main(["vbench", "--from_file", str(info), "--out_dir", str(out), "--per_dimension", "--dimensions",
                "dynamic_degree", "color"])
    assert [i["prompt"] for i in json.loads((out / "vbench-dynamic-degree.json").read_text())][::5] == \
        ["a cat", "a dog running"]  # 5 samples each by default
    assert len(json.loads((out / "vbench-color.json").read_text())) == 5
    with pytest.raises(SystemExit, match="not in"):
        build.main(["vbench", "--from_file", str(info), "--out_dir", str(out), "--dimensions", "scene"])
    with pytest.raises(SystemExit, match="--from_file"):
        build.main(["vbench", "--out_dir", str(out)])
    info.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(SystemExit, match="entry 0"):
        build.main(["vbench", "--from_file", str(info), "--out_dir", str(out), "--force"])


def test_wan_eval_script_generates_and_scores(models, tiny_scorers, tmp_path):
    """scripts/eval/test_wan.sh end to end on the tiny Wan model (its pipeline folder as the weights): mp4 per prompt
    at HEIGHTxWIDTH, then the frame-averaged metrics and temporal consistency in the gathered table."""
    import shutil
    import subprocess

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "toy.json").write_text(json.dumps(PROMPTS))
    config = tmp_path / "scorers.json"
    config.write_text(json.dumps({"clip": tiny_scorers["clip"], "temporal": tiny_scorers["clip"]}))
    out = tmp_path / "run"
    shutil.copytree(models["wan"], out)
    env = dict(os.environ, PYTHON=sys.executable, PRETRAIN=str(models["wan"]), PROMPTS_DIR=str(prompts),
               PROMPT_GROUPS="toy", SIZE="32x48", STEP="2", DEVICE="cpu", HF_HUB_OFFLINE="1",
               SCORE_ARGS=f"--scorer_config {config} --metrics clip temporal")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "eval" / "test_wan.sh"), str(out), "--num_frames", "5",
                           "--no_zip"], env=env, capture_output=True, text=True, timeout=300)
    log = (out / "joint_test_32x48.log").read_text()
    assert done.returncode == 0, log[-3000:] + done.stderr[-2000:]
    manifest = json.loads((out / "toy_seed0_32x48_2s_5.0cfg.json").read_text())
    assert len(manifest) == 2 and all(e["gen_image_path"].endswith(".mp4") for e in manifest)
    table = (out / "joint_test_32x48_table.md").read_text()
    assert "TemporalConsistency" in table and "CLIP" in table
