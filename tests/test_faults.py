"""Fault injection: what a 2,000-step run must survive (issue 15) and the real-use path's rough edges (issue 14).

Each test injects one fault (a planted pickle, damaged or missing checkpoint files, bad rows, bad arguments, a full
disk, ...) into a tiny run and checks that nothing is silently wrong: the run goes on and counts what it skipped, or
stops with one message that names the file or value and the fix.
"""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import train
from data.pairs import PairDataset
from families.conditioning import load_tokenizer
from test_train import REPO, metrics, run_train, train_args

MARKER = "pwned-marker"


class Payload:
    """Unpickling it would create MARKER in the working directory: the proof that a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pair_table(pickapic, n=None) -> pa.Table:
    """The fixture's decided train pairs whose images decode, as a pyarrow table (n rows if given)."""
    from PIL import Image
    import io

    table = pq.read_table(next((pickapic / "data").glob("train-*.parquet")))
    keep = []
    for i, row in enumerate(table.to_pylist()):
        try:
            for key in ("jpg_0", "jpg_1"):
                Image.open(io.BytesIO(row[key])).load()
        except Exception:  # noqa: BLE001
            continue
        if row["label_0"] in (0, 1):
            keep.append(i)
    table = table.take(keep)
    return table.slice(0, n) if n else table


def write_rows(table: pa.Table, folder: Path, split="train") -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def replace_column(table, name, values, type_=None):
    return table.set_column(table.column_names.index(name), name, pa.array(values, type=type_))


