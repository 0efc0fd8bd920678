#!/usr/bin/env bash
# Multi-node run from one login/head node over passwordless ssh (DeepSpeed's pdsh launcher).
#   launch/cluster/pdsh.sh HOSTFILE MASTER_ADDR --config configs/nih/moco_bt.yaml [key=value ...]
# Every node must see the repository, the .venv and the shards at the same paths.
set -euo pipefail
hostfile=$1 master=$2; shift 2
cd "$(dirname "$0")/../.."
source launch/cluster/env.sh
exec .venv/bin/deepspeed --hostfile "$hostfile" --launcher pdsh --master_addr "$master" \
  --master_port "${MASTER_PORT:-29500}" launch/pretrain.py "$@"
