"""SlurmConfig -> submitit executor parameters, sweep expansion, submission planning (no cluster)."""
import pytest

from gpt_vision.errors import ConfigError, UserError
from gpt_vision.slurm import SlurmConfig, TrainingJob, executor_parameters, expand_sweep, make_executor, plan_submissions
from tests.helpers.toydata import tiny_overrides, write_toy_shards


def test_section_maps_to_autoexecutor_parameters():
    cfg = SlurmConfig(partition="gpu", account="proj", qos="high", nodes=4, gpus_per_node=8, cpus_per_task=10,
                      mem_gb=480, time_min=1440, constraint="h100", signal_delay_s=300, array_parallelism=3,
                      extra={"exclusive": "", "mail-type": "END"})
    assert executor_parameters(cfg, "run") == {
        "name": "run", "timeout_min": 1440, "nodes": 4, "tasks_per_node": 8, "cpus_per_task": 10,
        "stderr_to_stdout": True, "gpus_per_node": 8, "mem_gb": 480, "slurm_signal_delay_s": 300,
        "slurm_array_parallelism": 3, "slurm_partition": "gpu", "slurm_account": "proj", "slurm_qos": "high",
        "slurm_constraint": "h100", "slurm_additional_parameters": {"exclusive": True, "mail-type": "END"},
    }


def test_defaults_leave_partition_memory_and_gpus_to_the_cluster():
    params = executor_parameters(SlurmConfig(), "run")
    assert params["tasks_per_node"] == 1
    assert not {"gpus_per_node", "mem_gb", "slurm_partition", "slurm_account", "slurm_additional_parameters"} & params.keys()
    assert executor_parameters(SlurmConfig(gpus_per_node=4, tasks_per_node=1), "x")["tasks_per_node"] == 1


def test_local_executor_gets_one_node_and_no_slurm_keys():
    params = executor_parameters(SlurmConfig(nodes=3, partition="gpu"), "run", local=True)
    assert params["nodes"] == 1 and not any(k.startswith("slurm_") for k in params)


def test_executor_sbatch_script_carries_the_section(tmp_path):
    cfg = SlurmConfig(partition="gpu", nodes=2, gpus_per_node=4, time_min=90, signal_delay_s=200, max_requeues=7,
                      extra={"exclusive": ""})
    executor = make_executor(cfg, tmp_path / "%j", "run")
    assert executor._executor.max_num_timeout == 7
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=90",
                 "--signal=USR2@200", "--exclusive\n"):
        assert line in script


@pytest.mark.parametrize("field,value,message", [
    ("nodes", 0, "must be >= 1"), ("max_requeues", -1, "must be >= 0"),
    ("signal_delay_s", 3600, "does not fit in time_min=60"), ("extra", {"--bad": "x"}, "not an sbatch option"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        SlurmConfig(**{field: value}).check()
    assert info.value.key == field


def test_sweep_is_the_cartesian_product_with_named_members():
    members = expand_sweep(["optim.lr=1e-3,3e-4", "seed=0,1"])
    assert members == [
        ("lr1e-3_seed0", ["optim.lr=1e-3", "seed=0"]), ("lr1e-3_seed1", ["optim.lr=1e-3", "seed=1"]),
        ("lr3e-4_seed0", ["optim.lr=3e-4", "seed=0"]), ("lr3e-4_seed1", ["optim.lr=3e-4", "seed=1"]),
    ]
    assert expand_sweep([]) == [("", [])]


@pytest.mark.parametrize("spec,message", [
    (["optim.lr"], "expected KEY=V1,V2"), (["optim.lr=1e-3,"], "empty value"),
    (["optim.lr=1,2", "optim.lr=3"], "given twice"), (["optim.lr=1e-3,1e-3"], "same name"),
])
def test_bad_sweeps_are_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        expand_sweep(spec)


def test_plan_validates_every_member_and_gives_each_its_run_dir(tmp_path):
    manifest = write_toy_shards(tmp_path / "shards")
    base = tiny_overrides(manifest, tmp_path / "run")
    slurm, subs = plan_submissions("pretrain", None, [*base, "slurm.nodes=2"], ["optim.lr=1e-3,3e-4"])
    assert slurm.nodes == 2
    assert [(s.name, s.run_dir) for s in subs] == [("toy-lr1e-3", tmp_path / "run" / "lr1e-3"),
                                                    ("toy-lr3e-4", tmp_path / "run" / "lr3e-4")]
    assert subs[0].argv[-3:] == ["optim.lr=1e-3", f"run_dir={tmp_path / 'run' / 'lr1e-3'}", "name=toy-lr1e-3"]
    with pytest.raises(ConfigError, match="optim.lrr"):
        plan_submissions("pretrain", None, base, ["optim.lrr=1,2"])


def test_finetune_takes_slurm_overrides_on_the_side(tmp_path):
    slurm, subs = plan_submissions("finetune", None, ["init=runs/x", f"output_dir={tmp_path}/out", "slurm.time_min=30"], [])
    assert slurm.time_min == 30 and subs[0].run_dir == tmp_path / "out"
    assert subs[0].argv == ["init=runs/x", f"output_dir={tmp_path}/out"]


def test_checkpoint_sets_the_stop_flag_and_resubmits_the_same_job():
    from gpt_vision.train import preemption

    job = TrainingJob("pretrain", ["--config", "x.yaml", "optim.lr=1e-3"], max_requeues=3)
    preemption.clear()
    try:
        delayed = job.checkpoint()
        assert preemption.stop_requested() and preemption.stop_reason() == "submitit checkpoint"
        assert delayed.function is job and delayed.args == () and job.argv[-1] == "optim.lr=1e-3"
    finally:
        preemption.clear()
    with pytest.raises(UserError, match="unknown task 'sample'"):
        TrainingJob("sample", [], 1)
