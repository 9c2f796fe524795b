"""The benchmark harnesses on the tiny models, the real architectures' sizes, and the step's speed properties:
no host synchronisation inside train.compute_loss, the closed-form lambda equal to the official autograd one, and
the speed flags training like the default. Timings are reported, never asserted."""

import json

import pytest
import torch

import train
from families.noise import importance_log_weight_coefficients
from families import DDPMNoise, make_family
from benchmarks import bench_data, bench_eval, bench_train
from benchmarks.models import CLIP_BIGG_TEXT, CLIP_L_TEXT, SD15_UNET, SDXL_UNET, VAE, build
from benchmarks.official_step import official_compute_loss, official_lose_scale
from test_train import metrics, reset_accelerate, run_train


def records_of(capsys):
    return json.loads(capsys.readouterr().out)


def test_real_architectures_have_the_released_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**SD15_UNET)) == 859_520_964
        assert count(UNet2DConditionModel(**SDXL_UNET)) == 2_567_463_684
        assert count(AutoencoderKL(**VAE)) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT))) == 694_659_840


def test_flop_count_of_the_sd15_step_on_the_meta_device(capsys):
    bench_train.main(["--config", "sd15", "--flops", "meta", "--batch", "1", "--safeguard", "on", "--json"])
    (record,) = records_of(capsys)
    parts = record["tflop_breakdown"]
    assert record["step_s"] is None and record["tflop_per_step"] == parts["total"] > 0
    assert parts["policy_forward"] == parts["reference_forward"] > 1.0  # two 64x64 UNet passes: ~0.8 TFLOP each
    assert parts["backward_and_loss"] == pytest.approx(2 * parts["policy_forward"], rel=0.05)
    assert 0 < parts["text_encoder_1"] < 0.01 * parts["total"]  # why caching text embeddings is not worth it
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=1e-3)


def test_train_harness_on_tiny(capsys):
    try:
        bench_train.main(["--config", "tiny", "--method", "diffusion-dpo", "sft", "--safeguard", "both", "--batch", "1",
                          "--steps", "2", "--warmup", "1", "--step", "both", "--json"])
    finally:
        reset_accelerate()
    records = records_of(capsys)
    assert [(r["method"], r["safeguard"], r["step"]) for r in records] == [
        ("diffusion-dpo", False, "ours"), ("diffusion-dpo", False, "official"),
        ("diffusion-dpo", True, "ours"), ("diffusion-dpo", True, "official"),
        ("sft", False, "ours"), ("sft", False, "official")]
    for r in records:
        assert {"config", "method", "safeguard", "batch", "step_s", "pairs_per_s", "peak_mem_mb"} <= r.keys()
        assert r["config"] == "tiny" and r["batch"] == 1 and r["step_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["pairs_per_s"] == pytest.approx(1 / r["step_s"], rel=1e-3) and r["tflop_per_step"] > 0
        assert r["command"].startswith("python benchmarks/bench_train.py --config tiny") and r["date"]
    safeguarded = [r for r in records if r["safeguard"]]
    assert all(0 < r["lambda_s"] < r["step_s"] and "on_off_ratio" in r for r in safeguarded)
    assert all("speedup_vs_official" in r for r in records if r["step"] == "ours")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny_bench(request):
    models = build("tiny", sdxl_tiny=request.param == "sdxl")
    return models


REFUSED = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def refuse_host_reads(monkeypatch):
    """Reading a tensor's value on the host (a device synchronisation on GPU) raises inside the step."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() inside the training step: a host synchronisation on GPU")
        return method

    for name in REFUSED:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def step_args(models, method, *flags):
    argv = ["--pretrained_model_name_or_path", "x", "--dataset_name", "x", "--train_method", method, "--resolution",
            "32", "--train_batch_size", "2", "--mixed_precision", "no", "--use_winner_preserving",
            "--winner_preserving_mu", "0.5", "--noise_offset", "0.1", "--input_perturbation", "0.1",
            "--timestep_range", "100", "800"]
    return train.parse_args(argv + (["--sdxl"] if models.sdxl else []) + list(flags))


@pytest.mark.parametrize("method", train.METHODS)
def test_the_step_reads_nothing_on_the_host(tiny_bench, method, monkeypatch):
    """train.compute_loss and the backward pass, every option that adds work to the step switched on."""
    from diffusers import DDPMScheduler

    from benchmarks.models import SCHEDULE

    models = tiny_bench
    args = step_args(models, method, "--winner_preserving_granularity", "sample" if method == "dmpo" else "batch",
                     "--importance_weighting", "full" if method == "dspo" else "clip_mask")
    coefficients = importance_log_weight_coefficients(DDPMScheduler(**SCHEDULE))
    batch = bench_train.synthetic_batch(args, models.tokenizers, "cpu", torch.Generator().manual_seed(0))
    refuse_host_reads(monkeypatch)
    loss, step_metrics, weight_metrics, relabelled = train.compute_loss(
        args, batch, models.unet, models.ref_unet, models.vae, models.text_encoders, make_family(args),
        DDPMNoise(DDPMScheduler(**SCHEDULE)), torch.float32, coefficients)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in [*step_metrics.values(), *weight_metrics.values()])
    assert weight_metrics and relabelled is None  # the importance weights ran too
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.unet.parameters())
    models.unet.zero_grad(set_to_none=True)


def test_the_lora_step_reads_nothing_on_the_host(tiny_bench, monkeypatch):
    """With --use_lora the reference is the policy with its adapters disabled (train.adapters_disabled)."""
    import copy

    models = tiny_bench
    args = step_args(models, "diffusion-dpo", "--use_lora", "--lora_rank", "2")
    unet = copy.deepcopy(models.unet)
    train.add_lora(unet, args, torch.float32)

    def reference(*inputs, **kwargs):
        with train.adapters_disabled(unet):
            return unet(*inputs, **kwargs)

    batch = bench_train.synthetic_batch(args, models.tokenizers, "cpu", torch.Generator().manual_seed(0))
    refuse_host_reads(monkeypatch)
    from diffusers import DDPMScheduler

    from benchmarks.models import SCHEDULE

    loss, *_ = train.compute_loss(args, batch, unet, reference, models.vae, models.text_encoders, make_family(args),
                                  DDPMNoise(DDPMScheduler(**SCHEDULE)), torch.float32)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for _, p in train.trainable_parameters(unet))


def test_the_guard_catches_the_official_steps_host_reads(tiny_bench, monkeypatch):
    """The same guard on the official-style step raises: the test above can fail."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from benchmarks.models import SCHEDULE

    models = tiny_bench
    args = step_args(models, "diffusion-dpo")
    batch = bench_train.synthetic_batch(args, models.tokenizers, "cpu", torch.Generator().manual_seed(0))
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="no")
        refuse_host_reads(monkeypatch)
        with pytest.raises(AssertionError, match="host synchronisation"):
            official_compute_loss(args, batch, models.unet, models.ref_unet, models.vae, models.text_encoders,
                                  DDPMScheduler(**SCHEDULE), torch.float32, accelerator, models.tokenizers)
    finally:
        monkeypatch.undo()
        reset_accelerate()


