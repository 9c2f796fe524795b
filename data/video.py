"""Video preference pairs for train.py's video families (wan, cogvideox): sources, decoding, frame sampling, transforms.

Rows are Pick-a-Pic-style with videos instead of images: `mp4_0`, `mp4_1`, `label_0` (1: video 0 preferred, 0: video
1, 0.5: tie) and the caption column. They come from

- parquet / arrow files or a folder of them (`mp4_0`/`mp4_1` hold encoded video bytes), through data.rows.load_rows;
- WebDataset shards with `<key>.mp4_0.mp4`, `<key>.mp4_1.mp4`, `<key>.label_0.txt` and `<key>.caption.txt` or
  `<key>.original_prompt.txt`, through data.rows.load_rows (shards stream);
- a JSONL manifest of local files (`--dataset_name pairs.jsonl`): one object a line with `caption`, `video_0`,
  `video_1` (paths, relative to the manifest's folder unless absolute) and `label_0`, read by `data.rows.load_manifest`;
  `video_0`/`video_1` become `mp4_0`/`mp4_1` holding the absolute paths.

Each video is decoded with PyAV and turned upright by its display-matrix rotation (eval.video.upright_rgb, shared
with scoring: phone footage stored sideways plays, trains and scores upright). `--num_frames` frames are taken `--frame_stride` source frames apart, or at
`--target_fps` (the nearest source frame to each time step of 1/target_fps, from the container's frame rate); the clip
is centred in the video, or starts at a random frame with `--random_crop`. Frames are resized so that the clip covers
`--video_size` (the shorter side to `--resolution` for a square size; bilinear, antialiased), cropped (centre, or
random with `--random_crop`), flipped with p = 0.5 unless `--no_hflip`, and scaled to [-1, 1]: one crop and one flip
per video, the same for all of its frames. Every random choice comes from the generator keyed by (seed, epoch,
index), as for images, so batches are identical after a resume. A video that cannot be decoded, has fewer frames
than the clip needs, or frames larger than 8K UHD (refused from its header, before any frame is decoded), skips its
row (the next row takes its place) and is counted in `skipped_rows`, as is a pair with no preference signal: winner
and loser the same file, or the same decoded frames. Each bad row is counted once per reason (`skipped_by_reason` in
training_state.json and the end summary).

An example's `pixel_values` are (2 x 3, F, H, W): the winner's (3, F, H, W) then the loser's along the channels, as
image pairs are (6, H, W); SFT keeps the winner alone.
"""

from __future__ import annotations

import io
import logging
import math
import random
from pathlib import Path

import torch

from data.rows import UnusableCaption, bad_row, decode_image, valid_caption  # the image rule: a caption is a caption

logger = logging.getLogger("train")


class VideoTooShort(ValueError):
    pass


class VideoTooLarge(ValueError):
    pass


# The largest frame decoded: 8K UHD. A file's header can claim any size, and a small file can hold huge frames that
# compress well (a uniform colour); a clip of such frames would take gigabytes as RGB and as floats: its row is skipped.
MAX_FRAME_PIXELS = 7680 * 4320


class BadVideo(ValueError):
    """A video of a row that cannot be used, naming the video; `reason` is its skip reason (train.py counts them)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def video_name(value) -> str:
    """A video for messages: its path, or the size of the bytes a parquet/WebDataset row holds."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return str(value)


def same_source(first, second) -> bool:
    """The two videos of a row are one file (the same path or the same bytes)."""
    if isinstance(first, dict) and isinstance(second, dict):
        first, second = first.get("bytes") or first.get("path"), second.get("bytes") or second.get("path")
    return type(first) is type(second) and first == second


# --- arguments -------------------------------------------------------------------------------------------------


