"""Drill 1: two uninterrupted CPU runs in deterministic mode are bitwise equal, step by step."""
from tests.helpers.drills import train_losses
from tests.helpers.inproc import differing_tensors, first_difference, pretrain, weights


def test_two_runs_give_bitwise_equal_losses_and_weights(manifest, tmp_path, figure):
    pretrain(manifest, tmp_path / "a")
    pretrain(manifest, tmp_path / "b")
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    first = first_difference(a, b)
    differing = differing_tensors(weights(tmp_path / "a"), weights(tmp_path / "b"))
    figure(f"{len(a)} steps compared; first differing step: {first or 'none'}; differing weight tensors: {len(differing)}")
    assert len(a) == 8
    assert first is None
    assert differing == []
