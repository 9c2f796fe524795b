"""Faults of the eval pipeline, each with a test that failed before its fix (tiny models, CPU, 32x32, 2 steps):

* a `--max_prompts` smoke run was later skipped and scored as the full set;
* re-running one prompt set overwrote the log, and the gathered table lost the other sets;
* each prompt set reloaded every scorer;
* a train.py LoRA output folder given as the UNet silently evaluated the base model;
* resuming reused the images of another model or of other prompts under the same file names.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.generate import GenerateError, generate, main as generate_main, parse_args, prompt_matches, read_prompt, save_png
from eval.score import ALL_METRICS, gather_scores, score_manifests
from test_generate import images

REPO = Path(__file__).resolve().parent.parent
SIZE, STEPS = 32, 2
RUN = f"papv2_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg"


def run(base, prompts, out=None, unet=None, **flags):
    """generate() at the test size; extra flags as keyword arguments (True = bare flag)."""
    argv = ["--pretrain_path", str(base), "--test_json", str(prompts), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", str(STEPS), "--no_zip"]
    argv += ["--unet_path", str(unet)] if unet else []
    argv += ["--output_path", str(out)] if out else []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    return generate(parse_args(argv))


def write_prompts(folder: Path, prompts: list[str]) -> Path:
    """A prompt file named papv2.json (the run name comes from the file name) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [{"prompt": p, "gen_image_path": "", "raw_image_path": "", "metadata": {}} for p in prompts]
    (folder / "papv2.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return folder / "papv2.json"


@pytest.fixture(scope="module")
def prompts4(shared_dir, tmp_path_factory):
    """The first four papv2 prompts, as a prompt file of their own."""
    papv2 = json.loads((shared_dir / "prompts" / "papv2.json").read_text(encoding="utf-8"))
    return write_prompts(tmp_path_factory.mktemp("prompts"), [x["prompt"] for x in papv2[:4]])


# ------------------------------------------------------------------------------------------ 1. smoke runs, n


def test_smoke_run_is_recorded_completed_and_never_shrinks(tiny_sd15, prompts4, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_sd15, prompts4, out, max_prompts=2)
    record = json.loads((out / RUN / "run.json").read_text())
    assert (record["n_prompts"], record["total_prompts"], record["complete"]) == (2, 4, False)
    assert "Partial run: 2 of 4 prompts" in capsys.readouterr().out
    full = run(tiny_sd15, prompts4, out)  # the same command without --max_prompts completes the run
    assert (full["generated"], full["skipped"], full["n_prompts"]) == (2, 2, 4)
    assert len(json.loads((out / f"{RUN}.json").read_text())) == 4
    assert json.loads((out / RUN / "run.json").read_text())["complete"] is True
    again = run(tiny_sd15, prompts4, out, max_prompts=1)  # a later smoke run must not hide the finished prompts
    assert (again["generated"], again["n_prompts"]) == (0, 4) and len(json.loads((out / f"{RUN}.json").read_text())) == 4


class PixelScorer:
    """Scorer double: score = mean of the red channel."""

    def __init__(self, name):
        self.name = name
        self.metric = {"pickscore": "PickScore", "hpsv2": "HPSv2", "aesthetics": "AesScore", "clip": "CLIPScore",
                       "imagereward": "ImageReward"}[name]

    def score(self, prompts, images):
        return [float(np.asarray(im.convert("RGB"))[..., 0].mean()) for im in images]


def fake_run(root: Path, group: str, values, prompts_total=None) -> Path:
    """`<root>/<group>_seed0_8x8_50s_7.5cfg.json` over solid 8x8 images of red `values`; with `prompts_total`, the run
    record eval.generate keeps beside them."""
    name = f"{group}_seed0_8x8_50s_7.5cfg"
    (root / name).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, v in enumerate(values):
        path = root / name / f"{i}_8x8.png"
        Image.new("RGB", (8, 8), (v, 0, 0)).save(path)
        entries.append({"prompt": f"p{i}", "gen_image_path": str(path), "raw_image_path": "", "metadata": {}})
    if prompts_total:
        (root / name / "run.json").write_text(json.dumps({"n_prompts": len(values), "total_prompts": prompts_total}))
    (root / f"{name}.json").write_text(json.dumps(entries))
    return root / f"{name}.json"


def test_partial_run_is_flagged_and_n_shown(tmp_path, capsys):
    manifest = fake_run(tmp_path, "papv2", [10, 30], prompts_total=487)
    score_manifests([manifest], [PixelScorer("pickscore")])
    out = capsys.readouterr().out
    assert "lists 2 of the 487 prompts of its prompt file (a --max_prompts run)" in out
    assert "| papv2 | PickScore | 20.0000 | 2 |" in out.splitlines()
    rows = gather_scores([tmp_path / "papv2_seed0_8x8_50s_7.5cfg_scores.json"])
    assert rows == [("papv2", "PickScore", "20.0000", "2")]
    assert "[WARN] papv2: 2 of 487 prompts scored (a --max_prompts run)" in capsys.readouterr().out


# ------------------------------------------------------------------------ 2. the table keeps every prompt set


def test_gathered_table_keeps_every_prompt_set(tmp_path, capsys):
    runs = {group: fake_run(tmp_path, group, values) for group, values in
            [("partiprompts", [1, 3]), ("papv2", [10, 20, 30]), ("hpsv2", [5])]}
    score_manifests(list(runs.values()), [PixelScorer("pickscore"), PixelScorer("hpsv2")])
    score_manifests([runs["hpsv2"]], [PixelScorer("pickscore"), PixelScorer("hpsv2")])  # one set scored again
    files = sorted(tmp_path.glob("*_scores.json"))
    capsys.readouterr()
    rows = gather_scores(files, tmp_path / "joint_test_8_table")
    assert rows == [("papv2", "PickScore", "20.0000", "3"), ("papv2", "HPSv2", "20.0000", "3"),
                    ("hpsv2", "PickScore", "5.0000", "1"), ("hpsv2", "HPSv2", "5.0000", "1"),
                    ("partiprompts", "PickScore", "2.0000", "2"), ("partiprompts", "HPSv2", "2.0000", "2")]
    assert capsys.readouterr().out.endswith("| partiprompts | HPSv2 | 2.0000 | 2 |\n")
    saved = json.loads((tmp_path / "joint_test_8_table.json").read_text())
    assert saved["table"][0] == {"prompt": "papv2", "predictor": "PickScore", "score": 20.0, "n": 3}
    assert (tmp_path / "joint_test_8_table.md").read_text().splitlines()[0] == "| Prompt | Predictor | Score | n |"


def test_gather_errors_are_one_message(tmp_path):
    from eval.score import main as score_main

    with pytest.raises(SystemExit, match="^error: no score files to gather"):
        score_main(["--gather_scores"])
    with pytest.raises(SystemExit, match="^error: score file not found: .*nope_scores.json"):
        score_main(["--gather_scores", str(tmp_path / "nope_scores.json")])
    (tmp_path / "x_scores.json").write_text("[1]")
    with pytest.raises(SystemExit, match="is not a score file written by eval.score"):
        score_main(["--gather_scores", str(tmp_path / "x_scores.json")])


def test_log_gather_keeps_the_newest_row_of_a_rerun(tmp_path, capsys):
    from eval.score import gather_log

    log = tmp_path / "joint_test_512.log"
    log.write_text("total len of test data : 2\nFinalResults PickScore for papv2 : 0.1000\n"
                   "total len of test data : 3200\nFinalResults PickScore for hpsv2 : 0.3000\n"
                   "===== appended by a re-run\ntotal len of test data : 487\nFinalResults PickScore for papv2 : 0.2000\n")
    assert gather_log(log) == [("papv2", "PickScore", "0.2000", "487"), ("hpsv2", "PickScore", "0.3000", "3200")]


# ------------------------------------------------------------------------------ 3. each scorer loaded once


def test_each_scorer_loaded_once_for_all_prompt_sets(tmp_path, monkeypatch, capsys):
    import eval.scorers
    from eval.score import main as score_main

    loads = []

    def fake_load_scorer(name, **kwargs):
        loads.append(name)
        return PixelScorer(name)

    monkeypatch.setattr(eval.scorers, "load_scorer", fake_load_scorer)
    manifests = [fake_run(tmp_path, group, [1, 2]) for group in ("papv2", "hpsv2", "partiprompts")]
    score_main(["--json_path", *map(str, manifests), "--device", "cpu"])
    assert loads == list(ALL_METRICS)  # 5 loads for 3 prompt sets, not 15
    finals = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FinalResults")]
    assert len(finals) == 15 and finals[-1] == "FinalResults ImageReward for partiprompts : 1.5000"


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in interpreter that records its arguments; `-c` snippets and --print_weights run for real."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
                    f'if [[ $1 == -c || $* == *--print_weights* ]]; then exec {sys.executable} "$@"; fi\nexit 0\n')
    fake.chmod(0o755)
    return fake, calls


