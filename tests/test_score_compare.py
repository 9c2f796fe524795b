"""eval.score / eval.compare / scripts/eval/test_vs.sh: pairing, win/tie arithmetic, statistics, output formats, errors.

The arithmetic tests use PixelScorer, a test double whose score is a known function of the image pixels (the mean
of one colour channel), so every expected number is computed by hand. The real (tiny) scorers run end to end once.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.compare import bootstrap_ci, compare_manifests, sign_test_p, summarize, win_stats
from eval.manifest import ManifestError, pair_items, read_manifest
from eval.score import gather_log, score_manifest, score_manifests

REPO = Path(__file__).resolve().parent.parent
METRIC_TOKENS = {"pickscore": "PickScore", "hpsv2": "HPSv2", "aesthetics": "AesScore", "clip": "CLIPScore",
                 "imagereward": "ImageReward"}


class PixelScorer:
    """Scorer double: score = mean of colour channel `channel` of the image (0-255)."""

    def __init__(self, name="pickscore", channel=0):
        self.name, self.metric, self.channel, self.calls = name, METRIC_TOKENS[name], channel, []

    def score(self, prompts, images):
        assert len(prompts) == len(images)
        self.calls.append(len(images))
        return [float(np.asarray(im)[..., self.channel].mean()) for im in images]


def make_run(root: Path, name: str, prompts, values, path_style="cwd"):
    """Official-format manifest `<root>/<name>.json` of solid images `<root>/<name>/<i>_8x8.png`, colour (v, 2v%256, 7).

    path_style: "cwd" = path relative to the CWD (tests chdir to root), "abs", "list" = [ "", path ].
    """
    (root / name).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (prompt, v) in enumerate(zip(prompts, values)):
        rel = f"{name}/{i}_8x8.png"
        Image.new("RGB", (8, 8), (v, (2 * v) % 256, 7)).save(root / rel)
        image = {"cwd": rel, "abs": str(root / rel), "list": ["", rel]}[path_style]
        entries.append({"prompt": prompt, "gen_image_path": image, "raw_image_path": "", "metadata": {}})
    path = root / f"{name}.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A and B with duplicates, a tie, surplus items and prompts unique to each side. Pairs (sorted prompts):
    a: A0=100 vs B0=50 (A wins), A1=80 vs B2=80 (tie), [A's 3rd "a" = 255 dropped]; b: 10 vs 200 (B wins);
    c: 30 vs 20 (A wins), [B's 2nd "c" = 0 dropped]; "onlyA" / "onlyB" unmatched."""
    monkeypatch.chdir(tmp_path)
    a = make_run(tmp_path, "papv2_seed0_A", ["b", "a", "a", "a", "c", "onlyA"], [10, 100, 80, 255, 30, 99])
    b = make_run(tmp_path, "papv2_seed0_B", ["a", "b", "a", "c", "c", "onlyB"], [50, 200, 80, 20, 0, 99])
    return a, b


PAIR_KEYS = ["model_a", "model_b", "total_pairs", "wins_a", "wins_b", "ties", "win_rate_a_over_b", "mean_score_a",
             "mean_score_b", "ties_policy"]
EXTRA_KEYS = ["sign_test_p_value", "win_rate_ci95", "bootstrap_resamples", "bootstrap_seed", "json_a", "json_b",
              "pairing", "dropped", "unmatched_a", "unmatched_b"]


