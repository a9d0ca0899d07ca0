"""Fine-tune entry point (one process): linear/attentive probe, full fine-tune, distillation."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_vision.cli import finetune_main, run  # noqa: E402

if __name__ == "__main__":
    run(finetune_main)
