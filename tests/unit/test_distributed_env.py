"""detect_env over the environments each launcher really produces (copied from real runs)."""

import os
import socket

import pytest
import torch.distributed as dist

from gpt_vision.distributed import (
    DistEnv,
    detect_env,
    expand_hostlist,
    first_host,
    init_process_group,
    strip_launcher_args,
)
from gpt_vision.errors import UserError

DEEPSPEED = {  # `deepspeed --num_gpus 2 train.py`, second process
    "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
    "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
}
TORCHRUN = {  # `torchrun --nnodes 2 --nproc-per-node 2 ...`, rank 3
    "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "MASTER_ADDR": "node01", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none",
}
SBATCH_SCRIPT = {  # the batch script of `sbatch -N2 --ntasks-per-node=2` (no step id!)
    "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0",
    "SLURM_TASKS_PER_NODE": "2(x2)",
}
SRUN_TASK = {  # task 3 of `srun` inside that batch script
    **SBATCH_SCRIPT, "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_PROCID": "3",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "127.0.0.[1-2]", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_plain_python_is_a_single_process():
    assert detect_env([], {}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "python")


def test_deepspeed_launcher_env_and_local_rank_argument():
    env = detect_env(["--local_rank=1", "model.depth=2"], DEEPSPEED)
    assert env == DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")
    assert not env.is_main and env.is_distributed


def test_deepspeed_without_local_rank_argument_is_recognised_by_its_env():
    assert detect_env([], DEEPSPEED).launcher == "deepspeed"


def test_local_rank_argument_in_two_tokens_and_dashed_spelling():
    assert detect_env(["--local-rank", "1"], DEEPSPEED).local_rank == 1


def test_torchrun():
    assert detect_env([], TORCHRUN) == DistEnv(3, 4, 1, 2, "node01", 29400, "torchrun")


def test_legacy_torch_distributed_launch_passes_local_rank_but_is_torchrun():
    assert detect_env(["--local-rank=1"], TORCHRUN).launcher == "torchrun"


def test_generic_env_launcher():
    environ = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert detect_env([], environ) == DistEnv(0, 2, 0, 2, "h", 1234, "env")


def test_srun_task():
    env = detect_env([], SRUN_TASK)
    assert env == DistEnv(3, 4, 1, 2, "127.0.0.1", 15001, "srun")


def test_srun_port_derives_from_job_id_and_master_env_overrides():
    assert detect_env([], {**SRUN_TASK, "SLURM_JOB_ID": "123456"}).master_port == 15000 + 123456 % 20000
    env = detect_env([], {**SRUN_TASK, "MASTER_PORT": "40000", "MASTER_ADDR": "10.0.0.9"})
    assert (env.master_addr, env.master_port) == ("10.0.0.9", 40000)


def test_srun_master_is_first_node_of_the_step_not_of_the_job():
    environ = {**SRUN_TASK, "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    assert detect_env([], environ).master_addr == "gpu03"


def test_srun_uneven_tasks_per_node():
    environ = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
               "SLURM_NODEID": "2", "SLURM_PROCID": "4", "SLURM_LOCALID": "0"}
    env = detect_env([], environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (4, 5, 0, 1)


def test_sbatch_batch_script_and_salloc_shell_are_single_processes():
    assert detect_env([], SBATCH_SCRIPT).launcher == "python"
    assert detect_env([], SBATCH_SCRIPT).world_size == 1
    assert detect_env([], {**SRUN_TASK, "SLURM_STEP_ID": "batch"}).world_size == 1
    assert detect_env([], {**SRUN_TASK, "SLURM_STEP_ID": "4294967294"}).world_size == 1


def test_torchrun_under_srun_prefers_torchrun():
    env = detect_env([], {**SRUN_TASK, **TORCHRUN})
    assert env == DistEnv(3, 4, 1, 2, "node01", 29400, "torchrun")


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
        ("a", ["a"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
        ("x-[009-010].ib,y", ["x-009.ib", "x-010.ib", "y"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["n[1-2", "n]1", "n[a-b]", "n[3-1]", "a,,b", ""])
def test_expand_hostlist_rejects_malformed(hostlist):
    with pytest.raises(ValueError):
        expand_hostlist(hostlist)


def test_first_host_reports_unreadable_nodelist_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match=r"cannot read Slurm node list 'n\[1-2'"):
        first_host("n[1-2")


def test_first_host_falls_back_to_scontrol_for_syntax_it_cannot_read(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames n[a-b]" ] && printf "w1\\nw2\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert first_host("n[a-b]") == "w1"


@pytest.mark.parametrize(
    "environ, argv, message",
    [
        ({"RANK": "0"}, [], "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, [], "WORLD_SIZE is set but RANK is not"),
        ({**TORCHRUN, "RANK": "4"}, [], r"RANK=4 is outside 0..3 \(WORLD_SIZE=4\)"),
        ({**TORCHRUN, "RANK": "-1"}, [], "RANK=-1 is outside"),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, [], "WORLD_SIZE='two' is not an integer"),
        ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, [], "WORLD_SIZE=0 must be at least 1"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, [], r"LOCAL_RANK=2 is outside 0..1"),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "8"}, [], "LOCAL_WORLD_SIZE=8 must be between 1 and WORLD_SIZE=4"),
        ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, [], "LOCAL_RANK is not"),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, [], "MASTER_ADDR is not set"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, [], "MASTER_PORT=70000 is not a TCP port"),
        ({**TORCHRUN, "MASTER_PORT": "x"}, [], "MASTER_PORT='x' is not an integer"),
        (DEEPSPEED, ["--local_rank=0"], "--local_rank=0 disagrees with LOCAL_RANK=1"),
        (DEEPSPEED, ["--local_rank"], "--local_rank needs a value"),
        (DEEPSPEED, ["--local_rank=one"], "--local_rank='one' is not an integer"),
        ({}, ["--local_rank=0"], "--local_rank=0 was passed but RANK and WORLD_SIZE are not set"),
        ({**SRUN_TASK, "SLURM_PROCID": "4"}, [], r"SLURM_PROCID=4 is outside 0..3"),
        ({**SRUN_TASK, "SLURM_PROCID": ""}, [], "SLURM_PROCID='' is not an integer"),
        ({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2x2"}, [], "is not of the form"),
        ({**SRUN_TASK, "SLURM_NODEID": "2"}, [], "SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE"),
        ({**SRUN_TASK, "SLURM_JOB_ID": "abc"}, [], "SLURM_JOB_ID='abc' is not an integer"),
        ({**SRUN_TASK, "SLURM_LOCALID": "2"}, [], r"SLURM_LOCALID=2 is outside 0..1"),
        ({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, [],
         "SLURM_STEP_TASKS_PER_NODE=8 must be between 1 and SLURM_STEP_NUM_TASKS=4"),
        ({k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}, [], "without SLURM_JOB_NODELIST"),
    ],
)
def test_inconsistent_environments_raise_one_clear_line(environ, argv, message):
    with pytest.raises(UserError, match=message) as info:
        detect_env(argv, environ)
    assert "\n" not in str(info.value)


def test_strip_launcher_args():
    argv = ["--local_rank=0", "a=1", "--local-rank", "3", "b=2", "--local-rank=1"]
    assert strip_launcher_args(argv) == ["a=1", "b=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_process_group_single_process(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "stale")  # monkeypatch restores the caller's values afterwards
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "python")
    assert init_process_group(env) is False
    assert not dist.is_initialized()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"] == str(env.master_port)
    try:
        assert init_process_group(env, force=True) is True
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert init_process_group(env, force=True) is False
        with pytest.raises(UserError, match="already exists"):
            init_process_group(DistEnv(1, 2, 1, 2, "127.0.0.1", env.master_port, "env"))
    finally:
        dist.destroy_process_group()
