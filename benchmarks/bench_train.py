#!/usr/bin/env python
"""Time the training step that train.py runs: step time, pairs per second, peak memory, FLOPs and MFU.

    python benchmarks/bench_train.py --config tiny --method all --safeguard both --batch 2 --json
    python benchmarks/bench_train.py --config sd15 sdxl --precision bf16 --batch 8 --step both   # on a GPU
    python benchmarks/bench_train.py --config sdxl --flops meta                                  # FLOPs only, any machine

The step is train.compute_loss (pixels -> VAE and text encoders -> shared noise and timesteps -> policy and reference
-> importance weights, safeguard -> loss) followed by the update main() makes (backward, clip, optimizer step; one host
read per update for the non-finite guard). Models are `tiny`/`tiny-sdxl`, or the real SD1.5 / SDXL architectures with
random weights (benchmarks/models.py); the batch is random pixels with real captions, already on the device (data
loading is benchmarks/bench_data.py). Any other argument is a train.py flag, parsed by train.parse_args and set up as
main() sets it up (train.make_optimizer, train.add_lora, train.apply_speed_options), so `--channels_last`,
`--torch_compile`, `--gradient_checkpointing`, `--use_adafactor`, `--use_lora`, `--importance_weighting`, ... are timed
as train.py runs them. `--use_ema` and `--choice_model` work outside the step and are refused.

`--step official` times benchmarks/official_step.py instead: the official implementation's choices (bf16 reference
losses, lambda by an autograd pass, per-micro-step host reads). `--step both` reports ours/official. `--variants`
compares sets of train.py flags. Everything compared is timed interleaved, on the same batch.

Step time is the median of --steps timed steps after --warmup. Peak memory is torch.cuda.max_memory_allocated on
GPU, the process's peak resident set (VmHWM, reset per record) on CPU. `lambda_s` is the time of
train.winner_preserving_scale alone on the step's tensors, `safeguard_frac` its share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import families  # noqa: E402
import train  # noqa: E402
from families.noise import importance_log_weight_coefficients  # noqa: E402
from benchmarks.common import (  # noqa: E402
    command_line, common_fields, interleaved, peak_flops, peak_memory_mb, quantile, quiet_libraries,
    reset_peak_memory, synchronize, timed,
)

CONFIGS = ("tiny", "tiny-sdxl", "sd15", "sdxl")
CAPTIONS = ["a photo of an astronaut riding a horse on the moon", "a watercolor painting of a fox in a snowy forest",
            "a red sports car parked in front of a modern glass building at dusk", ""]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are train.py flags (e.g. --channels_last).")
    parser.add_argument("--config", nargs="+", default=["tiny"], choices=CONFIGS)
    parser.add_argument("--method", nargs="+", default=["diffusion-dpo"], help=f"{train.METHODS} or 'all'.")
    parser.add_argument("--safeguard", choices=["on", "off", "both"], default="both")
    parser.add_argument("--batch", nargs="+", type=int, default=[2], help="Pairs per micro-batch (--train_batch_size).")
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None,
                        help="--mixed_precision; default bf16 on GPU, no (fp32) on CPU.")
    parser.add_argument("--resolution", type=int, default=None, help="Pixels; default 32 tiny, 512 sd15, 1024 sdxl.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps (the median is reported).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (allocator, autotuning, compile).")
    parser.add_argument("--step", choices=["ours", "official", "both"], default="ours",
                        help="train.compute_loss, the official-style baseline, or both (reports the ratio).")
    parser.add_argument("--flops", choices=["count", "meta", "off"], default="count",
                        help="count: FLOPs of one extra step (FlopCounterMode); meta: only count, on the meta device, "
                             "no timing (any config on any machine); off.")
    parser.add_argument("--breakdown", action="store_true",
                        help="Also time the step's parts (VAE, text encoders, policy and reference forwards, optimizer) "
                             "with synchronising hooks: medians of 5 extra steps.")
    parser.add_argument("--variants", nargs="+", default=["default"], metavar="FLAGS",
                        help="Compare sets of train.py flags, each comma-separated without the dashes ('default': none), "
                             "e.g. --variants default fused_adam channels_last,fused_adam. One model copy per set, all "
                             "timed interleaved; records get speedup_vs_first_variant.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads on CPU. On a shared, loaded machine 1 is both faster and steadier.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print the records as a JSON list (and nothing else).")
    args, train_flags = parser.parse_known_args(argv)
    args.train_flags = train_flags
    if args.method == ["all"]:
        args.method = list(train.METHODS)
    for method in args.method:
        if method not in train.METHODS:
            parser.error(f"--method {method}: choose from {', '.join(train.METHODS)} or all")
    if args.precision is None:
        args.precision = "bf16" if str(args.device).startswith("cuda") else "no"
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The step


def variant_flags(variant: str) -> list[str]:
    """'fused_adam,gradient_accumulation_steps=4' -> ['--fused_adam', '--gradient_accumulation_steps=4']."""
    return [] if variant == "default" else [f"--{flag.strip()}" for flag in variant.split(",") if flag.strip()]


def train_args(config: str, method: str, safeguard: bool, batch: int, precision: str, resolution: int, flags):
    argv = ["--pretrained_model_name_or_path", f"<random {config}>", "--dataset_name", "<synthetic>",
            "--train_method", method, "--train_batch_size", str(batch), "--mixed_precision", precision,
            "--resolution", str(resolution), "--report_to", "none"]
    if method == "dspo":
        argv += ["--beta_dpo", "0.001"]  # the shipped SD1.5 DSPO value (5000 would saturate the loss)
    if safeguard:
        argv += ["--use_winner_preserving", "--winner_preserving_mu", "0.9"]
    if config in ("sdxl", "tiny-sdxl"):
        argv.append("--sdxl")
    return train.parse_args(argv + list(flags))


def synthetic_batch(args, tokenizers, device, generator):
    """What the DataLoader hands over (train.Collate), random pixels in [-1, 1], moved to the device."""
    from accelerate.utils import send_to_device

    channels = 3 if args.train_method == "sft" else 6
    examples = [{"pixel_values": torch.rand(channels, args.resolution, args.resolution, generator=generator) * 2 - 1,
                 "caption": CAPTIONS[i % len(CAPTIONS)], "skipped": 0} for i in range(args.train_batch_size)]
    return send_to_device(train.Collate(tokenizers)(examples), device)


class Bench:
    """One config on one device and precision: the models, one Accelerator, the prepared UNet and optimizer."""

    def __init__(self, config: str, device, precision: str, flags, resolution=None):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from benchmarks.models import RESOLUTION, SCHEDULE, build

        self.config, self.device, self.precision = config, torch.device(device), precision
        base = "tiny" if config == "tiny-sdxl" else config
        self.resolution = resolution or RESOLUTION[base]
        probe = train_args(config, "diffusion-dpo", False, 1, precision, self.resolution, flags)
        untimed = [flag for flag in ("use_ema", "choice_model") if getattr(probe, flag)]
        if untimed:
            raise SystemExit(f"bench_train.py does not time --{', --'.join(untimed)} (work outside train.compute_loss); "
                             "leave it out")
        self.accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision=precision,
                                       gradient_accumulation_steps=probe.gradient_accumulation_steps)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        models = build(base, self.device, self.weight_dtype, reference=not probe.use_lora,
                       sdxl_tiny=config == "tiny-sdxl")
        self.vae, self.text_encoders, self.tokenizers = models.vae, models.text_encoders, models.tokenizers
        self.ref_unet, self.alphas_cumprod = models.ref_unet, models.alphas_cumprod
        self.noise_scheduler = DDPMScheduler(**SCHEDULE)
        self.family = families.make_family(probe)  # sd or sdxl: the step's model-dependent parts
        self.noise_process = families.DDPMNoise(self.noise_scheduler).to(self.device)
        self.log_weight_coefficients = importance_log_weight_coefficients(self.noise_scheduler).to(self.device)
        unet = models.unet  # from here on as main() sets it up
        if probe.use_lora:
            train.add_lora(unet, probe, self.weight_dtype)
        if probe.enable_xformers:
            unet.enable_xformers_memory_efficient_attention()
        if probe.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        train.apply_speed_options(probe, unet, self.ref_unet, self.vae)
        optimizer = train.make_optimizer(probe, [p for _, p in train.trainable_parameters(unet)])
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.reference = self.ref_unet
        if probe.use_lora:  # the reference is the policy with its adapters disabled
            lora_unet = self.accelerator.unwrap_model(self.unet)

            def reference(*inputs, **kwargs):
                with train.adapters_disabled(lora_unet):
                    return lora_unet(*inputs, **kwargs)

            self.reference = reference
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def step_fn(self, args, batch, kind: str):
        """One micro-step and, on sync steps, the update, as main() does it."""
        accelerator, unet, optimizer = self.accelerator, self.unet, self.optimizer
        if kind == "official":
            from benchmarks.official_step import official_compute_loss

        def step():
            with accelerator.accumulate(unet):
                if kind == "ours":
                    loss, *_ = train.compute_loss(args, batch, unet, self.reference, self.vae, self.text_encoders,
                                                  self.family, self.noise_process, self.weight_dtype,
                                                  self.log_weight_coefficients)
                    finite = torch.isfinite(loss)  # main's non-finite guard
                    loss = torch.where(finite, loss, torch.zeros_like(loss))
                else:
                    loss, _ = official_compute_loss(args, batch, unet, self.reference, self.vae, self.text_encoders,
                                                    self.noise_scheduler, self.weight_dtype, accelerator, self.tokenizers)
                    finite = None
                accelerator.backward(loss)
                bad = False
                if accelerator.sync_gradients:
                    if finite is not None:
                        bad = accelerator.reduce((~finite).float(), reduction="sum").item() > 0  # once per update
                    if not bad and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                if not bad:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def lambda_time(self, args, repeats: int = 50) -> float:
        """Median time of train.winner_preserving_scale on tensors of the step's shape (what the safeguard adds)."""
        side = self.resolution // self.vae_factor
        shape = (2 * args.train_batch_size, self.vae.config.latent_channels, side, side)
        pred, target = torch.randn(shape, device=self.device), torch.randn(shape, device=self.device)
        fn = lambda: train.winner_preserving_scale(pred, target, args.winner_preserving_mu,  # noqa: E731
                                                   args.winner_preserving_granularity)
        return statistics.median(timed(fn, self.device, repeats, warmup=5))

    def parts(self) -> dict:
        """The timed modules. With --use_lora the reference is the policy module, so policy_forward holds both."""
        parts = {"vae_encode": self.vae.encoder, "policy_forward": self.accelerator.unwrap_model(self.unet)}
        if self.ref_unet is not None:
            parts["reference_forward"] = self.ref_unet
        parts.update({f"text_encoder_{i + 1}": encoder for i, encoder in enumerate(self.text_encoders)})
        return parts

    def breakdown(self, step, repeats: int = 5) -> dict:
        """Seconds in each module's forward and in the optimizer step, from hooks that synchronise the device;
        each the median over `repeats` steps."""
        def clock():
            synchronize(self.device)
            return time.perf_counter()

        runs = [split(step, self.parts(), clock, optimizer=self.optimizer.optimizer, rest="backward_loss_and_rest")
                for _ in range(repeats)]
        return {part: round(statistics.median(run[part] for run in runs), 6) for part in runs[0]}


