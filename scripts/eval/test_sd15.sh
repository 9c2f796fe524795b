#!/usr/bin/env bash
# Evaluate a fine-tuned UNet as the official scripts/eval/test_sd15.sh does (test_sdxl.sh, test_sd3.sh and test_flux.sh
# run this file for their family, EVAL_FAMILY=sdxl/sd3/flux; SD2.x: this file with PRETRAIN=<SD2 model> SIZE=768):
# for each prompt set (papv2, hpsv2, partiprompts) generate the images, then score all sets with the five metrics in
# one eval.score call (each scorer loaded once), then print the table of every set scored in OUTPUT with these
# settings (also sets scored by earlier runs). All output is appended to <OUTPUT>/joint_test_<SIZE>.log.
#
#   bash scripts/eval/test_sd15.sh output/sd15-dpo/unet.pth [extra eval.generate args, e.g. --batch_size 8]
#   bash scripts/eval/test_sd15.sh output/sd15-lora          # a train.py --use_lora folder: its LoRA adapter
#   bash scripts/eval/test_sd15.sh output/sd15-dpo/unet.pth --max_prompts 8   # smoke run: first 8 prompts per set
#
# UNET may be a unet.pth / .safetensors file, a diffusers folder, or a train.py output folder (unet.safetensors /
# unet.pth, or pytorch_lora_weights.safetensors, loaded as LoRA); for sd3/flux the transformer's: transformer.pth /
# .safetensors, a transformer or pipeline folder, or a train.py output folder. OUTPUT = the file's folder (or the
# folder itself).
# The header line names the weights loaded. Generation always runs and resumes: a finished set is checked (each image
# must store its prompt, and OUTPUT/<set>/run.json must record the same model and settings, else an error) and kept;
# a partial one, e.g. from --max_prompts, is completed, so a smoke run never stands in for the full set. The table's
# n column gives the prompts scored per set.
# Defaults are the official protocol: SIZE 512 (SDXL 1024), STEP 50, CFG 7.5 (official formula = standard 8.5), SEED 0;
# sd3: SIZE 1024, STEP 40, CFG 4.5 (standard formula); flux: SIZE 1024, STEP 50, CFG 3.5 (guidance embedding).
# Optional environment variables:
#   PRETRAIN, VAE        base model and VAE (eval.generate's --pretrain_path / --vae_path defaults otherwise; sd3 and
#                        flux: PRETRAIN defaults to the hub id in test_sd3.sh / test_flux.sh, or a local folder)
#   DEVICE, BATCH        device for generation and scoring; prompts per generation forward pass
#   PROMPTS_DIR          folder holding <group>.json (default: prompts/ of this repo); a missing file is built there
#                        with prompts/build.py from its public source
#   PROMPT_GROUPS        prompt sets (default "papv2 hpsv2 partiprompts"); SIZE, STEP, CFG, SEED override the protocol
#   PYTHON               interpreter (default python); LAUNCH: generator launcher (default $PYTHON; e.g.
#                        "accelerate launch" for several GPUs); SCORE_ARGS: extra eval.score arguments
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: ${EVAL_SCRIPT:-$0} UNET_PATH [extra eval.generate arguments]" >&2
    exit 2
fi
UNET=$1
shift
if [[ ! -e $UNET ]]; then
    echo "error: $UNET does not exist (give a unet.pth / unet.safetensors file, a transformer.pth for sd3/flux, or a" \
         "diffusers or train.py output folder)" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # python -m eval.* from any working directory
PYTHON=${PYTHON:-python}
read -r -a LAUNCHER <<< "${LAUNCH:-$PYTHON}"
read -r -a EXTRA_SCORE_ARGS <<< "${SCORE_ARGS:-}"