def test_eval_script_generates_scores_once_and_gathers_every_set(shared_dir, tmp_path):
    """test_sd15.sh: a set with a manifest is still handed to eval.generate (which completes a smoke run), all sets
    are scored in one eval.score call, the table covers every set scored in OUTPUT, the log is appended to, and
    the header names the weights."""
    fake, calls = fake_python(tmp_path)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "unet.safetensors").write_bytes(b"")
    stem = "_seed0_512x512_50s_7.5cfg"
    (out / f"papv2{stem}.json").write_text("[]")  # e.g. a --max_prompts smoke run
    for group in ("papv2", "partiprompts"):  # partiprompts: scored by an earlier run of the script
        (out / f"{group}{stem}_scores.json").write_text("{}")
    (out / "joint_test_512.log").write_text("earlier run\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": str(fake),
           "PRETRAIN": "base", "DEVICE": "cpu", "PROMPTS_DIR": str(shared_dir / "prompts"),
           "PROMPT_GROUPS": "papv2 hpsv2"}
    done = subprocess.run(["bash", str(REPO / "scripts/eval/test_sd15.sh"), str(out / "unet.safetensors"),
                           "--max_prompts", "2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    log = (out / "joint_test_512.log").read_text()
    assert done.returncode == 0, log
    assert log.startswith("earlier run\n===== ")
    assert f"UNet: {out}/unet.safetensors | weights: UNet file {out}/unet.safetensors | output: {out}" in log
    commands = [line.split()[:3] for line in calls.read_text().splitlines()[1:]]
    assert commands == [["-m", "eval.generate", "--print_weights"], ["-m", "eval.generate", "--test_json"],
                        ["-m", "eval.generate", "--test_json"], ["-m", "eval.score", "--json_path"],
                        ["-m", "eval.score", "--gather_scores"]]
    score_call, gather_call = calls.read_text().splitlines()[-2:]
    assert score_call == f"-m eval.score --json_path {out}/papv2{stem}.json {out}/hpsv2{stem}.json --device cpu"
    assert gather_call == (f"-m eval.score --gather_scores {out}/papv2{stem}_scores.json "
                           f"{out}/partiprompts{stem}_scores.json --table_out {out}/joint_test_512_table")


# ------------------------------------------------------------------------------------ 5. LoRA output folders


@pytest.fixture(scope="module")
def lora_folder(tiny_sd15, tmp_path_factory) -> Path:
    """What train.py --use_lora leaves: a folder holding pytorch_lora_weights.safetensors and no UNet weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.3)
    folder = tmp_path_factory.mktemp("lora-run")
    StableDiffusionPipeline.save_lora_weights(folder, convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    assert sorted(os.listdir(folder)) == ["pytorch_lora_weights.safetensors"]
    return folder


def test_lora_output_folder_is_evaluated_as_lora(tiny_sd15, prompts4, lora_folder, tmp_path, capsys):
    out = tmp_path / "sd15-lora"
    shutil.copytree(lora_folder, out)
    by_folder = run(tiny_sd15, prompts4, unet=out, max_prompts=1)  # bash scripts/eval/test_sd15.sh output/<run>
    by_flag = run(tiny_sd15, prompts4, tmp_path / "flag", max_prompts=1, lora_path=lora_folder)
    base = run(tiny_sd15, prompts4, tmp_path / "base", max_prompts=1)
    assert Path(by_folder["manifest"]).parent == out
    assert np.array_equal(images(by_folder["manifest"])[0], images(by_flag["manifest"])[0])
    assert np.abs(images(by_folder["manifest"])[0] - images(base["manifest"])[0]).mean() > 1
    adapter = out / "pytorch_lora_weights.safetensors"
    record = json.loads((out / RUN / "run.json").read_text())
    assert record["weights"] == f"base UNet of {tiny_sd15} + LoRA adapter {adapter}"
    assert f"({record['weights']})" in capsys.readouterr().out
    generate_main(["--unet_path", str(out), "--pretrain_path", str(tiny_sd15), "--print_weights"])
    assert capsys.readouterr().out == f"base UNet of {tiny_sd15} + LoRA adapter {adapter}\n"

    with_pipeline = tmp_path / "with-pipeline"  # --save_pipeline also stores the UNet the adapter was trained on
    shutil.copytree(lora_folder, with_pipeline)
    shutil.copytree(tiny_sd15 / "unet", with_pipeline / "unet")
    result = run(tiny_sd15, prompts4, unet=with_pipeline, max_prompts=1)
    assert np.array_equal(images(result["manifest"])[0], images(by_flag["manifest"])[0])


def test_lora_folder_errors(tiny_sd15, prompts4, lora_folder, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(lora_folder, both)
    (both / "unet.pth").write_bytes(b"")
    with pytest.raises(GenerateError, match=r"holds both UNet weights \(unet.pth\) and a LoRA adapter.*--unet_path .*unet.pth or --lora_path"):
        run(tiny_sd15, prompts4, unet=both)
    with pytest.raises(GenerateError, match="pass one adapter"):
        run(tiny_sd15, prompts4, unet=lora_folder, lora_path=lora_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: --unet_path folder .*empty holds nothing to evaluate"):
        generate_main(["--unet_path", str(tmp_path / "empty"), "--print_weights"])


# -------------------------------------------------------------------------- 6. resuming another run's images


def test_resume_refuses_another_models_images(tiny_sd15, prompts4, unet_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(unet_file, out / "unet.pth")
    run(tiny_sd15, prompts4, unet=out / "unet.pth", max_prompts=2)
    copy = tmp_path / "copied"  # a moved or copied folder still resumes: the fingerprint reads the weights' content
    shutil.copytree(out, copy)
    assert run(tiny_sd15, prompts4, unet=copy / "unet.pth", max_prompts=2)["generated"] == 0

    torch.save({k: v + 0.01 for k, v in torch.load(unet_file).items()}, out / "unet.pth")  # retrained, same name
    with pytest.raises(GenerateError, match=r"(?s)holds images of another run under the same name:\n"
                                            r"  UNet weights \(--unet_path\): was sha256:\w+, now sha256:\w+\n"
                                            r".*another --output_path, or delete .*papv2_seed0_32x32_2s_7.5cfg and"):
        run(tiny_sd15, prompts4, unet=out / "unet.pth")
    argv = ["--pretrain_path", str(tiny_sd15), "--test_json", str(prompts4), "--height", str(SIZE), "--width",
            str(SIZE), "--steps", str(STEPS), "--unet_path", str(out / "unet.pth")]
    with pytest.raises(SystemExit, match=r"^error: \S+ holds images of another run"):  # one message, no traceback
        generate_main(argv)

    with pytest.raises(GenerateError, match=r"precision \(--dtype\): was float32, now bfloat16"):
        run(tiny_sd15, prompts4, unet=copy / "unet.pth", dtype="bf16")
    other = write_prompts(tmp_path / "other", ["a different prompt"] * 4)
    with pytest.raises(GenerateError, match=r"prompts of --test_json: was \w+, now \w+"):
        run(tiny_sd15, other, unet=copy / "unet.pth")


@pytest.fixture(scope="module")
def unet_file(tiny_sd15, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    path = tmp_path_factory.mktemp("ckpt") / "unet.pth"
    torch.save(UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict(), path)
    return path


def test_images_storing_other_prompts_are_generated_again(tiny_sd15, prompts4, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_sd15, prompts4, out)
    (out / RUN / "run.json").unlink(missing_ok=True)  # a run made before run records existed, or by the official script
    prompts = [x["prompt"] for x in json.loads(prompts4.read_text(encoding="utf-8"))]
    changed = prompts[:1] + ["a red cube"] + prompts[2:3] + ["a blue ball"]
    result = run(tiny_sd15, write_prompts(tmp_path / "changed", changed), out)
    assert (result["generated"], result["skipped"]) == (2, 2)
    assert [read_prompt(out / RUN / f"{i}_{SIZE}x{SIZE}.png") for i in range(4)] == changed
    assert "[WARN] 2 images in" in capsys.readouterr().out


def test_prompt_check_accepts_the_official_ascii_exif(tmp_path):
    """The official script stored prompts as ASCII with '?' for other characters: such images are kept."""
    prompt = "café “x”"
    official = Image.Exif()
    official[0x010E] = prompt  # PIL writes str tags as ASCII, replacing the rest with '?'
    Image.new("RGB", (4, 4)).save(tmp_path / "official.png", exif=official)
    save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), prompt, tmp_path / "ours.png")
    from eval.generate import stored_prompt

    assert prompt_matches(stored_prompt(tmp_path / "official.png"), prompt)
    assert prompt_matches(stored_prompt(tmp_path / "ours.png"), prompt)
    assert not prompt_matches(stored_prompt(tmp_path / "ours.png"), "café")
    assert not prompt_matches(stored_prompt(tmp_path / "missing.png"), prompt)
