# Sourced by the six scripts beside it, which set NAME (the run name) and ARGS (their own shipped train.py
# arguments; the settings common to all six are COMMON_ARGS below).
# Runs `accelerate launch --quiet [--num_processes N] train.py --output_dir <repo>/output/NAME COMMON_ARGS ARGS
# [LoRA / CPU=1 settings below] "$@"`: arguments given to the script come last, so they add to or override the shipped
# ones (argparse keeps the last value). --quiet: no accelerate traceback repeating the command line when train.py fails.
# Output streams live; train.py's stderr is also copied to a temporary file, and when the run fails the last line
# printed is `error: <cause> (exit status N)` (train.py's `train.py: error: ...` line, else the last exception line),
# and the script exits with that status. Ctrl-C reaches the training as usual; SIGTERM/SIGHUP sent to the script
# are forwarded to `accelerate`.
#
# --use_lora among the script's arguments: the shipped full fine-tune learning rate (1e-8 or 1e-9, x --scale_lr) is far
# too small for LoRA adapters, so the shipped --learning_rate and --scale_lr are dropped and, unless given,
# --learning_rate 1e-5 and --lora_rank 8 added. Source: diffusers, examples/research_projects/diffusion_dpo/README.md
# (LoRA Diffusion-DPO; its SD1.5, SDXL and SDXL-Turbo commands all use --rank=8 --learning_rate=1e-5 without
# --scale_lr, constant schedule, no warmup, 8-bit AdamW; train_diffusion_dpo*.py build the LoRA as train.py does:
# lora_alpha = rank, Gaussian init, to_k/to_q/to_v/to_out.0). Not carried over: its batch (16 x 2 per GPU for SD1.5,
# 8 x 2 for SDXL), its beta (the script defaults, 2500 for SD1.5 and 5000 for SDXL; here each method keeps its own)
# and its optimizer (the SDXL scripts keep Adafactor, whose lr, without relative steps, is an absolute step size as
# Adam's). That README calls the scripts experimental, tested on little data; the value is a starting point for
# every objective here. --learning_rate, --lora_rank or --scale_lr among the arguments take precedence.
#
# Environment (all optional):
#   NUM_GPUS         GPUs on this machine (default: torch.cuda.device_count())
#   NUM_PROCESSES    processes in the whole job, passed as --num_processes (default: NUM_GPUS; with an `accelerate
#                    config` file present, the config decides; multi-node: GPUs per machine x machines)
#   ACCELERATE_ARGS  more `accelerate launch` options, e.g. "--config_file configs/accelerate/fsdp_sdxl.yaml"
#   NUM_MACHINES     several machines (docs/multinode.md): run this script once on each machine, with
#   MACHINE_RANK     this machine's rank, 0 .. NUM_MACHINES-1 (0 hosts torch.distributed's rendezvous),
#   MAIN_PROCESS_IP  the address of machine 0, and
#   MAIN_PROCESS_PORT  a free port on it (default 29500); passed as accelerate's --num_machines, --machine_rank,
#                    --main_process_ip and --main_process_port, and NUM_PROCESSES defaults to NUM_GPUS x NUM_MACHINES.
#                    scripts/train/slurm.sbatch sets all four from SLURM's environment.
#   CPU=1            run on the CPU (one process) even without a GPU, with smoke-test settings (batch 1, no
#                    accumulation, 256 px (SDXL 512; wan 64 px x 5 frames, cogvideox 64 px x 9 frames), 4 steps, a
#                    checkpoint at step 2, 16 pairs, fp32, <= 2 data workers) that the script's own arguments override
#   SAFEGUARD=0      plain objective: drop --use_winner_preserving and its mu; output_dir gets "-no-safeguard"
#   VARIANT=cm       DPO-C&M of arXiv 2505.21893 (our interpretation, docs/importance.md): --importance_weighting
#                    clip_mask (pairs with importance weight < 0.9 masked); output_dir gets "-cm"
#   VARIANT=is       importance-weighted objective: --importance_weighting full (weights clipped to [0.1, 1] and
#                    normalised over the micro-batch, so a batch of 1 pair becomes 2 with half the accumulation
#                    steps: the same pairs per update); output_dir gets "-is"
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

