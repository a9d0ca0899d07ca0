"""Drills 4, 5, 13: full training state round trip at world size 2 for every strategy, resharding
2 -> 1 and 1 -> 2 ranks, strategy change through export, and the fine-tune loader on a 2-rank
ZeRO-3 checkpoint. Ranks are real gloo processes running the real pretraining task in-process."""
import json

import pytest
from safetensors.torch import load_file

from tests.helpers.drills import train_losses
from gpt_vision.export import export_checkpoint, load_pretrained
from gpt_vision.train import preemption
from tests.helpers.inproc import differing_tensors, first_difference, pretrain, weights
from tests.helpers.multiproc import rank_env, run_ranks

STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "fairscale": ["parallel.strategy=fairscale"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}
COMMON = ["train.steps=4", "checkpoint.every=2"]


def stop_after(steps: int):
    def inject(step, strategy, loss):
        if step + 1 == steps:
            preemption.request_stop("drill")
        return loss
    return inject


def whole_and_split(rank, world_size, manifest, root, extra):
    env = rank_env(rank, world_size)
    pretrain(manifest, root / "whole", *COMMON, *extra, env=env)
    first = pretrain(manifest, root / "split", *COMMON, *extra, env=env, fault_injector=stop_after(2))
    second = pretrain(manifest, root / "split", *COMMON, *extra, env=env)
    return first.state.step, vars(second.state)


def rank_states(run, world_size):
    step = run / "checkpoints" / "step-0000004"
    return [json.loads((step / f"rank-{r:05d}.json").read_text()) for r in range(world_size)], \
        json.loads((step / "meta.json").read_text())["loop"]


def flat(prefix, value):
    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {k: v for key, item in items for k, v in flat(f"{prefix}.{key}", item).items()}
    return {prefix: value}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "fsdp" else pytest.mark.slow) for n in STRATEGIES])
def test_full_state_round_trip_at_world_size_2(name, manifest, tmp_path, figure):
    results = run_ranks(whole_and_split, 2, manifest, tmp_path, STRATEGIES[name], timeout=600)
    assert [r[0] for r in results] == [2, 2]
    whole, split = tmp_path / "whole", tmp_path / "split"
    loss_diff = first_difference(train_losses(whole), train_losses(split))
    tensors = differing_tensors(weights(whole), weights(split))
    (ranks_a, loop_a), (ranks_b, loop_b) = rank_states(whole, 2), rank_states(split, 2)
    fields_a, fields_b = flat("", {"ranks": ranks_a, "loop": loop_a}), flat("", {"ranks": ranks_b, "loop": loop_b})
    fields = sorted(k for k in fields_a.keys() | fields_b.keys() if fields_a.get(k) != fields_b.get(k))
    figure(f"{name}: resumed at step 2 of 4; mismatches: weights {len(tensors)}, first differing loss step "
           f"{loss_diff or 'none'}, data position/counter/RNG fields {len(fields)} of {len(fields_a)}")
    assert tensors == [] and loss_diff is None and fields == [], (tensors, loss_diff, fields)


@pytest.mark.slow
def test_global_torch_rng_survives_resume(manifest, tmp_path):
    run_ranks(whole_and_split, 2, manifest, tmp_path, STRATEGIES["fsdp"] + ["model.dropout=0.1"], timeout=600)
    assert first_difference(train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")) is None


def resume_elsewhere(rank, world_size, manifest, run, extra, source):
    """Resume `source` at this world size; return the weights loaded, as seen at the first step."""
    seen = {}

    def grab(step, strategy, loss):
        if not seen:
            state = strategy.full_state_dict()
            seen.update(state or {})
            seen["_step"] = step
        return loss
    pretrain(manifest, run, *COMMON, *extra, f"checkpoint.resume={source}", env=rank_env(rank, world_size),
             fault_injector=grab)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_reshard_2_to_1_and_1_to_2_ranks(name, manifest, tmp_path, figure):
    extra = STRATEGIES[name]
    run_ranks(lambda_free_train, 2, manifest, tmp_path / "two", extra, timeout=600)
    two_step = tmp_path / "two" / "checkpoints" / "step-0000002"
    one = run_ranks(resume_elsewhere, 1, manifest, tmp_path / "one", extra, two_step, timeout=600)[0]
    saved = weights(two_step)
    diff_2_1 = differing_tensors(saved, {k: v for k, v in one.items() if k != "_step"})
    one_step = tmp_path / "one" / "checkpoints" / "step-0000004"
    # One more step than the 1-rank leg ran, so the 2-rank leg takes a step on the loaded weights.
    back = run_ranks(resume_elsewhere, 2, manifest, tmp_path / "back", extra + ["train.steps=5"], one_step,
                     timeout=600)[0]
    diff_1_2 = differing_tensors(weights(one_step), {k: v for k, v in back.items() if k != "_step"})
    export = export_checkpoint(two_step, tmp_path / "export")
    as_single = load_pretrained(export).model.state_dict()
    diff_export = differing_tensors(saved, as_single)
    figure(f"{name}: differing tensors 2->1 {len(diff_2_1)}, 1->2 {len(diff_1_2)}, {name}->single via export {len(diff_export)}")
    assert one["_step"] == 2 and back["_step"] == 4
    assert diff_2_1 == [] and diff_1_2 == [] and diff_export == []


def lambda_free_train(rank, world_size, manifest, run, extra):
    pretrain(manifest, run, *COMMON, *extra, env=rank_env(rank, world_size))


def test_fine_tune_loader_reads_a_2_rank_zero3_checkpoint_bitwise(manifest, tmp_path, figure):
    run_ranks(lambda_free_train, 2, manifest, tmp_path / "run", STRATEGIES["zero3"], timeout=600)
    step = tmp_path / "run" / "checkpoints" / "step-0000004"
    loaded = load_pretrained(step).model.state_dict()
    exported = load_file(str(export_checkpoint(step, tmp_path / "export") / "model.safetensors"))
    diff = differing_tensors(loaded, exported)
    figure(f"ZeRO-3 x2 -> load_pretrained: {len(loaded)} tensors, differing from the export {len(diff)}")
    assert diff == []
