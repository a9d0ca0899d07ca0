"""Submit pretraining or fine-tuning to Slurm through submitit, resources from the config's `slurm:` section.

    python launch/submit.py pretrain --config configs/pretrain/X.yaml [key=value ...]
        [--sweep optim.lr=1e-3,3e-4 ...] [--local] [--wait]

Each job requeues itself on preemption or before its time limit and resumes from its newest
checkpoint. A sweep is one job array over the cartesian product, each member its own run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_vision.cli import run  # noqa: E402
from gpt_vision.slurm import submit_main  # noqa: E402

if __name__ == "__main__":
    run(submit_main)
