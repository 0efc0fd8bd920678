#!/usr/bin/env bash
# No-ssh mode: start this on every node yourself (or let any scheduler do it), one call per node.
#   launch/cluster/node.sh HOSTFILE NODE_RANK MASTER_ADDR --config configs/nih/moco_bt.yaml [key=value ...]
# NODE_RANK is 0..N-1 in hostfile order; MASTER_ADDR is node 0's address, reachable from all nodes.
set -euo pipefail
hostfile=$1 node_rank=$2 master=$3; shift 3
cd "$(dirname "$0")/../.."
source launch/cluster/env.sh
nodes=$(grep -cv '^\s*\(#\|$\)' "$hostfile")
exec .venv/bin/deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --num_nodes "$nodes" \
  --master_addr "$master" --master_port "${MASTER_PORT:-29500}" launch/pretrain.py "$@"