def add_video_arguments(parser):
    video = parser.add_argument_group("video (wan, cogvideox): mp4 pairs, frame sampling, memory")
    video.add_argument("--num_frames", type=int, default=None,
                       help="Frames per training clip; default the model's (wan 81, cogvideox 49). wan: 4k + 1; "
                            "cogvideox: 8k + 1 (an odd number of latent frames, as its VAE decodes).")
    video.add_argument("--frame_stride", type=int, default=1, help="Take every k-th source frame.")
    video.add_argument("--target_fps", type=float, default=None,
                       help="Instead of --frame_stride: sample the clip at this frame rate (nearest source frames).")
    video.add_argument("--video_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                       help="Training frame size; default --resolution square if given, else the model's "
                            "(wan 480 x 832, cogvideox 480 x 720).")
    video.add_argument("--vae_tiling", action="store_true",
                       help="Encode frames in overlapping spatial tiles (the VAE's enable_tiling): less memory, "
                            "slightly different latents. The VAE always encodes one video at a time (slicing).")
    return video


def check_video_args(parser, args, family):
    """Video defaults and refusals, before anything loads; for an image family, video flags are refused."""
    given = [flag for flag, value, default in (("--num_frames", args.num_frames, None), ("--frame_stride", args.frame_stride, 1),
                                               ("--target_fps", args.target_fps, None), ("--video_size", args.video_size, None),
                                               ("--vae_tiling", args.vae_tiling, False)) if value != default]
    if not getattr(family, "video", False):
        if given:
            parser.error(f"{', '.join(given)}: video options, and {args.model_family} is an image model family "
                         f"(video families: wan, cogvideox)")
        return
    if args.video_size is not None and args.resolution is not None:
        parser.error("give --resolution (a square size) or --video_size HEIGHT WIDTH, not both")
    if args.video_size is None:
        args.video_size = [args.resolution] * 2 if args.resolution is not None else list(family.default_video_size)
    height, width = args.video_size
    if height < 16 or width < 16 or height % 16 or width % 16:
        parser.error(f"--video_size (or --resolution): the video size must be multiples of 16 for {args.model_family} "
                     f"(8x VAE, then 2x2 patches), got {height} x {width}")
    args.resolution = min(height, width)  # what the image checks and the logs read
    if args.num_frames is None:
        args.num_frames = family.default_num_frames
    step = family.frame_multiple
    if args.num_frames < 1 or (args.num_frames - 1) % step:
        parser.error(f"--num_frames {args.num_frames}: {args.model_family} takes {step}k + 1 frames "
                     f"({family.frame_rule}), e.g. {1 + step * max(1, (args.num_frames - 1) // step)}")
    if args.frame_stride < 1:
        parser.error(f"--frame_stride must be >= 1, got {args.frame_stride}")
    if args.target_fps is not None and (args.frame_stride != 1 or not args.target_fps > 0):
        parser.error("--target_fps needs a positive rate and no --frame_stride (choose one way to space the frames)")
    if args.choice_model:
        parser.error("--choice_model relabels image pairs with an image scorer; it does not take videos")


# --- sources ---------------------------------------------------------------------------------------------------


# --- decoding and frame sampling -------------------------------------------------------------------------------


def open_video(value):
    """PyAV container for encoded bytes, a {"bytes", "path"} dict (datasets' undecoded Video) or a file path."""
    import av

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(value)))
    if isinstance(value, (str, Path)):
        return av.open(str(value))
    raise ValueError(f"not a video: {type(value).__name__}")


def clip_indices(total: int, fps: float | None, num_frames: int, stride: int, target_fps: float | None,
                 position: float | None) -> list[int]:
    """Source frame indices of the clip: `num_frames` frames `stride` apart, or at `target_fps` (nearest source frame
    to each multiple of fps / target_fps); the clip starts at `position` x (the last possible start) rounded down,
    or centred when `position` is None. Raises VideoTooShort when the video holds fewer frames than that."""
    if target_fps is not None:
        if not fps:
            raise ValueError("the video has no frame rate, so --target_fps cannot be applied")
        step = fps / target_fps
        offsets = [int(math.floor(i * step + 0.5)) for i in range(num_frames)]
    else:
        offsets = [i * stride for i in range(num_frames)]
    room = total - 1 - offsets[-1]
    if room < 0:
        raise VideoTooShort(f"{total} frames, the clip needs {offsets[-1] + 1}")
    start = room // 2 if position is None else min(int(position * (room + 1)), room)
    return [start + offset for offset in offsets]