def split(step, parts: dict, clock, optimizer=None, rest: str = "rest") -> dict:
    """Run `step` once and attribute the growth of `clock()` to each part's forward (and the optimizer step); what is
    left goes to `rest`. The clock is time (the time breakdown) or a FlopCounterMode's running total (FLOPs)."""
    spent, starts, hooks = {}, {}, []

    def pre(name):
        def hook(*_):
            starts[name] = clock()
        return hook

    def post(name):
        def hook(*_):
            spent[name] = spent.get(name, 0) + clock() - starts.pop(name)
        return hook

    for name, module in parts.items():
        hooks += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    if optimizer is not None:
        hooks += [optimizer.register_step_pre_hook(pre("optimizer_step")),
                  optimizer.register_step_post_hook(post("optimizer_step"))]
    try:
        start = clock()
        step()
        total = clock() - start
    finally:
        for hook in hooks:
            hook.remove()
    spent[rest] = total - sum(spent.values())
    spent["total"] = total
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in spent.items()}


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def meta_flops(config: str, method: str, safeguard: bool, batch: int, precision: str, resolution, flags) -> dict:
    """FLOPs of compute_loss + backward with every tensor on the meta device: nothing is allocated or computed."""
    from diffusers import DDPMScheduler

    from benchmarks.models import RESOLUTION, SCHEDULE, build

    base = "tiny" if config == "tiny-sdxl" else config
    args = train_args(config, method, safeguard, batch, precision, resolution or RESOLUTION[base], flags)
    weight_dtype = torch.float32  # the count does not depend on it, and without accelerate there is no autocast
    models = build(base, "meta", weight_dtype, reference=method != "sft" and not args.use_lora,
                   sdxl_tiny=config == "tiny-sdxl")
    reference = models.ref_unet
    if args.use_lora:
        train.add_lora(models.unet, args, weight_dtype)

        def reference(*inputs, **kwargs):
            with train.adapters_disabled(models.unet):
                return models.unet(*inputs, **kwargs)
    if args.gradient_checkpointing:  # the recomputed forwards count in the backward
        models.unet.enable_gradient_checkpointing()
    coefficients = importance_log_weight_coefficients(DDPMScheduler(**SCHEDULE)).to("meta")
    noise_process = families.DDPMNoise(DDPMScheduler(**SCHEDULE)).to("meta")
    with torch.device("meta"):
        batch_ = train.Collate(models.tokenizers)([
            {"pixel_values": torch.empty(3 if method == "sft" else 6, args.resolution, args.resolution),
             "caption": CAPTIONS[i % len(CAPTIONS)], "skipped": 0} for i in range(batch)])
    batch_ = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch_.items()}

    def step():
        loss, *_ = train.compute_loss(args, batch_, models.unet, reference, models.vae, models.text_encoders,
                                      families.make_family(args), noise_process, weight_dtype, coefficients)
        loss.backward()

    from torch.utils.flop_counter import FlopCounterMode

    parts = {"vae_encode": models.vae.encoder, "policy_forward": models.unet}
    if models.ref_unet is not None:
        parts["reference_forward"] = models.ref_unet
    parts.update({f"text_encoder_{i + 1}": encoder for i, encoder in enumerate(models.text_encoders)})
    counter = FlopCounterMode(display=False)
    with counter:
        return split(step, parts, counter.get_total_flops, rest="backward_and_loss")


