"""scripts/video_demo.sh + scripts/video_demo.py at smoke-test scale (--quick): every stage runs, the report and its
figures exist, and its numbers are finite and come from the runs. The full demo is not run here (minutes)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_quick_video_demo_writes_the_report(tmp_path):
    env = {**os.environ, "DEMO_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "video_demo.sh"), "--quick", "--output_dir", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    models = ("base", "dpo", "sdpo", "sdpo_is")
    for name in [f"strip_{m}.png" for m in models] + ["error_curves.png"]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name
    report = (out / "report.md").read_text()
    for image in [f"strip_{m}.png" for m in models] + ["error_curves.png"]:
        assert f"]({image})" in report
    assert "Quick mode" in report and "--importance_weighting clip_mask" in report

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    for model in models:
        numbers = results["absolute"][model]
        assert numbers["n"] == 4 and math.isfinite(numbers["colour"]) and 0 <= numbers["warm_fraction"] <= 1
        assert len(json.loads(Path(results["manifests"][model]).read_text())) == 4
    for run in models[1:]:
        assert 0 <= results["ab"][run]["win_rate_a_over_b"] <= 1
        metrics = [json.loads(line) for line in (out / "work" / run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == results["settings"]["pref_steps"]
        for key in ("avg_win_diff_loss", "avg_lose_diff_loss"):
            assert all(math.isfinite(m[key]) for m in metrics)
            assert all(math.isfinite(v) for v in results["curves"][run][key].values())
    assert all(m["avg_lose_l_scale"] == 1.0 for m in
               map(json.loads, (out / "work" / "dpo" / "metrics.jsonl").read_text().splitlines()))
    assert all(math.isfinite(v) for v in results["importance_weights"].values())
    assert "the report is" in done.stdout
