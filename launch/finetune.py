"""Fine-tune a backbone on 1% / 6% / 100% of the labels (full network or linear layer only).

python launch/finetune.py --weights runs/idc/moco --out evals/idc --fractions 0.01 0.06 1
python launch/finetune.py --weights random --config configs/idc/moco.yaml --out evals/idc --mode linear
python launch/finetune.py --weights runs/idc/moco --out evals_official/idc --protocol official --dataset idc
deepspeed launch/finetune.py --weights runs/idc/moco --out evals/idc        # data-parallel, all GPUs
DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --weights runs/idc/moco --out evals/idc
"""

from ilm_dist.eval.commands import finetune_main

if __name__ == "__main__":
    finetune_main()
