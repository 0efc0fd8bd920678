"""Run an experiment: methods x pretraining seeds x label fractions, pretrained, evaluated and compared.

python launch/experiment.py --config configs/experiments/demo.yaml             # cells one after the other
python launch/experiment.py --config configs/experiments/demo.yaml --dry-run   # the cells and their commands
python launch/experiment.py --config configs/experiments/demo.yaml --address auto   # as Ray tasks
"""

from ilm_dist.experiment.command import experiment_main

if __name__ == "__main__":
    experiment_main()
