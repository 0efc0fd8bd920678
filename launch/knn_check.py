"""Quick representation check: kNN accuracy of a run's backbone next to a random-init one.

python launch/knn_check.py --run runs/demo/pretrain [--split test]
"""

from ilm_dist.eval.knn_check import main

if __name__ == "__main__":
    main()
