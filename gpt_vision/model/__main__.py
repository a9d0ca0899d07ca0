"""`python -m gpt_vision.model`: print every preset's parameter count at the paper's setting."""

from gpt_vision.model.presets import main

main()
