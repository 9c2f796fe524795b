#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md (H100 / H200): JSON into benchmarks/results/, then the tables.
# No weights are needed: sd15/sdxl are the real architectures with random weights. About 15 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results
mkdir -p "$OUT"
TAG=${TAG:-$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")}  # h100 / h200
export HF_HUB_OFFLINE=1
R="--precision bf16 --steps 20 --warmup 5 --json"
# SDXL as shipped: Adafactor and gradient checkpointing (both forced by the official code, SPEC Q4).
XL="--use_adafactor --gradient_checkpointing"

$PY benchmarks/bench_train.py --config sd15 --method all --safeguard both --batch 8 --step both $R > $OUT/gpu-$TAG-sd15-methods.json
$PY benchmarks/bench_train.py --config sdxl --method diffusion-dpo dspo --safeguard both --batch 8 --step both $R $XL > $OUT/gpu-$TAG-sdxl-methods.json
$PY benchmarks/bench_train.py --config sd15 --method diffusion-dpo --safeguard on --batch 1 2 4 8 16 $R > $OUT/gpu-$TAG-sd15-batch.json
$PY benchmarks/bench_train.py --config sd15 --method diffusion-dpo --safeguard on --batch 8 \
    --variants default fused_adam channels_last torch_compile fused_adam,channels_last,torch_compile $R > $OUT/gpu-$TAG-sd15-speed-flags.json
$PY benchmarks/bench_train.py --config sdxl --method diffusion-dpo --safeguard on --batch 8 \
    --variants default channels_last torch_compile $R $XL > $OUT/gpu-$TAG-sdxl-speed-flags.json
$PY benchmarks/bench_train.py --config sd15 --method diffusion-dpo --safeguard on --batch 8 --steps 5 --breakdown \
    --variants default fused_adam --precision bf16 --json > $OUT/gpu-$TAG-sd15-breakdown.json
$PY benchmarks/bench_train.py --config sdxl --method diffusion-dpo --safeguard on --batch 8 --steps 5 --breakdown \
    --precision bf16 $XL --json > $OUT/gpu-$TAG-sdxl-breakdown.json
$PY benchmarks/bench_modules.py --config sd15 --batch 8 --precision bf16 --repeats 30 --rounds 3 --json > $OUT/gpu-$TAG-sd15-modules.json
$PY benchmarks/bench_data.py --workers 0 4 8 16 --resolution 512 --batch 8 --batches 16 --pairs 160 --json > $OUT/gpu-$TAG-data-512.json
$PY benchmarks/bench_data.py --workers 0 4 8 16 --resolution 1024 --sdxl --batch 8 --batches 16 --pairs 160 --json > $OUT/gpu-$TAG-data-1024.json
$PY benchmarks/bench_eval.py --generate sd15 sdxl --gen_batch 1 8 --steps 50 --scorers none --json > $OUT/gpu-$TAG-generate.json
# Scorers need the official weights in the Hugging Face cache (PickScore, HPSv2, CLIP ViT-H-14, aesthetics, ImageReward).
if $PY benchmarks/bench_eval.py --generate none --scorers all --scorer_weights official --score_images 64 --json > /tmp/scorers.json
then mv /tmp/scorers.json $OUT/gpu-$TAG-scorers.json; else echo "scorers skipped: official weights not in the cache"; fi

$PY benchmarks/tables.py $OUT/gpu-$TAG-*.json
