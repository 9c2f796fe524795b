"""eval/generate.py and prompts/build.py on the tiny models and the real prompt files (CPU, 32x32, 3 steps)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.generate import (GenerateError, encode, generate, load_models, load_scheduler, main, parse_args, read_prompt,
                           resolve_args, save_png)

REPO = Path(__file__).resolve().parent.parent
SIZE, STEPS = 32, 3
RUN = f"papv2_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg"


def run(base, prompts, out=None, unet=None, n=3, **flags):
    """generate() with the test-size defaults; extra flags as keyword arguments (True = bare flag)."""
    argv = ["--pretrain_path", str(base), "--test_json", str(prompts), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", str(STEPS), "--max_prompts", str(n)]
    argv += ["--unet_path", str(unet)] if unet else []
    argv += ["--output_path", str(out)] if out else []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    return generate(parse_args(argv))


def images(manifest) -> list[np.ndarray]:
    return [np.asarray(Image.open(x["gen_image_path"]), dtype=np.int16) for x in json.loads(Path(manifest).read_text())]


def assert_close(a, b, max_diff=1, frac=0.01):
    """Same images up to float noise: no pixel off by more than `max_diff`, almost all identical. A pixel moves by one
    level only when its float value lies within the two paths' float difference of a rounding boundary, so the share of
    moved pixels is about that difference in levels (float32 rounding through the sampler and VAE: well under 1e-2);
    a real difference moves most pixels by many levels (docs/testing.md)."""
    for x, y in zip(a, b, strict=True):
        diff = np.abs(x - y)
        assert diff.max() <= max_diff and (diff > 0).mean() <= frac, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine are ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def papv2(shared_dir):
    return shared_dir / "prompts" / "papv2.json"


@pytest.fixture(scope="module")
def unet_files(tiny_sd15, tmp_path_factory):
    """The tiny SD1.5 UNet's weights as unet.pth (plain state dict, like the released checkpoints) and .safetensors."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("ckpt")
    state = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    torch.save(state, folder / "unet.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "unet.safetensors")
    return folder


@pytest.fixture(scope="module")
def sd15_run(tiny_sd15, papv2, unet_files, tmp_path_factory):
    """The official usage: --unet_path unet.pth, outputs next to it, batch size 1."""
    out = tmp_path_factory.mktemp("run")
    shutil.copy(unet_files / "unet.pth", out / "unet.pth")
    result = run(tiny_sd15, papv2, unet=out / "unet.pth")
    return out, result


def test_official_outputs(sd15_run, papv2):
    out, result = sd15_run
    assert result["run_name"] == RUN and result["generated"] == 3
    prompts = json.loads(papv2.read_text(encoding="utf-8"))[:3]
    manifest = json.loads((out / f"{RUN}.json").read_text(encoding="utf-8"))
    assert [list(x) for x in manifest] == [["prompt", "gen_image_path", "raw_image_path", "metadata"]] * 3
    for i, (entry, source) in enumerate(zip(manifest, prompts)):
        assert entry == {"prompt": source["prompt"], "gen_image_path": os.path.join(str(out), RUN, f"{i}_{SIZE}x{SIZE}.png"),
                         "raw_image_path": "", "metadata": {}}
        image = Image.open(entry["gen_image_path"])
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert image.getexif()[0x010E] == source["prompt"] == read_prompt(entry["gen_image_path"])  # EXIF
    assert sorted(os.listdir(out / RUN)) == [f"{i}_{SIZE}x{SIZE}.png" for i in range(3)] + ["run.json"]
    with zipfile.ZipFile(out / f"{RUN}.zip") as archive:
        assert sorted(archive.namelist()) == sorted(os.listdir(out / RUN))[:-1]  # the images
    a, b, _ = images(out / f"{RUN}.json")
    assert np.abs(a - b).mean() > 1  # different prompts, different images (same initial noise)


def test_batch_size_invariance(tiny_sd15, papv2, sd15_run, tmp_path):
    out, _ = sd15_run
    result = run(tiny_sd15, papv2, tmp_path, unet=out / "unet.pth", batch_size=3)
    assert_close(images(result["manifest"]), images(out / f"{RUN}.json"))


def test_unet_formats_give_identical_images(tiny_sd15, papv2, sd15_run, unet_files, tmp_path):
    reference = images(sd15_run[0] / f"{RUN}.json")
    for name, unet in [("safetensors", unet_files / "unet.safetensors"), ("pipeline", tiny_sd15),
                       ("unet_folder", tiny_sd15 / "unet"), ("train_output", unet_files)]:
        result = run(tiny_sd15, papv2, tmp_path / name, unet=unet, n=1)
        assert np.array_equal(images(result["manifest"])[0], reference[0]), name


def test_default_output_path_and_output_alias(tiny_sd15, tiny_sdxl, unet_files, papv2):
    assert parse_args(["--output", "x"]).output_path == "x"  # the official shells pass --output
    common = ["--test_json", str(papv2)]
    args = resolve_args(parse_args(common + ["--pretrain_path", str(tiny_sd15), "--unet_path", str(unet_files / "unet.pth")]))
    assert args.output_path == str(unet_files) and not args.sdxl and (args.height, args.width) == (512, 512)
    assert args.vae_path is None  # SD1.5: the base model's VAE
    args = resolve_args(parse_args(common + ["--pretrain_path", str(tiny_sdxl), "--unet_path", str(tiny_sdxl)]))
    assert args.output_path == str(tiny_sdxl) and args.sdxl and (args.height, args.width) == (1024, 1024)
    assert args.vae_path == "madebyollin/sdxl-vae-fp16-fix"
    assert resolve_args(parse_args(common + ["--sdxl", "--output_path", "x"])).pretrain_path == "stabilityai/stable-diffusion-xl-base-1.0"


def test_exif_keeps_non_ascii_prompts(tmp_path):
    prompt = "A podcast called “Defending Democracy” — café"
    save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), prompt, tmp_path / "x.png")
    assert read_prompt(tmp_path / "x.png") == prompt and not (tmp_path / "x.png.tmp").exists()


