"""scripts/demo.sh + scripts/demo.py: every stage at smoke-test scale (--quick), and the pieces that decide what the
report says (the toy metric, the Figure-1 summaries, the verdicts). The full demo is not run here (minutes)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny import ATTRIBUTE_COLOURS, colour_score, draw_shape

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
demo = sys.modules["demo"] = importlib.util.module_from_spec(_spec)  # registered first: demo.py has a dataclass
_spec.loader.exec_module(demo)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`bash scripts/demo.sh --quick --output_dir out` from another directory, with this interpreter."""
    cwd = tmp_path_factory.mktemp("cwd")
    env = {**os.environ, "DEMO_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--quick", "--output_dir", "out"], cwd=cwd,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cwd / "out", done.stdout


def test_quick_demo_writes_the_report(quick_run):
    out, console = quick_run
    for name in ("training_curves.png", "figure1.png", "win_rates.png", "samples.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name
    report = (out / "report.md").read_text()
    for heading in ("## Was the preference learned?", "## Figure 1 at toy scale", "## A/B against the base",
                    "## Samples", "## Settings and commands"):
        assert heading in report
    for image in ("figure1.png", "training_curves.png", "win_rates.png", "samples.png"):
        assert f"]({image})" in report
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    assert results["verdicts"]["figure1"] in report and results["verdicts"]["figure1"] in console
    assert "the report is" in console and str(out / "report.md") in console


def test_quick_demo_numbers_come_from_its_runs(quick_run):
    out, _ = quick_run
    work, results = out / "work", json.loads((out / "results.json").read_text())
    settings = results["settings"]
    for run in ("dpo", "sdpo"):
        metrics = demo.read_metrics(work / run)
        assert [m["step"] for m in metrics] == list(range(1, settings["pref_steps"] + 1))
        for key, summary in results["figure1"][run].items():
            assert summary == pytest.approx(demo.phase_means(metrics, key))
        assert (work / run / "unet.pth").is_file()
    assert all(m["avg_lose_l_scale"] == 1.0 for m in demo.read_metrics(work / "dpo"))  # no safeguard: lambda 1
    assert all(0.0 <= m["avg_lose_l_scale"] <= 1.0 for m in demo.read_metrics(work / "sdpo"))

    n = settings["seeds"] * 4
    for model, manifest in results["ab"]["dpo"]["metrics"].items():
        assert manifest["total_pairs"] == n, model
    for model in ("base", "dpo", "sdpo"):
        entries = json.loads(Path(json.loads((out / "results.json").read_text())["ab"]["dpo"]["dir"]).parent.parent
                             .joinpath("generations", model, f"toy_{settings['seeds']}seeds.json").read_text())
        assert len(entries) == n and sorted({e["metadata"]["seed"] for e in entries}) == list(range(settings["seeds"]))
        scores = [colour_score(Image.open(e["gen_image_path"])) for e in entries]
        assert results["absolute"][model]["Colour"] == pytest.approx(np.mean(scores))
        assert results["absolute"][model]["warm_fraction"] == pytest.approx(np.mean(np.array(scores) > 0))
        for metric in ("PickScore", "HPSv2", "AesScore", "CLIPScore", "ImageReward"):
            assert np.isfinite(results["absolute"][model][metric])


def test_colour_scorer_is_the_toy_metric():
    warm = draw_shape("circle", ATTRIBUTE_COLOURS["preferred"], (32, 32))
    cool = draw_shape("circle", ATTRIBUTE_COLOURS["rejected"], (32, 32))
    scores = demo.ColourScorer().score(["a circle", "a circle"], [warm, cool])
    assert scores == pytest.approx([colour_score(warm), colour_score(cool)], abs=1e-6)
    assert scores[0] > 0 > scores[1]


def test_phase_means_and_smoothing():
    metrics = [{"x": float(v)} for v in [-1, -1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 4]]  # 12 steps
    summary = demo.phase_means(metrics, "x")
    assert summary == {"first": -1.0, "last": pytest.approx(8 / 3), "max": 4.0, "fraction_above_zero": 4 / 12}
    assert demo.smooth([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def _figure1(dpo_win, sdpo_win):
    def summary(last):
        return {"first": 0.0, "last": last, "max": max(last, 0.0), "fraction_above_zero": 0.5}

    return {"dpo": {"avg_win_diff_loss": summary(dpo_win), "avg_lose_diff_loss": summary(0.3)},
            "sdpo": {"avg_win_diff_loss": summary(sdpo_win), "avg_lose_diff_loss": summary(0.05)}}


def _results(dpo_colour, p_value):
    def ab(rate):
        stats = {"win_rate_a_over_b": rate, "win_rate_ci95": [rate - 0.1, rate], "sign_test_p_value": p_value}
        return {"Colour": stats}

    def absolute(colour):
        return {"Colour": colour, "warm_fraction": 0.5}

    return {"absolute": {"base": absolute(0.0), "dpo": absolute(dpo_colour), "sdpo": absolute(0.2)},
            "ab": {"dpo": {"metrics": ab(0.9 if dpo_colour > 0 else 0.4)}, "sdpo": {"metrics": ab(0.9)}}}


def test_verdicts_follow_the_numbers():
    said = demo.verdicts(_results(0.3, 1e-6), _figure1(dpo_win=0.15, sdpo_win=-0.004))
    assert said["dpo_learned"] and said["sdpo_learned"]
    assert said["figure1_dpo_winner_rose"] and said["figure1_safeguard_winner_at_or_below_zero"]
    assert "the winner's error rose along with the loser's" in said["figure1"]
    assert "stayed at or below zero" in said["figure1"]

    said = demo.verdicts(_results(-0.1, 0.3), _figure1(dpo_win=-0.01, sdpo_win=0.02))
    assert not said["dpo_learned"] and "NOT learned" in said["dpo_preference"]
    assert not said["figure1_dpo_winner_rose"] and "did NOT rise" in said["figure1"]
    assert not said["figure1_safeguard_winner_at_or_below_zero"] and "did NOT stay at or below zero" in said["figure1"]


def test_a_trained_unet_pth_feeds_the_eval_script(quick_run):
    """The chain train.py -> unet.pth -> scripts/eval/test_sd15.sh, as the report shows it (fewer steps, one metric)."""
    out, _ = quick_run
    work = out / "work"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PRETRAIN": str(work / "model"), "SIZE": "32", "STEP": "2", "CFG": "3.0", "PROMPTS_DIR": str(work),
           "PROMPT_GROUPS": "toy",
           "SCORE_ARGS": f"--metrics clip --scorer_config {work / 'scorers' / 'scorer_config.json'}"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "eval" / "test_sd15.sh"), "work/dpo/unet.pth"], cwd=out,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (work / "dpo" / "toy_seed0_32x32_2s_3.0cfg.json").is_file()
    finals = [line.split() for line in done.stdout.splitlines() if line.startswith("FinalResults")]
    assert [(f[1], f[3]) for f in finals] == [("CLIPScore", "toy")]  # one tiny metric: the chain, not the scorers
    report = (out / "report.md").read_text()
    assert "PRETRAIN=" in report and "bash scripts/eval/test_sd15.sh" in report
