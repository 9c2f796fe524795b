#!/usr/bin/env bash
# Evaluate a fine-tuned UNet as the official scripts/eval/test_sd15.sh does (test_sdxl.sh runs this file in SDXL mode):
# for each prompt set (papv2, hpsv2, partiprompts) generate the images unless the run's manifest already exists, score
# them with the five metrics, then print the gathered table. All output is tee'd to <OUTPUT>/joint_test_<SIZE>.log.
#
#   bash scripts/eval/test_sd15.sh output/sd15-dpo/unet.pth [extra eval.generate args, e.g. --batch_size 8]
#
# UNET may be a unet.pth / .safetensors file or a diffusers folder; OUTPUT = the file's folder (or the folder itself).
# Defaults are the official protocol: SIZE 512 (SDXL 1024), STEP 50, CFG 7.5 (official formula = standard 8.5), SEED 0.
# Optional environment variables:
#   PRETRAIN, VAE        base model and VAE (eval.generate's --pretrain_path / --vae_path defaults otherwise)
#   DEVICE, BATCH        device for generation and scoring; prompts per generation forward pass
#   PROMPTS_DIR          folder holding <group>.json (default: prompts/ of this repo); a missing file is built there
#                        with prompts/build.py from its public source
#   PROMPT_GROUPS        prompt sets (default "papv2 hpsv2 partiprompts"); SIZE, STEP, CFG, SEED override the protocol
#   PYTHON               interpreter (default python); LAUNCH: generator launcher (default $PYTHON; e.g.
#                        "accelerate launch" for several GPUs); SCORE_ARGS: extra eval.score arguments
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 UNET_PATH [extra eval.generate arguments]" >&2
    exit 2
fi
UNET=$1
shift
if [[ ! -e $UNET ]]; then
    echo "error: $UNET does not exist (give a unet.pth / unet.safetensors file or a diffusers UNet/pipeline folder)" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # python -m eval.* from any working directory
PYTHON=${PYTHON:-python}
read -r -a LAUNCHER <<< "${LAUNCH:-$PYTHON}"
read -r -a EXTRA_SCORE_ARGS <<< "${SCORE_ARGS:-}"

SDXL_FLAG=()
if [[ ${EVAL_SDXL:-0} == 1 ]]; then SDXL_FLAG=(--sdxl); fi
SIZE=${SIZE:-$([[ ${EVAL_SDXL:-0} == 1 ]] && echo 1024 || echo 512)}
STEP=${STEP:-50}
CFG=${CFG:-7.5}
SEED=${SEED:-0}
CFG_NAME=$("$PYTHON" -c "import sys; print(float(sys.argv[1]))" "$CFG")  # as the run name prints it: 7 -> 7.0
PROMPT_GROUPS=${PROMPT_GROUPS:-papv2 hpsv2 partiprompts}
PROMPTS_DIR=${PROMPTS_DIR:-$REPO/prompts}
if [[ -d $UNET ]]; then OUTPUT=$UNET; else OUTPUT=$(dirname "$UNET"); fi
LOG=$OUTPUT/joint_test_$SIZE.log

GEN_ARGS=(--unet_path "$UNET" --output "$OUTPUT" --height "$SIZE" --width "$SIZE" --steps "$STEP" --cfg "$CFG"
          --seed "$SEED" "${SDXL_FLAG[@]}")
[[ -n ${PRETRAIN:-} ]] && GEN_ARGS+=(--pretrain_path "$PRETRAIN")
[[ -n ${VAE:-} ]] && GEN_ARGS+=(--vae_path "$VAE")
[[ -n ${DEVICE:-} ]] && GEN_ARGS+=(--device "$DEVICE")
[[ -n ${BATCH:-} ]] && GEN_ARGS+=(--batch_size "$BATCH")
SCORE_DEVICE=()
[[ -n ${DEVICE:-} ]] && SCORE_DEVICE=(--device "$DEVICE")

run_all() {
    echo "UNet: $UNET | output: $OUTPUT | size $SIZE, $STEP steps, cfg $CFG, seed $SEED | groups: $PROMPT_GROUPS"
    for group in $PROMPT_GROUPS; do
        prompts=$PROMPTS_DIR/$group.json
        if [[ ! -f $prompts ]]; then
            echo ">>> $prompts is missing: building it from its public source"
            if ! "$PYTHON" "$REPO/prompts/build.py" "$group" --out_dir "$PROMPTS_DIR"; then
                echo "error: could not build $prompts. Copy the official files with" >&2
                echo "  python prompts/build.py --from_dir DIR --out_dir $PROMPTS_DIR" >&2
                echo "or set PROMPTS_DIR to a folder holding papv2.json, hpsv2.json and partiprompts.json." >&2
                return 1
            fi
        fi
        manifest=$OUTPUT/${group}_seed${SEED}_${SIZE}x${SIZE}_${STEP}s_${CFG_NAME}cfg.json
        if [[ ! -f $manifest ]]; then
            echo ">>> Generating $group"
            "${LAUNCHER[@]}" -m eval.generate --test_json "$prompts" "${GEN_ARGS[@]}" "$@"
        else
            echo ">>> $manifest exists: generation skipped"
        fi
        echo ">>> Scoring $group"
        "$PYTHON" -m eval.score --json_path "$manifest" "${SCORE_DEVICE[@]}" "${EXTRA_SCORE_ARGS[@]}"
    done
    "$PYTHON" -m eval.score --gather_log "$LOG"
}

run_all "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