@pytest.fixture(scope="module")
def trained(tiny_sd15, pickapic, tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4: copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_train(tiny_sd15, pickapic, out, "--checkpointing_steps", "2", steps=4)
    return out


def copy_run(trained, tmp_path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


# --- security ----------------------------------------------------------------------------------------------------


def test_resume_state_is_json_not_pickle(trained):
    folder = trained / "checkpoint-2"
    assert not list(folder.glob("custom_checkpoint_*.pkl"))
    state = json.loads((folder / checkpoints.TRAINING_STATE).read_text())
    assert state["step"] == 2 and state["data"]["seed"] == 0 and state["args"]["train_method"] == "diffusion-dpo"


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_planted_pickle_never_runs(tiny_sd15, pickapic, trained, tmp_path, monkeypatch, planted):
    """A payload planted in the newest checkpoint (a custom-state pickle, or the RNG file) is refused unrun; with
    `latest` the run falls back to the older complete checkpoint."""
    run = copy_run(trained, tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.save({"payload": Payload(tmp_path / MARKER)}, run / "checkpoint-4" / planted)
    with pytest.raises(checkpoints.CheckpointError, match=planted):
        run_train(tiny_sd15, pickapic, run, "--resume_from_checkpoint", str(run / "checkpoint-4"), steps=4)
    run_train(tiny_sd15, pickapic, run, "--checkpointing_steps", "2", steps=4)  # latest -> checkpoint-2, retrains 3..4
    assert not (tmp_path / MARKER).exists()


# --- data that must never be silently wrong ------------------------------------------------------------------------


def test_text_labels_are_numbers_and_the_winner_goes_first(pickapic, tmp_path):
    from tiny import colour_score
    import torchvision.transforms.functional as TF

    table = pair_table(pickapic, 16)
    table = replace_column(table, "label_0", [str(float(v)) for v in table.column("label_0").to_pylist()])
    dataset = dataset_from(write_rows(table, tmp_path / "text"))
    for index in range(len(dataset)):
        pixels = dataset[(0, 0, index)]["pixel_values"]
        winner, loser = (TF.to_pil_image(p * 0.5 + 0.5) for p in (pixels[:3], pixels[3:]))
        assert colour_score(winner) > colour_score(loser)


def test_labels_that_are_not_numbers_are_refused(pickapic, tmp_path):
    table = pair_table(pickapic, 4)
    table = replace_column(table, "label_0", ["1.0", "zero", "0.0", "1.0"])
    with pytest.raises(ValueError, match="label_0 holds 'zero'"):
        dataset_from(write_rows(table, tmp_path / "bad"))


def test_invalid_labels_are_counted_apart_from_split_decisions(pickapic, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    table = pair_table(pickapic, 12)
    labels = table.column("label_0").to_pylist()
    labels[:4] = [2.0, -1.0, float("nan"), 0.5]
    dataset = dataset_from(write_rows(replace_column(table, "label_0", labels, pa.float64()), tmp_path / "odd"))
    assert len(dataset) == 8
    assert "Eliminated 1/12 split decisions" in caplog.text
    assert "Dropped 3/12 rows whose label_0 is not 0, 0.5 or 1" in caplog.text


def dataset_from(folder, **overrides):
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(folder), "--resolution", "32",
                             "--no_hflip", "--proportion_empty_prompts", "0"])
    vars(args).update(overrides)
    return PairDataset(train.filter_rows(train.load_rows(args), args, True), args)


def bad_caption_rows(pickapic, tmp_path) -> Path:
    """8 good pairs, then rows 1, 2, 3 with a None, an int and an empty-list caption."""
    table = pair_table(pickapic, 8)
    captions = [[c] for c in table.column("caption").to_pylist()]
    captions[1], captions[2], captions[3] = None, None, []
    table = replace_column(table, "caption", captions, pa.list_(pa.string()))
    return write_rows(table, tmp_path / "captions")


def test_bad_captions_skip_their_row_counted_once(pickapic, tmp_path):
    dataset = dataset_from(bad_caption_rows(pickapic, tmp_path))
    examples = [dataset[(0, 0, i)] for i in range(len(dataset))]
    assert sum(e["skipped"] for e in examples) == 3  # three bad rows, not 3 + 2 + 1 retries
    assert all(isinstance(e["caption"], str) and e["caption"] for e in examples)


def test_int_caption_column_skips_rows(pickapic, tmp_path):
    table = pair_table(pickapic, 4)
    table = replace_column(table, "caption", [7, 8, 9, 10], pa.int64())
    dataset = dataset_from(write_rows(table, tmp_path / "ints"))
    with pytest.raises(RuntimeError, match="two decodable images and a caption"):
        dataset[(0, 0, 0)]


def test_two_ranks_sum_skipped_rows(tiny_sd15, pickapic, tmp_path):
    """One epoch of 8 rows over 2 CPU ranks (2 steps of 2 pairs per rank): the 3 bad rows are logged as 3."""
    from test_train import launch

    data = bad_caption_rows(pickapic, tmp_path)
    result = launch(*train_args(tiny_sd15, data, tmp_path / "out"), num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path / "out")[-1]["skipped_rows"] == 3


def test_empty_parquet_is_named(pickapic, tmp_path):
    table = pair_table(pickapic, 4).slice(0, 0)
    folder = write_rows(table, tmp_path / "empty")
    with pytest.raises(ValueError, match="train-00000-of-00001.parquet: the parquet file holds no rows"):
        dataset_from(folder)


# --- resume and checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing random_states_0.pkl", "truncated unet.safetensors", "truncated optimizer.bin",
                                    "garbage training_state.json"])
def test_damaged_checkpoint(tiny_sd15, pickapic, trained, tmp_path, caplog, damage):
    """A damaged newest checkpoint: named explicitly, it stops the run naming the file and the intact older one;
    with `latest`, the run resumes from the older one (with a warning) and ends where a clean run ends."""
    run = copy_run(trained, tmp_path)
    kind, name = damage.split()
    path = run / "checkpoint-4" / name
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("{not json")
    with pytest.raises(checkpoints.CheckpointError, match=f"{name}.*checkpoint-2"):
        run_train(tiny_sd15, pickapic, run, "--resume_from_checkpoint", "checkpoint-4", steps=4)
    run_train(tiny_sd15, pickapic, run, "--checkpointing_steps", "2", steps=4)
    assert f"checkpoint-4 cannot be resumed ({path}" in caplog.text
    clean, resumed = load_file(str(trained / "unet.safetensors")), load_file(str(run / "unet.safetensors"))
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)  # resumed from 2: exactly the clean run


