"""The submitit launcher: executor from the `slurm:` section, a preemption-safe job callable, sweeps.

Preemption with submitit: submitit's own USR2 handler (installed before our code runs) calls
`checkpoint()` on rank 0 only, then requeues at once and exits from inside the signal handler,
which would leave the other ranks in a collective and the checkpoint unwritten. `TrainingJob`
therefore routes the signal to the stop flag on every rank (the loop agrees on a step, every
rank saves it and the entry point returns EXIT_PREEMPTED), and only then hands rank 0 back to
submitit's handler, which calls `checkpoint()` (a resubmission of the same job: `resume=auto`
continues from the step just saved), requeues and exits. The other ranks wait for the requeue
to end them, as submitit expects of non-zero ranks.
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from gpt_vision.config_loader import load_config
from gpt_vision.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from gpt_vision.run_configs import FinetuneConfig, PretrainConfig
from gpt_vision.slurm_config import SlurmConfig

# Seconds a non-zero rank waits, after a stop, for rank 0's requeue to end it.
REQUEUE_WAIT_S = 300
TASKS = ("pretrain", "finetune")


def executor_parameters(cfg: SlurmConfig, name: str, local: bool = False) -> dict[str, Any]:
    """`AutoExecutor.update_parameters` keywords for this section (`local`: one node, no Slurm keys)."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": cfg.time_min,
        "nodes": 1 if local else cfg.nodes,
        "tasks_per_node": cfg.ntasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "stderr_to_stdout": True,
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    if local:
        return params
    params["slurm_signal_delay_s"] = cfg.signal_delay_s
    params["slurm_array_parallelism"] = cfg.array_parallelism
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key):
            params[f"slurm_{key}"] = getattr(cfg, key)
    if cfg.extra:
        # An option without a value (`exclusive: ""`) becomes a bare `--exclusive`.
        params["slurm_additional_parameters"] = {k: (v if v != "" else True) for k, v in cfg.extra.items()}
    return params


def make_executor(cfg: SlurmConfig, folder: str | os.PathLike, name: str, local: bool = False):
    """A submitit AutoExecutor (Slurm, or `local` processes for debugging) for `cfg`."""
    cluster = "local" if local else "slurm"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **{f"{cluster}_max_num_timeout": cfg.max_requeues})
    executor.update_parameters(**executor_parameters(cfg, name, local))
    return executor