def test_pairing_wins_ties_and_console(runs, tmp_path, capsys):
    a, b = runs
    scorer = PixelScorer("pickscore")
    summary = compare_manifests(a, b, [scorer], "LA", "LB", tmp_path / "out", batch_size=2, n_bootstrap=200)
    out = capsys.readouterr().out
    d = json.loads((tmp_path / "out" / "pair_pickscore.json").read_text())
    assert list(d) == PAIR_KEYS + EXTRA_KEYS + ["results"]
    assert (d["total_pairs"], d["wins_a"], d["wins_b"], d["ties"]) == (4, 2, 1, 1)
    assert d["win_rate_a_over_b"] == 2.5 / 4 and d["ties_policy"] == "half"
    assert d["mean_score_a"] == (100 + 80 + 10 + 30) / 4 and d["mean_score_b"] == (50 + 80 + 200 + 20) / 4
    assert (d["pairing"], d["dropped"], d["unmatched_a"], d["unmatched_b"]) == ("prompt", 2, 1, 1)
    assert [(r["prompt"], r["image_a"], r["image_b"], r["score_a"], r["score_b"], r["winner"]) for r in d["results"]] == [
        ("a", "papv2_seed0_A/1_8x8.png", "papv2_seed0_B/0_8x8.png", 100, 50, "LA"),
        ("a", "papv2_seed0_A/2_8x8.png", "papv2_seed0_B/2_8x8.png", 80, 80, "tie"),
        ("b", "papv2_seed0_A/0_8x8.png", "papv2_seed0_B/1_8x8.png", 10, 200, "LB"),
        ("c", "papv2_seed0_A/4_8x8.png", "papv2_seed0_B/3_8x8.png", 30, 20, "LA"),
    ]
    assert [r["pair_index"] for r in d["results"]] == [0, 1, 2, 3]
    assert scorer.calls == [2, 2, 2, 2]  # A images then B images, in batches of --batch_size
    for line in ["Total pairs: 4", "Model A: LA", "Model B: LB", "Mean PickScore -> LA: 55.000000 | LB: 87.500000",
                 "Wins -> LA: 2 | LB: 1 | ties: 1", "Win rate LA over LB (ties=0.5): 62.50%",
                 "[INFO] Aligned on 4 pairs; dropped 2 surplus items of duplicated prompts."]:
        assert line in out.splitlines()
    assert summary["metrics"][0]["win_rate_a_over_b"] == 0.625


def test_ties_as_loss_for_a(runs, tmp_path, capsys):
    a, b = runs
    compare_manifests(a, b, [PixelScorer()], "LA", "LB", tmp_path / "out", ties_as_loss_for_a=True, n_bootstrap=100)
    d = json.loads((tmp_path / "out" / "pair_pickscore.json").read_text())
    assert d["win_rate_a_over_b"] == 2 / 4 and d["ties_policy"] == "loss_for_a"
    out = capsys.readouterr().out
    assert "Win rate LA over LB (ties=0): 50.00%" in out
    assert "Pair: LA  vs  LB   (ties policy: loss_for_a)" in out


def test_statistics_in_pair_json(runs, tmp_path):
    a, b = runs
    compare_manifests(a, b, [PixelScorer()], "LA", "LB", tmp_path / "out", n_bootstrap=500, seed=3)
    d = json.loads((tmp_path / "out" / "pair_pickscore.json").read_text())
    assert d["sign_test_p_value"] == 1.0  # 2 wins vs 1 loss (tie excluded): 2 * P(X <= 1 | n=3) = 2 * 4/8
    assert d["win_rate_ci95"] == list(bootstrap_ci([1, 0.5, 0, 1], 500, 3))
    assert (d["bootstrap_resamples"], d["bootstrap_seed"]) == (500, 3)


def test_sign_test_by_hand():
    assert sign_test_p(7, 1) == pytest.approx(2 * (1 + 8) / 2 ** 8)  # 2 * P(X <= 1), X ~ Bin(8, 1/2)
    assert sign_test_p(1, 7) == pytest.approx(2 * 9 / 256)
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(0, 0) is None  # all ties: no test
    # ties are excluded: win_stats passes only wins to the test
    assert win_stats([1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0], n_bootstrap=10)["sign_test_p_value"] == pytest.approx(2 / 32)


def test_bootstrap_by_hand():
    # the documented procedure, written as a plain loop, gives identical numbers (also across internal chunks)
    rng = np.random.default_rng(7)
    credits = np.array([1.0] * 600 + [0.5] * 100 + [0.0] * 300)
    rates = [credits[rng.integers(0, len(credits), len(credits))].mean() for _ in range(5000)]
    assert bootstrap_ci(credits, 5000, seed=7) == tuple(np.percentile(rates, [2.5, 97.5]))
    # degenerate and exactly known distributions
    assert bootstrap_ci([1.0] * 5, 100) == (1.0, 1.0)
    assert bootstrap_ci([1.0, 0.0], 2000) == (0.0, 1.0)  # resampled rate in {0, .5, 1} w.p. 1/4, 1/2, 1/4
    # 6 wins / 4 losses: resampled rate ~ Bin(10, 0.6)/10, whose 2.5% / 97.5% quantiles are 0.3 / 0.9
    lo, hi = bootstrap_ci([1.0] * 6 + [0.0] * 4, 20000, seed=1)
    assert (lo, hi) == (0.3, 0.9)
    # seeded: same seed, same interval; another seed, (almost surely) another
    assert bootstrap_ci(credits, 300, seed=1) == bootstrap_ci(credits, 300, seed=1) != bootstrap_ci(credits, 300, seed=2)


