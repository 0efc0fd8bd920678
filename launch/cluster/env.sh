# Network and runtime variables multi-node jobs typically need. Source it in every node's job
# (the SLURM script does); for pdsh launches, copy the lines you need into ./.deepspeed_env
# (KEY=VALUE per line), which DeepSpeed exports on every remote node.

# Which interface NCCL/gloo bootstrap on (the cluster network, not docker0/lo).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
# gloo (CPU runs, DeepSpeed's object collectives) takes one interface name, no ^ exclusions:
# export GLOO_SOCKET_IFNAME=eth0
# InfiniBand / RoCE: the HCAs to use; NCCL_IB_DISABLE=1 forces TCP (slow, but works anywhere).
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
# export NCCL_IB_DISABLE=0
# GPUDirect RDMA between NIC and GPU when the topology allows it.
# export NCCL_NET_GDR_LEVEL=PHB
# Log NCCL's choices once when something is slow or hangs (INFO is verbose).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank that dies makes the others fail after engine.collective_timeout_s instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# CPU threads and cores per rank: ilm_dist places each rank itself (ilm_dist/cpu_placement.py: the node's
# cores split between its ranks, the loader workers' share left to them). Setting OMP_NUM_THREADS here
# overrides that thread count and turns the binding off.
