"""Console entry points: parse `--config FILE key=value ...`, run, turn UserError into one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from gpt_vision.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError

# How long a rank other than 0 waits before printing a user error itself (see _guard).
OTHER_RANKS_WAIT_S = 10.0


def _guard(prog: str, body: Callable[[], int], rank: int = 0) -> int:
    """Run `body`; a user error becomes one line on stderr and exit code 2.

    Under a multi-process launcher every rank meets the same error, so rank 0 says it: the
    other ranks wait, and the launcher ends them (or signals them to stop) when rank 0 exits.
    A rank still there after the wait (its error was not rank 0's), or whose error only some
    ranks can meet (`rank_local`), says it too, naming its rank.
    """
    try:
        return body()
    except UserError as exc:
        if rank != 0 and not exc.rank_local and _ended_by_launcher(OTHER_RANKS_WAIT_S):
            return EXIT_USER_ERROR
        where = f"rank {rank}: " if rank else ""
        print(f"{prog}: error: {where}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


def _ended_by_launcher(seconds: float) -> bool:
    """Wait up to `seconds`; True if a stop signal came (our handlers turn SIGTERM into a flag)."""
    from gpt_vision.train import preemption

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if preemption.stop_requested():
            return True
        time.sleep(0.05)
    return False


def _pretrain_args(prog: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Pretrain an image GPT on shards.")
    parser.add_argument("--config", help="YAML config (may pull others through `defaults:`)")
    parser.add_argument("--nproc_per_node", type=int, default=0,
                        help="start this many local ranks (torchrun's agent) and exit with their code: "
                        f"{EXIT_USER_ERROR} for a user error, {EXIT_PREEMPTED} when all ranks saved and stopped")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def _launcher_rank(argv: list[str]) -> int:
    """This process's rank for error printing; 0 when the launcher's variables are unreadable."""
    from gpt_vision.distributed import detect_env

    try:
        return detect_env(argv).rank
    except UserError:
        return 0


def pretrain_main(argv: list[str] | None = None) -> int:
    """`deepspeed|torchrun|srun|python launch/pretrain.py --config X.yaml key=value ...`,
    or `python launch/pretrain.py --nproc_per_node N ...` to start N local ranks itself."""
    from gpt_vision.distributed import detect_env, strip_launcher_args

    prog = "gpt-vision-pretrain"
    raw = sys.argv[1:] if argv is None else argv

    def body() -> int:
        env = detect_env(raw)
        args = _pretrain_args(prog, strip_launcher_args(raw))
        if args.nproc_per_node:
            return _start_local_ranks(prog, args.nproc_per_node, raw, env)
        from gpt_vision.config_loader import load_config
        from gpt_vision.run_configs import PretrainConfig
        from gpt_vision.tasks.pretrain import run_pretraining
        from gpt_vision.threads import configure_threads
        from gpt_vision.train import preemption

        logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                            format=f"[rank {env.rank}] %(levelname)s %(name)s: %(message)s")
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        configure_threads(env.local_world_size)
        preemption.install_handlers()
        result = run_pretraining(cfg, env)
        return EXIT_PREEMPTED if result.stopped_early else 0

    return _guard(prog, body, _launcher_rank(raw))


def _start_local_ranks(prog: str, nproc: int, raw: list[str], env) -> int:
    from gpt_vision.local_launch import run_local_ranks
    from gpt_vision.threads import choose_threads, physical_cores

    if env.launcher != "python":
        raise UserError(f"--nproc_per_node starts its own ranks; it cannot run under {env.launcher}")
    script = Path(__file__).resolve().parents[1] / "launch" / "pretrain.py"
    if not script.is_file():
        raise UserError(f"--nproc_per_node needs the repository's {script}")
    if not os.environ.get("OMP_NUM_THREADS"):  # torch's agent would otherwise force 1 per rank
        os.environ["OMP_NUM_THREADS"] = str(choose_threads(physical_cores(os.sched_getaffinity(0)), nproc))
    rest = list(raw)
    for at, arg in enumerate(rest):
        if arg == "--nproc_per_node" or arg.startswith("--nproc_per_node="):
            del rest[at:at + (2 if arg == "--nproc_per_node" else 1)]
            break
    return run_local_ranks(prog, nproc, str(script), rest)


def export_main(argv: list[str] | None = None) -> int:
    """`gpt-vision-export STEP_DIR OUT`: model.safetensors + config.yaml + palette, one process."""
    prog = "gpt-vision-export"

    def body() -> int:
        parser = argparse.ArgumentParser(prog=prog, description="Export a checkpoint to safetensors.")
        parser.add_argument("checkpoint", help="a step directory, or a run directory (its newest complete step)")
        parser.add_argument("out", help="output directory (must not exist, or be empty)")
        args = parser.parse_args(argv)
        from gpt_vision.export import export_checkpoint, export_source

        out = export_checkpoint(args.checkpoint, args.out)
        source = export_source(out)
        print(f"exported step {source['step']} ({source['checkpoint']}) -> {out}")
        return 0

    return _guard(prog, body)


def finetune_main(argv: list[str] | None = None) -> int:
    """`python launch/finetune.py --config X.yaml key=value ...` (one process)."""
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
    """For `launch/*.py`: exit with the entry point's code.

    A rank of a multi-process job that stops non-zero exits at once, without interpreter
    teardown: the launcher terminates the remaining ranks as soon as one exits non-zero, and a
    rank still tearing down (signal handlers gone) would die by that SIGTERM instead of
    reporting its own code. The ranks pass a barrier before a save-and-stop, so they all exit
    85 together.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    hard = os.environ.get("GPT_VISION_HARD_EXIT") or (code != 0 and os.environ.get("WORLD_SIZE", "1") != "1")
    os._exit(code) if hard else sys.exit(code)