@pytest.mark.parametrize("field, value", [
    ("step", -1), ("step", "abc"), ("step", 1.5), ("step", 2), ("skipped_rows", "x"), ("skipped_rows", -3),
    ("num_processes", 0), ("data", {"seed": "x"}), ("data", {"seed": 0, "offset": 5}), ("ema", {"decay": 2.0}),
    ("args", None), ("surprise", 1),
])
def test_damaged_training_state(tiny_sd15, pickapic, trained, tmp_path, caplog, field, value):
    """A training_state.json with a wrong type, a value out of range, a step that is not its folder's, an unknown
    field: named explicitly, the run stops naming the file and the field; with `latest` it resumes from the older
    complete checkpoint and ends bit-identical to the clean run (same steps from the same state)."""
    run = copy_run(trained, tmp_path)
    path = run / "checkpoint-4" / checkpoints.TRAINING_STATE
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    shown = field if field != "surprise" else "unknown fields"
    with pytest.raises(checkpoints.CheckpointError, match=f"{checkpoints.TRAINING_STATE} .*{shown}.*checkpoint-2"):
        run_train(tiny_sd15, pickapic, run, "--resume_from_checkpoint", "checkpoint-4", steps=4)
    run_train(tiny_sd15, pickapic, run, "--checkpointing_steps", "2", steps=4)
    assert f"checkpoint-4 cannot be resumed ({path}" in caplog.text
    clean, resumed = load_file(str(trained / "unet.safetensors")), load_file(str(run / "unet.safetensors"))
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


def test_negative_step_in_the_only_checkpoint_starts_nothing(tiny_sd15, pickapic, trained, tmp_path):
    """The issue's case: `"step": -1` in checkpoint-2, checkpoint-4 gone. It was resumed as step -1 (a new
    checkpoint-0, checkpoints rewritten, extra steps); now no checkpoint is complete and nothing is written."""
    import shutil

    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoint-4")
    path = run / "checkpoint-2" / checkpoints.TRAINING_STATE
    path.write_text(json.dumps({**json.loads(path.read_text()), "step": -1}))
    with pytest.raises(checkpoints.CheckpointError, match="no complete checkpoint.*'step' = -1.*--resume_from_checkpoint none"):
        run_train(tiny_sd15, pickapic, run, "--checkpointing_steps", "2", steps=4)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]


def test_no_complete_checkpoint_says_how_to_start_over(tiny_sd15, pickapic, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for folder in ("checkpoint-2", "checkpoint-4"):
        (run / folder / "optimizer.bin").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="no complete checkpoint.*--resume_from_checkpoint none"):
        run_train(tiny_sd15, pickapic, run, steps=4)


