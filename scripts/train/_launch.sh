# Sourced by the six scripts beside it, which set NAME (the run name) and ARGS (their own shipped train.py
# arguments; the settings common to all six are COMMON_ARGS below).
# Runs `accelerate launch [--num_processes N] train.py --output_dir <repo>/output/NAME ARGS... "$@"`: arguments given
# to the script come last, so they add to or override the shipped ones (argparse keeps the last value).
#
# Environment (all optional):
#   NUM_GPUS         GPUs on this machine (default: torch.cuda.device_count())
#   NUM_PROCESSES    processes in the whole job, passed as --num_processes (default: NUM_GPUS; with an `accelerate
#                    config` file present, the config decides; multi-node: GPUs per machine x machines)
#   ACCELERATE_ARGS  more `accelerate launch` options, e.g. "--config_file multinode.yaml --machine_rank 1"
#   CPU=1            run on the CPU (one process) even without a GPU: slow, for smoke tests with small models
#   SAFEGUARD=0      plain objective: drop --use_winner_preserving and its mu; output_dir gets "-no-safeguard"
#   PYTHON, ACCELERATE  interpreter and launcher (default: `python` and `accelerate` on PATH)

if [[ -z ${NAME:-} || -z ${ARGS+x} ]]; then
    echo "scripts/train/_launch.sh is sourced by the training scripts; run one of scripts/train/*.sh" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python}
ACCELERATE=${ACCELERATE:-accelerate}
SCRIPT="scripts/train/$(basename "${BASH_SOURCE[1]}")"

if ! command -v "$ACCELERATE" > /dev/null; then
    echo "error: '$ACCELERATE' not found. Install the requirements and activate the environment:" >&2
    echo "  bash scripts/setup.sh && source .venv/bin/activate" >&2
    exit 1
fi

if [[ ${SAFEGUARD:-1} == 0 ]]; then
    KEPT=()
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        case ${ARGS[i]} in
            --use_winner_preserving) ;;
            --winner_preserving_mu) i=$((i + 1)) ;;
            *) KEPT+=("${ARGS[i]}") ;;
        esac
    done
    ARGS=("${KEPT[@]}")
    NAME=$NAME-no-safeguard
fi

LAUNCH=()
if [[ ${CPU:-0} == 1 ]]; then
    LAUNCH=(--cpu --num_processes 1)
    PROCESSES="1 process on the CPU (CPU=1: slow, meant for smoke tests with small models and few steps)"
else
    if [[ -z ${NUM_GPUS:-} ]]; then
        if ! NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())"); then
            echo "error: '$PYTHON' cannot import torch. Install the requirements and activate the environment:" >&2
            echo "  bash scripts/setup.sh && source .venv/bin/activate   (or set PYTHON=/path/to/python)" >&2
            exit 1
        fi
    fi
    if [[ $NUM_GPUS == 0 && -z ${NUM_PROCESSES:-} ]]; then
        cat >&2 << EOF
No GPU found: torch.cuda.device_count() is 0 for $PYTHON. The shipped settings of $SCRIPT
(batch 8 x 32 accumulation steps per GPU, bf16, 2000 steps) are meant for GPUs.
To run it on the CPU anyway (slow: for a smoke test, pass a small model, few steps and no mixed precision):
  CPU=1 bash $SCRIPT --max_train_steps 10 --mixed_precision no [--pretrained_model_name_or_path DIR] [--dataset_name DIR]
To see the whole pipeline work on the CPU, run the offline demo: bash scripts/demo.sh
EOF
        exit 1
    fi
    accelerate_config=${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/accelerate/default_config.yaml
    if [[ -n ${NUM_PROCESSES:-} ]]; then
        LAUNCH=(--num_processes "$NUM_PROCESSES")
        PROCESSES="$NUM_PROCESSES processes (NUM_PROCESSES; $NUM_GPUS GPUs on this machine)"
    elif [[ -f $accelerate_config || ${ACCELERATE_ARGS:-} == *--config_file* ]]; then
        PROCESSES="as your accelerate config says (${ACCELERATE_ARGS:-$accelerate_config}); NUM_PROCESSES=N overrides"
    else
        LAUNCH=(--num_processes "$NUM_GPUS")
        PROCESSES="$NUM_GPUS processes, one per GPU"
    fi
fi
read -r -a EXTRA_LAUNCH <<< "${ACCELERATE_ARGS:-}"

# Shipped settings common to all six scripts (SPEC Part B §5.1); each script adds its model, objective and lr.
COMMON_ARGS=(
    --dataset_name yuvalkirstain/pickapic_v2 --dataloader_num_workers 16
    --train_batch_size 8 --gradient_accumulation_steps 32
    --max_train_steps 2000 --lr_scheduler constant_with_warmup --lr_warmup_steps 500 --checkpointing_steps 500
    --mixed_precision bf16 --allow_tf32
)
COMMAND=("$ACCELERATE" launch "${LAUNCH[@]}" "${EXTRA_LAUNCH[@]}" "$REPO/train.py" --output_dir "$REPO/output/$NAME"
         "${COMMON_ARGS[@]}" "${ARGS[@]}" "$@")
echo ">>> $NAME: $PROCESSES; effective batch = train_batch_size x gradient_accumulation_steps x processes"
echo ">>> ${COMMAND[*]}"
exec "${COMMAND[@]}"
