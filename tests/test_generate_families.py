"""eval.generate for the families beyond SD1.5/SDXL, on the tiny models (CPU, 32x32, 3 steps): SD2.x v-prediction
through the official loop (= diffusers' StableDiffusionPipeline with Euler), SD3.5 and FLUX.1 through their own
pipelines with what train.py writes (transformer.pth / .safetensors, LoRA folders); family detection, defaults, run
names, run record, resume, batch invariance, errors; scripts/eval/test_sd3.sh and test_flux.sh."""

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

from eval.generate import GenerateError, generate, main, parse_args, read_prompt, resolve_args

REPO = Path(__file__).resolve().parent.parent
SIZE, STEPS = 32, 3
PROMPTS = ["a red circle on a plain background", "a blue square", "a large green triangle"]
FLOW = ("sd3", "flux")
CFG = {"sd3": 4.5, "flux": 3.5}  # the families' defaults (model cards of SD3.5-medium and FLUX.1-dev)


def run(base, prompts, out=None, unet=None, n=3, **flags):
    """generate() at the test size; extra flags as keyword arguments (True = bare flag)."""
    argv = ["--pretrain_path", str(base), "--test_json", str(prompts), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", str(STEPS), "--max_prompts", str(n), "--no_zip"]
    argv += ["--unet_path", str(unet)] if unet else []
    argv += ["--output_path", str(out)] if out else []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    return generate(parse_args(argv))


def images(result_or_manifest) -> list[np.ndarray]:
    manifest = result_or_manifest["manifest"] if isinstance(result_or_manifest, dict) else result_or_manifest
    return [np.asarray(Image.open(x["gen_image_path"]), dtype=np.int16) for x in json.loads(Path(manifest).read_text())]


def assert_close(a, b, max_diff=1, frac=0.02):
    """Same images up to float noise: no pixel off by more than `max_diff`, almost all identical (the share of pixels a
    float difference can move by one level is about that difference in levels: see test_generate.assert_close)."""
    for x, y in zip(a, b, strict=True):
        diff = np.abs(x - y)
        assert diff.max() <= max_diff and (diff > 0).mean() <= frac, (diff.max(), (diff > 0).mean())


def mean_diff(a, b) -> float:
    return min(float(np.abs(x - y).mean()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "toy.json"
    items = [{"prompt": p, "raw_image_path": "", "metadata": {"i": i}} for i, p in enumerate(PROMPTS)]
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from tiny import build_flux, build_sd2v, build_sd3

    folder = tmp_path_factory.mktemp("bases")
    return {"sd2v": build_sd2v(folder / "sd2v"), "sd3": build_sd3(folder / "sd3"), "flux": build_flux(folder / "flux")}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """train.py's own outputs, 2 steps each: {family: {"full": folder with transformer.pth/.safetensors, "lora":
    folder with pytorch_lora_weights.safetensors}}. Large learning rates, so that the images visibly change."""
    import train
    from accelerate.state import AcceleratorState, GradientState

    from tiny import build_pickapic

    data = build_pickapic(tmp_path_factory.mktemp("data") / "pickapic", n_pairs=8)
    outputs = {}
    for family in FLOW:
        outputs[family] = {}
        for kind, extra in (("full", ["--learning_rate", "1e-2"]), ("lora", ["--learning_rate", "5e-2", "--use_lora"])):
            out = tmp_path_factory.mktemp(f"{family}-{kind}")
            try:
                train.main(["--pretrained_model_name_or_path", str(bases[family]), "--dataset_name", str(data),
                            "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2",
                            "--max_train_steps", "2", "--checkpointing_steps", "2", "--mixed_precision", "no",
                            "--seed", "0", "--lr_warmup_steps", "0", "--report_to", "none", *extra])
            finally:
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
            outputs[family][kind] = out
    return outputs


def initial_noise(channels: int) -> torch.Tensor:
    return torch.randn((1, channels, SIZE // 2, SIZE // 2), generator=torch.Generator("cpu").manual_seed(0))


# ------------------------------------------------------------------------------------------- SD2.x v-prediction


def test_v_prediction_loop_matches_diffusers(bases, prompts, tmp_path):
    """The official loop on a v-prediction model = StableDiffusionPipeline with the same Euler scheduler (guidance
    cfg + 1, negative prompt ""); reading v as epsilon would give other images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    base = bases["sd2v"]
    ours = run(base, prompts, tmp_path, n=1)
    assert ours["run_name"] == f"toy_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg"  # the sd family's official name and cfg
    scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"

    def diffusers_images(scheduler):
        pipe = StableDiffusionPipeline.from_pretrained(base, scheduler=scheduler, safety_checker=None,
                                                       requires_safety_checker=False)
        out = pipe(PROMPTS[0], negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=8.5, latents=initial_noise(4), output_type="np").images[0]
        return [np.round(out * 255).astype(np.int16)]

    assert_close(images(ours), diffusers_images(scheduler))
    as_epsilon = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", prediction_type="epsilon")
    assert mean_diff(images(ours), diffusers_images(as_epsilon)) > 2


# ---------------------------------------------------------------------------------------------- SD3.5 and FLUX.1


@pytest.mark.parametrize("family", FLOW)
def test_flow_family_matches_its_pipeline(family, bases, prompts, tmp_path):
    """Our sampling = the family's diffusers pipeline called with the same noise as `latents` and the default
    guidance (sd3: standard CFG with the encoding of "", flux: the guidance embedding)."""
    import diffusers

    base = bases[family]
    ours = run(base, prompts, tmp_path, n=1)
    pipe = getattr(diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]).from_pretrained(base)
    noise = initial_noise(16)
    if family == "flux":
        noise = pipe._pack_latents(noise, 1, 16, SIZE // 2, SIZE // 2)
    theirs = pipe(PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG[family],
                  latents=noise, output_type="np").images[0]
    assert_close(images(ours), [np.round(theirs * 255).astype(np.int16)])


@pytest.mark.parametrize("family", FLOW)
def test_flow_family_outputs_determinism_and_resume(family, bases, trained, prompts, tmp_path):
    base, weights = bases[family], trained[family]["full"] / "transformer.pth"
    out = tmp_path / "a"
    out.mkdir()
    shutil.copy(weights, out / "transformer.pth")
    first = run(base, prompts, unet=out / "transformer.pth")
    name = f"toy_seed0_{SIZE}x{SIZE}_{STEPS}s_{CFG[family]}cfg"
    assert first["run_name"] == name and first["generated"] == 3
    manifest = json.loads(Path(first["manifest"]).read_text())
    assert [x["prompt"] for x in manifest] == PROMPTS
    assert [x["metadata"] for x in manifest] == [{"i": i} for i in range(3)]
    assert [x["gen_image_path"] for x in manifest] == [os.path.join(str(out), name, f"{i}_{SIZE}x{SIZE}.png")
                                                       for i in range(3)]
    assert [read_prompt(x["gen_image_path"]) for x in manifest] == PROMPTS
    assert Image.open(manifest[0]["gen_image_path"]).size == (SIZE, SIZE)
    record = json.loads((out / name / "run.json").read_text())
    assert record["family"] == family and record["weights"] == f"transformer file {out / 'transformer.pth'}"
    assert record["fingerprint"]["sampling"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert "transformer" in record["fingerprint"]["model"] and record["complete"]

    reference = images(first)
    assert np.array_equal(np.stack(reference), np.stack(images(run(base, prompts, tmp_path / "b", unet=weights))))
    assert_close(reference, images(run(base, prompts, tmp_path / "c", unet=weights, batch_size=3)))

    files = [out / name / f"{i}_{SIZE}x{SIZE}.png" for i in range(3)]
    files[1].unlink()
    again = run(base, prompts, unet=out / "transformer.pth")
    assert (again["generated"], again["skipped"]) == (1, 2)
    assert np.array_equal(np.stack(images(again)), np.stack(reference))

    torch.save({k: v + 0.01 for k, v in torch.load(weights).items()}, out / "transformer.pth")  # retrained, same name
    with pytest.raises(GenerateError, match=r"transformer weights \(--unet_path\): was sha256:\w+, now sha256:\w+"):
        run(base, prompts, unet=out / "transformer.pth")


@pytest.mark.parametrize("family", FLOW)
def test_trained_transformer_and_lora_change_the_images(family, bases, trained, prompts, tmp_path, capsys):
    """train.py's outputs: the full transformer (.pth = .safetensors = its folder) and the LoRA folder (= the adapter
    fused into the transformer) each give other images than the base model."""
    import diffusers
    from safetensors.torch import save_file

    base, full, lora = bases[family], trained[family]["full"], trained[family]["lora"]
    base_images = images(run(base, prompts, tmp_path / "base"))
    from_pth = images(run(base, prompts, tmp_path / "pth", unet=full / "transformer.pth"))
    from_folder = run(base, prompts, tmp_path / "folder", unet=full)  # the folder: transformer.safetensors
    assert json.loads((tmp_path / "folder" / from_folder["run_name"] / "run.json").read_text())["weights"] == \
        f"transformer file {full / 'transformer.safetensors'}"
    assert np.array_equal(np.stack(from_pth), np.stack(images(from_folder)))
    assert mean_diff(from_pth, base_images) > 2

    with_lora = images(run(base, prompts, tmp_path / "lora", unet=lora))
    assert mean_diff(with_lora, base_images) > 0.3
    pipe = getattr(diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]).from_pretrained(base)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, tmp_path / "fused.safetensors")
    assert_close(with_lora, images(run(base, prompts, tmp_path / "fused", unet=tmp_path / "fused.safetensors")))

    capsys.readouterr()
    main(["--transformer_path", str(lora), "--pretrain_path", str(base), "--print_weights"])
    adapter = lora / "pytorch_lora_weights.safetensors"
    assert capsys.readouterr().out == f"base transformer of {base} + LoRA adapter {adapter}\n"


def test_family_detection_defaults_and_errors(bases, trained, prompts, tmp_path):
    common = ["--test_json", str(prompts), "--output_path", str(tmp_path)]

    def resolved(*argv):
        return resolve_args(parse_args(common + list(argv)))

    for family, steps in (("sd3", 40), ("flux", 50)):
        args = resolved("--pretrain_path", str(bases[family]))
        assert (args.model_family, args.sdxl, args.height, args.width, args.steps, args.cfg) == (
            family, False, 1024, 1024, steps, CFG[family])
        assert args.vae_path is None and args.weights.denoiser == "transformer"
    assert resolved("--pretrain_path", str(bases["sd2v"])).model_family == "sd"
    assert resolved("--model_family", "sd3").pretrain_path == "stabilityai/stable-diffusion-3.5-medium"
    assert resolved("--model_family", "flux").pretrain_path == "black-forest-labs/FLUX.1-dev"
    assert parse_args(["--transformer_path", "x"]).unet_path == "x"
    official = run(bases["sd3"], prompts, tmp_path / "official", n=1, cfg=3.5, guidance_formula="official")
    assert official["run_name"].endswith("_3.5cfg_official")  # = standard guidance 4.5, the default run
    assert_close(images(official), images(run(bases["sd3"], prompts, tmp_path / "standard", n=1)))

    with pytest.raises(GenerateError, match="not an SDXL pipeline"):
        resolved("--pretrain_path", str(bases["sd3"]), "--sdxl")
    with pytest.raises(GenerateError, match="--model_family sd was given but .* is a flux model"):
        resolved("--pretrain_path", str(bases["flux"]), "--model_family", "sd")
    with pytest.raises(GenerateError, match="--guidance_formula does not apply to flux"):
        resolved("--pretrain_path", str(bases["flux"]), "--guidance_formula", "standard")
    with pytest.raises(GenerateError, match=r"(?s)does not match the base transformer.*SD3 vs FLUX"):
        run(bases["flux"], prompts, tmp_path / "x", unet=trained["sd3"]["full"] / "transformer.safetensors")
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet.pth")
    with pytest.raises(GenerateError, match=r"(?s)holds a UNet \(SD/SDXL\) but the base model"):
        run(bases["sd3"], prompts, tmp_path / "x", unet=tmp_path / "unet.pth")
    both = tmp_path / "both"
    shutil.copytree(trained["sd3"]["lora"], both)
    shutil.copy(trained["sd3"]["full"] / "transformer.pth", both / "transformer.pth")
    with pytest.raises(GenerateError, match=r"holds both transformer weights \(transformer.pth\) and a LoRA adapter"):
        resolved("--pretrain_path", str(bases["sd3"]), "--unet_path", str(both))
    (tmp_path / "sd-output").mkdir()
    (tmp_path / "sd-output" / "unet.pth").write_bytes(b"")  # a train.py sd output folder, with an sd3 base
    with pytest.raises(GenerateError, match=r"holds nothing to evaluate: no transformer.safetensors .* It holds UNet"):
        resolved("--pretrain_path", str(bases["sd3"]), "--unet_path", str(tmp_path / "sd-output"))


# ------------------------------------------------------------------------------------ scripts/eval/test_{sd3,flux}.sh


def eval_shell(script, weights, cwd, fake, **env):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PROMPT_GROUPS": "toy", "PYTHON": str(fake), **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", str(REPO / "scripts" / "eval" / script), str(weights), "--max_prompts", "2"],
                          cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("family", FLOW)
def test_eval_scripts_pass_the_family_protocol(family, prompts, tmp_path):
    """The commands test_sd3.sh / test_flux.sh run, recorded by a stand-in interpreter: hub base, size, steps, cfg."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[[ $1 == -c ]] && exec {sys.executable} "$@"\n'
                    'exit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "transformer.pth").write_bytes(b"")
    done = eval_shell(f"test_{family}.sh", out / "transformer.pth", tmp_path, fake, PROMPTS_DIR=prompts.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    steps, hub = {"sd3": (40, "stabilityai/stable-diffusion-3.5-medium"),
                  "flux": (50, "black-forest-labs/FLUX.1-dev")}[family]
    generate_call, score_call = calls.read_text().splitlines()[2:4]
    assert generate_call.split() == [
        "-m", "eval.generate", "--test_json", str(prompts), "--unet_path", str(out / "transformer.pth"),
        "--output", str(out), "--height", "1024", "--width", "1024", "--steps", str(steps), "--cfg", str(CFG[family]),
        "--seed", "0", "--model_family", family, "--pretrain_path", hub, "--max_prompts", "2"]
    assert score_call == f"-m eval.score --json_path {out}/toy_seed0_1024x1024_{steps}s_{CFG[family]}cfg.json"


def test_sd3_script_generates_with_a_local_base(bases, trained, prompts, tmp_path):
    """test_sd3.sh with PRETRAIN a local folder, really generating (scoring stubbed): header, weights, manifest."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\n[[ "$1 $2" == "-m eval.score" ]] && exit 0\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "run"
    shutil.copytree(trained["sd3"]["full"], out)
    done = eval_shell("test_sd3.sh", out, tmp_path, fake, PROMPTS_DIR=prompts.parent, PRETRAIN=bases["sd3"],
                      SIZE=SIZE, STEP=2, DEVICE="cpu")
    log = (out / f"joint_test_{SIZE}.log").read_text()
    assert done.returncode == 0, log + done.stderr
    assert f"Transformer: {out} | weights: transformer file {out / 'transformer.safetensors'} | output: {out}" in log
    assert len(json.loads((out / f"toy_seed0_{SIZE}x{SIZE}_2s_4.5cfg.json").read_text())) == 2