# ----------------------------------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    records = []
    common = {**common_fields("meta" if args.flops == "meta" else args.device, args.command), "precision": args.precision}
    cases = [(m, s, b) for m in args.method for s in ({"on": [True], "off": [False]}.get(args.safeguard, [False, True]))
             for b in args.batch if not (s and m == "sft")]  # the safeguard does not apply to SFT
    for config in args.config:
        if args.flops == "meta":
            for method, safeguard, batch in cases:
                flops = meta_flops(config, method, safeguard, batch, args.precision, args.resolution, args.train_flags)
                record = {"config": config, "method": method, "safeguard": safeguard, "batch": batch,
                          "step_s": None, "pairs_per_s": None, "peak_mem_mb": None,
                          "tflop_per_step": round(flops["total"] / 1e12, 4),
                          "tflop_breakdown": {k: round(v / 1e12, 4) for k, v in flops.items()},
                          "train_flags": " ".join(args.train_flags), **common,
                          "precision": "any (FLOPs)"}
                records.append(record)
                if not args.json:
                    print(format_record(record), file=sys.stderr, flush=True)
            continue
        benches = {variant: Bench(config, args.device, args.precision, args.train_flags + variant_flags(variant),
                                  args.resolution) for variant in args.variants}
        first = benches[args.variants[0]]
        generator = torch.Generator().manual_seed(args.seed)
        kinds = ["ours", "official"] if args.step == "both" else [args.step]
        for method, batch in dict.fromkeys((m, b) for m, _, b in cases):
            # Every variant of this (method, batch) runs on the same batch, interleaved step by step.
            safeguards = [sg for m, sg, b in cases if (m, b) == (method, batch)]
            targs = {(variant, sg): train_args(config, method, sg, batch, args.precision, first.resolution,
                                               args.train_flags + variant_flags(variant))
                     for variant in benches for sg in safeguards}
            data = synthetic_batch(targs[args.variants[0], safeguards[0]], first.tokenizers, first.device, generator)
            steps = {(variant, sg, kind): benches[variant].step_fn(targs[variant, sg], data, kind)
                     for variant in benches for sg in safeguards for kind in kinds}
            first_call = {}
            times = interleaved(steps, first.device, args.steps, args.warmup, first_call)
            median = {key: statistics.median(values) for key, values in times.items()}
            for (variant, safeguard, kind), step in steps.items():
                bench, step_s = benches[variant], median[variant, safeguard, kind]
                reset_peak_memory(bench.device)
                step()
                key = variant, safeguard, kind
                record = {
                    "config": config, "method": method, "safeguard": safeguard, "batch": batch,
                    "step_s": round(step_s, 6), "pairs_per_s": round(batch / step_s, 4),
                    "peak_mem_mb": round(peak_memory_mb(bench.device), 1), "step": kind,
                    "step_s_q1": round(quantile(times[key], 0.25), 6), "step_s_q3": round(quantile(times[key], 0.75), 6),
                    "first_step_s": round(first_call[key], 4), "steps": args.steps, "resolution": bench.resolution,
                    "train_flags": " ".join(args.train_flags + variant_flags(variant)), **common,
                }
                if len(benches) > 1:
                    record["variant"] = variant
                    record["speedup_vs_first_variant"] = round(median[args.variants[0], safeguard, kind] / step_s, 3)
                if safeguard:
                    record["lambda_s"] = round(bench.lambda_time(targs[variant, True]), 8)
                    record["safeguard_frac"] = round(record["lambda_s"] / step_s, 6)
                    if (variant, False, kind) in median:  # the same step with the safeguard off, timed alongside
                        record["on_off_ratio"] = round(step_s / median[variant, False, kind], 4)
                if kind == "ours" and "official" in kinds:
                    record["speedup_vs_official"] = round(median[variant, safeguard, "official"] / step_s, 3)
                if args.flops == "count":
                    flops = count_flops(step)
                    record["tflop_per_step"] = round(flops / 1e12, 6)
                    record["tflops_per_s"] = round(flops / step_s / 1e12, 6)
                    peak = peak_flops(bench.device)
                    if peak and args.precision in ("bf16", "fp16"):
                        record["mfu"] = round(flops / step_s / peak, 4)
                if args.breakdown:
                    record["breakdown_s"] = bench.breakdown(step)
                records.append(record)
                if not args.json:
                    print(format_record(record), file=sys.stderr, flush=True)
        del benches, first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