def host_reads_in_training(monkeypatch, *args, **kwargs) -> int:
    """train.main's tensor-value reads outside the DataLoader (whose workers decode and transform on the CPU)."""
    import collections
    import sys

    counts = collections.Counter()

    def in_data_loading():
        frame = sys._getframe(2)
        while frame is not None:
            if "torch/utils/data/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def counting(name, original):
        def method(self, *a, **k):
            if not in_data_loading():
                counts[name] += 1
            return original(self, *a, **k)
        return method

    for name in REFUSED:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        run_train(*args, **kwargs)
    finally:
        monkeypatch.undo()
    return sum(counts.values())


def test_the_training_loop_reads_the_host_once_per_update_not_per_micro_batch(tiny_sd15, pickapic, tmp_path, monkeypatch):
    """Two updates of 1 or of 4 micro-batches: the same number of host reads (the non-finite guard and the logging
    read once per update; a read per micro-batch, such as int(batch["skipped"]), would add 6)."""
    common = ("--use_winner_preserving", "--checkpointing_steps", "100")
    one = host_reads_in_training(monkeypatch, tiny_sd15, pickapic, tmp_path / "one", *common)
    four = host_reads_in_training(monkeypatch, tiny_sd15, pickapic, tmp_path / "four", *common,
                                  "--gradient_accumulation_steps", "4")
    assert four == one


@pytest.mark.parametrize("case", ["random", "loser_aligned", "opposed"])
def test_closed_form_lambda_equals_the_official_autograd_lambda(case):
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(8, 4, 8, 8, generator=generator)
    pred = target + 0.3 * torch.randn(8, 4, 8, 8, generator=generator)
    win_residual = (pred - target)[:4]
    if case == "loser_aligned":  # loser residual = 3 x winner residual: lambda = (1 - mu) / 3 < 1
        pred = torch.cat([pred[:4], target[4:] + 3 * win_residual])
    elif case == "opposed":  # <R_l, R_w> < 0: lambda = 1
        pred = torch.cat([pred[:4], target[4:] - win_residual])
    ours = train.winner_preserving_scale(pred, target, mu=0.4)
    official = official_lose_scale(pred, target, mu=0.4)
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    if case == "loser_aligned":
        assert ours.item() == pytest.approx(0.6 / 3, rel=1e-4)
    if case == "opposed":
        assert ours.item() == 1.0


