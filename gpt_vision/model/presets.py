"""Named model shapes: the Image GPT paper's S/M/L/XL and two CPU-sized ones for tests and smoke runs.

Run `python -m gpt_vision.model` to print each preset's parameter count at the paper's
setting (512-colour palette, 32x32 = 1024 positions, next-pixel head).
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


def parameter_table(vocab_size: int = 512, image_size: int = 32) -> list[tuple[str, int, int]]:
    """(name, total, non-embedding) parameter counts per preset, counted on the meta device."""
    import torch

    from gpt_vision.model.config import ModelConfig
    from gpt_vision.model.gpt import GPT

    rows = []
    for name in PRESETS:
        cfg = ModelConfig(preset=name, vocab_size=vocab_size, image_size=image_size).resolved()
        with torch.device("meta"):
            model = GPT(cfg)
        rows.append((name, model.num_parameters(), model.num_parameters(non_embedding=True)))
    return rows


def main() -> None:
    print(f"{'preset':<10} {'layers':>6} {'width':>6} {'heads':>5} {'params':>14} {'non-embedding':>14}  note")
    for name, total, non_embedding in parameter_table():
        p = PRESETS[name]
        print(f"{name:<10} {p.n_layer:>6} {p.n_embd:>6} {p.n_head:>5} {total:>14,} {non_embedding:>14,}  {p.note}")
