#!/bin/bash
# Multi-node sparsetune run on SLURM: one launcher per node, each starting one process per GPU.
#
#   sbatch scripts/slurm_multinode.sh recipes/llama2_7b_multigpu.yaml zero3
#   sbatch --nodes 4 scripts/slurm_multinode.sh my_recipe.yaml fsdp train.max_steps=2000
#
# Preemption: SLURM sends SIGTERM to every task before killing it (--signal below gives 120 s);
# sparsetune checkpoints at the next step boundary and exits 0. Requeue and resume with --resume
# (the run's output_dir must be on a filesystem every node sees: all ranks write into the checkpoint).
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
shift 2 || true
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MAIN_PORT:-29500}

# --resume starts fresh when output_dir has no checkpoint yet, so the same line serves the first
# submission and every requeue after a preemption.
srun --kill-on-bad-exit=1 bash -c "sparsetune train '$RECIPE' $* --resume \
    --launch '$PRESET' --num-processes $GPUS_PER_NODE \
    --num-machines $SLURM_NNODES --machine-rank \$SLURM_NODEID \
    --main-process-ip $MAIN_IP --main-process-port $PORT"