def test_speed_flags_train_like_the_default(tiny_sd15, pickapic, tmp_path):
    """--fused_adam and --channels_last change results only by rounding: the same losses over 3 steps (to 2e-3: at
    beta 5000 a 1e-7 rounding difference in a denoising MSE moves the margin by 2.5e-4)."""
    run_train(tiny_sd15, pickapic, tmp_path / "default", steps=3)
    run_train(tiny_sd15, pickapic, tmp_path / "fast", "--fused_adam", "--channels_last", steps=3)
    default, fast = metrics(tmp_path / "default"), metrics(tmp_path / "fast")
    assert [m["train_loss"] for m in fast] == pytest.approx([m["train_loss"] for m in default], rel=2e-3)


def test_torch_compile_flag_compiles_both_unets_in_place(tiny_bench):
    import copy

    args = step_args(tiny_bench, "diffusion-dpo", "--torch_compile")
    unet, ref_unet = copy.deepcopy(tiny_bench.unet), copy.deepcopy(tiny_bench.ref_unet)
    keys = list(unet.state_dict())
    train.apply_speed_options(args, unet, ref_unet, None)
    assert unet._compiled_call_impl is not None and ref_unet._compiled_call_impl is not None  # compiled lazily
    assert list(unet.state_dict()) == keys  # checkpoints keep their keys


def test_fused_adam_is_refused_with_other_optimizers(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d", "--fused_adam", "--use_adafactor"])
    assert "--fused_adam is for torch's AdamW" in capsys.readouterr().err


def test_data_harness_on_tiny(capsys):
    bench_data.main(["--workers", "0", "1", "--batch", "2", "--batches", "2", "--pairs", "8", "--resolution", "32",
                     "--image_size", "40", "64", "--sdxl", "--json"])
    records = records_of(capsys)
    assert [r["workers"] for r in records] == [0, 1]
    for r in records:
        assert r["pairs_per_s"] > 0 and r["pairs_per_s_per_worker"] > 0 and r["first_batch_s"] > 0
    assert records[1]["persistent_workers"] and not records[0]["persistent_workers"]


def test_eval_harness_on_tiny(capsys):
    bench_eval.main(["--generate", "tiny", "--gen_batch", "2", "--steps", "2", "--scorers", "clip", "imagereward",
                     "--score_images", "3", "--score_batch", "2", "--image_size", "64", "--repeats", "1", "--json"])
    records = records_of(capsys)
    assert [(r["bench"], r.get("scorer")) for r in records] == [("generate", None), ("score", "clip"),
                                                                 ("score", "imagereward")]
    assert all(r["images_per_s"] > 0 and r["device"].startswith("CPU") for r in records)
    assert records[0]["batch"] == 2 and records[0]["steps"] == 2


def test_flow_family_flops_use_the_real_architectures():
    """benchmarks/flops_families.py: the FLUX.1-dev transformer config gives the released model's parameter count, and
    the step's FLOPs split into its parts (meta device, a small resolution to keep it quick)."""
    from benchmarks.flops_families import flops_per_pair

    record = flops_per_pair("flux", 256, False)
    assert record["parameters"]["denoiser"] == 11_901_408_320
    parts = record["parts_tflop"]
    assert all(v > 0 for v in parts.values()) and abs(sum(parts.values()) - record["tflop_per_pair"]) < 1e-6
    assert parts["backward_and_loss"] == pytest.approx(2 * parts["policy_forward"], rel=0.05)


def test_memory_table_arithmetic():
    from benchmarks.memory_table import table

    rows = {(r["model"], r["strategy"], r["latents_cache"]): r for r in table(gpus=8)}
    sd15 = rows[("SD1.5", "DDP", False)]
    assert sd15["denoiser_params"] == 859_520_964
    assert sd15["state_gb"] == pytest.approx(18 * 859_520_964 / 1e9)
    assert rows[("FLUX.1-dev", "DDP", False)]["fits"] == []  # a full FLUX fine-tune needs sharding
    flux = rows[("FLUX.1-dev", "DDP", True)]["denoiser_params"]  # FSDP: the policy's 16 bytes / 8, the reference whole
    assert rows[("FLUX.1-dev", "FSDP x8", True)]["state_gb"] == pytest.approx((16 * flux / 8 + 2 * flux) / 1e9)
    assert rows[("FLUX.1-dev", "FSDP x8", True)]["fits"] == [80]
    assert ("Wan2.1-1.3B", "LoRA", True) not in rows  # no cache for the video families