def test_index_fallback_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a = make_run(tmp_path, "A", ["x1", "x2", "x3"], [1, 5, 9])
    b = make_run(tmp_path, "B", ["y1", "y2", "y3"], [2, 5, 3])
    compare_manifests(a, b, [PixelScorer("clip")], "A", "B", tmp_path / "out", n_bootstrap=10)
    assert "[WARN] No exact prompt matches. Falling back to index-wise pairing." in capsys.readouterr().out
    d = json.loads((tmp_path / "out" / "pair_clip.json").read_text())
    assert d["pairing"] == "index" and [r["prompt"] for r in d["results"]] == ["x1", "x2", "x3"]
    assert (d["wins_a"], d["wins_b"], d["ties"]) == (1, 1, 1)

    c = make_run(tmp_path, "C", ["z1", "z2"], [1, 2])  # disjoint and of another length
    with pytest.raises(ManifestError, match=r"share no prompt and have different lengths \(3 vs 2\)"):
        compare_manifests(a, c, [PixelScorer()], outdir=tmp_path / "x")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ManifestError, match="no usable entries"):
        compare_manifests(empty, b, [PixelScorer()], outdir=tmp_path / "x")
    not_list = tmp_path / "dict.json"
    not_list.write_text('{"prompt": "x"}')
    with pytest.raises(ManifestError, match="must be a JSON list"):
        compare_manifests(not_list, b, [PixelScorer()], outdir=tmp_path / "x")


def test_missing_images_one_error_before_scoring(runs, tmp_path):
    a, b = runs
    for rel in ["papv2_seed0_A/1_8x8.png", "papv2_seed0_A/4_8x8.png", "papv2_seed0_B/1_8x8.png"]:
        (tmp_path / rel).unlink()
    scorer = PixelScorer()
    with pytest.raises(ManifestError) as err:
        compare_manifests(a, b, [scorer], "LA", "LB", tmp_path / "out")
    msg = str(err.value)
    assert "2 of 4 images listed in" in msg and "1 of 4 images listed in" in msg
    for rel in ["papv2_seed0_A/1_8x8.png", "papv2_seed0_A/4_8x8.png", "papv2_seed0_B/1_8x8.png"]:
        assert rel in msg
    assert scorer.calls == [] and not (tmp_path / "out").exists()
    with pytest.raises(ManifestError) as err:  # score.py: every missing image of every manifest in one error
        score_manifests([a, b], [scorer])
    assert "2 of 6 images listed in" in str(err.value) and "1 of 6 images listed in" in str(err.value)


