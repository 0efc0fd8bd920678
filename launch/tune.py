"""Ray Tune sweep over loss weights, layer subsets, loss type and training knobs.

python launch/tune.py --config configs/sweeps/demo.yaml                 # local Ray, CPU trials
python launch/tune.py --config configs/sweeps/idc.yaml data.shards=/tmp/packed/idc
python launch/tune.py --config configs/sweeps/idc.yaml --resume         # after an interruption
python launch/tune.py --config configs/sweeps/idc.yaml --address auto   # an existing Ray cluster
"""

from ilm_dist.tune.command import tune_main

if __name__ == "__main__":
    tune_main()
