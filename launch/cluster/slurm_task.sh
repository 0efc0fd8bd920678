#!/usr/bin/env bash
# One SLURM task of launch/cluster/slurm.sbatch: reads its place in the job from SLURM's per-task variables
# and execs the launcher (node mode) or one rank (gpu mode) with the job's arguments unchanged.
#   slurm_task.sh node|gpu [launch/pretrain.py arguments ...]
set -euo pipefail
mode=$1
shift
if [ "$mode" = node ]; then
  exec .venv/bin/deepspeed --hostfile "$ILM_HOSTFILE" --no_ssh \
    --node_rank "$SLURM_NODEID" --num_nodes "$SLURM_NNODES" --num_gpus "$ILM_GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
fi
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
exec .venv/bin/python launch/pretrain.py "$@"
