"""Fault injection on the surfaces added after the first round (issue 20): video pairs, the latent cache, a
rectified-flow run killed with SIGKILL, eval.generate killed mid-run, FSDP's sharded checkpoints.

As in test_faults.py, each test injects one fault and checks that nothing is silently wrong: the row is skipped and
counted, or the run stops with one message naming the file and the fix, or it resumes to exactly what an undisturbed
run gives.
"""

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
import data.video as video_data
from test_train import REPO, metrics, reset_accelerate, run_train

# --- video pairs -------------------------------------------------------------------------------------------------


def clip(shade: int, n_frames: int = 8) -> bytes:
    """An 8-frame 32 x 32 mp4 whose red level is `shade` (the frames differ a little, so every one is coded)."""
    from tiny.video import encode_mp4

    return encode_mp4([np.full((32, 32, 3), (shade, 40 + 4 * i, 60), np.uint8) for i in range(n_frames)])


def zero_frame_mp4() -> bytes:
    """A valid mp4 with a video stream and no frame at all."""
    import av
    from tiny.video import video_codec

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(video_codec(), rate=8)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
    return buffer.getvalue()


# A header claiming 16000 x 16000 frames (FFmpeg opens it: it is under its own size limit), then a few bytes.
HUGE_HEADER = b"YUV4MPEG2 W16000 H16000 F8:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(1000)


def video_args(data, *extra):
    return train.parse_args(["--pretrained_model_name_or_path", "x", "--model_family", "wan", "--dataset_name", str(data),
                             "--resolution", "32", "--num_frames", "5", "--seed", "0", "--no_hflip", *extra])


def manifest_dataset(manifest, *extra):
    args = video_args(manifest, *extra)
    return train.pair_dataset(train.filter_rows(train.load_rows(args), args, True), args)


@pytest.fixture
def faulty_videos(tmp_path):
    """A manifest of 8 pairs: rows 1, 3, 4, 5, 6 each hold one bad video (loser side), the others two good ones."""
    folder = tmp_path / "videos"
    folder.mkdir()
    good = clip(200)
    for i in range(8):
        (folder / f"good{i}.mp4").write_bytes(clip(20 + 20 * i))
    bad = {1: ("corrupt.mp4", os.urandom(3000)), 3: ("truncated.mp4", good[: len(good) // 2]),
           4: ("zero_frames.mp4", zero_frame_mp4()), 5: ("huge.y4m", HUGE_HEADER), 6: ("missing.mp4", None)}
    lines = []
    for i in range(8):
        loser = f"good{i}.mp4"
        if i in bad:
            loser, content = bad[i]
            if content is not None:
                (folder / loser).write_bytes(content)
        (folder / f"winner{i}.mp4").write_bytes(good)
        lines.append(json.dumps({"caption": f"pair {i}", "video_0": f"winner{i}.mp4", "video_1": loser, "label_0": 1}))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_bad_videos_skip_their_row_counted_once(faulty_videos):
    """Corrupt, truncated, zero-frame, huge-header and missing videos: each skips its row (the next row takes its
    place), is counted once, and the run goes on."""
    dataset = manifest_dataset(faulty_videos, "--proportion_empty_prompts", "0")
    examples = [dataset[(0, 0, i)] for i in range(8)]
    assert [e["skipped"] for e in examples] == [0, 1, 0, 1, 1, 1, 1, 0]
    assert [e["caption"] for e in examples] == ["pair 0", "pair 2", "pair 2", "pair 7", "pair 7", "pair 7", "pair 7", "pair 7"]
    assert all(e["pixel_values"].shape == (6, 5, 32, 32) for e in examples)


def test_a_huge_frame_header_is_refused_before_decoding(tmp_path):
    """16000 x 16000 frames would take 768 MB each as RGB: refused from the header, with no large allocation."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(video_data.VideoTooLarge, match="16000 x 16000 frames"):
        video_data.decode_clip(HUGE_HEADER, 5)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 200e6  # ru_maxrss is in KiB


def test_frames_over_the_limit_are_refused(monkeypatch):
    """The limit is read from the stream's header, before decoding: with it lowered below the tiny clip's 32 x 32
    the clip is refused (a real over-limit clip, e.g. 8192 x 8192 frames of one colour, is small on disk but takes
    seconds and gigabytes to make and decode)."""
    data = clip(100)
    assert video_data.decode_clip(data, 5).shape == (5, 32, 32, 3)
    monkeypatch.setattr(video_data, "MAX_FRAME_PIXELS", 32 * 32 - 1)
    with pytest.raises(video_data.VideoTooLarge, match="32 x 32 frames"):
        video_data.decode_clip(data, 5)


def test_manifest_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    """Relative paths resolve against the manifest's folder whatever the working directory; absolute paths, `..`
    and symbolic links are followed as written (the manifest is the user's list of local files)."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "lists" / "clips").mkdir(parents=True)
    target = tmp_path / "videos" / "a.mp4"
    target.write_bytes(clip(180))
    shutil.copy(target, tmp_path / "lists" / "clips" / "a.mp4")
    (tmp_path / "lists" / "link.mp4").symlink_to(target)
    loser = tmp_path / "videos" / "b.mp4"
    loser.write_bytes(clip(30))
    forms = ["clips/a.mp4", "../videos/a.mp4", str(target), "link.mp4"]
    manifest = tmp_path / "lists" / "pairs.jsonl"
    manifest.write_text("".join(json.dumps({"caption": "c", "video_0": form, "video_1": str(loser), "label_0": 1}) + "\n"
                                for form in forms))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rows = train.load_rows(video_args(Path(os.path.relpath(manifest, elsewhere))))  # a relative manifest path too
    assert all(Path(path).is_absolute() for path in rows["mp4_0"])
    dataset = manifest_dataset(Path(os.path.relpath(manifest, elsewhere)))
    examples = [dataset[(0, 0, i)] for i in range(4)]
    assert [e["skipped"] for e in examples] == [0, 0, 0, 0]
    assert all(torch.equal(e["pixel_values"], examples[0]["pixel_values"]) for e in examples)


@pytest.mark.parametrize("value", [None, 7, ""])
def test_a_manifest_path_that_is_not_a_string_names_its_line(tmp_path, value):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"caption": "c", "video_0": "a.mp4", "video_1": "b.mp4", "label_0": 1}) + "\n" +
                        json.dumps({"caption": "c", "video_0": "a.mp4", "video_1": value, "label_0": 1}) + "\n")
    with pytest.raises(ValueError, match=f"pairs.jsonl, line 2: video_1 is {value!r}, not a file path"):
        train.load_rows(video_args(manifest))


