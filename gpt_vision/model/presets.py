"""Named model shapes: the Image GPT paper's S/M/L/XL and two CPU-sized ones for tests and smoke runs.

`python -m gpt_vision.model` prints each preset's parameter count (see `model/__main__.py`).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int
    note: str = ""


PRESETS: dict[str, Preset] = {
    "igpt-tiny": Preset(4, 128, 4, "CPU tests and smoke runs"),
    "igpt-mini": Preset(8, 256, 8, "CPU-sized experiments"),
    "igpt-s": Preset(24, 512, 8, "paper: 76M"),
    "igpt-m": Preset(36, 1024, 8, "paper: 455M"),
    "igpt-l": Preset(48, 1536, 16, "paper: 1.4B"),
    # The paper gives iGPT-XL's depth and width but not its head count; 16 is our choice.
    "igpt-xl": Preset(60, 3072, 16, "paper: 6.8B; head count not published, 16 is our choice"),
}
