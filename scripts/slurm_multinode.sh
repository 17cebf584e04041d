#!/bin/bash
# Multi-node sparsetune run on SLURM: one launcher per node, each starting one process per GPU.
#
#   sbatch scripts/slurm_multinode.sh recipes/llama2_7b_multigpu.yaml zero3
#   sbatch --nodes 4 scripts/slurm_multinode.sh my_recipe.yaml fsdp train.max_steps=2000 'description=my run'
#
# Overrides (KEY=VALUE ...) reach `sparsetune train` as the same single arguments you passed, spaces and
# quotes included: quote them for your own shell only, as above. MAIN_PORT=... in the environment changes
# the rendezvous port (default 29500).
#
# Preemption: SLURM sends SIGTERM to every task before killing it (--signal below gives 120 s); each task
# execs sparsetune, so the signal reaches it directly, and it checkpoints at the next step boundary and
# exits 0. When the job is requeued (--requeue below, on preemption or `scontrol requeue JOBID`), this
# script runs again with the same arguments and --resume continues from the newest checkpoint. The run's
# output_dir must be on a filesystem every node sees: all ranks write into the checkpoint.
#SBATCH --job-name=sparsetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm_multinode.sh RECIPE PRESET [KEY=VALUE ...]}
PRESET=${2:-zero3}
shift $(($# < 2 ? $# : 2))  # what is left in "$@" are the overrides, still one argument each
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# sed reads the whole list: `head -n 1` would exit early, and scontrol's SIGPIPE fail the job under pipefail.
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
: "${MAIN_IP:?scontrol show hostnames gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}"
PORT=${MAIN_PORT:-29500}

# The command runs in one task per node. Everything reaches it as positional parameters, never spliced
# into the command string, so no value is re-split or re-parsed by the task's shell. SLURM_NODEID is
# different on every node, so it is read inside the task (single quotes keep this shell from expanding it).
# --resume starts fresh when output_dir has no checkpoint yet, so the same line serves the first
# submission and every requeue after a preemption.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 bash -c '
    preset=$1 gpus=$2 nnodes=$3 main_ip=$4 port=$5
    shift 5
    exec sparsetune train "$@" --resume \
        --launch "$preset" --num-processes "$gpus" \
        --num-machines "$nnodes" --machine-rank "$SLURM_NODEID" \
        --main-process-ip "$main_ip" --main-process-port "$port"
' sparsetune-node "$PRESET" "$GPUS_PER_NODE" "$SLURM_NNODES" "$MAIN_IP" "$PORT" "$RECIPE" "$@"
