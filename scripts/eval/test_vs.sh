#!/usr/bin/env bash
# A/B win rates of model A over model B on all five metrics, then the summary table (official test_vs.sh CLI).
#
#   scripts/eval/test_vs.sh --json_a A.json --json_b B.json --label_a A --label_b B \
#       [--device cuda|cpu] [--batch_size 64] [--outdir output/vs_eval] [extra eval.compare args ...]
#
# Results go to <outdir>/<A>_vs_<B>_<MMDD-HHMMSS>/ (pair_*.json, summary.json, summary.md, win_rates.png).
# Any other argument (e.g. --ties_as_loss_for_a, --scorer_config cfg.json, --pickscore_path DIR) is passed on to
# `python -m eval.compare`. Works from any directory; relative paths are taken from where you run it.
# One process: each of the five scorers is loaded once. Compare complete runs: a manifest from a --max_prompts smoke
# run lists only its first N prompts (eval.score flags such runs), and prompts only one side has are left out.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

DEVICE=""          # empty: eval.compare picks cuda when available, else cpu
BATCH_SIZE=64
OUTDIR="output/vs_eval"
LABEL_A=""; LABEL_B=""; JSON_A=""; JSON_B=""
EXTRA=()

usage() {
  echo "Usage: $0 --json_a A.json --json_b B.json --label_a 'A' --label_b 'B'" >&2
  echo "          [--device cuda|cpu] [--batch_size 64] [--outdir DIR] [extra eval.compare args]" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --json_a) JSON_A="${2:?--json_a needs a value}"; shift 2;;
    --json_b) JSON_B="${2:?--json_b needs a value}"; shift 2;;
    --label_a) LABEL_A="${2:?--label_a needs a value}"; shift 2;;
    --label_b) LABEL_B="${2:?--label_b needs a value}"; shift 2;;
    --device) DEVICE="${2:?--device needs a value}"; shift 2;;
    --batch_size) BATCH_SIZE="${2:?--batch_size needs a value}"; shift 2;;
    --outdir) OUTDIR="${2:?--outdir needs a value}"; shift 2;;
    -h|--help) usage;;
    # pass-through; a value naming an existing file/dir (relative to the caller's directory) is made absolute
    *) if [[ "$1" != -* && -e "$1" ]]; then EXTRA+=("$(realpath -- "$1")"); else EXTRA+=("$1"); fi; shift;;
  esac
done

[[ -z "$JSON_A" || -z "$JSON_B" || -z "$LABEL_A" || -z "$LABEL_B" ]] && usage

echo "Label_A: $LABEL_A"
echo "Label_B: $LABEL_B"
echo "Json_A: $JSON_A"
echo "Json_B: $JSON_B"

# resolve the user's paths before leaving their directory
JSON_A="$(realpath -m -- "$JSON_A")"
JSON_B="$(realpath -m -- "$JSON_B")"
STAMP="$(date +%m%d-%H%M%S)"
SUBDIR="$(realpath -m -- "${OUTDIR}/${LABEL_A//\//-}_vs_${LABEL_B//\//-}_${STAMP}")"
mkdir -p "$SUBDIR"
echo ">>> Results will be saved under: $SUBDIR"

ARGS=(--json_a "$JSON_A" --json_b "$JSON_B" --label_a "$LABEL_A" --label_b "$LABEL_B" --batch_size "$BATCH_SIZE"
      --outdir "$SUBDIR" --metrics pickscore hpsv2 aesthetics clip imagereward)
if [[ -n "$DEVICE" ]]; then ARGS+=(--device "$DEVICE"); fi

# image paths inside the manifests may be relative to the directory the generator ran in: the repo root for the
# shipped scripts; eval.compare also tries the manifest's own directory.
cd "$REPO"
# one process, one model in memory at a time: pickscore, hpsv2, aesthetics, clip, imagereward, then the summary
"$PYTHON" -m eval.compare "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