def format_record(r: dict) -> str:
    if r["step_s"] is None:
        return f"{r['config']:9s} {r['method']:13s} safeguard={str(r['safeguard']):5s} batch={r['batch']:3d}  {r['tflop_per_step']:.3f} TFLOP/step"
    text = (f"{r['config']:9s} {r.get('variant', ''):16s} {r.get('step', 'ours'):8s} {r['method']:13s} safeguard={str(r['safeguard']):5s} "
            f"batch={r['batch']:3d}  step {r['step_s'] * 1e3:9.2f} ms  {r['pairs_per_s']:8.2f} pairs/s  "
            f"peak {r['peak_mem_mb']:9.1f} MB")
    if "safeguard_frac" in r:
        text += f"  lambda {r['lambda_s'] * 1e6:.0f} us ({100 * r['safeguard_frac']:.3f}% of the step)"
    if "on_off_ratio" in r:
        text += f"  on/off {r['on_off_ratio']:.3f}"
    if "speedup_vs_official" in r:
        text += f"  official/ours {r['speedup_vs_official']:.3f}"
    if "speedup_vs_first_variant" in r:
        text += f"  speed-up {r['speedup_vs_first_variant']:.3f}"
    if "mfu" in r:
        text += f"  MFU {100 * r['mfu']:.1f}%"
    return text


