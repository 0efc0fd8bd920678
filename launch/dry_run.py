"""Validate a configuration for a cluster shape and print the plan (no cluster, no GPU needed).

python launch/dry_run.py --config configs/nih/moco_bt.yaml --nodes 4 --gpus-per-node 8 --num-samples 86524
"""

from ilm_dist.plan import dry_run_main

if __name__ == "__main__":
    dry_run_main()