case ${VARIANT:-} in
    "") ;;
    cm) ARGS+=(--importance_weighting clip_mask); NAME=$NAME-cm ;;
    is)
        ARGS+=(--importance_weighting full); NAME=$NAME-is
        for ((i = 0; i < ${#ARGS[@]}; i++)); do  # the shipped batch and accumulation (the last occurrences win)
            [[ ${ARGS[i]} == --train_batch_size ]] && batch=${ARGS[i + 1]}
            [[ ${ARGS[i]} == --gradient_accumulation_steps ]] && accumulation=${ARGS[i + 1]}
        done
        if [[ ${batch:-1} == 1 ]]; then  # full normalises over the micro-batch: one pair would always weigh 1
            accumulation=${accumulation:-1}
            ARGS+=(--train_batch_size 2 --gradient_accumulation_steps $(((accumulation + 1) / 2)))
        fi
        ;;
    *) echo "error: VARIANT=${VARIANT}: use cm (DPO-C&M) or is (importance-weighted), or leave it unset" >&2; exit 2 ;;
esac

given() {  # given --flag: the script's own arguments contain --flag or --flag=value
    local arg
    for arg in "${USER_ARGS[@]}"; do
        [[ $arg == "$1" || $arg == "$1="* ]] && return 0
    done
    return 1
}
USER_ARGS=("$@")
if [[ ${VIDEO_PAIRS:-0} == 1 ]] && ! given --dataset_name; then  # the video scripts: no public default set
    echo "error: give --dataset_name: your video pairs (parquet or WebDataset with mp4_0/mp4_1, or a JSONL manifest;" \
         "docs/video.md)" >&2
    exit 2
fi

# LoRA: diffusers' Diffusion-DPO LoRA recipe (header above) instead of the full fine-tune learning rate.
LORA_ARGS=()
if given --use_lora; then
    KEPT=()
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        case ${ARGS[i]} in
            --scale_lr) ;;
            --learning_rate) i=$((i + 1)) ;;
            *) KEPT+=("${ARGS[i]}") ;;
        esac
    done
    ARGS=("${KEPT[@]}")
    given --learning_rate || LORA_ARGS+=(--learning_rate 1e-5)
    given --lora_rank || LORA_ARGS+=(--lora_rank 8)
    added=${LORA_ARGS[*]:+, ${LORA_ARGS[*]} added}
    echo ">>> --use_lora: the shipped full fine-tune --learning_rate and --scale_lr dropped$added; source: diffusers'" \
         "Diffusion-DPO LoRA recipe (examples/research_projects/diffusion_dpo/README.md); your arguments override"
fi