def expand_sweep(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`["optim.lr=1e-3,3e-4", "seed=0,1"]` -> the cartesian product as (suffix, overrides) pairs.

    The suffix (e.g. ``lr1e-3_seed0``) names each member's run; no sweep gives one unnamed member.
    """
    axes: list[list[tuple[str, str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. optim.lr=1e-3,3e-4)")
        choices = values.split(",")
        if any(not v for v in choices):
            raise UserError(f"--sweep {spec!r}: empty value in the list")
        if key in (k for axis in axes for k, _ in axis[:1]):
            raise UserError(f"--sweep {key} is given twice")
        axes.append([(key, v) for v in choices])
    members = []
    for combo in itertools.product(*axes):
        suffix = "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{k.rsplit('.', 1)[-1]}{v}") for k, v in combo)
        members.append((suffix, [f"{k}={v}" for k, v in combo]))
    suffixes = [s for s, _ in members]
    if len(set(suffixes)) != len(suffixes):
        raise UserError(f"--sweep gives runs with the same name ({', '.join(sorted(suffixes))}); use distinct values")
    return members


@dataclass
class JobOutcome:
    """What a finished submitit job returns (per task)."""

    task: str
    rank: int
    exit_code: int
    stopped_early: bool
    restarts: int


def _entry_points():
    from gpt_vision import cli

    return {"pretrain": cli.pretrain_main, "finetune": cli.finetune_main}


class TrainingJob(Checkpointable):
    """Runs `launch/<task>.py --config ... key=value` inside a submitit job, on every rank.

    submitit pickles it, calls it on every task, and on preemption/timeout asks rank 0 for
    `checkpoint()`.
    """

    def __init__(self, task: str, argv: list[str], max_requeues: int):
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        self.task = task
        self.argv = list(argv)
        self.max_requeues = max_requeues

    def __call__(self) -> JobOutcome:
        from gpt_vision.train import preemption

        job_env = submitit.JobEnvironment()
        _export_rank_env(job_env)
        usr_sig = job_env._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)
        preemption.install_handlers((usr_sig, signal.SIGUSR1, signal.SIGTERM))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if os.environ.get("SLURM_CPUS_PER_TASK"):  # before torch loads: no more threads than CPUs
            os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        code = _entry_points()[self.task](self.argv)
        outcome = JobOutcome(self.task, job_env.global_rank, code, code == EXIT_PREEMPTED, restarts)
        if code == 0 or code == EXIT_PREEMPTED and restarts >= self.max_requeues:
            return outcome
        if code != EXIT_PREEMPTED:
            raise RuntimeError(f"{self.task} exited with code {code} on rank {job_env.global_rank}; see the job log")
        if job_env.global_rank != 0:
            _wait_for_requeue(job_env.global_rank)
        if not callable(submitit_handler):
            raise UserError(f"{self.task} stopped early but submitit installed no {usr_sig.name} handler to requeue it")
        # The requeue SIGTERMs the whole job, `scontrol requeue` itself included unless it
        # inherits an ignored SIGTERM: it must finish, and so must submitit's exit path.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        submitit_handler(usr_sig, None)  # calls checkpoint(), requeues, exits
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Rank 0, from submitit's signal handler: no collectives here, only the stop flag.

        The training loop then agrees on a step with the other ranks and saves it; the returned
        resubmission runs the same command again, which resumes from that step (`resume=auto`).
        """
        from gpt_vision.train import preemption

        preemption.request_stop("submitit checkpoint")
        return DelayedSubmission(self, *args, **kwargs)


def _export_rank_env(job_env) -> None:
    """Outside Slurm (the local executor) publish the task's place for `detect_env`; srun tasks
    carry SLURM_* variables, which `detect_env` reads itself once a rank layout inherited from
    the submitting shell (it would win over SLURM_*) is dropped."""
    from gpt_vision.distributed import DEFAULT_MASTER_ADDR, SLURM_PORT_BASE, SLURM_PORT_SPAN

    if job_env.cluster == "slurm":
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
            os.environ.pop(name, None)
        return
    if job_env.num_tasks == 1:
        return
    os.environ.update(
        RANK=str(job_env.global_rank),
        WORLD_SIZE=str(job_env.num_tasks),
        LOCAL_RANK=str(job_env.local_rank),
        LOCAL_WORLD_SIZE=str(job_env.num_tasks // job_env.num_nodes),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(SLURM_PORT_BASE + int(job_env.raw_job_id) % SLURM_PORT_SPAN)),
    )


def _wait_for_requeue(rank: int) -> None:
    """A non-zero rank after a stop: rank 0 requeues the job, which ends this process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(REQUEUE_WAIT_S)
    raise RuntimeError(f"rank {rank} stopped and saved, but the job was not requeued within {REQUEUE_WAIT_S}s")


# ---- launch/submit.py ----------------------------------------------------------------------------

@dataclass
class Submission:
    """One job (or array member) to submit: its command-line arguments and where its run goes."""

    argv: list[str]
    run_dir: Path
    name: str


def _task_config(task: str):
    return PretrainConfig if task == "pretrain" else FinetuneConfig


def _run_location(cfg) -> tuple[str, Path]:
    """(name, run directory) of a loaded pretrain or finetune config."""
    if hasattr(cfg, "resolved_run_dir"):
        return cfg.name or cfg.resolved_run_dir.name, cfg.resolved_run_dir
    return Path(cfg.output_dir).name, Path(cfg.output_dir)


def plan_submissions(task: str, config: str | None, overrides: list[str], sweep: list[str]) -> tuple[SlurmConfig, list[Submission]]:
    """Load and check every member's config before anything is submitted.

    A config without a `slurm:` section (fine-tuning) takes `slurm.*` overrides on the side.
    Sweep members run in `<run dir>/<suffix>` (named `<name>-<suffix>`), so they never share checkpoints.
    """
    cls = _task_config(task)
    config = str(Path(config).resolve()) if config else None
    has_slurm = "slurm" in cls.__dataclass_fields__
    task_overrides = [o for o in overrides if has_slurm or not o.startswith("slurm.")]
    slurm = None if has_slurm else load_config(SlurmConfig, None, [o[len("slurm."):] for o in overrides if o.startswith("slurm.")])
    base = load_config(cls, config, task_overrides)
    base_name, base_dir = _run_location(base)
    members = expand_sweep(sweep)
    submissions = []
    for suffix, extra in members:
        if sweep:
            location = "run_dir" if has_slurm else "output_dir"
            extra = [*extra, f"{location}={base_dir / suffix}"] + ([f"name={base_name}-{suffix}"] if has_slurm else [])
        argv = [*(["--config", config] if config else []), *task_overrides, *extra]
        cfg = load_config(cls, config, argv[2 if config else 0:])
        name, run_dir = _run_location(cfg)
        submissions.append(Submission(argv, run_dir, name))
        slurm = slurm or cfg.slurm
    if any(s.run_dir.resolve() == other.run_dir.resolve() for i, s in enumerate(submissions) for other in submissions[:i]):
        raise UserError("two sweep members would write to the same run directory")
    return slurm, submissions


def submit(task: str, slurm: SlurmConfig, submissions: list[Submission], local: bool = False) -> list:
    """Submit one job, or one job array for several submissions; returns the submitit jobs.

    Logs go to `slurm.log_dir`, else `<run dir>/slurm` (a sweep: beside its members' run dirs;
    fine-tuning: `<output dir>-slurm`, since it wants an empty output directory).
    """
    single = len(submissions) == 1
    home = submissions[0].run_dir if single else submissions[0].run_dir.parent
    default = home.with_name(home.name + "-slurm") if single and task == "finetune" else home / "slurm"
    folder = Path(slurm.log_dir) if slurm.log_dir else default
    executor = make_executor(slurm, folder / "%j", submissions[0].name if single else f"{home.name}-sweep", local)
    functions = [TrainingJob(task, s.argv, slurm.max_requeues) for s in submissions]
    if single:
        return [executor.submit(functions[0])]
    with executor.batch():
        jobs = [executor.submit(fn) for fn in functions]
    return jobs


def submit_main(argv: list[str] | None = None) -> int:
    """`launch/submit.py pretrain|finetune --config X.yaml key=value ... [--sweep k=v1,v2] [--local] [--wait]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="gpt-vision-submit", description="Submit training to Slurm via submitit.")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--config", help="YAML config of the task")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one job array over the product of all --sweep lists")
    parser.add_argument("--local", action="store_true", help="run as local processes (submitit's local executor)")
    parser.add_argument("--wait", action="store_true", help="wait for the jobs and exit non-zero if one fails")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (slurm.* included)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        slurm, submissions = plan_submissions(args.task, args.config, args.overrides, args.sweep)
        if args.local and slurm.nodes > 1:
            print(f"--local runs on this machine: slurm.nodes={slurm.nodes} becomes 1", file=sys.stderr)
        jobs = submit(args.task, slurm, submissions, local=args.local)
    except UserError as exc:
        print(f"gpt-vision-submit: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    for job, sub in zip(jobs, submissions):
        print(f"submitted job {job.job_id}: {sub.name} -> {sub.run_dir} (log {job.paths.stdout})", flush=True)
    if not args.wait:
        return 0
    failed = 0
    for job in jobs:
        try:
            job.results()
            print(f"job {job.job_id}: finished", flush=True)
        except Exception as exc:  # a job's own failure, reported per job
            failed += 1
            print(f"job {job.job_id}: {job.state}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}",
                  file=sys.stderr, flush=True)
    return 1 if failed else 0
