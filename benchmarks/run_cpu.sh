#!/usr/bin/env bash
# Every CPU figure of benchmarks/RESULTS.md: JSON into benchmarks/results/, then the tables.
# One torch thread per process: on a shared machine, OpenMP's spinning threads make timings slower and erratic.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
T="--threads 1 --json"

$PY benchmarks/bench_train.py --config tiny --method all --safeguard both --batch 2 --step both --steps 30 --warmup 5 $T > $OUT/cpu-tiny-methods.json
$PY benchmarks/bench_train.py --config tiny --method diffusion-dpo --safeguard both --batch 1 8 --step both --steps 20 --warmup 3 $T > $OUT/cpu-tiny-batch.json
$PY benchmarks/bench_train.py --config tiny-sdxl --method diffusion-dpo dspo --safeguard both --batch 2 --step both --steps 30 --warmup 5 $T > $OUT/cpu-tiny-sdxl.json
$PY benchmarks/bench_train.py --config tiny --method diffusion-dpo --safeguard on --batch 2 --steps 60 --warmup 5 \
    --variants default fused_adam channels_last fused_adam,channels_last $T > $OUT/cpu-tiny-speed-flags.json
INDUCTOR=$(mktemp -d)  # an empty compile cache, so the first step shows the full compilation time
TORCHINDUCTOR_CACHE_DIR=$INDUCTOR $PY benchmarks/bench_train.py --config tiny --method diffusion-dpo --safeguard on \
    --batch 2 --steps 40 --warmup 5 --variants default torch_compile $T > $OUT/cpu-tiny-torch-compile.json
rm -rf "$INDUCTOR"
$PY benchmarks/bench_train.py --config tiny --method diffusion-dpo --safeguard on --batch 2 --steps 20 --breakdown \
    --variants default fused_adam $T > $OUT/cpu-tiny-breakdown.json
$PY benchmarks/bench_modules.py --config tiny --batch 2 --repeats 100 --rounds 3 $T > $OUT/cpu-tiny-modules.json
$PY benchmarks/bench_train.py --config sd15 sdxl --method diffusion-dpo --safeguard on --batch 1 8 --flops meta --json > $OUT/meta-flops.json
$PY benchmarks/bench_train.py --config sdxl --method diffusion-dpo --safeguard on --batch 8 --flops meta \
    --gradient_checkpointing --json > $OUT/meta-flops-sdxl-checkpointing.json
$PY benchmarks/bench_data.py --workers 0 1 2 --resolution 512 --batch 8 --batches 8 --json > $OUT/cpu-data-512.json
$PY benchmarks/bench_data.py --workers 0 1 2 --resolution 512 --batch 8 --batches 8 --no_persistent --json > $OUT/cpu-data-512-not-persistent.json
$PY benchmarks/bench_data.py --workers 0 2 --resolution 1024 --sdxl --image_size 768 1280 --batch 8 --batches 4 --pairs 48 --json > $OUT/cpu-data-1024-sdxl.json
$PY benchmarks/bench_eval.py --generate tiny --gen_batch 1 4 --steps 50 --scorers all --score_images 32 --repeats 3 $T > $OUT/cpu-eval-tiny.json

$PY benchmarks/tables.py $OUT/cpu-*.json $OUT/meta-*.json