FAMILY=${EVAL_FAMILY:-$([[ ${EVAL_SDXL:-0} == 1 ]] && echo sdxl || echo sd)}
WEIGHTS_LABEL=UNet
case $FAMILY in
    sd) FAMILY_FLAG=(); DEFAULT_SIZE=512; DEFAULT_STEP=50; DEFAULT_CFG=7.5 ;;
    sdxl) FAMILY_FLAG=(--sdxl); DEFAULT_SIZE=1024; DEFAULT_STEP=50; DEFAULT_CFG=7.5 ;;
    # the model cards' diffusers examples: SD3.5-medium 40 steps, guidance 4.5; FLUX.1-dev 50 steps, guidance 3.5
    sd3) FAMILY_FLAG=(--model_family sd3); DEFAULT_SIZE=1024; DEFAULT_STEP=40; DEFAULT_CFG=4.5
         WEIGHTS_LABEL=Transformer; PRETRAIN=${PRETRAIN:-stabilityai/stable-diffusion-3.5-medium} ;;
    flux) FAMILY_FLAG=(--model_family flux); DEFAULT_SIZE=1024; DEFAULT_STEP=50; DEFAULT_CFG=3.5
          WEIGHTS_LABEL=Transformer; PRETRAIN=${PRETRAIN:-black-forest-labs/FLUX.1-dev} ;;
    # video (mp4 per prompt; frame-averaged metrics and temporal consistency): the pipelines' default sizes, the
    # model cards' steps and guidance (docs/video.md)
    wan) FAMILY_FLAG=(--model_family wan); DEFAULT_SIZE=480x832; DEFAULT_STEP=50; DEFAULT_CFG=5.0
         WEIGHTS_LABEL=Transformer; PRETRAIN=${PRETRAIN:-Wan-AI/Wan2.1-T2V-1.3B-Diffusers} ;;
    cogvideox) FAMILY_FLAG=(--model_family cogvideox); DEFAULT_SIZE=480x720; DEFAULT_STEP=50; DEFAULT_CFG=6.0
               WEIGHTS_LABEL=Transformer; PRETRAIN=${PRETRAIN:-THUDM/CogVideoX-2b} ;;
    *) echo "error: EVAL_FAMILY must be sd, sdxl, sd3, flux, wan or cogvideox, not $FAMILY" >&2; exit 2 ;;
esac
SIZE=${SIZE:-$DEFAULT_SIZE}
if [[ $SIZE == *x* ]]; then HEIGHT=${SIZE%x*}; WIDTH=${SIZE#*x}; else HEIGHT=$SIZE; WIDTH=$SIZE; fi
STEP=${STEP:-$DEFAULT_STEP}
CFG=${CFG:-$DEFAULT_CFG}
SEED=${SEED:-0}
CFG_NAME=$("$PYTHON" -c "import sys; print(float(sys.argv[1]))" "$CFG")  # as the run name prints it: 7 -> 7.0
PROMPT_GROUPS=${PROMPT_GROUPS:-papv2 hpsv2 partiprompts}
PROMPTS_DIR=${PROMPTS_DIR:-$REPO/prompts}
if [[ -d $UNET ]]; then OUTPUT=$UNET; else OUTPUT=$(dirname "$UNET"); fi
LOG=$OUTPUT/joint_test_$SIZE.log

GEN_ARGS=(--unet_path "$UNET" --output "$OUTPUT" --height "$HEIGHT" --width "$WIDTH" --steps "$STEP" --cfg "$CFG"
          --seed "$SEED" "${FAMILY_FLAG[@]}")
[[ -n ${PRETRAIN:-} ]] && GEN_ARGS+=(--pretrain_path "$PRETRAIN")
[[ -n ${VAE:-} ]] && GEN_ARGS+=(--vae_path "$VAE")
[[ -n ${DEVICE:-} ]] && GEN_ARGS+=(--device "$DEVICE")
[[ -n ${BATCH:-} ]] && GEN_ARGS+=(--batch_size "$BATCH")
SCORE_DEVICE=()
[[ -n ${DEVICE:-} ]] && SCORE_DEVICE=(--device "$DEVICE")

run_all() {
    echo "===== $(date '+%Y-%m-%d %H:%M:%S') ${EVAL_SCRIPT:-$0} $UNET $*"  # EVAL_SCRIPT: the wrapper that ran this
    local weights
    weights=$("$PYTHON" -m eval.generate --print_weights "${GEN_ARGS[@]}" "$@")
    echo "$WEIGHTS_LABEL: $UNET | weights: $weights | output: $OUTPUT | size $SIZE, $STEP steps, cfg $CFG, seed $SEED | groups: $PROMPT_GROUPS"
    local manifests=()
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
        echo ">>> Generating $group (done images are checked and kept; a partial run is completed)"
        "${LAUNCHER[@]}" -m eval.generate --test_json "$prompts" "${GEN_ARGS[@]}" "$@"
        manifests+=("$OUTPUT/${group}_seed${SEED}_${HEIGHT}x${WIDTH}_${STEP}s_${CFG_NAME}cfg.json")
    done
    echo ">>> Scoring $PROMPT_GROUPS"
    "$PYTHON" -m eval.score --json_path "${manifests[@]}" "${SCORE_DEVICE[@]}" "${EXTRA_SCORE_ARGS[@]}"
    # the table of every set scored in OUTPUT with these settings, so re-running one set keeps the others
    local scores=()
    shopt -s nullglob
    scores=("$OUTPUT"/*"_seed${SEED}_${HEIGHT}x${WIDTH}_${STEP}s_${CFG_NAME}cfg_scores.json")
    shopt -u nullglob
    "$PYTHON" -m eval.score --gather_scores "${scores[@]}" --table_out "$OUTPUT/joint_test_${SIZE}_table"
}

run_all "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
