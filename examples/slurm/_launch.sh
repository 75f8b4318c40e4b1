# Shared body of the sbatch scripts in this folder (sourced, not submitted). It sets the
# environment, runs ONE srun step of `python -m megatron_diffu.$STAGE`, and turns the trainer's
# exit code into the job's fate:
#
#   0   training finished (train_iters reached)          -> the job ends with 0
#   75  checkpointed after SIGUSR1/SIGTERM (pre-emption   -> `scontrol requeue $SLURM_JOB_ID`:
#       or the time limit: #SBATCH --signal=USR1@120)        the same job id runs again later and
#                                                            resumes from `latest` (--load = --save)
#   other  a real failure                                 -> the job fails with that code
#
# Each task runs through _task.sh, which maps the trainer's 75 to exit 0 + a marker file (so that
# --kill-on-bad-exit=1 does not SIGTERM ranks still finishing the checkpoint); the step counts as
# pre-empted when it exits 0 with markers. A crashed rank (its traceback is in the job log,
# prefixed by its task id) makes srun return non-zero, and --kill-on-bad-exit=1 stops the other
# ranks at once instead of letting them hang in a collective.
#
# Inputs (environment; sbatch exports the submitter's environment, and keeps it on requeue):
#   STAGE            pretrain | sft | grpo (set by the sbatch script)
#   CONFIG           YAML run config (required; the pretrain script defaults to the 7B recipe)
#   SAVE             checkpoint directory (default runs/$SLURM_JOB_NAME/checkpoints); reruns resume here
#   INIT_CHECKPOINT  first run only (no `latest` in $SAVE yet): start from these weights (--finetune)
#   MDIFFU_ROOT      repository root (default: the directory sbatch was called from)
#   MDIFFU_CPU=1     CPU mode: gloo, no GPUs, OMP threads = cpus per task (tests, laptops)
#   MDIFFU_PYTHON    python command (default python3; tests use it to inject faults)
#   MDIFFU_MAX_RESTARTS  stop requeueing after this many restarts (default 50)
#   MDIFFU_CONTAINER_IMAGE  run the step in a pyxis/enroot container (squashfs or docker://...)
#   MDIFFU_CONTAINER_MOUNTS extra pyxis mounts (default: the repo and $SAVE's parent)
#   MDIFFU_CPU_BIND  srun --cpu-bind value (default cores on GPUs, none in CPU mode)
# Script arguments are passed to the stage as flags (`sbatch pretrain.sbatch --train-iters 100`).

set -uo pipefail
EXIT_REQUEUE=75
# SIGUSR1 is for the ranks (Slurm signals the job steps: --signal=USR1@N without "B:", and
# `scancel --signal=USR1`); should it also reach this shell (scancel --batch/--full), don't die
# of it: keep waiting for srun, which then reports the ranks' checkpoint-and-exit.
trap ':' USR1

ROOT=${MDIFFU_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT" || { echo "[slurm] cannot cd to MDIFFU_ROOT=$ROOT" >&2; exit 1; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: "${STAGE:?set STAGE (pretrain|sft|grpo)}"
: "${CONFIG:?set CONFIG=path/to/run.yaml (e.g. sbatch --export=ALL,CONFIG=examples/x.yaml ...)}"
[ -f "$CONFIG" ] || { echo "[slurm] CONFIG=$CONFIG not found (relative to $ROOT)" >&2; exit 2; }
SAVE=${SAVE:-$ROOT/runs/${SLURM_JOB_NAME:-$STAGE}/checkpoints}
mkdir -p "$SAVE"
read -r -a PY <<<"${MDIFFU_PYTHON:-python3}"

if [ "${MDIFFU_CPU:-0}" = 1 ]; then
  export MDIFFU_DIST_BACKEND=gloo CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  CPU_BIND=${MDIFFU_CPU_BIND:-none}
else
  # --- NCCL / InfiniBand knobs (defaults are safe; tune per cluster) ----------------------
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer aborts, not hangs
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP comm/compute ordering (Megatron)
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}               # INFO once to see the chosen transports
  # export NCCL_IB_HCA=mlx5_0,mlx5_1,...               # which HCAs to use (ibv_devices lists them)
  # export NCCL_SOCKET_IFNAME=ib0                      # bootstrap interface (not docker0/lo)
  # export NCCL_IB_GID_INDEX=3                         # RoCE v2 fabrics
  # export NCCL_NET_GDR_LEVEL=PHB                      # GPUDirect RDMA distance
  # export NCCL_IB_TIMEOUT=22 NCCL_IB_RETRY_CNT=10     # lossy / large fabrics
  # export NCCL_NVLS_ENABLE=0                          # if NVLink SHARP misbehaves on H100 systems
  # export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)-ib  # IB hostname
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  CPU_BIND=${MDIFFU_CPU_BIND:-cores}
fi

