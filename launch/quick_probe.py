"""Quick representation check: kNN accuracy of a run's backbone next to a random-init one.

python launch/quick_probe.py --run runs/demo/pretrain [--split test]
"""

from ilm_dist.eval.quick_probe import main

if __name__ == "__main__":
    main()