def decode_clip(value, num_frames: int, stride: int = 1, target_fps: float | None = None,
                position: float | None = None) -> torch.Tensor:
    """The clip's frames, (F, H, W, 3) uint8, upright (the container's display rotation applied, eval.video.upright_rgb).
    Frames are decoded in order up to the clip's last one only."""
    from eval.video import upright_rgb

    with open_video(value) as container:
        stream = container.streams.video[0]
        check_frame_size(stream.codec_context.width, stream.codec_context.height)  # before any frame is decoded
        fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        total = stream.frames
        if not total:  # no count in the container: count the packets (demuxing only, no decoding), then rewind
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        wanted = clip_indices(total, fps, num_frames, stride, target_fps, position)
        frames, keep = [], collections_counter(wanted)
        for index, frame in enumerate(container.decode(stream)):
            if index in keep:
                check_frame_size(frame.width, frame.height)  # a stream can change size midway
                array = torch.from_numpy(upright_rgb(frame))  # the display rotation applied, as for scoring
                frames.extend([array] * keep[index])  # a low source rate can repeat a frame under --target_fps
            if index >= wanted[-1]:
                break
    if len(frames) < num_frames:
        raise VideoTooShort(f"decoded {len(frames)} of the {num_frames} frames the clip needs")
    return torch.stack(frames)


def decode_image_frame(value) -> torch.Tensor:
    """A conditioning image (bytes, a {"bytes", "path"} dict, a path or a PIL image) as one RGB frame (1, H, W, 3) uint8."""
    import numpy as np

    return torch.from_numpy(np.asarray(decode_image(value)).copy())[None]


def check_frame_size(width: int, height: int):
    if width * height > MAX_FRAME_PIXELS:
        raise VideoTooLarge(f"{width} x {height} frames, more than the {MAX_FRAME_PIXELS} pixels (8K UHD) decoded")


