"""Pretraining entry point for every launcher: deepspeed, torchrun, srun (sbatch) or python."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_vision.cli import pretrain_main, run  # noqa: E402

if __name__ == "__main__":
    run(pretrain_main)
