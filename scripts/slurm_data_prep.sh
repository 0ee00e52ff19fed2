#!/usr/bin/env bash
# data-prep on a Ray cluster inside a Slurm allocation: the first node runs the Ray head and the
# build (the driver), every node a Ray worker with all its CPUs. N nodes x C cores.
#
#   sbatch --nodes 4 --cpus-per-task 32 --time 4:00:00 scripts/slurm_data_prep.sh configs/data/full_example.yaml [key=value ...]
#
# Inputs and output_dir must be visible from every node: a shared filesystem, or s3:// / gs://
# URLs (with s3fs / gcsfs installed on every node). The kit must be installed on every node in
# the same environment (the job inherits this shell's environment, PATH and venv included).
# The recipe's keys apply; engine=ray, ray.address and ray.wait_for_nodes are set here.
#SBATCH --job-name=data-prep
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

RECIPE="${1:?usage: sbatch scripts/slurm_data_prep.sh RECIPE.yaml [key=value ...]}"
shift
mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
HEAD="${NODES[0]}"
# The batch script runs on the first node of the allocation: its address is the head's.
HEAD_IP="${RAY_HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}"
PORT="${RAY_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
CPUS="${SLURM_CPUS_PER_TASK:-$(nproc)}"
ADDRESS="${HEAD_IP}:${PORT}"

PIDS=()
stop_ray() {
  # The Ray processes live as long as their job steps; ending the steps ends the cluster.
  for pid in "${PIDS[@]}"; do kill "${pid}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_ray EXIT

mkdir -p logs
# --block keeps each `ray start` in the foreground of its job step, so Slurm owns its lifetime.
srun --nodes=1 --ntasks=1 -w "${HEAD}" \
  ray start --head --node-ip-address="${HEAD_IP}" --port="${PORT}" --num-cpus="${CPUS}" \
  --include-dashboard=false --block &
PIDS+=($!)

# The head must answer before the workers join it (and before the driver does).
for _ in $(seq 120); do
  if ray status --address "${ADDRESS}" >/dev/null 2>&1; then break; fi
  sleep 2
done
ray status --address "${ADDRESS}" >/dev/null

for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "${node}" \
    ray start --address="${ADDRESS}" --num-cpus="${CPUS}" --block &
  PIDS+=($!)
done

# The engine waits until every node has joined, so the build is planned for all their CPUs.
data-prep run "${RECIPE}" engine=ray "ray.address=${ADDRESS}" "ray.wait_for_nodes=${#NODES[@]}" "$@"
