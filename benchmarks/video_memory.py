"""GPU memory of one video preference training step, per model, computed (not measured) from the real configs.

For Wan2.1-T2V-1.3B and -14B and CogVideoX-2b and -5b: the parameter counts from the public configs on the meta
device (benchmarks/memory_table.py's configs, plus the 14B's and the 2b's), then the fixed state per GPU, one process:

- full fine-tune: policy weights fp32 (4 B/param), gradients fp32 (4), AdamW's two moments fp32 (8), the frozen
  reference in bf16 (2);
- LoRA (rank 8 on to_k, to_q, to_v, to_out.0, the launchers' setting): the base in bf16 (2 B/param), the reference
  is the same weights with the adapters off; the adapters with their gradients and AdamW moments (16 B/param);
- frozen text encoder (UMT5-XXL / T5-XXL encoder) and VAE in bf16.

Above that fixed state, two transient peaks, traced with fake tensors (torch FakeTensorMode: nothing is computed or
allocated; every op runs its meta implementation, so shapes and dtypes are those of a GPU run) while a
TorchDispatchMode (`PeakMemory`) adds up the storages created and frees them when they die:

- the frozen VAE encoding one pair (bf16, one video at a time, as train.py's slicing);
- one micro-batch of one pair (two videos) at F frames x H x W: the policy forward with gradient checkpointing under
  bf16 autocast (its cached bf16 weight copies included), the reference forward in inference mode, the loss, the
  backward into gradients that already exist (as in a later micro-batch of the accumulation), and for a full
  fine-tune AdamW's foreach step. Attention is flash attention (`flash_sdpa`: its saved state is the output and the
  log-sum-exp, no N x N matrix), which PyTorch's SDPA picks on an A100/H100 for these shapes. LoRA is emulated
  (peft cannot convert fake tensors): the targeted projections' weights take the gradients, which saves the same
  inputs for the backward; their buffers count as fixed state and the adapters' optimizer step is negligible.

Total = fixed state + max(VAE encode, step); it must stay under 90 % of 80 GB (the CUDA context, the allocator's
fragmentation, the text encoder's forward (small) and pinned memory are not counted).

    python benchmarks/video_memory.py [--markdown] [--models Wan2.1-1.3B ...]    # a few minutes on one CPU core
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flops_families import T5_XXL  # noqa: E402
from benchmarks.memory_table import COGVIDEOX_5B_TRANSFORMER, UMT5_XXL, WAN_1_3B_TRANSFORMER  # noqa: E402

WAN_14B_TRANSFORMER = dict(WAN_1_3B_TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # diffusers' convert_wan_to_diffusers.py
COGVIDEOX_2B_TRANSFORMER = dict(COGVIDEOX_5B_TRANSFORMER, num_attention_heads=30, num_layers=30,
                                use_rotary_positional_embeddings=False)  # convert_cogvideox_to_diffusers.py's 2B notes
MODELS = {  # name: (family, transformer config, native size, native frames, text tokens)
    "Wan2.1-1.3B": ("wan", WAN_1_3B_TRANSFORMER, (480, 832), 81, 512),
    "Wan2.1-14B": ("wan", WAN_14B_TRANSFORMER, (720, 1280), 81, 512),
    "CogVideoX-2B": ("cogvideox", COGVIDEOX_2B_TRANSFORMER, (480, 720), 49, 226),
    "CogVideoX-5B": ("cogvideox", COGVIDEOX_5B_TRANSFORMER, (480, 720), 49, 226),
}
SETTINGS = {  # frames x (height, width) to try per family
    "wan": [(f, size) for size in ((480, 832), (720, 1280)) for f in (17, 33, 49, 81)],
    "cogvideox": [(f, (480, 720)) for f in (17, 33, 49)],
}
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
GPU_GB, USABLE = 80, 0.9
# Fake tensors on a fake CPU: the autograd engine of a fake CUDA device needs a real one. Under FakeTensorMode every op
# runs its meta implementation whatever the device, so the shapes and dtypes are those of CUDA (flash attention
# included, through `flash_sdpa`); autocast is the CPU's bf16 autocast, whose op lists are close to CUDA's.
DEVICE = "cpu"


def transformer_class(family):
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    return WanTransformer3DModel if family == "wan" else CogVideoXTransformer3DModel


def frozen_modules(family):
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    if family == "wan":
        return UMT5EncoderModel(UMT5Config(**UMT5_XXL)), AutoencoderKLWan()
    return T5EncoderModel(T5Config(**T5_XXL)), AutoencoderKLCogVideoX()


def lora_parameters(model, rank: int = 8) -> int:
    return sum(rank * (module.in_features + module.out_features) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS))


def counts(name: str) -> dict:
    family, config, *_ = MODELS[name]
    with torch.device("meta"):
        transformer = transformer_class(family)(**config)
        text, vae = frozen_modules(family)
        return {"transformer": sum(p.numel() for p in transformer.parameters()), "lora": lora_parameters(transformer),
                "text_encoder": sum(p.numel() for p in text.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


def fixed_bytes(n: dict) -> dict:
    frozen = 2 * (n["text_encoder"] + n["vae"])
    return {
        "full": {"weights": 4 * n["transformer"], "gradients": 4 * n["transformer"], "optimizer": 8 * n["transformer"],
                 "reference": 2 * n["transformer"], "frozen": frozen},
        "lora": {"weights": 2 * n["transformer"] + 4 * n["lora"], "gradients": 4 * n["lora"], "optimizer": 8 * n["lora"],
                 "reference": 0, "frozen": frozen},
    }


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the flash kernel (its meta implementation: outputs and log-sum-exp saved, no N x N)."""
    if attn_mask is not None:
        raise ValueError("an attention mask: flash attention does not apply")
    dtype = query.dtype
    query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                              scale=scale)[0].to(dtype)


