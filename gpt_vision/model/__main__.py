"""`python -m gpt_vision.model`: every preset's parameter count at the paper's setting.

The paper's setting: a 512-colour palette, 32x32 = 1024 positions, next-pixel head.
"""
import torch

from gpt_vision.model.config import ModelConfig
from gpt_vision.model.gpt import GPT
from gpt_vision.model.presets import PRESETS


def parameter_table(vocab_size: int = 512, image_size: int = 32) -> list[tuple[str, int, int]]:
    """(name, total, non-embedding) parameter counts per preset, counted on the meta device."""
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


if __name__ == "__main__":
    main()