def test_resume_with_another_objective_is_refused(tiny_sd15, pickapic, trained, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    run = copy_run(trained, tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="--train_method: 'diffusion-dpo' in the checkpoint, 'dspo' now"):
        run_train(tiny_sd15, pickapic, run, "--train_method", "dspo", steps=6)
    with pytest.raises(checkpoints.CheckpointError, match="--resolution: 32 in the checkpoint, 64 now"):
        run_train(tiny_sd15, pickapic, run, "--resolution", "64", steps=6)
    assert run_train(tiny_sd15, pickapic, run, "--checkpointing_steps", "3", steps=6) == 6  # safe to change
    assert "Changed since checkpoint-4: --max_train_steps: 4 in the checkpoint, 6 now" in caplog.text


def test_metrics_are_not_repeated_after_a_resume(tiny_sd15, pickapic, tmp_path):
    run_train(tiny_sd15, pickapic, tmp_path, "--checkpointing_steps", "2", steps=3)  # logged 1..3, checkpoint at 2
    run_train(tiny_sd15, pickapic, tmp_path, "--checkpointing_steps", "2", steps=4)  # resumes at 2
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("flag, value, message", [
    ("--checkpoints_total_limit", "-1", "--checkpoints_total_limit must be >= 1"),
    ("--checkpoints_total_limit", "0", "--checkpoints_total_limit must be >= 1"),
    ("--checkpointing_steps", "0", "--checkpointing_steps must be >= 1"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be >= 1"),
    ("--train_batch_size", "0", "--train_batch_size must be >= 1"),
    ("--resolution", "0", "--resolution must be a positive multiple of 8"),
    ("--resolution", "500", "--resolution must be a positive multiple of 8"),
    ("--max_nonfinite_steps", "0", "--max_nonfinite_steps must be >= 1"),
    ("--beta_dpo", "0", "--beta_dpo must be > 0"),
    ("--beta_dpo", "-5", "--beta_dpo must be > 0"),
    ("--dmpo_alpha", "1", "--dmpo_alpha must be in [0, 1)"),
    ("--dmpo_alpha", "-0.1", "--dmpo_alpha must be in [0, 1)"),
    ("--max_train_steps", "0", "--max_train_steps must be >= 1"),
])
def test_bad_numbers_are_refused_before_loading(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d", flag, value])
    assert message in capsys.readouterr().err


def test_output_dir_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d",
                          "--output_dir", str(tmp_path / "afile" / "run")])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_skipped_update_logs_no_loss(tiny_sd15, pickapic, tmp_path):
    with pytest.raises(FloatingPointError):
        run_train(tiny_sd15, pickapic, tmp_path, "--learning_rate", "1e30", "--checkpointing_steps", "1",
                  "--max_nonfinite_steps", "2", "--max_grad_norm", "0", steps=10)
    logged = metrics(tmp_path)
    assert logged[-1]["skipped_updates"] == 2 and logged[-1]["train_loss"] is None
    assert all(m["train_loss"] is not None for m in logged if m["skipped_updates"] == 0)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")])
def test_disk_full_during_a_checkpoint(tiny_sd15, pickapic, tmp_path, monkeypatch, error):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def failing_save(state, path, *args, **kwargs):
        calls.append(path)
        if "checkpoint-4" in str(path):
            raise error
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="no space left on .* while writing .*; the previous checkpoint checkpoint-2 is intact"):
        run_train(tiny_sd15, pickapic, tmp_path, "--checkpointing_steps", "2", steps=4)
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


def test_free_space_is_checked_before_saving(tiny_sd15, pickapic, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="not enough disk space for checkpoint-2: about .* GB needed, 0.0 GB free"):
        run_train(tiny_sd15, pickapic, tmp_path, "--checkpointing_steps", "2", steps=2)
    assert not list(tmp_path.glob("*checkpoint-2*"))


# --- the real-use path (issue 14) --------------------------------------------------------------------------------


def test_sdxl_defaults_to_the_official_optimizer_and_checkpointing():
    base = ["--pretrained_model_name_or_path", "x", "--dataset_name", "d"]
    args = train.parse_args(base + ["--sdxl"])
    assert args.optimizer == "adafactor" and args.gradient_checkpointing is True
    args = train.parse_args(base + ["--sdxl", "--optimizer", "adamw", "--no_gradient_checkpointing"])
    assert args.optimizer == "adamw" and args.gradient_checkpointing is False and not args.use_adafactor
    args = train.parse_args(base)
    assert args.optimizer == "adamw" and args.gradient_checkpointing is False
    assert train.parse_args(base + ["--use_8bit_adam"]).optimizer == "adamw8bit"
    with pytest.raises(SystemExit):
        train.parse_args(base + ["--use_adafactor", "--optimizer", "adamw"])


