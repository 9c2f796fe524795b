"""Tiny SD3.5-like and FLUX.1-like (rectified-flow transformer) pipelines in the diffusers folder layouts.

Both pair CLIP text encoders (tokenizers built as `build_clip_tokenizer` builds them) with a T5 encoder whose
tokenizer is trained here, offline, on a few captions: a Unigram model with T5's special tokens and pre-tokenizer,
saved as a `tokenizer.json` that `T5TokenizerFast.from_pretrained` loads. The VAEs have 16 latent channels and the
real scaling/shift factors; the schedulers are the real FlowMatchEulerDiscreteScheduler configs. Sizes are tiny.

    build_sd3("work/tiny-sd3")    # transformer/ vae/ text_encoder{,_2,_3}/ tokenizer{,_2,_3}/ scheduler/
    build_flux("work/tiny-flux")  # transformer/ vae/ text_encoder{,_2}/ tokenizer{,_2}/ scheduler/
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from tiny.diffusion import _text_encoder, _vae, build_clip_tokenizer

# T5's special tokens sit at these ids in every T5 vocabulary (google/t5-v1_1-*, as SD3 and FLUX.1 use).
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


def build_t5_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 512, vocab_size: int = 256):
    """A small T5 tokenizer (SentencePiece-style Unigram, "▁" word prefix, "</s>" appended), trained offline.

    Ids: <pad> 0, </s> 1, <unk> 2 as in T5; then the learned pieces. The pieces come from tiny.toy_captions() and a few
    more words, plus every ASCII letter, digit and punctuation mark, so any ASCII text tokenizes without <unk>
    (other characters map to <unk>). Unlike the real T5 vocabulary (32000 pieces + 100 <extra_id_*> sentinels) it has
    no sentinels (span-corruption targets, unused by diffusion models) and no NFKC-like normalizer.
    `model_max_length` 512: what the SD3 and FLUX.1 repos' T5 tokenizer configs say, as far as I know; the pipelines
    pass their own `max_sequence_length` (SD3: 256, FLUX.1-dev: 512) anyway.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    from tiny.data import SHAPES, toy_captions

    corpus = toy_captions() + [
        "a photo of a " + " ".join(SHAPES),
        "red orange yellow green blue purple black white grey warm cool colour color",
        "an image picture painting drawing of the small large big round with in and",
        string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation,
    ]
    trainer_tokenizer = Tokenizer(Unigram())
    # The pre-tokenizer and decoder that transformers' T5 tokenizer installs.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[T5_PAD, T5_EOS, T5_UNK], unk_token=T5_UNK, show_progress=False,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
    )
    trainer_tokenizer.train_from_iterator(corpus, trainer=trainer)
    vocab = [tuple(piece) for piece in json.loads(trainer_tokenizer.to_str())["model"]["vocab"]]
    assert [piece for piece, _ in vocab[:3]] == [T5_PAD, T5_EOS, T5_UNK], vocab[:3]
    # The trainer's piece set is deterministic, but not its order among equal scores nor the scores' last bits
    # (hash-map order, parallel sums): round and sort so that token ids are the same on every build.
    pieces = sorted(((piece, round(score, 6)) for piece, score in vocab[3:]), key=lambda item: (-item[1], item[0]))
    vocab = vocab[:3] + pieces
    tokenizer = T5TokenizerFast(
        vocab=vocab, pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK, extra_ids=0,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _name_t5_fast(out_dir: Path, component: str):
    # transformers 5 has one T5 tokenizer class (T5TokenizerFast is an alias of T5Tokenizer), so save_pretrained
    # writes "T5Tokenizer"; the real SD3/FLUX.1 model_index.json files name "T5TokenizerFast". Both load the same.
    path = out_dir / "model_index.json"
    index = json.loads(path.read_text())
    index[component] = ["transformers", "T5TokenizerFast"]
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _t5_encoder(d_model: int, vocab_size: int, seed: int):
    """A T5 v1.1-style encoder (gated-GELU feed-forward, as google/t5-v1_1-xxl, the encoder of SD3 and FLUX.1)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _flow_vae(seed: int, scaling_factor: float, shift_factor: float, factor: int):
    # SD3's and FLUX.1's VAEs: 16 latent channels, a shift as well as a scale, and no quant/post-quant 1x1 convs
    # (their vae/config.json say use_quant_conv/use_post_quant_conv false).
    return _vae(
        seed, scaling_factor=scaling_factor, factor=factor, latent_channels=16, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_sd3(out_dir: str | os.PathLike, resolution: int = 32, seed: int = 0, vae_factor: int = 2) -> Path:
    """A tiny SD3.5-medium-like StableDiffusion3Pipeline folder.

    From the real stabilityai/stable-diffusion-3.5-medium configs: scheduler FlowMatchEulerDiscreteScheduler with
    shift 3.0 (and no dynamic shifting); VAE scaling_factor 1.5305, shift_factor 0.0609, 16 latent channels;
    transformer with qk_norm "rms_norm" and dual-attention (MMDiT-X) layers (there layers 0-12 of 24; here layer 0
    of 2); two CLIP text encoders with projection (CLIP-L, OpenCLIP bigG there: 768 + 1280 wide, "quick_gelu" and
    "gelu") and a T5 encoder (4096 wide there). As in the real model: joint_attention_dim = T5 width (the CLIP
    token states are concatenated and zero-padded to it), pooled_projection_dim = sum of the CLIP projection widths,
    caption_projection_dim = the transformer width. Sizes: transformer 2 layers x 2 heads x 8 dims, 16 patches
    (2x2) of a 16x16 latent by default; `transformer.config.sample_size` * vae_factor is the pipeline's default size.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    clip_widths, t5_width = (32, 48), 96
    if sum(clip_widths) > t5_width:
        raise ValueError("the CLIP states are zero-padded to the T5 width: it must be at least their sum")
    tokenizer_3 = build_t5_tokenizer(out_dir / "tokenizer_3")
    heads, head_dim = 2, 8
    torch.manual_seed(seed + 5)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // vae_factor, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=sum(clip_widths),
        # Room for 4x the default patch grid (SD3.5-medium: 384, 6x the 64-patch grid of its 128-latent default).
        pos_embed_max_size=4 * (resolution // vae_factor // 2),
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609, factor=vae_factor),
        text_encoder=_text_encoder(clip_widths[0], True, seed + 2),
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer"),
        text_encoder_2=_text_encoder(clip_widths[1], True, seed + 4, hidden_act="gelu"),
        # SD3's tokenizer_2 is built like its tokenizer here (pad "<|endoftext|>"); I do not know for certain which
        # pad token the real tokenizer_2 files name, and pooled states (taken at the first eos) do not depend on it.
        tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2"),
        text_encoder_3=_t5_encoder(t5_width, len(tokenizer_3), seed + 6),
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir)
    _name_t5_fast(out_dir, "tokenizer_3")
    return out_dir