def collections_counter(items) -> dict:
    counts = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def transform_clip(frames: torch.Tensor, size: tuple[int, int], random_crop: bool, hflip: bool,
                   rng: random.Random) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, h, w) in [-1, 1]: resize to cover (h, w) keeping the aspect ratio (bilinear,
    antialiased), crop (centre or random), maybe flip, all frames alike."""
    import torchvision.transforms.functional as TF

    height, width = size
    video = frames.permute(0, 3, 1, 2).float() / 255.0  # (F, 3, H, W)
    scale = max(height / video.shape[-2], width / video.shape[-1])
    resized = (max(height, round(video.shape[-2] * scale)), max(width, round(video.shape[-1] * scale)))
    video = TF.resize(video, list(resized), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if random_crop:
        top, left = rng.randint(0, resized[0] - height), rng.randint(0, resized[1] - width)
    else:
        top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    video = video[..., top : top + height, left : left + width]
    if hflip and rng.random() < 0.5:
        video = video.flip(-1)
    return (video.clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3).contiguous()


# --- the dataset -----------------------------------------------------------------------------------------------


class VideoPairDataset(torch.utils.data.Dataset):
    """data.pairs.PairDataset for videos: the same keys, candidates, skipping, caption rules and random streams; pixels
    (6, F, H, W) winner first (SFT: (3, F, H, W)). Built by data.pairs.pair_dataset for a video family."""

    def __init__(self, rows, args):
        self.rows, self.size = rows, tuple(args.video_size)
        self.random_crop, self.hflip = args.random_crop, not args.no_hflip
        self.num_frames, self.stride, self.target_fps = args.num_frames, args.frame_stride, args.target_fps
        self.proportion_empty_prompts, self.caption_column = args.proportion_empty_prompts, args.caption_column
        self.winner_only = args.train_method == "sft"
        # image-to-video (families/wan22.py): both clips from their video's first frame, cropped and flipped alike;
        # with --conditioning_image_column the row's image stands in for both first frames
        self.from_first_frame = getattr(args, "conditioning_image", None) == "first_frame"
        self.image_column = getattr(args, "conditioning_image_column", None)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        index, n = key[2], len(self.rows)
        return self.example(key, (self.rows[(index + offset) % n] for offset in range(n)))

    def example(self, key, candidates) -> dict:
        seed, epoch, index = key
        rng = random.Random(f"{seed}-{epoch}-{index}")
        # Where each clip starts in its video: drawn first, so that a skipped row does not shift the later draws.
        positions = [rng.random(), rng.random()] if self.random_crop else [None, None]
        if self.from_first_frame:
            positions = [0.0, 0.0]
        bad_rows = []
        for attempt, row in enumerate(candidates):
            try:
                if not valid_caption(row[self.caption_column]):
                    raise UnusableCaption(f"unusable caption {row[self.caption_column]!r}")
                clips = [self.decode(row, side, positions[side]) for side in (0, 1)]
                if same_source(row["mp4_0"], row["mp4_1"]) or torch.equal(clips[0], clips[1]):
                    raise BadVideo(f"mp4_0 and mp4_1 are the same {'file' if same_source(row['mp4_0'], row['mp4_1']) else 'frames'} "
                                   f"({video_name(row['mp4_0'])}): the pair has no preference signal",
                                   "no preference signal")
                image = self.decode_image(row) if self.image_column else None
                break
            except Exception as error:  # noqa: BLE001 - an undecodable or too short video skips the row
                bad_rows.append(bad_row(self.rows, epoch, index + attempt, getattr(error, "reason", "undecodable video"), error))
                logger.debug(f"{key}: row skipped ({type(error).__name__}: {error})")
        else:
            raise RuntimeError(f"row {index}: {bad_rows[0][2].split(': ', 1)[-1]}; and no row after it has two decodable "
                               f"videos of {self.num_frames} frames and a caption either: check the mp4_0/mp4_1 "
                               f"(video_0/video_1) and {self.caption_column} columns, and --num_frames / --frame_stride")
        skipped = int(attempt > 0)
        if row["label_0"] == 0:
            clips.reverse()  # winner first
        caption = row[self.caption_column]
        if not isinstance(caption, str):
            caption = rng.choice(list(caption))
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        state = rng.getstate()  # before the transforms: image-to-video repeats their crop and flip
        if self.winner_only:
            pixels = transform_clip(clips[0], self.size, self.random_crop, self.hflip, rng)
        else:
            pixels = []
            for clip in clips:
                if self.from_first_frame:
                    rng.setstate(state)  # the same crop and flip for both: the shared first frame stays one image
                pixels.append(transform_clip(clip, self.size, self.random_crop, self.hflip, rng))
            pixels = torch.cat(pixels)
        if image is not None:  # the conditioning image as both clips' first frame, with the clips' crop and flip
            rng.setstate(state)
            first = transform_clip(image, self.size, self.random_crop, self.hflip, rng)[:, 0]
            pixels[:3, 0] = first
            if pixels.shape[0] == 6:
                pixels[3:, 0] = first
        return {"pixel_values": pixels, "caption": caption, "skipped": skipped, "bad_rows": bad_rows}

    def decode(self, row, side: int, position) -> torch.Tensor:
        """decode_clip of the row's video `side`; a failure is a BadVideo naming the video and its reason."""
        value = row[f"mp4_{side}"]
        try:
            return decode_clip(value, self.num_frames, self.stride, self.target_fps, position)
        except Exception as error:  # noqa: BLE001 - any decoding failure skips the row
            reason = ("video too short" if isinstance(error, VideoTooShort) else
                      "video too large" if isinstance(error, VideoTooLarge) else "undecodable video")
            raise BadVideo(f"mp4_{side} {video_name(value)}: {reason} ({error})", reason) from error

    def decode_image(self, row) -> torch.Tensor:
        """The row's conditioning image (--conditioning_image_column); a failure is a BadVideo naming it."""
        value = row[self.image_column]
        try:
            return decode_image_frame(value)
        except Exception as error:  # noqa: BLE001 - any decoding failure skips the row
            raise BadVideo(f"{self.image_column} {video_name(value)}: undecodable image ({error})",
                           "undecodable image") from error
