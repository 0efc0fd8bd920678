"""Linear probes on the frozen pooled output of each ResNet block (Block 1..4).

python launch/probe.py --weights runs/idc/moco --out evals/idc
"""

from ilm_dist.eval.cli import probe_main

if __name__ == "__main__":
    probe_main()