def test_corrupt_image_named(runs, tmp_path):
    a, b = runs
    (tmp_path / "papv2_seed0_B/3_8x8.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ManifestError, match=r"cannot read image .*papv2_seed0_B/3_8x8.png \(manifest entry 3\)"):
        compare_manifests(a, b, [PixelScorer()], "LA", "LB", tmp_path / "out")


def test_summary_formats(runs, tmp_path, capsys):
    a, b = runs
    scorers = [PixelScorer(name, channel=1 if name == "clip" else 0) for name in METRIC_TOKENS]
    summary = compare_manifests(a, b, scorers, "LA", "LB", tmp_path / "out", n_bootstrap=100)
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == summary
    assert list(saved) == ["pair", "metrics", "averages"]
    assert saved["pair"] == {"model_a": "LA", "model_b": "LB", "ties_policy": "half"}
    assert [r["metric"] for r in saved["metrics"]] == ["PickScore", "HPSv2", "CLIPScore", "AesScore", "ImageReward"]
    for r in saved["metrics"]:
        assert list(r) == ["metric", "mean_a", "mean_b", "win_rate_a_over_b", "wins_a", "wins_b", "ties", "total_pairs"]
    assert list(saved["averages"]) == ["macro_win_rate_a_over_b", "micro_win_rate_a_over_b"]
    # channel 1 = 2v mod 256: pairs (200,100) A, (160,160) tie, (20,144) B, (60,40) A -> same counts as channel 0
    clip = saved["metrics"][2]
    assert (clip["mean_a"], clip["mean_b"], clip["wins_a"], clip["ties"]) == ((200 + 160 + 20 + 60) / 4, (100 + 160 + 144 + 40) / 4, 2, 1)
    assert saved["averages"] == {"macro_win_rate_a_over_b": 0.625, "micro_win_rate_a_over_b": 0.625}
    lines = out.splitlines()
    table = ["| Metric       |  A mean  |  B mean  |  A win rate  | Wins/Ties/Losses |   n  |",
             "|--------------|----------|----------|--------------|------------------|------|",
             "| PickScore    | 55.000000 | 87.500000 |  62.50%     | 2/1/1         |    4 |",
             "| HPSv2        | 55.000000 | 87.500000 |  62.50%     | 2/1/1         |    4 |",
             "| CLIPScore    | 110.000000 | 111.000000 |  62.50%     | 2/1/1         |    4 |"]
    i = lines.index(table[0])
    assert lines[i : i + 5] == table
    assert lines[i + 7 : i + 9] == ["|--------------|----------|----------|--------------|------------------|------|",
                                    "| Average      |        - |        - |  62.50%     | -                  |    - |"]
    assert "Pair: LA  vs  LB   (ties policy: half)" in lines
    assert "Macro avg win rate (unweighted across 5 metrics): 62.50%" in lines
    assert "Micro avg win rate (weighted by #pairs):         62.50%" in lines
    md = (tmp_path / "out" / "summary.md").read_text()
    assert table[2] in md and "| Metric | A win rate | 95% CI | sign-test p | n |" in md
    assert (tmp_path / "out" / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ["pickscore", "hpsv2", "aesthetics", "clip", "imagereward"]:
        assert (tmp_path / "out" / f"pair_{name}.json").is_file()


def test_macro_micro_with_different_n(runs, tmp_path, capsys):
    a, b = runs  # 4 pairs, win rate 0.625
    compare_manifests(a, b, [PixelScorer("pickscore")], "LA", "LB", tmp_path / "out", n_bootstrap=10)
    c = make_run(tmp_path, "C", ["p", "q"], [1, 1])
    d = make_run(tmp_path, "D", ["p", "q"], [2, 2])  # 2 pairs, both lost: win rate 0
    compare_manifests(c, d, [PixelScorer("hpsv2")], "LA", "LB", tmp_path / "out", n_bootstrap=10)
    summary = summarize(tmp_path / "out")
    assert [r["total_pairs"] for r in summary["metrics"]] == [4, 2]
    assert summary["averages"]["macro_win_rate_a_over_b"] == pytest.approx((0.625 + 0) / 2)
    assert summary["averages"]["micro_win_rate_a_over_b"] == pytest.approx((0.625 * 4 + 0 * 2) / 6)
    assert "Macro avg win rate (unweighted across 2 metrics): 31.25%" in capsys.readouterr().out


def test_summarize_official_pair_files(tmp_path):
    """summary over pair files written by the official scripts (no statistics fields) still works."""
    rows = {"pair_pickscore.json": (0.21, 0.2, 0.6, 6, 4, 0, 10), "pair_aesthetics.json": (5.5, 5.4, 0.55, 5, 4, 1, 10)}
    for fname, (ma, mb, wr, wa, wb, t, n) in rows.items():
        (tmp_path / fname).write_text(json.dumps({
            "model_a": "x/y/a.json", "model_b": "x/y/b.json", "total_pairs": n, "wins_a": wa, "wins_b": wb, "ties": t,
            "win_rate_a_over_b": wr, "mean_score_a": ma, "mean_score_b": mb, "ties_policy": "half", "results": []}))
    s = summarize(tmp_path)
    assert [r["metric"] for r in s["metrics"]] == ["PickScore", "AesScore"]
    assert s["averages"]["macro_win_rate_a_over_b"] == pytest.approx(0.575)
    assert (tmp_path / "win_rates.png").is_file()
    with pytest.raises(ManifestError, match="no pair_"):
        summarize(tmp_path / "nothing")


def test_default_labels_and_list_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "exp" / "run1"
    a = make_run(root, "papv2_A", ["p", "q"], [9, 9], path_style="abs")
    b = make_run(root, "papv2_B", ["p", "q"], [1, 9], path_style="list")  # relative to the manifest's dir, in a list
    summary = compare_manifests(a, b, [PixelScorer()], outdir=tmp_path / "out", n_bootstrap=10)
    assert summary["pair"]["model_a"] == "exp/run1/papv2_A.json"
    assert summary["pair"]["model_b"] == "exp/run1/papv2_B.json"
    d = json.loads((tmp_path / "out" / "pair_pickscore.json").read_text())
    assert d["results"][0]["image_b"] == "papv2_B/0_8x8.png" and d["results"][0]["winner"] == "exp/run1/papv2_A.json"


def test_image_path_resolution(tmp_path, monkeypatch):
    """CWD first, then the manifest's directory, then <manifest dir>/<run folder>/<file> (moved result folders)."""
    out = tmp_path / "results"
    make_run(out, "papv2_run", ["p"], [1])
    entries = [{"prompt": "p", "gen_image_path": p} for p in
               ["papv2_run/0_8x8.png", "/elsewhere/output/papv2_run/0_8x8.png", "output/papv2_run/0_8x8.png"]]
    (out / "m.json").write_text(json.dumps(entries))
    monkeypatch.chdir(tmp_path)
    items = read_manifest(out / "m.json")
    assert [it.path for it in items] == [out / "papv2_run/0_8x8.png"] * 3
    monkeypatch.chdir(out)  # now the CWD-relative candidate is found first
    assert read_manifest(out / "m.json")[0].path == Path("papv2_run/0_8x8.png")
    (out / "bad.json").write_text(json.dumps([{"prompt": 3, "gen_image_path": "x.png"}]))
    with pytest.raises(ManifestError, match="without a string 'prompt'"):
        read_manifest(out / "bad.json", strict=True)
    assert read_manifest(out / "bad.json", strict=False) == []


def test_pair_items_duplicates_k_th_with_k_th(tmp_path):
    from eval.manifest import Item

    A = [Item(i, p, f"a{i}") for i, p in enumerate(["x", "y", "x", "x"])]
    B = [Item(i, p, f"b{i}") for i, p in enumerate(["x", "x", "y", "y"])]
    pairs = pair_items(A, B)
    assert [(ia.image, ib.image) for ia, ib in zip(pairs.a, pairs.b)] == [("a0", "b0"), ("a2", "b1"), ("a1", "b2")]
    assert (pairs.dropped, pairs.unmatched_a, pairs.unmatched_b) == (2, 0, 0)


# ----------------------------------------------------------------------------------------------- eval.score
def test_score_manifest_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest = make_run(tmp_path, "papv2_seed0_512x512_50s_7.5cfg", ["p0", "p1", "p0"], [10, 20, 33])
    original = json.loads(manifest.read_text())
    res = score_manifest(manifest, [PixelScorer("pickscore"), PixelScorer("imagereward", channel=1)], batch_size=2)
    out = capsys.readouterr().out
    assert res["group"] == "papv2" and res["total"] == 3
    assert res["means"] == {"PickScore": 21.0, "ImageReward": (20 + 40 + 66) / 3}
    assert "total len of test data : 3" in out.splitlines()
    finals = [l for l in out.splitlines() if l.startswith("FinalResults")]
    assert finals == ["FinalResults PickScore for papv2 : 21.0000", "FinalResults ImageReward for papv2 : 42.0000"]
    assert all(re.fullmatch(r"FinalResults \S+ for \S+ : -?\d+\.\d{4}", l) for l in finals)
    pick = json.loads((tmp_path / "papv2_seed0_512x512_50s_7.5cfg_pickscore.json").read_text())
    assert pick == [dict(e, pick_score=v) for e, v in zip(original, [10.0, 20.0, 33.0])]
    ir = json.loads((tmp_path / "papv2_seed0_512x512_50s_7.5cfg_image_reward_score.json").read_text())
    assert [e["image_reward_score"] for e in ir] == [20.0, 40.0, 66.0]
    md = (tmp_path / "papv2_seed0_512x512_50s_7.5cfg_scores.md").read_text()
    assert md == ("| Prompt | Predictor | Score | n |\n| --- | --- | --- | --- |\n| papv2 | PickScore | 21.0000 | 3 |\n"
                  "| papv2 | ImageReward | 42.0000 | 3 |\n")
    table = json.loads((tmp_path / "papv2_seed0_512x512_50s_7.5cfg_scores.json").read_text())
    assert table["table"] == [{"prompt": "papv2", "predictor": "PickScore", "score": 21.0, "n": 3},
                              {"prompt": "papv2", "predictor": "ImageReward", "score": 42.0, "n": 3}]
    assert table["means"]["ImageReward"] == pytest.approx(42.0) and table["total"] == 3


def test_score_several_manifests_official_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    m1 = make_run(tmp_path, "papv2_x", ["a"], [1])
    m2 = make_run(tmp_path, "hpsv2_x", ["a", "b"], [2, 4])
    score_manifests([m1, m2], (PixelScorer(n) for n in ["pickscore", "hpsv2"]), output_dir=tmp_path / "o")
    finals = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("FinalResults", "total len"))]
    assert finals == ["total len of test data : 1", "FinalResults PickScore for papv2 : 1.0000",
                      "FinalResults HPSv2 for papv2 : 1.0000", "total len of test data : 2",
                      "FinalResults PickScore for hpsv2 : 3.0000", "FinalResults HPSv2 for hpsv2 : 3.0000"]
    assert json.loads((tmp_path / "o" / "hpsv2_x_hpsv2score.json").read_text())[1]["hpsv2_score"] == 4.0