LAUNCH=(--quiet)
SMOKE_ARGS=()
MACHINES=${NUM_MACHINES:-1}
if [[ ! $MACHINES =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_MACHINES=$MACHINES: give the number of machines, 1 or more" >&2
    exit 2
fi
if ((MACHINES > 1)); then
    if [[ ! ${MACHINE_RANK:-} =~ ^[0-9]+$ ]] || ((MACHINE_RANK >= MACHINES)) || [[ -z ${MAIN_PROCESS_IP:-} ]]; then
        echo "error: NUM_MACHINES=$MACHINES needs MACHINE_RANK (0 .. $((MACHINES - 1)), this machine's;" \
             "now '${MACHINE_RANK:-}') and MAIN_PROCESS_IP (machine 0's address; now '${MAIN_PROCESS_IP:-}')." \
             "Under SLURM: sbatch scripts/train/slurm.sbatch (docs/multinode.md)" >&2
        exit 2
    fi
    if [[ ${CPU:-0} == 1 ]]; then
        echo "error: CPU=1 is a one-process smoke test on one machine; unset NUM_MACHINES" >&2
        exit 2
    fi
fi
if [[ ${CPU:-0} == 1 ]]; then
    LAUNCH+=(--cpu --num_processes 1)
    PROCESSES="1 process on the CPU"
    smoke_resolution=256
    [[ " ${ARGS[*]} " == *" --sdxl "* ]] && smoke_resolution=512
    smoke_workers=$(nproc 2> /dev/null || echo 1)
    ((smoke_workers > 2)) && smoke_workers=2
    SMOKE_ARGS=(
        --train_batch_size 1 --gradient_accumulation_steps 1
        --dataloader_num_workers "$smoke_workers" --max_train_steps 4 --checkpointing_steps 2 --lr_warmup_steps 0
        --max_train_samples 16 --mixed_precision no
    )
    # Video families: the smallest valid clip (docs/video.md "Smoke test on the CPU"): 64 px square and the fewest
    # frames of more than one latent frame (wan 4k + 1: 5; cogvideox 8k + 1: 9); the shipped 81/49 frames at 480 px
    # take minutes per step and tens of GB on a CPU.
    smoke_family=
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        [[ ${ARGS[i]} == --model_family ]] && smoke_family=${ARGS[i + 1]}
    done
    for ((i = 0; i < ${#USER_ARGS[@]}; i++)); do  # the script's own arguments win, as in train.py
        [[ ${USER_ARGS[i]} == --model_family ]] && smoke_family=${USER_ARGS[i + 1]:-}
        [[ ${USER_ARGS[i]} == --model_family=* ]] && smoke_family=${USER_ARGS[i]#--model_family=}
    done
    case $smoke_family in
        wan) smoke_resolution=64; SMOKE_ARGS+=(--num_frames 5) ;;
        cogvideox) smoke_resolution=64; SMOKE_ARGS+=(--num_frames 9) ;;
    esac
    given --video_size || SMOKE_ARGS+=(--resolution "$smoke_resolution")  # train.py takes one of the two
    echo ">>> CPU=1: smoke-test settings ${SMOKE_ARGS[*]} (your arguments override them)"
else
    if [[ -z ${NUM_GPUS:-} ]]; then
        if ! NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())"); then
            echo "error: '$PYTHON' cannot import torch. Install the requirements and activate the environment:" >&2
            echo "  bash scripts/setup.sh && source .venv/bin/activate   (or set PYTHON=/path/to/python)" >&2
            exit 1
        fi
    fi
    if [[ $NUM_GPUS == 0 && -z ${NUM_PROCESSES:-} && ${VIDEO_PAIRS:-0} == 1 ]]; then
        cat >&2 << EOF
No GPU found: torch.cuda.device_count() is 0 for $PYTHON. The shipped settings of $SCRIPT
(1 video pair x 16 accumulation steps per GPU at the model's full frame count and size, bf16, 2000 steps) are meant
for GPUs. A smoke test on the CPU: CPU=1 uses batch 1, no accumulation, 64 px clips of 5 (wan) or 9 (cogvideox)
frames, 4 steps (checkpoint at 2), 16 pairs, fp32 (docs/video.md gives its time and memory per step):
  CPU=1 bash $SCRIPT --dataset_name pairs.jsonl [--pretrained_model_name_or_path DIR]
To see the whole video pipeline work on the CPU, run the offline demo: bash scripts/video_demo.sh
EOF
        exit 1
    fi
    if [[ $NUM_GPUS == 0 && -z ${NUM_PROCESSES:-} ]]; then
        cat >&2 << EOF
No GPU found: torch.cuda.device_count() is 0 for $PYTHON. The shipped settings of $SCRIPT
(batch 8 x 32 accumulation steps per GPU, bf16, 2000 steps) are meant for GPUs.
A smoke test on the CPU: CPU=1 uses batch 1, no accumulation, small images, 4 steps (checkpoint at 2), 16 pairs, fp32:
  CPU=1 bash $SCRIPT --dataset_name DIR [--pretrained_model_name_or_path DIR]
(a small local copy of the data: the full Pick-a-Pic v2 is several hundred GB; your arguments override the settings)
To see the whole pipeline work on the CPU, run the offline demo: bash scripts/demo.sh
EOF
        exit 1
    fi
    accelerate_config=${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/accelerate/default_config.yaml
    if ((MACHINES > 1)); then  # accelerate counts the processes of the whole job, over every machine
        NUM_PROCESSES=${NUM_PROCESSES:-$((NUM_GPUS * MACHINES))}
        LAUNCH+=(--num_processes "$NUM_PROCESSES" --num_machines "$MACHINES" --machine_rank "$MACHINE_RANK"
                 --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "${MAIN_PROCESS_PORT:-29500}")
        PROCESSES="$NUM_PROCESSES processes on $MACHINES machines (this is machine $MACHINE_RANK; rendezvous at"
        PROCESSES+=" $MAIN_PROCESS_IP:${MAIN_PROCESS_PORT:-29500})"
    elif [[ -n ${NUM_PROCESSES:-} ]]; then
        LAUNCH+=(--num_processes "$NUM_PROCESSES")
        PROCESSES="$NUM_PROCESSES processes (NUM_PROCESSES; $NUM_GPUS GPUs on this machine)"
    elif [[ -f $accelerate_config || ${ACCELERATE_ARGS:-} == *--config_file* ]]; then
        PROCESSES="as your accelerate config says (${ACCELERATE_ARGS:-$accelerate_config}); NUM_PROCESSES=N overrides"
    else
        LAUNCH+=(--num_processes "$NUM_GPUS")
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
         "${COMMON_ARGS[@]}" "${ARGS[@]}" "${LORA_ARGS[@]}" "${SMOKE_ARGS[@]}" "$@")
echo ">>> $NAME: $PROCESSES; effective batch = train_batch_size x gradient_accumulation_steps x processes"
echo ">>> ${COMMAND[*]}"

# Run it with stderr streamed live and copied to $stderr_copy, so that a failure can end with its one-line cause.
stderr_copy=$(mktemp "${TMPDIR:-/tmp}/train-stderr.XXXXXX")
trap 'rm -f "$stderr_copy"' EXIT
exec 4> >(trap '' INT TERM HUP; exec tee "$stderr_copy" >&2)  # tee outlives a signal, to copy the last words
tee_pid=$!
set +e
if env --default-signal=INT,QUIT true 2> /dev/null; then
    # In the background so that the traps below run while it trains (a foreground child would delay them until it
    # ends); env undoes the SIGINT/SIGQUIT ignoring that bash gives background children, so Ctrl-C, which the terminal
    # sends to the training as well as to this script, stops it as before; 0<&0 keeps stdin (not /dev/null).
    env --default-signal=INT,QUIT "${COMMAND[@]}" 0<&0 2>&4 4>&- &
    child=$!
    trap 'kill -TERM "$child" 2> /dev/null' TERM
    trap 'kill -HUP "$child" 2> /dev/null' HUP
    trap ':' INT  # the training got the Ctrl-C too: wait for it to stop
    delay=0.05
    while kill -0 "$child" 2> /dev/null; do  # polled: a `wait` cut short by a trap can then hang (bash 5.2)
        sleep "$delay"
        delay=0.5
    done
    wait "$child"
    status=$?
else  # an env without --default-signal (coreutils < 8.31): in the foreground; Ctrl-C works, SIGTERM is not forwarded
    "${COMMAND[@]}" 2>&4 4>&-
    status=$?
fi
exec 4>&-
for _ in {1..50}; do  # let tee copy the last lines (a leftover process holding stderr open must not hang the script)
    kill -0 "$tee_pid" 2> /dev/null || break
    sleep 0.1
done
if ((status != 0)); then
    cause=$(tail -c 1000000 "$stderr_copy" | tr '\r' '\n' | grep -a -o 'train\.py: error: .*' | tail -n 1)
    if [[ -z $cause ]]; then  # no such line: the last exception line other than the launchers' own
        cause=$(tail -c 1000000 "$stderr_copy" | tr '\r' '\n' | grep -a -v -E 'CalledProcessError|ChildFailedError' |
                grep -a -E '^([A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_]*(Error|Exception|Interrupt|Exit)\b' | tail -n 1)
    fi
    if [[ -z $cause ]]; then  # else the last line that is not traceback, separator or progress bar
        noise='^[[:space:]]|^$|^Traceback |^During handling|^The above exception|^[=~^-]+$|CalledProcessError'
        noise+='|ChildFailedError|[0-9]+%\|'
        cause=$(tail -c 1000000 "$stderr_copy" | tr '\r' '\n' | grep -a -v -E "$noise" | tail -n 1)
    fi
    echo "error: ${cause:-$NAME failed, see the output above} (exit status $status)" >&2
fi
exit "$status"
