"""Drill 11: the disk fills up between two saves (a real 4 MiB tmpfs as the run directory): the
run stops with one clear line naming the checkpoint and the cause; the previous checkpoint stays
complete and loadable."""
import os

import pytest

from gpt_vision import checkpoint as ckpt
from gpt_vision.errors import UserError
from tests.helpers.inproc import fill_disk_at, pretrain, weights

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_disk_full_during_save_stops_cleanly_and_keeps_the_previous_checkpoint(manifest, small_disk, figure):
    run = small_disk / "run"
    with pytest.raises(UserError) as error:
        pretrain(manifest, run, "logging.tensorboard=false", fault_injector=fill_disk_at(2, small_disk))
    latest = ckpt.latest_complete(run / "checkpoints")
    weights(latest)  # loadable
    figure(f"error: {error.value}; newest complete checkpoint {latest.name}, loadable")
    assert "\n" not in str(error.value) and "No space left on device" in str(error.value)
    assert latest.name == "step-0000002"