def test_score_errors(tmp_path, monkeypatch):
    from eval.score import main

    monkeypatch.chdir(tmp_path)
    m = make_run(tmp_path, "papv2_x", ["a", "b", "c"], [1, 2, 3])
    (tmp_path / "papv2_x/0_8x8.png").unlink()
    (tmp_path / "papv2_x/2_8x8.png").unlink()
    with pytest.raises(SystemExit) as err:  # the CLI: one message, no traceback, before any model is loaded
        main(["--json_path", str(m), "--device", "cpu"])
    assert str(err.value).startswith("error: 2 of 3 images listed in")
    assert "entry 0: 'papv2_x/0_8x8.png'" in str(err.value) and "entry 2: 'papv2_x/2_8x8.png'" in str(err.value)
    empty = tmp_path / "papv2_empty.json"
    empty.write_text("[]")
    with pytest.raises(ManifestError, match="has no entries"):
        score_manifest(empty, [PixelScorer()])
    with pytest.raises(SystemExit, match="manifest not found"):
        main(["--json_path", "nope.json"])


def test_gather_log(tmp_path, capsys):
    log = tmp_path / "joint_test_512.log"
    log.write_text("-> load x\ntotal len of test data : 487\nTotal Pick score: 0.21\n  FinalResults PickScore for papv2 : 0.2134\n"
                   "Testing: 100%|####|\nFinalResults HPSv2 for papv2 : 0.2701\nnot FinalResults X for y : 1\n"
                   "Total ImageReward score: -0.12  over 1632 samples\nFinalResults ImageReward for partiprompts : -0.1234\n")
    rows = gather_log(log)
    assert rows == [("papv2", "PickScore", "0.2134", "487"), ("papv2", "HPSv2", "0.2701", "487"),
                    ("partiprompts", "ImageReward", "-0.1234", "1632")]
    expected = ("| Prompt | Predictor | Score | n |\n| --- | --- | --- | --- |\n| papv2 | PickScore | 0.2134 | 487 |\n"
                "| papv2 | HPSv2 | 0.2701 | 487 |\n| partiprompts | ImageReward | -0.1234 | 1632 |\n")
    assert capsys.readouterr().out == "\n\n\n" + expected
    assert (tmp_path / "joint_test_512_table.md").read_text() == expected
    assert json.loads((tmp_path / "joint_test_512_table.json").read_text())["table"][2] == {
        "prompt": "partiprompts", "predictor": "ImageReward", "score": -0.1234, "n": 1632}


