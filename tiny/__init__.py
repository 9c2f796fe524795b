"""Tiny offline stand-ins for the real models and data, shared by tests, the demo and the benchmarks.

Nothing here is downloaded: every model is built from a small config with random weights and saved in the
same folder layout as its real counterpart, so the real loading code (`from_pretrained(path)`) runs unchanged.

    from tiny import build_sd15, build_sdxl, build_pickapic
    build_sd15("work/tiny-sd15")                 # diffusers folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/
    build_sd2v("work/tiny-sd2v")                 # the same layout, a v-prediction (SD2.1-768-like) model
    build_sd3("work/tiny-sd3")                   # SD3.5-like: transformer/, 3 text encoders (CLIP, CLIP, T5), flow
    build_flux("work/tiny-flux")                 # FLUX.1-dev-like (guidance_embeds=False: schnell-like)
    build_pickapic("work/pickapic", n_pairs=64)  # Pick-a-Pic v2 schema as parquet: train/ and test_unique/ splits
    build_pickapic_webdataset("work/pickapic-wds")  # the same rows as WebDataset shards (the v2 mirror's layout)
    build_tiny_scorers("work/scorers")           # {metric: load_scorer kwargs} for the five eval metrics
    build_wan("work/tiny-wan")                   # Wan2.1-T2V-like WanPipeline (UMT5, AutoencoderKLWan, flow)
    build_cogvideox("work/tiny-cogvideox")       # CogVideoX-2b-like (rotary=True: 5b-like), v-prediction, zero SNR
    build_video_pairs("work/video-pairs")        # mp4 preference pairs: parquet, JSONL manifest, WebDataset shards
    build_wan22_ti2v("work/tiny-wan22")          # Wan2.2-TI2V-5B-like (48-channel 16x VAE, expand_timesteps)
    build_wan22_a14b("work/tiny-a14b")           # Wan2.2-A14B-like: two experts, boundary_ratio (i2v=True: I2V-A14B)
    build_wan_i2v("work/tiny-wan-i2v")           # Wan2.1-I2V-like: 36 input channels, a CLIP image encoder
"""

from tiny.diffusion import build_clip_tokenizer, build_sd2v, build_sd15, build_sdxl
from tiny.flow import build_flux, build_sd3, build_t5_tokenizer
from tiny.scorers import build_tiny_scorers
from tiny.video import (build_cogvideox, build_video_pairs, build_wan, build_wan22_a14b, build_wan22_ti2v, build_wan_i2v,
                        encode_mp4)
from tiny.data import (ATTRIBUTE_COLOURS, SHAPES, build_pickapic, build_pickapic_webdataset, colour_score, draw_shape,
                       toy_captions)

__all__ = [
    "ATTRIBUTE_COLOURS",
    "SHAPES",
    "build_clip_tokenizer",
    "build_cogvideox",
    "build_flux",
    "build_pickapic",
    "build_pickapic_webdataset",
    "build_sd15",
    "build_sd2v",
    "build_sd3",
    "build_sdxl",
    "build_t5_tokenizer",
    "build_tiny_scorers",
    "build_video_pairs",
    "build_wan",
    "build_wan22_a14b",
    "build_wan22_ti2v",
    "build_wan_i2v",
    "colour_score",
    "draw_shape",
    "encode_mp4",
    "toy_captions",
]
