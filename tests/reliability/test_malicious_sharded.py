"""Drill 8 for sharded checkpoints: a pickle payload (`__reduce__` that would create a marker
file) planted in a step directory written by the real fsdp / ZeRO-1 / ZeRO-3 strategies at 2
ranks: in DCP's `.metadata`, in a non-tensor value inside a `.distcp` file, and in DeepSpeed
`*.pt` files. Offline loading (`load_consolidated`, `load_pretrained`) and a 2-rank resume each
end in one UserError naming the file, the marker never appears, and the untouched checkpoints
still load bitwise. Each payload is also shown to be live: loading the planted file the unsafe
way creates its marker."""
import dataclasses
import io
import pickle
import shutil

import pytest
import torch

from gpt_vision.errors import UserError
from gpt_vision.export import load_pretrained
from gpt_vision.parallel import load_consolidated
from tests.helpers.inproc import Payload, differing_tensors, pretrain, weights
from tests.helpers.multiproc import rank_env, run_ranks

STRATEGIES = {
    "fsdp": ["parallel.strategy=fsdp"],
    "zero1": ["parallel.strategy=deepspeed", "parallel.zero_stage=1"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}
STRATEGY_NAME = {"fsdp": "fsdp", "zero1": "deepspeed", "zero3": "deepspeed"}
STEP = "step-0000002"


def payload_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": Payload(marker)}, buffer)
    return buffer.getvalue()


def poison_metadata(step, marker):
    """`.metadata` replaced by a plain pickle of the payload (what DCP unpickles first)."""
    target = step / ".metadata"
    target.write_bytes(pickle.dumps(Payload(marker)))
    return target, lambda: pickle.loads(target.read_bytes())


def poison_dcp_value(step, marker):
    """The `lr` of the first param group repointed at a payload appended to its `.distcp` file;
    the metadata itself stays valid (it is what `dcp.save` of a poisoned state dict writes)."""
    meta_file = step / ".metadata"
    metadata = pickle.loads(meta_file.read_bytes())  # our own file, written by the strategy above
    index = next(i for i in metadata.storage_data if i.fqn.startswith("optim.param_groups.") and i.fqn.endswith(".lr"))
    info = metadata.storage_data[index]
    target, blob = step / info.relative_path, payload_bytes(marker)
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(blob)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob))
    meta_file.write_bytes(pickle.dumps(metadata))

    def unsafe():
        with open(target, "rb") as f:
            f.seek(offset)
            return torch.load(io.BytesIO(f.read(len(blob))), weights_only=False)
    return target, unsafe


def poison_torch_file(name):
    def poison(step, marker):
        target = step / "deepspeed" / "state" / name
        assert target.is_file(), f"no {name} in {sorted(p.name for p in target.parent.iterdir())}"
        target.write_bytes(payload_bytes(marker))
        return target, lambda: torch.load(target, weights_only=False)
    return poison


# case -> (strategy, how to poison, whether the offline model loader reads the poisoned bytes)
CASES = {
    "fsdp-metadata": ("fsdp", poison_metadata, True),
    "fsdp-optimizer-value": ("fsdp", poison_dcp_value, False),
    "zero1-model-states": ("zero1", poison_torch_file("mp_rank_00_model_states.pt"), True),
    "zero1-optim-states": ("zero1", poison_torch_file("zero_pp_rank_1_mp_rank_00_optim_states.pt"), True),
    "zero3-optim-states": ("zero3", poison_torch_file("zero_pp_rank_0_mp_rank_00_optim_states.pt"), True),
}


def train_all(rank, world_size, manifest, root):
    for name, extra in STRATEGIES.items():
        pretrain(manifest, root / name, "train.steps=2", "checkpoint.every=2", *extra, env=rank_env(rank, world_size))


def resume_each(rank, world_size, manifest, root, runs):
    """Resume every (run dir, strategy, source step) in one set of ranks: a UserError's text, or
    the full weights as the first step after a good resume sees them."""
    outcomes = []
    for run, name, source in runs:
        seen = {}

        def grab(step, strategy, loss):
            if not seen:
                seen.update(strategy.full_state_dict() or {})
            return loss
        try:
            pretrain(manifest, root / run, "train.steps=3", "checkpoint.every=2", f"checkpoint.resume={source}",
                     *STRATEGIES[name], env=rank_env(rank, world_size), fault_injector=grab)
            outcomes.append(("resumed", seen))
        except UserError as error:
            outcomes.append(("UserError", str(error)))
    return outcomes