# ----------------------------------------------------------------------------------------------- test_vs.sh
def test_vs_sh_arguments(tmp_path):
    """The shell wrapper with a stub python: labels/paths echoed right (B8), run dir created, args passed on."""
    stub = tmp_path / "stub-python"
    stub.write_text('#!/usr/bin/env bash\necho "CWD=$PWD"\nprintf "ARG=%s\\n" "$@"\n')
    stub.chmod(0o755)
    (tmp_path / "cfg.json").write_text("{}")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "cfg.json").write_text("{}")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/eval/test_vs.sh"), "--json_a", "a/A.json", "--json_b", "b/B.json",
         "--label_a", "base", "--label_b", "sdpo", "--outdir", "vs", "--ties_as_loss_for_a",
         "--scorer_config", "cfg.json", "--device", "cpu"],
        cwd=cwd, env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True, check=True)
    out = proc.stdout.splitlines()
    assert "Json_A: a/A.json" in out and "Json_B: b/B.json" in out and "Label_B: sdpo" in out
    assert f"CWD={REPO}" in out
    args = [l[4:] for l in out if l.startswith("ARG=")]
    (run,) = list((cwd / "vs").iterdir())
    assert re.fullmatch(r"base_vs_sdpo_\d{4}-\d{6}", run.name)
    assert args[:12] == ["-m", "eval.compare", "--json_a", str(cwd / "a/A.json"), "--json_b", str(cwd / "b/B.json"),
                         "--label_a", "base", "--label_b", "sdpo", "--batch_size", "64"]
    assert args[args.index("--outdir") + 1] == str(run)
    assert args[args.index("--metrics") + 1 : args.index("--metrics") + 6] == [
        "pickscore", "hpsv2", "aesthetics", "clip", "imagereward"]
    assert args[-5:] == ["--device", "cpu", "--ties_as_loss_for_a", "--scorer_config", str(cwd / "cfg.json")]
    bad = subprocess.run(["bash", str(REPO / "scripts/eval/test_vs.sh"), "--json_a", "x"], cwd=cwd,
                         env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True)
    assert bad.returncode != 0 and "Usage:" in bad.stderr


