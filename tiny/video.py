"""Tiny Wan2.1-like and CogVideoX-like text-to-video pipelines in the diffusers folder layouts, and a tiny video
preference data set (mp4 pairs) in three forms: parquet, a JSONL manifest of local files, WebDataset shards.

The models keep what training depends on from the real configs (component classes, latent channels, VAE compression
8x spatial and 4x temporal, latent normalisation, patch sizes, scheduler configs, text lengths) and shrink the rest
(widths, depths, vocabularies). The T5/UMT5 tokenizers are trained offline as tiny.flow.build_t5_tokenizer does.

    build_wan("work/tiny-wan")              # transformer/ vae/ text_encoder/ tokenizer/ scheduler/ (WanPipeline)
    build_cogvideox("work/tiny-cogvideox")  # the same folders (CogVideoXPipeline); rotary=True: CogVideoX-5b-like
    build_video_pairs("work/video-pairs")   # {"parquet": ..., "manifest": ..., "webdataset": ...}
    build_wan22_ti2v / build_wan22_a14b / build_wan_i2v   # Wan2.2-TI2V-5B-, A14B- (two experts) and Wan2.1-I2V-like

Which facts about the real models are known and which are assumed is said next to each setting.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from tiny.data import ATTRIBUTE_COLOURS, SHAPES, draw_shape, toy_captions
from tiny.flow import _name_t5_fast, build_t5_tokenizer

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers/scheduler/scheduler_config.json as far as I know (diffusers' Wan documentation:
# "By default, Wan uses the UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, ...)",
# default flow_shift 3.0 for Wan, 5.0 recommended for 720p). Not read from the hub here (no network): an assumption
# in its details (solver_order 2, the beta fields, which flow matching ignores), a fact in what training reads:
# flow_shift and num_train_timesteps.
WAN_SCHEDULER = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", predict_x0=True,
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", timestep_spacing="linspace", steps_offset=0,
)

# THUDM/CogVideoX-2b/scheduler/scheduler_config.json: the values diffusers' scripts/convert_cogvideox_to_diffusers.py
# writes (read there): CogVideoXDDIMScheduler, v_prediction, scaled_linear betas 0.00085..0.012, zero terminal SNR,
# trailing spacing, snr_shift_scale 3.0. CogVideoX-5b's config differs (as far as I know: snr_shift_scale 1.0, not
# checked here); the family reads whatever the model's scheduler/ says.
COGVIDEOX_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
    timestep_spacing="trailing", steps_offset=0,
)


def _umt5_encoder(d_model: int, vocab_size: int, seed: int):
    """A UMT5 encoder (google/umt5-xxl's architecture: gated-GELU T5 v1.1 blocks, per-layer relative position bias)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)


def build_wan(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Wan2.1-T2V-like WanPipeline folder.

    Known from the real configs (diffusers' convert_wan_to_diffusers.py and AutoencoderKLWan's defaults, which are the
    Wan2.1 VAE's): transformer patch_size (1, 2, 2), 16 latent channels in and out, qk_norm "rms_norm_across_heads",
    cross_attn_norm, text_dim = the UMT5 width (4096 there), eps 1e-6; VAE AutoencoderKLWan with z_dim 16,
    dim_mult (1, 2, 4, 4) (8x spatial), temperal_downsample (False, True, True) (4x temporal, causal: 4k + 1 frames ->
    k + 1 latent frames) and its per-channel latents_mean / latents_std (the defaults, kept); UMT5 text encoder,
    T5-style tokenizer (the model_index names T5TokenizerFast). Tiny here: transformer 2 layers x 2 heads x 16 dims
    (1.3B: 30 x 12 x 128), VAE base_dim 8 (96), UMT5 width 32 (4096). Assumed: the scheduler details (WAN_SCHEDULER).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    out_dir = Path(out_dir)
    text_width = 32
    tokenizer = build_t5_tokenizer(out_dir / "tokenizer")  # model_max_length 512: WanPipeline's max_sequence_length
    torch.manual_seed(seed + 5)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=text_width, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=_umt5_encoder(text_width, len(tokenizer), seed + 6), vae=vae,
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER), transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
    _name_t5_fast(out_dir, "tokenizer")
    return out_dir


def build_cogvideox(out_dir: str | os.PathLike, rotary: bool = False, resolution: int = 32, num_frames: int = 5,
                    seed: int = 0) -> Path:
    """A tiny CogVideoX-like CogVideoXPipeline folder: CogVideoX-2b-like (sincos positional embeddings), or with
    `rotary=True` CogVideoX-5b-like (use_rotary_positional_embeddings, learned embeddings off, VAE scaling 0.7).

    Known from the real configs (diffusers' convert_cogvideox_to_diffusers.py): transformer patch_size 2,
    16 latent channels, temporal_compression_ratio 4, max_text_seq_length 226 (the tokenizer pads to it: CogVideoX's
    T5 takes 226 tokens), rotary embeddings on the 5b only; VAE AutoencoderKLCogVideoX with 16 latent channels, 8x
    spatial and 4x temporal compression, scaling_factor 1.15258426 (2b) or 0.7 (5b); text encoder T5 v1.1-XXL (a
    T5EncoderModel); scheduler as COGVIDEOX_SCHEDULER. sample_height/width/frames are the transformer's default
    size: 60 x 90 latents, 49 frames there (480 x 720 px); here `resolution` px square, `num_frames` frames.
    Tiny: 2 layers x 2 heads x 16 dims (2b: 30 x 30 x 64; 5b: 42 x 48 x 64), VAE widths 8-16, T5 width 32.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    from tiny.flow import _t5_encoder

    out_dir = Path(out_dir)
    text_width = 32
    tokenizer = build_t5_tokenizer(out_dir / "tokenizer", model_max_length=226)
    torch.manual_seed(seed + 5)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
        text_embed_dim=text_width, num_layers=2, sample_width=resolution // 8, sample_height=resolution // 8,
        sample_frames=num_frames, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
        use_rotary_positional_embeddings=rotary, use_learned_positional_embeddings=False,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
        # sample size 2x the frames: tiled encoding (--vae_tiling) starts above half of it, as 240 x 360 px there
        temporal_compression_ratio=4, sample_height=2 * resolution, sample_width=2 * resolution,
        scaling_factor=0.7 if rotary else 1.15258426,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(text_width, len(tokenizer), seed + 6), vae=vae,
        transformer=transformer, scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER),
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# --- video preference pairs ----------------------------------------------------------------------------------------


def video_codec() -> str:
    """An H.264 encoder if the installed PyAV has one (libx264), else MPEG-4 part 2: both play everywhere."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames, fps: int = 8) -> bytes:
    """RGB frames (a list of HxWx3 uint8 arrays or PIL images, even sides) -> mp4 bytes, yuv420p, near-lossless."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = video_codec()
        stream = container.add_stream(codec, rate=Fraction(fps))
        first = np.asarray(frames[0])
        stream.height, stream.width, stream.pix_fmt = first.shape[0], first.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "4", "preset": "ultrafast"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.asarray(frame)), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def moving_shape(shape: str, colour, size, n_frames: int, rng: random.Random) -> list:
    """One shape drifting along a straight line across a grey background (PIL images, one per frame): `draw_shape`
    with the same size and colour jitter in every frame (drawn once), shifted a little more each frame."""
    dx, dy = rng.uniform(-0.3, 0.3) * size[0], rng.uniform(-0.3, 0.3) * size[1]  # drift over the whole clip, px
    jitter = rng.random()
    frames = []
    for i in range(n_frames):
        image = draw_shape(shape, colour, size, random.Random(jitter))
        step = i / max(n_frames - 1, 1)
        frames.append(image.transform(image.size, 0, (1, 0, -round(dx * step), 0, 1, -round(dy * step)),
                                      fillcolor=(200, 200, 200)))
    return frames


def _video_rows(n_pairs: int, seed: int, tie_fraction: float, n_frames: int, sizes: tuple[int, int], fps: int,
                corrupt: bool, short: bool, shared_first_frame: bool = False) -> list[dict]:
    rng = random.Random(seed)
    captions = toy_captions()
    rows = []
    for i in range(n_pairs):
        shape_index = i % len(SHAPES)
        size = (2 * rng.randint(sizes[0] // 2, sizes[1] // 2), 2 * rng.randint(sizes[0] // 2, sizes[1] // 2))  # even
        preferred = moving_shape(SHAPES[shape_index], ATTRIBUTE_COLOURS["preferred"], size, n_frames, rng)
        rejected = moving_shape(SHAPES[shape_index], ATTRIBUTE_COLOURS["rejected"], size, n_frames, rng)
        if shared_first_frame:  # image-to-video pairs: both clips continue one image
            rejected[0] = preferred[0]
        is_tie = rng.random() < tie_fraction
        winner_first = rng.random() < 0.5
        videos = (preferred, rejected) if winner_first else (rejected, preferred)
        label_0 = 0.5 if is_tie else (1.0 if winner_first else 0.0)
        rows.append({"caption": captions[shape_index], "mp4_0": encode_mp4(videos[0], fps),
                     "mp4_1": encode_mp4(videos[1], fps), "label_0": label_0, "label_1": 1.0 - label_0,
                     "ranking_id": i})
    decided = [row for row in rows if row["label_0"] != 0.5]
    if corrupt and decided:  # bytes that no demuxer reads, on a decided pair (so the tie filter does not hide it)
        decided[min(2, len(decided) - 1)]["mp4_0"] = decided[min(2, len(decided) - 1)]["mp4_0"][:64]
    if short and len(decided) > 1:  # a playable clip of 2 frames: too short for any useful --num_frames
        row = decided[min(5, len(decided) - 1)]
        row["mp4_1"] = encode_mp4(moving_shape(SHAPES[0], ATTRIBUTE_COLOURS["rejected"], (32, 32), 2, rng), fps)
    return rows


def build_video_pairs(out_dir: str | os.PathLike, n_pairs: int = 16, seed: int = 0, tie_fraction: float = 0.15,
                      n_frames: int = 12, sizes: tuple[int, int] = (32, 48), fps: int = 8, corrupt: bool = True,
                      short: bool = True, webdataset: bool = True, shard_size: int = 8,
                      shared_first_frame: bool = False) -> dict[str, Path]:
    """Video preference pairs with a preference a tiny model can learn: both clips of a pair show the caption's shape
    drifting across the frame, the preferred one painted warm (red), the rejected one cool (blue) (tiny.colour_score
    on a frame measures it). Like real sets: ties (label 0.5), varied sizes, either position for the winner, one
    corrupt clip (truncated bytes) and one too short (2 frames), both on decided pairs. The same rows, three ways:

    - `parquet`: `<out_dir>/parquet/data/train-00000-of-00001.parquet`, the Pick-a-Pic-style schema with encoded mp4
      bytes: `mp4_0`, `mp4_1`, `label_0`, `label_1`, `caption`, `ranking_id`;
    - `manifest`: `<out_dir>/manifest/train.jsonl`, one JSON object a line, {"caption", "video_0", "video_1",
      "label_0"}, the video paths relative to the manifest (`videos/000003_0.mp4`), the files beside it;
    - `webdataset` (optional): `<out_dir>/webdataset/train-NNNNN.tar`, `<key>.mp4_0.mp4`, `<key>.mp4_1.mp4`,
      `<key>.label_0.txt`, `<key>.original_prompt.txt`.

    `shared_first_frame`: the rejected clip starts with the preferred clip's first frame (image-to-video pairs).
    Clips are `n_frames` frames at `fps`, H.264 (MPEG-4 part 2 if PyAV has no libx264), yuv420p. Returns the paths.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    rows = _video_rows(n_pairs, seed, tie_fraction, n_frames, sizes, fps, corrupt, short, shared_first_frame)
    paths = {"parquet": out_dir / "parquet", "manifest": out_dir / "manifest" / "train.jsonl"}
    (paths["parquet"] / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"] / "data" / "train-00000-of-00001.parquet")

    videos = paths["manifest"].parent / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    with open(paths["manifest"], "w") as manifest:
        for index, row in enumerate(rows):
            entry = {"caption": row["caption"], "label_0": row["label_0"]}
            for side in (0, 1):
                name = f"videos/{index:06d}_{side}.mp4"
                (paths["manifest"].parent / name).write_bytes(row[f"mp4_{side}"])
                entry[f"video_{side}"] = name
            manifest.write(json.dumps(entry) + "\n")

    if webdataset:
        paths["webdataset"] = out_dir / "webdataset"
        paths["webdataset"].mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, len(rows), shard_size)):
            with tarfile.open(paths["webdataset"] / f"train-{shard:05d}.tar", "w") as tar:
                for index, row in enumerate(rows[start : start + shard_size], start):
                    fields = {"mp4_0.mp4": row["mp4_0"], "mp4_1.mp4": row["mp4_1"],
                              "label_0.txt": str(row["label_0"]).encode(), "label_1.txt": str(row["label_1"]).encode(),
                              "original_prompt.txt": row["caption"].encode()}
                    for field, data in fields.items():
                        member = tarfile.TarInfo(f"{index:06d}.{field}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
    return paths


# --- Wan2.2 and image-to-video (issue 22) ----------------------------------------------------------------------------

# The schedulers' flow_shift: Wan2.2's own configs (Wan-Video/Wan2.2, wan/configs/: sample_shift 12.0 for t2v-A14B,
# 5.0 for i2v-A14B and ti2v-5B; boundary 0.875 for t2v-A14B, 0.900 for i2v-A14B) as far as I know; the diffusers
# conversions may ship another flow_shift (not read here, no network). Training reads whatever scheduler/ says.
WAN22_SHIFT = {"ti2v_5b": 5.0, "t2v_a14b": 12.0, "i2v_a14b": 5.0}
WAN22_BOUNDARY = {"t2v_a14b": 0.875, "i2v_a14b": 0.9}


def _wan_transformer(in_channels: int, out_channels: int, text_width: int, seed: int, **extra):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=out_channels, text_dim=text_width, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **extra,
    )


def _wan21_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True])