@pytest.fixture(scope="module")
def saved(manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    run_ranks(train_all, 2, manifest, root, timeout=600)
    return {name: root / name / "checkpoints" / STEP for name in STRATEGIES}


@pytest.fixture(scope="module")
def poisoned(saved, tmp_path_factory):
    """Each case on its own copy of the step directory: case -> (step dir, file, marker, unsafe load)."""
    root = tmp_path_factory.mktemp("poisoned")
    out = {}
    for case, (name, poison, _) in CASES.items():
        step = root / case / "checkpoints" / STEP
        shutil.copytree(saved[name], step)
        marker = root / f"PWNED-{case}"
        target, unsafe = poison(step, marker)
        out[case] = (step, target, marker, unsafe)
    return out


def why(outcome: str) -> str:
    """The reason part of a refusal, for figures (the path is long and known)."""
    return outcome.split("refused to load: ")[-1][:90]


def attempt(action) -> str:
    try:
        action()
        return "loaded"
    except UserError as error:
        return f"UserError: {error}"


@pytest.mark.parametrize("case", CASES)
def test_offline_loaders_refuse_a_poisoned_step_without_running_it(case, saved, poisoned, figure):
    name, _, reads_poison = CASES[case]
    step, target, marker, unsafe = poisoned[case]
    outcomes = [attempt(lambda: load_consolidated(step, STRATEGY_NAME[name])), attempt(lambda: load_pretrained(step))]
    executed = marker.exists()
    figure(f"{case}: payload executed {executed}; load_consolidated/load_pretrained: "
           f"{' | '.join(why(o) if o.startswith('UserError') else o for o in outcomes)}")
    assert not executed
    if reads_poison:
        for outcome in outcomes:
            assert outcome.startswith("UserError") and str(target) in outcome and "\n" not in outcome, outcome
    else:  # the model tensors are untouched and still load, bitwise
        assert outcomes == ["loaded", "loaded"]
        assert differing_tensors(weights(step), weights(saved[name])) == []


def test_resume_refuses_every_poisoned_step_and_loads_good_ones_bitwise(manifest, saved, poisoned, tmp_path, figure):
    runs = [(f"evil-{case}", CASES[case][0], str(poisoned[case][0])) for case in CASES]
    runs += [(f"good-{name}", name, str(step)) for name, step in saved.items()]
    per_rank = run_ranks(resume_each, 2, manifest, tmp_path, runs, timeout=900)
    executed = {case: poisoned[case][2].exists() for case in CASES}
    lines = []
    for i, case in enumerate(CASES):
        target = poisoned[case][1]
        for rank, outcomes in enumerate(per_rank):
            kind, text = outcomes[i]
            lines.append(f"{case} rank {rank}: {kind}" + (f" ({why(text)})" if rank == 0 else ""))
            assert kind == "UserError" and str(target) in text and "\n" not in text, (case, rank, kind, text)
    for j, (name, step) in enumerate(saved.items(), start=len(CASES)):
        kind, seen = per_rank[0][j]
        assert kind == "resumed" and [o[j][0] for o in per_rank] == ["resumed", "resumed"], (name, per_rank[1][j])
        differing = differing_tensors(weights(step), seen)
        lines.append(f"good {name}: {len(seen)} tensors resumed, {len(differing)} differing from load_pretrained")
        assert seen and differing == [], (name, differing)
    figure(f"payload executed {sum(executed.values())} of {len(executed)}; " + "; ".join(lines))
    assert not any(executed.values()), executed


def test_dcp_metadata_pointing_outside_the_step_is_refused(saved, tmp_path):
    """Allowed classes only, but a storage path that leaves the directory: refused before reading."""
    step = tmp_path / "outside" / STEP
    shutil.copytree(saved["fsdp"], step)
    metadata = pickle.loads((step / ".metadata").read_bytes())
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path="../../secret.distcp")
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match=r"\.metadata: refused to load: it points at \.\./\.\./secret\.distcp"):
        load_consolidated(step, "fsdp")


@pytest.mark.parametrize("case", CASES)
def test_each_planted_payload_is_live(case, poisoned):
    """The control: loading the planted file the way DCP/DeepSpeed would without the checks runs it."""
    _, _, marker, unsafe = poisoned[case]
    marker.unlink(missing_ok=True)
    unsafe()
    assert marker.exists()
    marker.unlink()