class PeakMemory:
    """Peak bytes of the CUDA tensors created inside (a TorchDispatchMode: each op's outputs, their storages counted
    once while alive and released when freed), the given modules' parameters and buffers excluded. Works on fake
    tensors; the autograd engine carries the mode into its backward threads."""

    def __init__(self, *modules):
        from torch.utils.weak import WeakIdKeyDictionary

        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self.seen[tensor.untyped_storage()] = 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type == DEVICE:
                        tracker.track(tensor.untyped_storage())
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def track(self, storage):
        import weakref

        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, size)

    def release(self, size):
        self.live -= size


@contextlib.contextmanager
def bf16_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_sdpa
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.device(DEVICE):
            yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def vae_encode_peak(name: str, frames: int, size: tuple[int, int]) -> int:
    """Peak bytes above the weights of the frozen VAE encoding one pair (bf16, one video at a time)."""
    family = MODELS[name][0]
    with fake_cuda():
        with bf16_default():  # built in bf16 (fake tensors cannot be converted in place by .to)
            _, vae = frozen_modules(family)
        vae.requires_grad_(False).enable_slicing()
        pixels = torch.randn(2, 3, frames, *size, dtype=torch.bfloat16)
        with PeakMemory(vae) as tracker, torch.inference_mode():
            vae.encode(pixels).latent_dist.sample()
    return tracker.peak


