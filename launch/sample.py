"""Sampling entry point: image completions and unconditional samples as PNG grids (one process)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_vision.cli import run, sample_main  # noqa: E402

if __name__ == "__main__":
    run(sample_main)
