"""Pretrain MoCo v2 + intermediate-layer losses.

deepspeed launch/pretrain.py --config configs/demo.yaml train.max_steps=20 output_dir=runs/x
python launch/pretrain.py --config configs/demo.yaml            # one process
python launch/pretrain.py --config configs/idc/moco_bt.yaml --resume
"""

from ilm_dist.pretrain import pretrain_main

if __name__ == "__main__":
    pretrain_main()