def test_resume_skips_done_images_and_redoes_corrupt_one(tiny_sd15, papv2, sd15_run, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(sd15_run[0], out)
    (out / f"{RUN}.json").unlink()
    reference = images(sd15_run[0] / f"{RUN}.json")
    files = [out / RUN / f"{i}_{SIZE}x{SIZE}.png" for i in range(3)]
    files[1].write_bytes(files[1].read_bytes()[:100])  # a run killed while writing
    mtimes = [f.stat().st_mtime_ns for f in files]
    result = run(tiny_sd15, papv2, unet=out / "unet.pth")
    assert (result["generated"], result["skipped"]) == (1, 2)
    assert [f.stat().st_mtime_ns for f in files][::2] == mtimes[::2]
    assert [np.array_equal(x, y) for x, y in zip(images(out / f"{RUN}.json"), reference)] == [True] * 3
    assert run(tiny_sd15, papv2, unet=out / "unet.pth")["generated"] == 0  # complete: loads no model at all


def test_guidance_formulas(tiny_sd15, papv2, tmp_path):
    """Official eps_c + s(eps_c - eps_u) equals standard guidance with scale s + 1."""
    official = run(tiny_sd15, papv2, tmp_path, n=1, cfg=2.0)
    standard = run(tiny_sd15, papv2, tmp_path, n=1, cfg=3.0, guidance_formula="standard")
    same_scale = run(tiny_sd15, papv2, tmp_path, n=1, cfg=2.0, guidance_formula="standard")
    assert official["run_name"].endswith("_2.0cfg") and standard["run_name"].endswith("_3.0cfg_standard")
    assert_close(images(official["manifest"]), images(standard["manifest"]))
    assert all(np.abs(x - y).mean() > 1 for x, y in zip(images(official["manifest"]), images(same_scale["manifest"])))


def test_matches_diffusers_pipeline(tiny_sd15, tiny_sdxl, papv2, tmp_path):
    """The hand-written loop = diffusers' pipeline with Euler, negative prompt "" and guidance cfg + 1."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    prompt = json.loads(papv2.read_text(encoding="utf-8"))[0]["prompt"]
    noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator("cpu").manual_seed(0))
    for base, cls, extra in [(tiny_sd15, StableDiffusionPipeline, {"vae_path": tiny_sd15}),
                             (tiny_sdxl, StableDiffusionXLPipeline, {"vae_path": tiny_sdxl})]:
        ours = images(run(base, papv2, tmp_path / base.name, n=1, **extra)["manifest"])
        kwargs = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
        pipe = cls.from_pretrained(base, scheduler=EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"), **kwargs)
        theirs = pipe(prompt, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      guidance_scale=8.5, latents=noise, output_type="np").images[0]
        assert_close(ours, [np.round(theirs * 255).astype(np.int16)], max_diff=1, frac=0.02)


def test_sdxl_detected_and_outputs(tiny_sdxl, shared_dir, tmp_path):
    """SDXL chosen from model_index.json; partiprompts entries (with neg_prompt) give the same manifest shape."""
    parti = shared_dir / "prompts" / "partiprompts.json"
    one = run(tiny_sdxl, parti, tmp_path / "b1", n=2, vae_path=tiny_sdxl)
    two = run(tiny_sdxl, parti, tmp_path / "b2", n=2, vae_path=tiny_sdxl, batch_size=2)
    assert one["run_name"] == f"partiprompts_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg"
    manifest = json.loads(Path(one["manifest"]).read_text())
    prompts = [x["prompt"] for x in json.loads(parti.read_text())[:2]]
    assert [x["prompt"] for x in manifest] == prompts and [list(x) for x in manifest][0][1] == "gen_image_path"
    assert Image.open(manifest[0]["gen_image_path"]).getexif()[0x010E] == prompts[0]
    assert_close(images(one["manifest"]), images(two["manifest"]))


def test_sdxl_empty_prompt_is_encoded_not_zeroed(tiny_sdxl, papv2):
    """Official: uncond = real encoding of "" (diffusers' SDXL default would zero it)."""
    from diffusers import StableDiffusionXLPipeline

    args = resolve_args(parse_args(["--pretrain_path", str(tiny_sdxl), "--vae_path", str(tiny_sdxl),
                                    "--test_json", str(papv2), "--output_path", "x"]))
    emb, pooled = encode(load_models(args, torch.device("cpu"), torch.float32), ["", "a cat"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ref = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True, negative_prompt="")
    torch.testing.assert_close(emb[1], ref[0][0]), torch.testing.assert_close(pooled[1], ref[2][0])
    torch.testing.assert_close(emb[0], ref[1][0]), torch.testing.assert_close(pooled[0], ref[3][0])
    assert pooled[0].abs().sum() > 0


def test_scheduler_follows_base_config(tiny_sd15, tiny_sdxl, tmp_path):
    """Real SD1.5 ships a PNDM config without timestep_spacing -> Euler linspace; SDXL's says leading."""
    base = tmp_path / "sd15"
    shutil.copytree(tiny_sd15 / "scheduler", base / "scheduler")
    config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    config.pop("timestep_spacing", None)  # as in stable-diffusion-v1-5's file (written by diffusers 0.6)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    sd15, sdxl = load_scheduler(str(base)), load_scheduler(str(tiny_sdxl))
    sd15.set_timesteps(50), sdxl.set_timesteps(50)
    assert float(sd15.timesteps[0]) == 999 and float(sd15.init_noise_sigma) == pytest.approx(float(sd15.sigmas.max()))
    assert float(sdxl.timesteps[0]) == 981 and float(sdxl.timesteps[-1]) == 1
    assert float(sdxl.init_noise_sigma) == pytest.approx((float(sdxl.sigmas.max()) ** 2 + 1) ** 0.5)


def test_lora_matches_merged_weights(tiny_sd15, papv2, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.3)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    torch.save(merged, tmp_path / "merged.pth")
    lora = images(run(tiny_sd15, papv2, tmp_path / "a", n=1, lora_path=tmp_path / "lora")["manifest"])
    assert_close(lora, images(run(tiny_sd15, papv2, tmp_path / "b", n=1, unet=tmp_path / "merged.pth")["manifest"]))
    base = images(run(tiny_sd15, papv2, tmp_path / "c", n=1)["manifest"])
    assert all(np.abs(x - y).mean() > 1 for x, y in zip(lora, base))


def test_actionable_errors(tiny_sd15, tiny_sdxl, papv2, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    torch.save(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").state_dict(), tmp_path / "xl.pth")
    with pytest.raises(GenerateError, match=r"(?s)does not match the base UNet.*unexpected keys.*add_embedding.*SDXL UNet.*--sdxl"):
        run(tiny_sd15, papv2, unet=tmp_path / "xl.pth")
    torch.save({"module." + k: v for k, v in torch.load(tmp_path / "xl.pth").items()}, tmp_path / "wrapped.pth")
    with pytest.raises(GenerateError, match="'module.'"):
        run(tiny_sdxl, papv2, unet=tmp_path / "wrapped.pth", vae_path=tiny_sdxl)
    with pytest.raises(GenerateError, match="prompts/build.py"):
        run(tiny_sd15, tmp_path / "prompts" / "papv2.json", tmp_path)
    with pytest.raises(GenerateError, match="does not exist"):
        run(tiny_sd15, papv2, unet=tmp_path / "nope.pth")
    with pytest.raises(GenerateError, match="not an SDXL pipeline"):
        run(tiny_sd15, papv2, tmp_path, sdxl=True)
    with pytest.raises(SystemExit, match="^error: --output_path is required"):  # the CLI prints, no traceback
        main(["--pretrain_path", str(tiny_sd15), "--test_json", str(papv2)])


# ------------------------------------------------------------------------------------------------- prompts/build.py


def test_build_from_dir_copies_and_validates(shared_dir, tmp_path):
    build = [sys.executable, str(REPO / "prompts" / "build.py"), "--out_dir", str(tmp_path / "out")]
    done = subprocess.run(build + ["--from_dir", str(shared_dir / "prompts")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("papv2", "hpsv2", "partiprompts"):
        assert (tmp_path / "out" / f"{name}.json").read_bytes() == (shared_dir / "prompts" / f"{name}.json").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "papv2.json").write_text(json.dumps(json.loads((shared_dir / "prompts" / "papv2.json").read_text())[:-1]))
    done = subprocess.run(build + ["papv2", "--force", "--from_dir", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "486 entries, the official file has 487" in done.stderr


def test_build_from_sources_reproduces_official_bytes(shared_dir, tmp_path):
    """hpsv2 from the four HPDv2 style files and partiprompts from PartiPrompts.tsv give the official files' bytes."""
    import csv

    from prompts.build import entries, hpsv2_prompts, partiprompts_prompts, write

    hps = [x["prompt"] for x in json.loads((shared_dir / "prompts" / "hpsv2.json").read_text(encoding="utf-8"))]
    styles = tmp_path / "benchmark"
    styles.mkdir()
    for k, style in enumerate(("anime", "concept-art", "paintings", "photo")):
        (styles / f"{style}.json").write_text(json.dumps(hps[800 * k : 800 * (k + 1)]), encoding="utf-8")
    parti = [x["prompt"] for x in json.loads((shared_dir / "prompts" / "partiprompts.json").read_text(encoding="utf-8"))]
    with open(tmp_path / "PartiPrompts.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerows([["Prompt", "Category", "Challenge", "Note"]] + [[p, "Abstract", "Basic", ""] for p in parti])
    write("hpsv2", entries("hpsv2", hpsv2_prompts(str(styles))), tmp_path)
    write("partiprompts", entries("partiprompts", partiprompts_prompts(str(tmp_path))), tmp_path)
    for name in ("hpsv2", "partiprompts"):
        assert (tmp_path / f"{name}.json").read_bytes() == (shared_dir / "prompts" / f"{name}.json").read_bytes()


def test_build_papv2_from_pickapic_parquet(pickapic, shared_dir, tmp_path):
    from prompts.build import entries, main as build_main, write
    from tiny import toy_captions

    main_out = tmp_path / "out"
    build_main(["papv2", "--pickapic", str(pickapic), "--out_dir", str(main_out)])
    built = json.loads((main_out / "papv2.json").read_text())
    assert built == [{"prompt": c, "gen_image_path": "", "raw_image_path": "", "metadata": {}} for c in toy_captions()]
    official = json.loads((shared_dir / "prompts" / "papv2.json").read_text(encoding="utf-8"))
    write("papv2", entries("papv2", [x["prompt"] for x in official]), tmp_path)  # non-ASCII kept, as official
    assert (tmp_path / "papv2.json").read_bytes() == (shared_dir / "prompts" / "papv2.json").read_bytes()


# ------------------------------------------------------------------------------------------- scripts/eval/*.sh


@pytest.fixture(scope="module")
def scorer_config(tmp_path_factory):
    from tiny.scorers import build_tiny_scorers

    folder = tmp_path_factory.mktemp("scorers")
    (folder / "config.json").write_text(json.dumps(build_tiny_scorers(folder)))
    return folder / "config.json"


def eval_shell(script, unet, output, cwd, **env):
    """Run scripts/eval/<script> UNET --max_prompts 2 from `cwd` with the given environment; (returncode, log text)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PROMPT_GROUPS": "papv2", **{k: str(v) for k, v in env.items()}}
    done = subprocess.run(["bash", str(REPO / "scripts" / "eval" / script), str(unet), "--max_prompts", "2"],
                          cwd=cwd, env=env, capture_output=True, text=True)
    log = Path(output) / f"joint_test_{env.get('SIZE', 512)}.log"
    return done.returncode, log.read_text() if log.exists() else done.stdout + done.stderr


def test_eval_shell_end_to_end(tiny_sd15, shared_dir, unet_files, scorer_config, tmp_path):
    """Generate with the tiny SD1.5 and score with the five tiny scorers; run from another folder, relative path."""
    (tmp_path / "ckpt").mkdir()
    shutil.copy(unet_files / "unet.pth", tmp_path / "ckpt" / "unet.pth")
    code, log = eval_shell("test_sd15.sh", "ckpt/unet.pth", tmp_path / "ckpt", tmp_path, PRETRAIN=tiny_sd15, SIZE=SIZE,
                           STEP=2, PROMPTS_DIR=shared_dir / "prompts", SCORE_ARGS=f"--scorer_config {scorer_config}")
    assert code == 0, log
    assert ">>> Generating papv2" in log and (tmp_path / "ckpt" / f"papv2_seed0_{SIZE}x{SIZE}_2s_7.5cfg.json").is_file()
    assert "UNet: ckpt/unet.pth | weights: UNet file ckpt/unet.pth | output: ckpt" in log
    metrics = ["PickScore", "HPSv2", "AesScore", "CLIPScore", "ImageReward"]
    assert [line.split()[1] for line in log.splitlines() if line.startswith("FinalResults")] == metrics
    assert "[WARN] papv2: 2 of 487 prompts scored (a --max_prompts run)" in log  # a smoke run says so
    last = log.split("FinalResults ImageReward for papv2 : ")[1].split()[0]
    assert log.rstrip().endswith(f"| papv2 | ImageReward | {last} | 2 |")  # the gathered table comes last, with n


def test_eval_shell_arguments(shared_dir, tmp_path):
    """The commands the shells run, recorded by a stand-in interpreter: official flags, SDXL mode, resume, errors."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[[ $1 == -c ]] && exec {sys.executable} "$@"\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "xl"
    out.mkdir()
    (out / "unet.safetensors").write_bytes(b"")
    env = dict(PYTHON=fake, PRETRAIN="base", VAE="vae", DEVICE="cpu", BATCH=2, PROMPTS_DIR=shared_dir / "prompts")
    code, log = eval_shell("test_sdxl.sh", out / "unet.safetensors", out, tmp_path, SIZE=1024, **env)
    assert code == 0, log
    weights_call, generate_call, score_call, gather_call = calls.read_text().splitlines()[1:]
    assert weights_call.startswith("-m eval.generate --print_weights --unet_path")
    assert generate_call.split() == [
        "-m", "eval.generate", "--test_json", str(shared_dir / "prompts" / "papv2.json"),
        "--unet_path", str(out / "unet.safetensors"), "--output", str(out), "--height", "1024", "--width", "1024",
        "--steps", "50", "--cfg", "7.5", "--seed", "0", "--sdxl", "--pretrain_path", "base", "--vae_path", "vae",
        "--device", "cpu", "--batch_size", "2", "--max_prompts", "2"]
    assert score_call == f"-m eval.score --json_path {out}/papv2_seed0_1024x1024_50s_7.5cfg.json --device cpu"
    assert gather_call == f"-m eval.score --gather_scores --table_out {out}/joint_test_1024_table"  # stub: no scores

    calls.unlink()
    (out / "papv2_seed0_512x512_50s_7.0cfg.json").write_text("[]")  # CFG=7 names runs "7.0cfg", as Python prints it
    code, log = eval_shell("test_sd15.sh", out / "unet.safetensors", out, tmp_path, CFG=7, **env)
    assert code == 0 and "generation skipped" not in log, log  # an existing manifest may be a smoke run's: resumed
    assert [c.split()[:3] for c in calls.read_text().splitlines()[1:]][1:] == [
        ["-m", "eval.generate", "--test_json"], ["-m", "eval.score", "--json_path"], ["-m", "eval.score", "--gather_scores"]]
    assert f"--json_path {out}/papv2_seed0_512x512_50s_7.0cfg.json" in calls.read_text()

    code, log = eval_shell("test_sd15.sh", "missing/unet.pth", tmp_path, tmp_path, **env)
    assert code == 2 and "does not exist" in log