# ------------------------------------------------------------------------------------- end to end, tiny models
@pytest.fixture(scope="module")
def tiny_scorer_config(tmp_path_factory):
    tiny = pytest.importorskip("tiny.scorers")
    return tiny.build_tiny_scorers(tmp_path_factory.mktemp("tiny-scorers"))


def test_end_to_end_tiny_scorers(tiny_scorer_config, tmp_path, capsys):
    """Score and compare through the real scorer stack (tiny random models), via the CLIs."""
    from eval.compare import main as compare_main
    from eval.score import main as score_main

    rng = np.random.default_rng(0)
    prompts = ["a red cube", "a blue ball", "a red cube", "two cats"]
    runs = []
    for name in ["papv2_A", "papv2_B"]:
        (tmp_path / name).mkdir()
        entries = []
        for i, p in enumerate(prompts):
            path = tmp_path / name / f"{i}_40x40.png"
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
            entries.append({"prompt": p, "gen_image_path": str(path), "raw_image_path": "", "metadata": {}})
        (tmp_path / f"{name}.json").write_text(json.dumps(entries))
        runs.append(tmp_path / f"{name}.json")
    cfg = tmp_path / "scorers.json"
    cfg.write_text(json.dumps(tiny_scorer_config))

    score_main(["--json_path", str(runs[0]), "--device", "cpu", "--batch_size", "4", "--scorer_config", str(cfg)])
    finals = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FinalResults")]
    assert [l.split()[1] for l in finals] == ["PickScore", "HPSv2", "AesScore", "CLIPScore", "ImageReward"]
    assert all(re.fullmatch(r"FinalResults \S+ for papv2 : -?\d+\.\d{4}", l) for l in finals)
    ir = json.loads((tmp_path / "papv2_A_image_reward_score.json").read_text())
    assert len(ir) == 4 and all(isinstance(e["image_reward_score"], float) for e in ir)

    out = tmp_path / "vs"
    compare_main(["--json_a", str(runs[0]), "--json_b", str(runs[1]), "--label_a", "A", "--label_b", "B",
                  "--device", "cpu", "--batch_size", "4", "--scorer_config", str(cfg), "--outdir", str(out),
                  "--n_bootstrap", "200", "--metrics", "imagereward", "pickscore"])
    summary = json.loads((out / "summary.json").read_text())
    assert [r["metric"] for r in summary["metrics"]] == ["PickScore", "ImageReward"]  # official summary order
    # the pair file's scores are the absolute scores of the same images (same model, same pairing)
    pick_abs = [e["pick_score"] for e in json.loads((tmp_path / "papv2_A_pickscore.json").read_text())]
    pair = json.loads((out / "pair_pickscore.json").read_text())
    by_image = {r["image_a"]: r["score_a"] for r in pair["results"]}
    assert [by_image[str(tmp_path / "papv2_A" / f"{i}_40x40.png")] for i in range(4)] == pytest.approx(pick_abs, abs=1e-5)
    assert pair["total_pairs"] == 4 and pair["wins_a"] + pair["wins_b"] + pair["ties"] == 4


