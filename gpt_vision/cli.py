"""Console entry points: parse `--config FILE key=value ...`, run, turn UserError into one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from gpt_vision.errors import UserError

# A run stopped by a signal (Slurm warning, preemption) after saving: the caller should requeue.
EXIT_PREEMPTED = 85
EXIT_USER_ERROR = 2


def _guard(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


def _config_args(prog: str, argv: list[str], description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config (may pull others through `defaults:`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def pretrain_main(argv: list[str] | None = None) -> int:
    """`deepspeed|torchrun|srun|python launch/pretrain.py --config X.yaml key=value ...`."""
    from gpt_vision.distributed import detect_env, strip_launcher_args

    prog = "gpt-vision-pretrain"
    raw = sys.argv[1:] if argv is None else argv

    def body() -> int:
        env = detect_env(raw)
        args = _config_args(prog, strip_launcher_args(raw), "Pretrain an image GPT on shards.")
        from gpt_vision.config import PretrainConfig, load_config
        from gpt_vision.tasks.pretrain import run_pretraining
        from gpt_vision.train import preemption

        logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                            format=f"[rank {env.rank}] %(levelname)s %(name)s: %(message)s")
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        preemption.install_handlers()
        result = run_pretraining(cfg, env)
        return EXIT_PREEMPTED if result.stopped_early else 0

    return _guard(prog, body)


def export_main(argv: list[str] | None = None) -> int:
    """`gpt-vision-export STEP_DIR OUT`: model.safetensors + config.yaml + palette, one process."""
    prog = "gpt-vision-export"

    def body() -> int:
        parser = argparse.ArgumentParser(prog=prog, description="Export a checkpoint to safetensors.")
        parser.add_argument("checkpoint", help="a step directory, or a run directory (its newest complete step)")
        parser.add_argument("out", help="output directory (must not exist, or be empty)")
        args = parser.parse_args(argv)
        from gpt_vision.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} -> {out}")
        return 0

    return _guard(prog, body)


def finetune_main(argv: list[str] | None = None) -> int:
    prog = "gpt-vision-finetune"

    def body() -> int:
        from gpt_vision.tasks.finetune_cli import main

        return main(argv, prog)

    return _guard(prog, body)


def sample_main(argv: list[str] | None = None) -> int:
    prog = "gpt-vision-sample"

    def body() -> int:
        from gpt_vision.sampling import main

        return main(argv, prog)

    return _guard(prog, body)


def run(main: Callable[[], int]) -> None:
    """For `launch/*.py`: exit with the entry point's code."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code) if os.environ.get("GPT_VISION_HARD_EXIT") else sys.exit(code)