CONTAINER=()
if [ -n "${MDIFFU_CONTAINER_IMAGE:-}" ]; then  # pyxis: the srun step runs inside the image
  CONTAINER=(--container-image="$MDIFFU_CONTAINER_IMAGE"
             --container-mounts="${MDIFFU_CONTAINER_MOUNTS:-$ROOT:$ROOT,$(dirname "$SAVE"):$(dirname "$SAVE")}"
             --container-workdir="$ROOT")
fi

restarts=${SLURM_RESTART_COUNT:-0}
latest=$(cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
echo "[slurm] $(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?} ($STAGE) restart $restarts: ${SLURM_JOB_NUM_NODES:-1} node(s)" \
     "${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-1} task(s); config $CONFIG; checkpoints $SAVE (latest: $latest)"

# Where to start: our own `latest` if there is one (a requeued or resubmitted job resumes, whatever
# the config says about finetuning), else INIT_CHECKPOINT as a finetune start (weights only:
# e.g. the converted Qwen2.5-Coder-7B), else the config's own checkpoint.load/finetune.
if [ -s "$SAVE/latest_checkpointed_iteration.txt" ]; then
  LOAD=(--load "$SAVE" --no-finetune)
elif [ -n "${INIT_CHECKPOINT:-}" ]; then
  LOAD=(--load "$INIT_CHECKPOINT" --finetune)
else
  LOAD=()
fi

# tasks that exit 75 (checkpointed after a signal) leave a marker here and exit 0 (_task.sh)
export MDIFFU_EXIT_MARK=$SAVE/.exit-markers/${SLURM_JOB_ID:-local}
rm -rf "$MDIFFU_EXIT_MARK" && mkdir -p "$MDIFFU_EXIT_MARK"

srun --kill-on-bad-exit=1 --cpu-bind="$CPU_BIND" --label "${CONTAINER[@]}" \
  bash "$ROOT/examples/slurm/_task.sh" \
  "${PY[@]}" -m "megatron_diffu.$STAGE" --config "$CONFIG" --save "$SAVE" "${LOAD[@]}" "$@"
rc=$?
marked=$(find "$MDIFFU_EXIT_MARK" -name 'task-*' 2>/dev/null | wc -l)
rm -rf "$MDIFFU_EXIT_MARK"
[ "$rc" -eq 0 ] && [ "$marked" -gt 0 ] && rc=$EXIT_REQUEUE

case $rc in
  0)
    echo "[slurm] $(date -u +%FT%TZ) training finished"; exit 0 ;;
  "$EXIT_REQUEUE")
    now=$(cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
    if [ "${SLURM_JOB_ID:-}" = "" ] || [ "$restarts" -ge "${MDIFFU_MAX_RESTARTS:-50}" ]; then
      echo "[slurm] checkpointed at iteration $now after a signal; not requeueing (restart $restarts)"
      exit "$EXIT_REQUEUE"
    fi
    echo "[slurm] $(date -u +%FT%TZ) checkpointed at iteration $now after a signal: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { echo "[slurm] scontrol requeue failed" >&2; exit "$EXIT_REQUEUE"; }
    exit 0 ;;  # normally not reached: the requeue ends this batch script
  *)
    echo "[slurm] $(date -u +%FT%TZ) FAILED with exit code $rc (see the task-labelled errors above)" >&2
    exit "$rc" ;;
esac
