"""Report over methods evaluated on one dataset: tables with CIs, probe/CKA/KS plots, Markdown page.

python launch/analyse.py evals/idc --out evals/idc/report
python launch/analyse.py evals/idc/idc_moco evals/idc/idc_moco_mse --out report/
python launch/analyse.py evals_official/idc --out evals_official/idc/report   # the protocol they record

It only reads saved files and runs in one process; under the deepspeed launcher rank 0 does the work.
"""

from ilm_dist.eval.commands import analyse_main

if __name__ == "__main__":
    analyse_main()
