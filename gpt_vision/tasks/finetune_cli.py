"""`launch/finetune.py --config configs/finetune/X.yaml init=PATH [key=value ...]`: one process,
one GPU or the CPU; dispatches on task.kind and prints a one-line summary."""
from __future__ import annotations

import argparse
import logging

from gpt_vision.config_loader import load_config
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.scores import summary
from gpt_vision.threads import configure_threads


def run(cfg: FinetuneConfig) -> dict:
    """Run the configured task; returns what was written to results.json."""
    if cfg.task.kind == "distill":
        from gpt_vision.tasks.distill import run_distill

        return run_distill(cfg)
    from gpt_vision.tasks.backbone import load_backbone

    backbone = load_backbone(cfg)
    if cfg.task.kind == "linear_probe":
        from gpt_vision.tasks.probe import run_linear_probe

        return run_linear_probe(cfg, backbone)
    if cfg.task.kind == "attentive_probe":
        from gpt_vision.tasks.probe import run_attentive_probe

        return run_attentive_probe(cfg, backbone)
    from gpt_vision.tasks.finetune import run_finetune

    return run_finetune(cfg, backbone)


def main(argv: list[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Probe, fine-tune or distill a pretrained image GPT.")
    parser.add_argument("--config", help="YAML config (e.g. configs/finetune/linear_probe.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. init=runs/x output_dir=out/probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    configure_threads(local_ranks=1)
    results = run(cfg)
    print(f"{summary(cfg.task.kind, results)} -> {cfg.output_dir}", flush=True)
    return 0
