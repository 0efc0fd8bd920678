"""Linear probes on the frozen pooled output of each ResNet block (Block 1..4).

python launch/probe.py --weights runs/idc/moco --out evals/idc
python launch/probe.py --weights runs/idc/moco --out evals_official/idc --protocol official --dataset idc
deepspeed launch/probe.py --weights runs/idc/moco --out evals/idc      # features extracted on all GPUs
DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/probe.py --weights runs/idc/moco --out evals/idc
"""

from ilm_dist.eval.commands import probe_main

if __name__ == "__main__":
    probe_main()