def _scheduler(shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**{**WAN_SCHEDULER, "flow_shift": shift})


def build_wan22_ti2v(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Wan2.2-TI2V-5B-like WanPipeline folder (expand_timesteps=True: per-token timesteps).

    Known from diffusers' convert_wan_to_diffusers.py (its Wan2.2-TI2V-5B entries) and the Wan2.2 VAE: transformer
    48 latent channels in and out, patch_size (1, 2, 2); VAE AutoencoderKLWan with z_dim 48, is_residual, 12 in/out
    channels with patch_size 2 (a 2x2 pixel shuffle before the encoder: 16x spatial with dim_mult (1, 2, 4, 4)),
    scale_factor_spatial 16, temporal 4x; 48 latents_mean / latents_std (random here: the real ones are the
    conversion's list). Tiny: transformer 2 layers x 2 heads x 16 dims (5B: 30 x 24 x 128), VAE base_dim 8
    (160 / 256), UMT5 width 32. Assumed: the scheduler details (WAN_SCHEDULER, shift WAN22_SHIFT)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    out_dir = Path(out_dir)
    text_width = 32
    tokenizer = build_t5_tokenizer(out_dir / "tokenizer")
    generator = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=(torch.randn(48, generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(48, generator=generator) + 0.5).tolist(),
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=_umt5_encoder(text_width, len(tokenizer), seed + 6), vae=vae,
        scheduler=_scheduler(WAN22_SHIFT["ti2v_5b"]), transformer=_wan_transformer(48, 48, text_width, seed + 5),
        expand_timesteps=True,
    )
    pipe.save_pretrained(out_dir)
    _name_t5_fast(out_dir, "tokenizer")
    return out_dir


def build_wan22_a14b(out_dir: str | os.PathLike, i2v: bool = False, seed: int = 0) -> Path:
    """A tiny Wan2.2-T2V-A14B-like WanPipeline folder (`i2v=True`: I2V-A14B-like WanImageToVideoPipeline): two
    experts, `transformer` (high noise) and `transformer_2` (low noise), switched at boundary_ratio (0.875 / 0.9).

    Known from diffusers' conversion of the A14B models: both experts WanTransformer3DModel with the Wan2.1 VAE
    (16 latent channels, 8x spatial); I2V: in_channels 36 (16 noisy + 4 mask + 16 image latents), no image encoder
    (image_dim None: only Wan2.1's I2V transformer takes a CLIP embedding). Tiny: each expert 2 layers x 2 heads x
    16 dims (A14B: 40 x 40 x 128), different random weights per expert."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    out_dir = Path(out_dir)
    text_width = 32
    kind = "i2v_a14b" if i2v else "t2v_a14b"
    tokenizer = build_t5_tokenizer(out_dir / "tokenizer")
    channels = 36 if i2v else 16
    parts = dict(
        tokenizer=tokenizer, text_encoder=_umt5_encoder(text_width, len(tokenizer), seed + 6), vae=_wan21_vae(seed + 1),
        scheduler=_scheduler(WAN22_SHIFT[kind]), transformer=_wan_transformer(channels, 16, text_width, seed + 5),
        transformer_2=_wan_transformer(channels, 16, text_width, seed + 7), boundary_ratio=WAN22_BOUNDARY[kind],
    )
    pipe = WanImageToVideoPipeline(**parts) if i2v else WanPipeline(**parts)
    pipe.save_pretrained(out_dir)
    _name_t5_fast(out_dir, "tokenizer")
    return out_dir


def build_wan_i2v(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Wan2.1-I2V-14B-like WanImageToVideoPipeline folder: transformer in_channels 36 (16 noisy + 4 mask +
    16 image latents), image_dim and added_kv_proj_dim set (the CLIP image embedding goes in through added K/V
    projections of the cross-attention), a CLIPVisionModel image encoder (ViT-H/14 there: the pipeline takes its
    penultimate hidden states, 257 tokens x 1280) and its CLIPImageProcessor (224 px, CLIP's mean and std).
    Tiny: CLIP vision 2 layers, width 32, 32 px, patch 8 (17 tokens)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out_dir = Path(out_dir)
    text_width, image_width = 32, 32
    tokenizer = build_t5_tokenizer(out_dir / "tokenizer")
    torch.manual_seed(seed + 8)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=image_width, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=_umt5_encoder(text_width, len(tokenizer), seed + 6), vae=_wan21_vae(seed + 1),
        scheduler=_scheduler(WAN_SCHEDULER["flow_shift"]), image_encoder=image_encoder, image_processor=processor,
        transformer=_wan_transformer(36, 16, text_width, seed + 5, image_dim=image_width, added_kv_proj_dim=32),
    )
    pipe.save_pretrained(out_dir)
    _name_t5_fast(out_dir, "tokenizer")
    return out_dir