def test_sdxl_run_says_what_it_chose(tiny_sdxl, pickapic, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    run_train(tiny_sdxl, pickapic, tmp_path, sdxl=True)
    assert "Optimizer: adafactor (the official SDXL default; --optimizer adamw to change)" in caplog.text
    assert "Gradient checkpointing: on (the official SDXL default" in caplog.text


def hub_cache(pickapic, root: Path, repo="someone/pairs") -> Path:
    """A dataset in the layout `hf download --repo-type dataset` leaves in the Hugging Face cache."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"datasets--{repo.replace('/', '--')}"
    shutil.copytree(pickapic / "data", folder / "snapshots" / revision / "data")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return folder / "snapshots" / revision


def test_dataset_hub_id_resolves_offline_from_the_cache(pickapic, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_cache(pickapic, tmp_path / "hub")
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "someone/pairs"])
    rows = train.load_rows(args)
    assert len(rows) == 64 and str(snapshot) in args.resolved_dataset
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "someone/absent"])
    with pytest.raises(FileNotFoundError, match="hf download --repo-type dataset someone/absent"):
        train.load_rows(args)


def test_a_folder_loads_only_the_requested_split(pickapic, tmp_path):
    import shutil

    folder = tmp_path / "pairs"
    shutil.copytree(pickapic, folder)
    (folder / "data" / "validation-00000-of-00001.parquet").write_bytes(b"not a parquet file at all")
    rows = train.load_rows(train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(folder)]))
    assert len(rows) == 64  # the broken validation split was never read
    rows = train.load_rows(train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(folder),
                                             "--split", "test_unique"]))
    assert len(rows) == 8


def test_empty_local_tokenizer_names_the_folder_and_file(tiny_sd15, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # transformers then loads an empty vocabulary
        (model / "tokenizer" / name).unlink()
    with pytest.raises(RuntimeError) as error:
        load_tokenizer(str(model), "tokenizer", None)
    assert f"{model / 'tokenizer' / 'vocab.json'} is missing" in str(error.value) and "hf download" not in str(error.value)
    (model / "tokenizer" / "vocab.json").write_text("{}")  # a damaged file: tokenizers raises a plain Exception
    with pytest.raises(RuntimeError, match=f"cannot load the tokenizer in {model / 'tokenizer'}"):
        load_tokenizer(str(model), "tokenizer", None)


def test_cli_error_is_printed_once_and_last(pickapic, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "train.py"),
                             *train_args("no-such-org/no-such-model", pickapic, tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("no-such-org/no-such-model: ") <= 1 and result.stderr.count("train.py: error:") == 1
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error:")


def test_run_description_config_card_and_file_modes(trained):
    config = json.loads((trained / "training_config.json").read_text())
    assert config["arguments"]["train_method"] == "diffusion-dpo"
    assert {"model", "vae", "dataset", "optimizer", "learning_rate", "precision"} <= set(config["resolved"])
    assert "data/train-00000-of-00001.parquet" in config["resolved"]["dataset"] or "train-00000" in config["resolved"]["dataset"]
    card = (trained / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "Diffusion-DPO" in card
    mask = os.umask(0)
    os.umask(mask)
    for name in ("unet.safetensors", "unet.pth", "checkpoint-2/unet.safetensors"):
        assert stat.S_IMODE((trained / name).stat().st_mode) == 0o666 & ~mask, name


def test_pipeline_shares_the_unet_file_and_is_written_whole(tiny_sd15, pickapic, tmp_path, monkeypatch):
    run_train(tiny_sd15, pickapic, tmp_path / "ok", "--save_pipeline")
    linked = tmp_path / "ok" / "unet" / "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(linked, tmp_path / "ok" / "unet.safetensors")
    assert (tmp_path / "ok" / "model_index.json").exists()
    from diffusers import StableDiffusionPipeline

    def failing_save(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", failing_save)
    with pytest.raises(OSError):
        run_train(tiny_sd15, pickapic, tmp_path / "failed", "--save_pipeline")
    assert not (tmp_path / "failed" / "model_index.json").exists() and not (tmp_path / "failed" / ".pipeline.tmp").exists()
    assert (tmp_path / "failed" / "unet.safetensors").exists()
