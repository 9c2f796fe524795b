"""train.py end to end on the tiny models: every method, SD1.5 and SDXL, resume, two processes, data errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data.pairs import PairDataset
from families.conditioning import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_args(model, data, output_dir, *extra, steps=2, sdxl=False):
    args = [
        "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
        "--mixed_precision", "no", "--seed", "0", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
        "--report_to", "none", *extra,
    ]
    return args + (["--sdxl"] if sdxl else [])


def run_train(*args, **kwargs):
    """train.main in this process (accelerate's singletons reset afterwards): about a second per tiny run."""
    try:
        return train.main(train_args(*args, **kwargs))
    finally:
        reset_accelerate()


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def base_unet(model):
    return load_file(str(Path(model) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo", "sft"])
@pytest.mark.parametrize("safeguard", [False, True], ids=["plain", "safeguard"])
def test_every_method_trains(tiny_sd15, tiny_sdxl, pickapic, tmp_path, method, sdxl, safeguard):
    model = tiny_sdxl if sdxl else tiny_sd15
    extra = ["--train_method", method, "--dmpo_alpha", "0.01"]
    if method == "dmpo":  # exercise the optional noise terms on one method
        extra += ["--noise_offset", "0.05", "--input_perturbation", "0.1"]
    if method == "dspo":
        extra += ["--beta_dpo", "0.001"]
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    assert run_train(model, pickapic, tmp_path, *extra, sdxl=sdxl) == 2

    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in logged)
    assert (tmp_path / "checkpoint-2" / "unet.safetensors").exists()
    assert (tmp_path / "unet.pth").exists() and (tmp_path / "unet.safetensors").exists()
    trained, base = load_file(str(tmp_path / "unet.safetensors")), base_unet(model)
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "the UNet weights did not change"
    pth = torch.load(tmp_path / "unet.pth", weights_only=True)
    assert all(torch.equal(pth[k], trained[k]) for k in trained)
    if method != "sft":
        assert {"implicit_acc_accumulated", "avg_win_diff_loss", "avg_lose_diff_loss"} <= logged[0].keys()
        scale = logged[-1]["avg_lose_l_scale"]
        assert (0.0 <= scale <= 1.0) if safeguard else scale == 1.0


def test_resume_is_exact(tiny_sd15, pickapic, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: same weights, bit for bit (crosses epoch boundaries). Bitwise
    by construction: the resumed run reloads weights, optimizer, RNG and data state and repeats the same operations."""
    common = ["--max_train_samples", "8", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3",
              "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--random_crop"]
    run_train(tiny_sd15, pickapic, tmp_path / "straight", *common, steps=6)
    run_train(tiny_sd15, pickapic, tmp_path / "resumed", *common, steps=3)
    assert (tmp_path / "resumed" / "checkpoint-3").exists()
    run_train(tiny_sd15, pickapic, tmp_path / "resumed", *common, steps=6)
    straight = load_file(str(tmp_path / "straight" / "unet.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "unet.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["train_loss"] for m in metrics(tmp_path / "straight")] == [m["train_loss"] for m in metrics(tmp_path / "resumed")]


def test_resume_without_a_seed_is_exact(tiny_sd15, pickapic, tmp_path):
    """No --seed: the run draws one, records it (log, training_config.json, the checkpoint's data state) and a resume
    reuses it, so the --max_train_samples subsample, the order and the noise are those of the unbroken run (which is
    run here with the drawn seed given explicitly: the same code path once the seed is known, hence bit for bit)."""
    common = ["--max_train_samples", "8", "--checkpointing_steps", "2"]

    def run_without_seed(output_dir, steps):
        argv = train_args(tiny_sd15, pickapic, output_dir, *common, steps=steps)
        i = argv.index("--seed")
        try:
            return train.main(argv[:i] + argv[i + 2:])
        finally:
            reset_accelerate()

    run_without_seed(tmp_path / "resumed", 2)
    config = json.loads((tmp_path / "resumed" / "training_config.json").read_text())
    assert config["arguments"]["seed"] is None
    seed = int(config["resolved"]["seed"].split()[0])
    assert config["resolved"]["seed"] == f"{seed} (drawn: no --seed given; a resume reuses it)"
    state = json.loads((tmp_path / "resumed" / "checkpoint-2" / "training_state.json").read_text())
    assert state["data"]["seed"] == seed
    run_without_seed(tmp_path / "resumed", 4)
    run_train(tiny_sd15, pickapic, tmp_path / "seeded", *common, "--seed", str(seed), steps=4)
    assert json.loads((tmp_path / "seeded" / "training_config.json").read_text())["resolved"]["seed"] == seed
    straight = load_file(str(tmp_path / "seeded" / "unet.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "unet.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["train_loss"] for m in metrics(tmp_path / "seeded")] == [m["train_loss"] for m in metrics(tmp_path / "resumed")]


def test_finished_run_resumes_to_nothing(tiny_sd15, pickapic, tmp_path):
    run_train(tiny_sd15, pickapic, tmp_path)
    before = load_file(str(tmp_path / "unet.safetensors"))
    assert run_train(tiny_sd15, pickapic, tmp_path) == 2
    after = load_file(str(tmp_path / "unet.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_limit_and_no_temporary_folders(tiny_sd15, pickapic, tmp_path):
    run_train(tiny_sd15, pickapic, tmp_path, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", steps=4)
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]


def test_nonfinite_losses_stop_the_run_and_keep_the_good_checkpoint(tiny_sd15, pickapic, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite for 2 consecutive updates"):
        run_train(tiny_sd15, pickapic, tmp_path, "--learning_rate", "1e30", "--checkpointing_steps", "1",
                  "--max_nonfinite_steps", "2", "--max_grad_norm", "0", steps=10)
    logged = metrics(tmp_path)
    assert logged[0]["skipped_updates"] == 0 and logged[-1]["skipped_updates"] == 2
    assert (tmp_path / "checkpoint-1").exists()
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "checkpoint-1" / "unet.safetensors")).values())


def test_save_pipeline_keeps_frozen_parts_in_original_precision(tiny_sd15, pickapic, tmp_path, cpu_bf16_attention):
    run_train(tiny_sd15, pickapic, tmp_path, "--save_pipeline", "--mixed_precision", "bf16")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32  # SPEC B4
    trained = load_file(str(tmp_path / "unet.safetensors"))
    assert all(torch.equal(pipe.unet.state_dict()[k], trained[k]) for k in trained)


def test_saved_pipeline_samples_with_eval_generate_s_scheduler(tiny_sd15, pickapic, tmp_path):
    """The tiny SD1.5 folder holds a PNDM config, as the real one: the pipeline's own scheduler ("leading" spacing)
    would sample differently from eval.generate's Euler ("linspace"), so --save_pipeline saves eval's."""
    from diffusers import StableDiffusionPipeline

    from eval.generate import load_scheduler

    run_train(tiny_sd15, pickapic, tmp_path, "--save_pipeline")
    saved = StableDiffusionPipeline.from_pretrained(tmp_path).scheduler
    evaluated = load_scheduler(str(tiny_sd15))
    assert type(saved) is type(evaluated)
    settings = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731 - no metadata
    assert settings(saved.config) == settings(evaluated.config) and saved.config.timestep_spacing == "linspace"
    saved.set_timesteps(2)
    evaluated.set_timesteps(2)
    assert torch.equal(saved.timesteps, evaluated.timesteps) and torch.equal(saved.sigmas, evaluated.sigmas)
    card = (tmp_path / "README.md").read_text()
    assert "EulerDiscreteScheduler.from_pretrained" in card and "guidance_scale=8.5" in card


def with_pair_weights(pickapic, folder: Path, weight: float) -> Path:
    """The pickapic training rows with a pair_weight column (the name eval.make_pairs writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = next((Path(pickapic) / "data").glob("train-*.parquet"))
    table = pq.read_table(source)
    table = table.append_column("pair_weight", pa.array([weight] * table.num_rows, pa.float64()))
    (folder / "data").mkdir(parents=True)
    pq.write_table(table, folder / "data" / source.name)
    return folder


def test_pair_weight_column_multiplies_each_pair_loss(tiny_sd15, pickapic, tmp_path):
    run_train(tiny_sd15, pickapic, tmp_path / "plain", "--importance_weighting", "clip_mask")
    # weight 1: each pair's loss times 1.0 is that loss exactly, so the run is bitwise the run without weights
    run_train(tiny_sd15, with_pair_weights(pickapic, tmp_path / "ones", 1.0), tmp_path / "ones-run",
              "--importance_weighting", "clip_mask", "--pair_weight_column", "pair_weight")
    plain, ones = metrics(tmp_path / "plain"), metrics(tmp_path / "ones-run")
    for key in ("train_loss", "implicit_acc_accumulated", "is_weight_mean"):
        assert [m[key] for m in ones] == [m[key] for m in plain]
    trained, reference = load_file(str(tmp_path / "ones-run" / "unet.safetensors")), \
        load_file(str(tmp_path / "plain" / "unet.safetensors"))
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    # weight 2: the first step (same weights, same batch) has every pair's loss doubled, exactly (a power of two)
    run_train(tiny_sd15, with_pair_weights(pickapic, tmp_path / "twos", 2.0), tmp_path / "twos-run",
              "--importance_weighting", "clip_mask", "--pair_weight_column", "pair_weight")
    twos = metrics(tmp_path / "twos-run")
    assert twos[0]["train_loss"] == 2 * plain[0]["train_loss"]
    assert twos[0]["is_weight_mean"] == plain[0]["is_weight_mean"]
    with pytest.raises(ValueError, match="no column pair_weight"):
        run_train(tiny_sd15, pickapic, tmp_path / "missing", "--pair_weight_column", "pair_weight")


# --- data -----------------------------------------------------------------------------------------------------


def dataset_for(pickapic, **overrides):
    argv = ["--pretrained_model_name_or_path", "x", "--dataset_name", str(pickapic), "--resolution", "32",
            "--no_hflip", "--proportion_empty_prompts", "0"]
    args = train.parse_args(argv)
    vars(args).update(overrides)
    return PairDataset(train.filter_rows(train.load_rows(args), args, True), args)


def test_ties_dropped_winner_first_and_corrupt_row_skipped(pickapic):
    from tiny import colour_score
    import torchvision.transforms.functional as TF

    dataset = dataset_for(pickapic)
    assert len(dataset) == 64 - sum(1 for l in train.load_rows(train.parse_args(
        ["--pretrained_model_name_or_path", "x", "--dataset_name", str(pickapic)]))["label_0"] if l == 0.5)
    skipped = 0
    for index in range(len(dataset)):
        item = dataset[(0, 0, index)]
        skipped += item["skipped"]
        winner, loser = item["pixel_values"][:3], item["pixel_values"][3:]
        assert colour_score(TF.to_pil_image(winner * 0.5 + 0.5)) > colour_score(TF.to_pil_image(loser * 0.5 + 0.5))
    assert skipped == 1  # the one truncated JPEG


def test_same_key_same_sample_and_augmentations_vary(pickapic):
    dataset = dataset_for(pickapic, no_hflip=False, random_crop=True, proportion_empty_prompts=0.5)
    a, b = dataset[(0, 3, 5)], dataset[(0, 3, 5)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    captions = {dataset[(0, epoch, 5)]["caption"] for epoch in range(20)}
    assert "" in captions and len(captions) == 2


@pytest.mark.parametrize("form", ["folder", "glob", "file", "save_to_disk", "train_data_dir"])
def test_dataset_sources(pickapic, tmp_path, form):
    argv = ["--pretrained_model_name_or_path", "x"]
    parquet = next((pickapic / "data").glob("train-*.parquet"))
    if form == "folder":
        argv += ["--dataset_name", str(pickapic)]
    elif form == "glob":
        argv += ["--dataset_name", str(pickapic / "data" / "train-*.parquet")]
    elif form == "file":
        argv += ["--dataset_name", str(parquet)]
    elif form == "save_to_disk":
        from datasets import load_dataset

        load_dataset(str(pickapic)).save_to_disk(str(tmp_path / "disk"))
        argv += ["--dataset_name", str(tmp_path / "disk")]
    else:
        argv += ["--train_data_dir", str(pickapic)]  # the official imagefolder path crashed here (SPEC B1)
    rows = train.load_rows(train.parse_args(argv))
    assert len(rows) == 64 and {"jpg_0", "jpg_1", "label_0", "caption"} <= set(rows.column_names)


def test_missing_column_is_named(pickapic, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(next((pickapic / "data").glob("train-*.parquet"))).drop(["label_0"])
    pq.write_table(table, tmp_path / "no_label.parquet")
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(tmp_path / "no_label.parquet")])
    with pytest.raises(ValueError, match="no column label_0"):
        train.filter_rows(train.load_rows(args), args, True)


def test_empty_tokenizer_is_refused():
    with pytest.raises(RuntimeError, match="empty vocabulary.*stable-diffusion-v1-5/stable-diffusion-v1-5|stable-diffusion-v1-5.*empty vocabulary"):
        load_tokenizer("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer", None)


def test_8bit_adam_without_bitsandbytes_says_how_to_install(tiny_sd15, pickapic, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        run_train(tiny_sd15, pickapic, tmp_path, "--use_8bit_adam")


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d", "--winner_preserving_mu", "2"])
    assert "--winner_preserving_mu must be in [0, 1]" in capsys.readouterr().err


# --- through `accelerate launch` ---------------------------------------------------------------------------------


def launch(*args, num_processes=1, timeout=240):
    launcher = ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"] + (["--multi_gpu"] if num_processes > 1 else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([*ACCELERATE, *launcher, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_accelerate_launch_sdxl(tiny_sdxl, pickapic, tmp_path):
    result = launch(*train_args(tiny_sdxl, pickapic, tmp_path, "--use_winner_preserving", "--winner_preserving_mu",
                                "0.6", "--winner_preserving_granularity", "sample", "--use_adafactor",
                                "--gradient_checkpointing", "--unet_init", str(tiny_sdxl), sdxl=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "unet.pth").exists() and len(metrics(tmp_path)) == 2


def test_two_processes_on_cpu_hold_identical_weights(tiny_sd15, pickapic, tmp_path):
    result = launch(*train_args(tiny_sd15, pickapic, tmp_path, "--use_winner_preserving", "--winner_preserving_mu", "0.9"),
                    num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 ranks hold identical UNet weights" in result.stderr + result.stdout
    assert (tmp_path / "checkpoint-2" / "random_states_1.pkl").exists()  # every rank's RNG is saved, not only rank 0's


def test_cli_reports_a_missing_model_clearly(pickapic, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *train_args("no-such-org/no-such-model", pickapic, tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "train.py: error:" in result.stderr and "no-such-org/no-such-model" in result.stderr