def markdown(records: list[dict]) -> str:
    """A RESULTS.md table: one row per record, then the device, load, date and command they share."""
    lines = ["| config | flags | step | method | safeguard | batch | precision | step ms (q1-q3) | pairs/s | peak MB | "
             "TFLOP/step | lambda share | safeguard on/off | official/ours | vs first flags |", "|" + "---|" * 15]
    for r in records:
        timing = f"{r['step_s'] * 1e3:.1f} ({r['step_s_q1'] * 1e3:.1f}-{r['step_s_q3'] * 1e3:.1f})" if r["step_s"] else "-"
        lines.append(" | ".join([
            f"| {r['config']}", r.get("train_flags") or "-", r.get("step", "-"), r["method"],
            "on" if r["safeguard"] else "off", str(r["batch"]), r["precision"], timing,
            f"{r['pairs_per_s']:.2f}" if r["pairs_per_s"] else "-", f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] else "-",
            f"{r['tflop_per_step']:.4g}" if "tflop_per_step" in r else "-",
            f"{100 * r['safeguard_frac']:.3f}%" if "safeguard_frac" in r else "-",
            f"{r['on_off_ratio']:.3f}" if "on_off_ratio" in r else "-",
            f"{r['speedup_vs_official']:.3f}" if "speedup_vs_official" in r else "-",
            f"{r['speedup_vs_first_variant']:.3f}" if "speedup_vs_first_variant" in r else "-",
        ]) + " |")
    if records:
        r = records[0]
        lines.append(f"\nDevice: {r['device']}; torch {r['torch']}; load average {r['load_avg_1m']} at the start; "
                     f"{r['date']}.\nCommand: `{r['command']}`")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.command = command_line("bench_train.py", argv)
    records = run(args)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(markdown(records))
    return records


if __name__ == "__main__":
    main()
