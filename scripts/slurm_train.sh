#!/usr/bin/env bash
# Multi-node training under Slurm: one `accelerate launch` per node, N nodes x G GPUs.
#
#   sbatch --nodes 4 --gpus-per-node 8 --time 24:00:00 scripts/slurm_train.sh configs/train/llama3_70b_qlora_zero3.yaml [key=value ...]
#
# Pre-emption: Slurm sends SIGUSR1 to this batch shell 120 s before the time limit (--signal below).
# The shell forwards SIGTERM to the job step; the launcher (torchrun under accelerate) passes it to
# every rank, which saves a checkpoint at the next step and exits with 75. The job then re-queues
# itself and the next start resumes (resume=true) from the newest COMPLETE checkpoint.
# torchrun kills the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after forwarding the signal
# (default 30 s, shorter than a large model's step plus its save); it is set below from the
# config's training.preemption_grace_s (default 120 s) plus a margin. Keep --signal's lead time
# (120 s below) above that, or Slurm kills the job first.
#SBATCH --job-name=finetune
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG="${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [key=value ...]}"
shift
ACCEL_CONFIG="${ACCEL_CONFIG:-configs/accelerate/multi_node_zero3.yaml}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"   # "a100:8" -> "8"
NNODES="${SLURM_NNODES:-1}"
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# A dead rank must end the job in bounded time instead of hanging every other rank; the collective
# timeout itself is the config's training.ddp_timeout_s (NCCL reads no timeout variable).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# From the config (with the same overrides): the pre-emption grace period, and whether the run
# directory holds a COMPLETE checkpoint to resume from. A requeued job whose first start died
# before its first checkpoint starts again instead of failing on resume=true.
read -r GRACE HAS_CHECKPOINT < <(python - "$CONFIG" "$@" <<'PY'
import sys
from pathlib import Path

from finetune.config import load_config
from finetune.training.recipe import latest_complete_checkpoint

cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("resume=")])
ckpt = latest_complete_checkpoint(Path(cfg.output_dir) / "checkpoints")
print(int(cfg.training.preemption_grace_s), 1 if ckpt else 0)
PY
)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$(( GRACE + 30 ))}"

EXTRA=()
if [[ "${HAS_CHECKPOINT}" == 1 ]]; then
  EXTRA+=("resume=true")
fi

requeue() {
  echo "caught USR1: asking the trainers to checkpoint and stop, then re-queueing ${SLURM_JOB_ID}"
  kill -TERM "${SRUN_PID}" 2>/dev/null || true
  wait "${SRUN_PID}" || true
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
}
trap requeue USR1

mkdir -p logs
# One launcher per node; each reads its rank from SLURM_PROCID. No shell strings are built
# from user input: arguments are passed as an array.
srun --kill-on-bad-exit=1 --wait=60 bash -c '
  exec accelerate launch \
    --config_file "$0" \
    --num_machines "$1" \
    --num_processes "$(( $1 * $2 ))" \
    --machine_rank "${SLURM_PROCID}" \
    --main_process_ip "$3" \
    --main_process_port "$4" \
    --rdzv_backend c10d \
    -m finetune train "${@:5}"
' "${ACCEL_CONFIG}" "${NNODES}" "${GPUS_PER_NODE}" "${MASTER_ADDR}" "${MASTER_PORT}" "${CONFIG}" "$@" "${EXTRA[@]}" &
SRUN_PID=$!
wait "${SRUN_PID}"
