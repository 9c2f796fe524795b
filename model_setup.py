"""The trained model's setup: LoRA adapters (and the frozen reference they give for free), the trainable parameters,
the optimizer, and the speed options (gradient checkpointing, xformers, channels-last)."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger("train")


def add_lora(unet, args, dtype):
    """Freeze the UNet in `dtype` and add trainable fp32 LoRA adapters (peft, through diffusers' integration).

    B starts at zero, so the adapted UNet starts as the base. The adapters are drawn under their own seed (--seed), so a
    LoRA run sees the same noise and timesteps as a full fine-tuning run with the same seed.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.nn.Module.to(unet, dtype=dtype)  # torch's own: diffusers' override warns about fp32 modules the UNet lacks
    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        if args.seed is not None:
            torch.manual_seed(args.seed)
        unet.add_adapter(config)
    for _, param in trainable_parameters(unet):
        param.data = param.data.float()


@contextlib.contextmanager
def adapters_disabled(unet):
    """Inside, the LoRA UNet is its base model: the reference of a LoRA run, with no second UNet in memory."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def trainable_parameters(unet) -> list:
    return [(name, param) for name, param in unet.named_parameters() if param.requires_grad]


def sharded_state_placements(placements, ndim: int, reduced_dim: int) -> list:
    """The placements of a gradient's mean over `reduced_dim` (a factored Adafactor moment): a dimension sharded
    before it keeps its shard, the reduced one becomes replicated (its mean spans every rank), later ones shift."""
    from torch.distributed.tensor import Replicate, Shard

    result = []
    for placement in placements:
        if isinstance(placement, Shard):
            dim = placement.dim % ndim
            placement = Replicate() if dim == reduced_dim else Shard(dim - (dim > reduced_dim))
        result.append(placement)
    return result


def make_optimizer(args, params):
    """AdamW (the official default), bitsandbytes 8-bit AdamW, or Adafactor with the official SDXL settings."""
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        class ShardableAdafactor(Adafactor):
            """transformers' Adafactor, whose state it creates as plain tensors; under FSDP2 the parameters and
            gradients are DTensors, so the state is created here as DTensors of the right placements before its
            first step. The step itself is transformers' code on DTensors: the factored second moments are means over
            the whole matrix (DTensor reduces the sharded dimension across ranks), the update clipping uses the RMS
            of the whole update, so a sharded step is the unsharded one up to float rounding. The cost: a few small
            all-reduces per parameter and step (a first dimension that does not split evenly gathers that update)."""

            @torch.no_grad()
            def step(self, closure=None):
                from torch.distributed.tensor import DTensor, zeros

                for group in self.param_groups:
                    for p in group["params"]:
                        grad, state = p.grad, self.state[p]
                        if not isinstance(grad, DTensor) or len(state) > 0:
                            continue
                        shape, mesh, placements = grad.shape, grad.device_mesh, grad.placements
                        state.update(step=0, RMS=0)
                        if len(shape) >= 2:  # the factored moments (transformers' _get_options), rows then columns
                            state["exp_avg_sq_row"] = zeros(shape[:-1], device_mesh=mesh, placements=
                                                            sharded_state_placements(placements, len(shape), len(shape) - 1))
                            state["exp_avg_sq_col"] = zeros(shape[:-2] + shape[-1:], device_mesh=mesh, placements=
                                                            sharded_state_placements(placements, len(shape), len(shape) - 2))
                        else:
                            state["exp_avg_sq"] = torch.zeros_like(grad)
                return super().step(closure)

        return ShardableAdafactor(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, clip_threshold=1.0,
                                  scale_parameter=False, relative_step=False)
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    extra = {"fused": True} if args.fused_adam else {}
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)


def apply_speed_options(args, unet, ref_unet, vae):
    """--channels_last and --torch_compile, in place. `Module.compile` keeps the module and its state-dict keys."""
    if args.channels_last:
        for module in (unet, ref_unet, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if args.torch_compile:
        for module in (unet, ref_unet):
            if module is not None:
                module.compile()