def step_peak(name: str, frames: int, size: tuple[int, int], strategy: str) -> int:
    """Peak bytes above the fixed state (weights, gradients, AdamW moments, reference) of one micro-batch of one pair:
    policy forward (gradient checkpointing, bf16 autocast), reference forward (inference mode), loss, backward into
    gradients that already exist (as from an earlier micro-batch of the accumulation), AdamW's step (foreach)."""
    family, config, _, _, text_tokens = MODELS[name]
    height, width = size
    latent = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    with fake_cuda():
        if strategy == "full":
            policy = transformer_class(family)(**config)  # fp32 master weights
            with bf16_default():
                reference = transformer_class(family)(**config).requires_grad_(False)
        else:  # LoRA, emulated: the base frozen in bf16 and the reference is the base (adapters off)
            # peft cannot convert fake tensors, so instead of rank-8 adapters the targeted projections' own weights
            # take gradients: the same inputs are saved for the backward (an adapter's A sees the projection's input),
            # the gradient buffers are fixed state (excluded) and the adapters' optimizer step is negligible.
            with bf16_default():
                policy = transformer_class(family)(**config).requires_grad_(False)
            for module_name, module in policy.named_modules():
                if isinstance(module, torch.nn.Linear) and any(module_name.endswith(t) for t in LORA_TARGETS):
                    module.weight.requires_grad_(True)
            reference = None
        policy.enable_gradient_checkpointing()
        policy.train()
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)
        for param in trainable:
            param.grad = torch.zeros_like(param)
        if strategy == "full":
            optimizer.step()  # the moments exist from here on: fixed state, not counted below
        fixed = [policy] + ([reference] if reference is not None else [])
        noisy = torch.randn(2, *latent)
        states = torch.randn(2, text_tokens, 4096)
        timesteps = torch.tensor([500.0, 500.0]) if family == "wan" else torch.tensor([500, 500])
        rotary = None
        if family == "cogvideox" and config["use_rotary_positional_embeddings"]:
            from types import SimpleNamespace

            from diffusers import CogVideoXPipeline

            fake = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=SimpleNamespace(
                patch_size=config["patch_size"], patch_size_t=None, sample_width=config["sample_width"],
                sample_height=config["sample_height"], attention_head_dim=config["attention_head_dim"])))
            rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, height, width, latent[1], DEVICE)

        def call(model, x):
            if family == "wan":
                return model(hidden_states=x, timestep=timesteps, encoder_hidden_states=states.to(x.dtype),
                             return_dict=False)[0]
            return model(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=timesteps, encoder_hidden_states=states.to(x.dtype),
                         image_rotary_emb=rotary, return_dict=False)[0].permute(0, 2, 1, 3, 4)

        with PeakMemory(*fixed) as tracker:
            for param in trainable:  # the existing gradients and moments are fixed state too
                tracker.seen[param.grad.untyped_storage()] = 0
                for value in optimizer.state[param].values():
                    if torch.is_tensor(value):
                        tracker.seen[value.untyped_storage()] = 0
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                prediction = call(policy, noisy).float()
                with torch.inference_mode():
                    reference_prediction = call(reference or policy, noisy.to(torch.bfloat16)).float()
            loss = (prediction - reference_prediction.clone()).pow(2).mean()
            loss.backward()
            del loss, prediction, reference_prediction
            if strategy == "full":
                optimizer.step()
    return tracker.peak


def table(names) -> list[dict]:
    rows = []
    for name in names:
        family = MODELS[name][0]
        n = counts(name)
        fixed = fixed_bytes(n)
        for frames, size in SETTINGS[family]:
            if name == "Wan2.1-1.3B" and size[0] > 480:
                continue  # 1.3B is a 480p model (Wan2.1's model card)
            vae = vae_encode_peak(name, frames, size)
            for strategy in ("full", "lora"):
                peaks = {"vae_encode": vae, "step": step_peak(name, frames, size, strategy)}
                total = sum(fixed[strategy].values()) + max(peaks.values())
                rows.append({"model": name, "params": n, "strategy": strategy, "frames": frames, "size": size,
                             "fixed": fixed[strategy], "activations": peaks, "total": total,
                             "fits_80gb": total <= USABLE * GPU_GB * 1e9})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = table(args.models)
    if not args.markdown:
        for row in rows:
            print(json.dumps(row))
        return rows
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    print("| model | strategy | frames x H x W | weights | gradients | optimizer | reference | text enc. + VAE | "
          "VAE encode peak | step peak | total GB | fits 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        f, a = row["fixed"], row["activations"]
        print(f"| {row['model']} | {row['strategy']} | {row['frames']} x {row['size'][0]} x {row['size'][1]} | "
              f"{gb(f['weights'])} | {gb(f['gradients'])} | {gb(f['optimizer'])} | {gb(f['reference'])} | "
              f"{gb(f['frozen'])} | {gb(a['vae_encode'])} | {gb(a['step'])} | {gb(row['total'])} | "
              f"{'yes' if row['fits_80gb'] else 'no'} |")
    return rows


if __name__ == "__main__":
    main()
