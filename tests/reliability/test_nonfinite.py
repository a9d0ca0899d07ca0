"""Drill 7: a non-finite loss or gradient on ONE rank of two, at a chosen step: every rank skips
the step, the weights stay bitwise unchanged, the skip is logged and counted; K consecutive
skips stop the run with a clear error and leave a good checkpoint."""
import json

import pytest
import torch

from gpt_vision import checkpoint as ckpt
from gpt_vision.train.loop import NonFiniteLossError
from tests.helpers.inproc import differing_tensors, pretrain, weights
from tests.helpers.multiproc import rank_env, run_ranks


class PoisonGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poisoner(rank_to_poison: int, loss_step: int, grad_step: int, snapshots: dict):
    def inject(step, strategy, loss):
        if step in (1, loss_step, loss_step + 1, grad_step, grad_step + 1):
            snapshots.setdefault(step, {k: v.detach().clone() for k, v in strategy.unwrapped.state_dict().items()})
        if strategy.rank != rank_to_poison:
            return loss
        if step == loss_step:
            return loss * float("nan")
        if step == grad_step:
            return PoisonGrad.apply(loss)
        return loss
    return inject


def one_rank_poisoned(rank, world_size, manifest, run_dir):
    snapshots = {}
    result = pretrain(manifest, run_dir, "parallel.strategy=ddp", "train.steps=6",
                      env=rank_env(rank, world_size), fault_injector=poisoner(1, 2, 4, snapshots))
    changed = {s: len(differing_tensors(snapshots[s], snapshots[s + 1])) for s in (1, 2, 4)}
    return result.state.skipped_steps, result.state.step, changed


def test_non_finite_on_one_rank_is_skipped_everywhere_and_leaves_weights_unchanged(manifest, tmp_path, figure):
    run = tmp_path / "run"
    results = run_ranks(one_rank_poisoned, 2, manifest, run, timeout=300)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"] for r in rows if r.get("split") == "train" and r.get("skipped_steps")}
    figure(f"ddp x2, NaN loss at step 2 and NaN grads at step 4 on rank 1 only: skipped per rank "
           f"{[r[0] for r in results]}; weight tensors changed by the skipped steps {[r[2][2] + r[2][4] for r in results]}; "
           f"logged skipped at steps {sorted(logged)}")
    for skipped, steps, changed in results:
        assert skipped == 2 and steps == 6
        assert changed[2] == 0 and changed[4] == 0  # skipped steps: bitwise unchanged
        assert changed[1] > 0  # a normal step does change them
    assert logged == {3, 5}  # logged at the step count after each skipped step


def test_k_consecutive_skips_stop_with_a_good_checkpoint(manifest, tmp_path, figure):
    good = {}

    def poison(step, strategy, loss):
        if step == 4:
            good.update({k: v.detach().clone() for k, v in strategy.unwrapped.state_dict().items()})
        return PoisonGrad.apply(loss) if step >= 4 else loss

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        pretrain(manifest, run, "train.max_consecutive_skips=3", fault_injector=poison)
    latest = ckpt.latest_complete(run / "checkpoints")
    differing = differing_tensors(weights(latest), good)
    figure(f"K=3: error '{error.value}'; last checkpoint {latest.name}, tensors differing from the last good state {len(differing)}")
    assert "3 consecutive steps" in str(error.value) and "\n" not in str(error.value)
    assert differing == []