def build_flux(
    out_dir: str | os.PathLike, guidance_embeds: bool = True, resolution: int = 32, seed: int = 0, vae_factor: int = 2
) -> Path:
    """A tiny FLUX.1-like FluxPipeline folder: FLUX.1-dev with `guidance_embeds=True`, FLUX.1-schnell with False.

    From the real black-forest-labs configs: VAE scaling_factor 0.3611, shift_factor 0.1159, 16 latent channels;
    transformer patch_size 1 on 2x2-packed latents (in_channels 64 = 16 x 4), joint_attention_dim = T5 width,
    pooled_projection_dim = CLIP-L's width (its pooled output, no projection: text_encoder is a CLIPTextModel),
    axes_dims_rope summing to attention_head_dim (16+56+56 = 128 there); scheduler FlowMatchEulerDiscreteScheduler:
    dev: shift 3.0, use_dynamic_shifting true, base_shift 0.5, max_shift 1.15, base/max_image_seq_len 256/4096;
    schnell: shift 1.0 and no dynamic shifting (the schnell scheduler config, as far as I know: not checked here).
    Images must be a multiple of 2 * vae_factor pixels high and wide (the pipeline packs 2x2 latent patches).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out_dir = Path(out_dir)
    clip_width, t5_width = 32, 64
    heads, head_dim, axes = 2, 16, (4, 6, 6)  # every rope axis even, summing to the head width
    tokenizer_2 = build_t5_tokenizer(out_dir / "tokenizer_2")
    torch.manual_seed(seed + 5)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds, axes_dims_rope=axes,
    )
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_flow_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159, factor=vae_factor),
        text_encoder=_text_encoder(clip_width, False, seed + 2),
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer"),
        text_encoder_2=_t5_encoder(t5_width, len(tokenizer_2), seed + 6),
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(out_dir)
    _name_t5_fast(out_dir, "tokenizer_2")
    return out_dir
