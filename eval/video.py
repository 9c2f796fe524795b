"""Video files for evaluation: writing the generated mp4s, reading them back as frames, and which frames to score.

    write_mp4(frames, "out/0_480x832.mp4", fps=16, prompt="a cat")   # (F, H, W, 3) uint8, the prompt in the metadata
    read_frames("out/0_480x832.mp4")                                  # every frame, PIL RGB, in order
    sample_indices(81, 8)                                             # [0, 11, 23, 34, 46, 57, 69, 80]

Encoding: H.264 (libx264, CRF 17, yuv420p) when the installed PyAV has it, else MPEG-4 part 2 at a high bit rate:
both play everywhere. The prompt is stored as the container's `comment` tag (UTF-8), the way the images store it in
EXIF, so that a resumed run regenerates a file holding another prompt. Decoding uses PyAV (FFmpeg); every decoded
frame goes through `upright_rgb`, which applies the stream's display-matrix rotation (phone footage stored sideways
with a rotation of -90 degrees is turned upright, as players and `ffmpeg` do). Training (video_data.decode_clip)
and scoring (read_frames) share it.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
PROMPT_TAG = "comment"
CRF = "17"  # x264's "visually lossless" end; the scores should measure the model, not the codec


def is_video(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(frames, path: str | os.PathLike, fps: float, prompt: str | None = None) -> None:
    """RGB frames ((F, H, W, 3) uint8 array or tensor, or a list of HxWx3 arrays) -> an mp4 at `fps`, written
    atomically. Odd sizes are padded by one edge pixel (yuv420p needs even sides)."""
    import av

    frames = np.asarray(frames if not hasattr(frames, "numpy") else frames.numpy())
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (frames, height, width, 3) uint8 frames, got shape {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        if prompt is not None:
            container.metadata[PROMPT_TAG] = prompt
        name = codec()
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        if name == "libx264":
            stream.options = {"crf": CRF}
        else:
            stream.bit_rate = 8_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def display_rotation(frame) -> int:
    """Degrees counter-clockwise (a multiple of 90) the frame must be turned to be shown upright: the display matrix
    the container stores (PyAV's VideoFrame.rotation; 0 without one). Mirroring in the matrix is not applied."""
    return int(round((getattr(frame, "rotation", 0) or 0) / 90)) * 90 % 360


def rotate(array: np.ndarray, degrees: int) -> np.ndarray:
    """(H, W, C) array turned `degrees` counter-clockwise (a multiple of 90)."""
    return np.ascontiguousarray(np.rot90(array, k=(degrees // 90) % 4))


def upright_rgb(frame) -> np.ndarray:
    """A decoded PyAV frame as an (H, W, 3) uint8 RGB array, shown the way it is meant to be seen (display rotation
    applied): the one decoding step training and scoring share."""
    return rotate(frame.to_ndarray(format="rgb24"), display_rotation(frame))


def read_frames(path: str | os.PathLike, indices=None) -> list:
    """The video's frames as PIL RGB images, in order (only those at `indices` if given); decoding stops at the last
    frame needed, each turned upright (`upright_rgb`). Raises ValueError naming the file when it cannot be decoded."""
    import av
    from PIL import Image

    wanted = None if indices is None else sorted(set(indices))
    frames = []
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if wanted is None or i in wanted:
                    frames.append(Image.fromarray(upright_rgb(frame)) if display_rotation(frame) else frame.to_image())
                if wanted is not None and i >= wanted[-1]:
                    break
    except (av.error.FFmpegError, OSError, IndexError) as error:  # IndexError: no video stream
        raise ValueError(f"cannot decode video {path}: {error}") from None
    if not frames:
        raise ValueError(f"video {path} has no frames")
    if wanted is not None and len(frames) < len(wanted):
        raise ValueError(f"video {path} has fewer frames than frame {wanted[-1]}")
    return frames


def video_info(path: str | os.PathLike) -> dict:
    """{"frames", "fps", "prompt"} of a video (frames counted by decoding when the container does not say)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for _ in container.decode(video=0))
        return {"frames": frames, "fps": float(stream.average_rate or 0),
                "prompt": container.metadata.get(PROMPT_TAG)}


def count_frames(path: str | os.PathLike) -> int:
    """Frames in a video, by decoding (exact where the container's count is missing or wrong)."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def sample_indices(total: int, n: int) -> list[int]:
    """n frame indices spread evenly over 0 .. total-1, first and last included (all frames when n >= total)."""
    if total < 1:
        raise ValueError("a video needs at least one frame")
    if n >= total:
        return list(range(total))
    if n == 1:
        return [(total - 1) // 2]
    return [round(k * (total - 1) / (n - 1)) for k in range(n)]


def stored_video_prompt(path: Path) -> str | None:
    """The prompt an mp4 stores if it decodes completely ("" when it stores none); None when it is missing or broken
    (a killed run), so that it is generated again."""
    import av

    if not path.is_file():
        return None
    try:
        with av.open(str(path)) as container:
            prompt = container.metadata.get(PROMPT_TAG, "")
            if sum(1 for _ in container.decode(video=0)) == 0:
                return None
            return prompt
    except Exception:  # noqa: BLE001 - any decoding failure means: generate it again
        return None