def test_no_bootstrap(runs, tmp_path, capsys):
    a, b = runs
    compare_manifests(a, b, [PixelScorer()], "LA", "LB", tmp_path / "out", n_bootstrap=0)
    d = json.loads((tmp_path / "out" / "pair_pickscore.json").read_text())
    assert d["win_rate_ci95"] is None and d["sign_test_p_value"] == 1.0
    out = capsys.readouterr().out
    assert "Bootstrap 95% CI: not computed | sign test p = 1" in out
    assert "| PickScore | 62.50% | - | 1 | 4 |" in out


def test_offline_without_scorer_weights_fails_at_once_naming_option_and_command(runs, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: eval.score stops before loading a model, with one line
    naming the option for a local copy and the `hf download` command (no retries, no connection traceback); the hub
    unreachable (no offline flag) gives the same line."""
    from huggingface_hub import constants

    import eval.scorers
    from eval.score import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = []
    monkeypatch.setattr(eval.scorers.PickScoreScorer, "__init__", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as exited:
        main(["--json_path", str(runs[0]), "--metrics", "pickscore", "clip", "--device", "cpu"])
    message = str(exited.value.code)
    assert not loaded and "\n" not in message and message.startswith("error: the Hugging Face hub is offline")
    assert "pickscore needs yuvalkirstain/PickScore_v1 (or a local copy: --pickscore_path)" in message
    assert "hf download yuvalkirstain/PickScore_v1" in message
    with pytest.raises(SystemExit) as exited:
        main(["--json_path", str(runs[0]), "--metrics", "clip", "--device", "cpu"])
    assert "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K open_clip_pytorch_model.bin" in str(exited.value.code)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(eval.scorers, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SystemExit) as exited:
        main(["--json_path", str(runs[0]), "--metrics", "hpsv2", "--device", "cpu"])
    assert "hub is unreachable" in str(exited.value.code) and "hf download xswu/HPSv2 HPS_v2_compressed.pt" in str(exited.value.code)
    local = tmp_path / "hps.pt"  # a local copy needs no hub: the check lets the loader run
    local.write_bytes(b"")
    eval.scorers.check_hub_weights({"hpsv2": {"model_path": str(local), "device": "cpu"}})


def test_one_metric_naming_and_the_group_is_the_prompt_file():
    """eval.compare's names are the scorers' (eval.score's FinalResults tokens); a manifest of prompts_vid.json is
    group prompts_vid, the official names keep theirs; a TemporalConsistency row keeps the summary aligned."""
    from eval.compare import PAIR_FILES, summary_text
    from eval.manifest import group_name
    from eval.scorers import _SCORERS

    assert {key: name for key, (name, _) in PAIR_FILES.items()} == {key: cls.metric for key, cls in _SCORERS.items()}
    assert group_name("out/prompts_vid_seed0_480x832_50s_5.0cfg.json") == "prompts_vid"
    assert group_name("out/papv2_seed0_512x512_50s_7.5cfg.json") == "papv2" and group_name("x/hpsv2_official.json") == "hpsv2"
    row = dict(mean_a=0.5, mean_b=0.25, win_rate_a_over_b=0.5, wins_a=1, wins_b=1, ties=0, total_pairs=2)
    summary = {"pair": {"model_a": "A", "model_b": "B", "ties_policy": "half"},
               "metrics": [dict(row, metric="PickScore"), dict(row, metric="TemporalConsistency")],
               "averages": {"macro_win_rate_a_over_b": 0.5, "micro_win_rate_a_over_b": 0.5}}
    table = [line for line in summary_text(summary, []).splitlines() if line.startswith("|")]
    assert len({line.index("|", 1) for line in table}) == 1  # the first column ends at the same place on every row
