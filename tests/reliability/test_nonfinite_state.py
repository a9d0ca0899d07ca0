"""Drill: no non-finite value is accepted from the config or committed to a checkpoint.

Non-finite or out-of-range floats in the config stop the CLI with one line naming the key; a
state whose parameters or optimizer moments became non-finite (on one rank's shard only) is
refused before anything of that step is written, and the error names the newest finite step."""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers.drills import overrides, run_cli
from gpt_vision import checkpoint as ckpt
from gpt_vision.train.loop import NonFiniteStateError
from tests.helpers.inproc import pretrain
from tests.helpers.multiproc import rank_env, run_ranks
from test_config_env import error_lines

BAD_VALUES = {
    "optim.lr=.inf": "config key 'optim.lr': must be a finite number, got inf",
    "optim.lr=.nan": "config key 'optim.lr': must be a finite number, got nan",
    "optim.weight_decay=.nan": "config key 'optim.weight_decay': must be a finite number, got nan",
    "optim.grad_clip=.nan": "config key 'optim.grad_clip': must be a finite number, got nan",
    "optim.eps=.nan": "config key 'optim.eps': must be a finite number, got nan",
    "model.init_std=.nan": "config key 'model.init_std': must be a finite number, got nan",
    "optim.lr=1e39": "config key 'optim.lr': must be a finite number > 0; 1e+39 overflows float32",
}


def test_non_finite_config_values_fail_with_one_line_naming_the_key(manifest, tmp_path, figure):
    def attempt(override):
        return run_cli(overrides(manifest, tmp_path / override, override))

    with ThreadPoolExecutor(3) as pool:
        procs = dict(zip(BAD_VALUES, pool.map(attempt, BAD_VALUES)))
    figure("; ".join(f"{o}: exit {p.returncode}" for o, p in procs.items()))
    for override, proc in procs.items():
        assert proc.returncode == 2, (override, proc.stderr[-2000:])
        assert error_lines(proc.stderr) == [f"gpt-vision-pretrain: error: {BAD_VALUES[override]} (in command line)"]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / override).exists()


def poison_state(at_step: int, rank_to_poison: int):
    """At `at_step`, set one value of this rank's first non-empty parameter shard to inf."""
    def inject(step, strategy, loss):
        if step == at_step and strategy.rank == rank_to_poison:
            tensor = next(t for t in strategy.local_state_tensors() if t.numel())
            with torch.no_grad():
                tensor.view(-1)[0] = math.inf
        return loss
    return inject


def fsdp_rank(rank, world_size, manifest, run_dir):
    try:
        pretrain(manifest, run_dir, "parallel.strategy=fsdp", env=rank_env(rank, world_size),
                 fault_injector=poison_state(2, 1))
    except NonFiniteStateError as error:
        return str(error)
    return "no error"


def test_non_finite_shard_on_one_rank_is_never_committed(manifest, tmp_path, figure):
    run = tmp_path / "run"
    messages = run_ranks(fsdp_rank, 2, manifest, run, timeout=300)
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    figure(f"fsdp x2, inf in rank 1's shard at step 3: committed {steps}; error {messages[0]!r}")
    expected = (f"step 4: parameters or optimizer state are not finite (lower optim.lr?); no checkpoint written "
                f"for it; the newest finite checkpoint is {run / 'checkpoints' / 'step-0000002'}")
    assert messages == [expected, expected]
    assert steps == ["step-0000002"] and ckpt.latest_complete(run / "checkpoints").name == "step-0000002"


def test_a_resumed_run_whose_state_turns_non_finite_names_the_step_it_resumed(manifest, tmp_path, figure):
    run = tmp_path / "run"
    pretrain(manifest, run, "train.steps=4")
    with pytest.raises(NonFiniteStateError) as error:
        pretrain(manifest, run, fault_injector=poison_state(4, 0))
    figure(f"resumed at step 4, inf at step 5: {error.value}")
    assert str(error.value) == (
        "step 6: parameters or optimizer state are not finite (lower optim.lr?); no checkpoint written for it; "
        f"the newest finite checkpoint is {run / 'checkpoints' / 'step-0000004'}")
    assert [p.name for p in ckpt.complete_steps(run / "checkpoints")] == ["step-0000002", "step-0000004"]


def test_k_skips_name_the_newest_finite_checkpoint(manifest, tmp_path):
    from test_nonfinite import PoisonGrad
    from gpt_vision.train.loop import NonFiniteLossError

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        pretrain(manifest, run, "train.max_consecutive_skips=3",
                 fault_injector=lambda step, strategy, loss: PoisonGrad.apply(loss) if step >= 4 else loss)
    assert str(error.value).endswith(f"the newest finite checkpoint is {run / 'checkpoints' / 'step-0000006'}")