# --- kill -9 -----------------------------------------------------------------------------------------------------


def kill_when(command, ready, timeout=300) -> subprocess.Popen:
    """Start `command`, SIGKILL it as soon as `ready()` holds (polled every 2 ms); fail if it ends first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the process ended before the kill: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the moment to kill never came")
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    return process


def test_flux_run_killed_while_writing_a_checkpoint_resumes_bit_exact(tiny_flux, pickapic, tmp_path):
    """A rectified-flow run (flux) SIGKILLed while it writes checkpoint-4 resumes from checkpoint-2 (the partial
    folder is not a checkpoint) and ends with the undisturbed run's weights and losses, bit for bit: the same steps
    from the same saved state, on one thread (the killed run is another process with the same thread count)."""
    from test_train import train_args

    common = ["--max_train_samples", "8", "--checkpointing_steps", "2", "--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    run_train(tiny_flux, pickapic, tmp_path / "straight", *common, steps=6)
    killed = tmp_path / "killed"
    kill_when([sys.executable, str(REPO / "train.py"), *train_args(tiny_flux, pickapic, killed, *common, steps=6)],
              lambda: (killed / ".checkpoint-4.tmp").exists() or (killed / "checkpoint-4").exists())
    assert (killed / "checkpoint-2").is_dir() and not (killed / "transformer.safetensors").exists()
    run_train(tiny_flux, pickapic, killed, *common, steps=6)
    straight = load_file(str(tmp_path / "straight" / "transformer.safetensors"))
    resumed = load_file(str(killed / "transformer.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["train_loss"] for m in metrics(killed)] == [m["train_loss"] for m in metrics(tmp_path / "straight")]
    assert not list(killed.glob(".checkpoint-*"))  # the partial folder was cleared by the next save


def test_eval_generate_killed_mid_run_resumes_to_the_same_images(tiny_sd15, tmp_path):
    """eval.generate SIGKILLed after its first images: run again, it generates only the missing ones, and every
    image equals the undisturbed run's, bit for bit (each image's noise comes from its own seed)."""
    from eval.generate import generate, parse_args
    from PIL import Image

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"a shape number {i}"} for i in range(10)]))

    def argv(out):
        return ["--pretrain_path", str(tiny_sd15), "--test_json", str(prompts), "--height", "32", "--width", "32",
                "--steps", "3", "--output_path", str(out), "--device", "cpu", "--dtype", "fp32"]

    generate(parse_args(argv(tmp_path / "straight")))
    killed = tmp_path / "killed"
    kill_when([sys.executable, "-m", "eval.generate", *argv(killed)], lambda: len(list(killed.rglob("*.png"))) >= 2)
    done = len(list(killed.rglob("*.png")))
    assert done < 10
    result = generate(parse_args(argv(killed)))
    assert result["generated"] >= 10 - done and result["generated"] < 10
    straight, resumed = sorted((tmp_path / "straight").rglob("*.png")), sorted(killed.rglob("*.png"))
    assert [p.name for p in straight] == [p.name for p in resumed] and len(straight) == 10
    for a, b in zip(straight, resumed):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), b.name


def test_eval_make_pairs_killed_mid_run_resumes_to_the_same_pairs(tiny_sd15, tmp_path):
    """eval.make_pairs SIGKILLed while it generates candidates: run again, it ends with the undisturbed run's
    candidates (bit for bit: batch size 1, each candidate from its own seed) and the same pairs, scores included."""
    import pyarrow.parquet as pq
    from PIL import Image

    from eval import make_pairs

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"a shape number {i}"} for i in range(6)]))

    def argv(out):
        return ["--prompts", str(prompts), "--output_dir", str(out), "--pretrain_path", str(tiny_sd15), "--height", "32",
                "--width", "32", "--steps", "2", "--num_candidates", "3", "--seed", "7", "--batch_size", "1",
                "--scorers", "colour", "--pair_rule", "margin", "--margin", "0.1", "--device", "cpu", "--dtype", "fp32"]

    def rows(out):
        return [row for f in sorted((out / "data").glob("train-*.parquet")) for row in pq.read_table(f).to_pylist()]

    def make(out):
        try:
            return make_pairs.main(argv(out))
        finally:
            reset_accelerate()  # make_pairs holds accelerate's process state

    make(tmp_path / "straight")
    killed = tmp_path / "killed"
    kill_when([sys.executable, "-m", "eval.make_pairs", *argv(killed)],
              lambda: len(list((killed / "candidates").rglob("*.png"))) >= 2 if (killed / "candidates").is_dir() else False)
    assert len(list((killed / "candidates").rglob("*.png"))) < 18 and not (killed / "data").exists()
    make(killed)
    assert rows(killed) == rows(tmp_path / "straight") and rows(killed)
    straight = sorted(p.relative_to(tmp_path / "straight") for p in (tmp_path / "straight" / "candidates").rglob("*.png"))
    assert straight == sorted(p.relative_to(killed) for p in (killed / "candidates").rglob("*.png"))
    for path in straight:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "straight" / path)), np.asarray(Image.open(killed / path)))


@pytest.fixture(scope="module")
def wan_and_pairs(tmp_path_factory):
    from tiny import build_video_pairs, build_wan

    root = tmp_path_factory.mktemp("wan-kill")
    return build_wan(root / "wan"), build_video_pairs(root / "pairs")["parquet"]


def test_wan_run_killed_while_writing_a_checkpoint_resumes_bit_exact(wan_and_pairs, tmp_path):
    """The same for a video run (wan): SIGKILLed while it writes checkpoint-4, resumed, the undisturbed run's
    weights and losses bit for bit (random clip starts included: they are keyed by (seed, epoch, index))."""
    from test_train import train_args

    model, pairs = wan_and_pairs
    common = ["--num_frames", "5", "--checkpointing_steps", "2", "--random_crop", "--use_winner_preserving",
              "--winner_preserving_mu", "0.5"]
    run_train(model, pairs, tmp_path / "straight", *common, steps=6)
    killed = tmp_path / "killed"
    kill_when([sys.executable, str(REPO / "train.py"), *train_args(model, pairs, killed, *common, steps=6)],
              lambda: (killed / ".checkpoint-4.tmp").exists() or (killed / "checkpoint-4").exists())
    assert (killed / "checkpoint-2").is_dir() and not (killed / "transformer.safetensors").exists()
    run_train(model, pairs, killed, *common, steps=6)
    straight = load_file(str(tmp_path / "straight" / "transformer.safetensors"))
    resumed = load_file(str(killed / "transformer.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["train_loss"] for m in metrics(killed)] == [m["train_loss"] for m in metrics(tmp_path / "straight")]
