"""Drill 8: malicious files. A pickle payload in a checkpoint (`__reduce__` that would create a
marker file), shards with pickle/.pyd/.pth members, `../`, absolute names and symlinks, and a
YAML with `!!python/object`: nothing executes, nothing is written outside the run, and each is
a clear one-line error or a skipped member."""
import os
import tarfile

import numpy as np
import pytest
import torch

from gpt_vision.config_loader import load_config
from gpt_vision.data.config import DataConfig
from gpt_vision.data.palette import Palette
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import UserError
from gpt_vision.export import load_pretrained
from gpt_vision.run_configs import PretrainConfig
from tests.helpers.inproc import Payload, pretrain
from tests.helpers import shardgen


@pytest.fixture(scope="module")
def single_run(manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    pretrain(manifest, run, "train.steps=2", "schedule.warmup_steps=1", "checkpoint.every=2")
    return run


def test_pickle_payload_in_a_single_checkpoint_never_runs(manifest, single_run, tmp_path, figure):
    step = single_run / "checkpoints" / "step-0000002"
    marker = tmp_path / "PWNED"
    outcomes = []
    for name in ("optimizer.pt", "model.safetensors"):
        original = (step / name).read_bytes()
        torch.save({"state": Payload(marker)}, step / name)
        try:
            actions = (lambda: load_pretrained(single_run),
                       lambda: pretrain(manifest, single_run, "train.steps=4", "schedule.warmup_steps=1"))
            for action in actions:
                try:
                    action()
                    outcomes.append(f"{name}: loaded")
                except UserError as error:
                    outcomes.append(f"{name}: UserError ({str(error)[:90]}...)")
                    assert "\n" not in str(error)
                except Exception as error:  # noqa: BLE001 - recorded, then failed below
                    outcomes.append(f"{name}: {type(error).__name__}")
        finally:
            (step / name).write_bytes(original)
    figure(f"payload executed: {marker.exists()}; outcomes {outcomes}")
    assert not marker.exists()
    assert all("UserError" in outcome for outcome in outcomes if "loaded" not in outcome)


def evil_members(tmp_path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    def member(name, data=b"x", kind=tarfile.REGTYPE, target=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, target, len(data) if kind == tarfile.REGTYPE else 0
        return info, data if kind == tarfile.REGTYPE else None

    import pickle
    payload = pickle.dumps(Payload(tmp_path / "PWNED-shard"))
    return [
        member("evil.pickle", payload), member("evil.pyd", b"MZ" + payload), member("evil.pth", payload),
        member("evil2.pkl", payload),
        member("../escape.png", b"x"), member(str(tmp_path / "absolute.png"), b"x"),
        member("link.png", kind=tarfile.SYMTYPE, target="/etc/passwd"),
        member("hard.png", kind=tarfile.LNKTYPE, target="../escape.png"),
    ]


def test_shard_with_pickles_traversal_and_links_is_read_safely(tmp_path, figure):
    root = tmp_path / "shards"
    manifest = shardgen.write_dataset(root, {"train": [16], "test": [4]})
    shardgen.append_raw_members(root / "train-000000.tar", evil_members(tmp_path))
    before = set(os.listdir(tmp_path))
    cfg = DataConfig(manifest=str(manifest), num_workers=0, max_bad_fraction=1.0, bad_window=10)
    loader = ShardLoader(cfg, "train", Palette(np.linspace(0, 255, 8, dtype=np.float32)[:, None]), 4, train=False)
    keys = [key for batch in loader for key in batch["key"]]
    after = set(os.listdir(tmp_path))
    figure(f"good samples {len(keys)}; skipped/counted {loader.bad_samples}; payload executed: "
           f"{(tmp_path / 'PWNED-shard').exists()}; new files outside: {sorted(after - before)}")
    assert len(keys) == 16 and not any(k.startswith("evil") or "escape" in k for k in keys)
    assert not (tmp_path / "PWNED-shard").exists() and after == before
    assert not (root.parent / "escape.png").exists()


def test_yaml_python_object_tag_is_refused_without_running(tmp_path, figure):
    marker = tmp_path / "PWNED-yaml"
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
                      f"name: !!python/object:os.system {{}}\n")
    with pytest.raises(UserError) as error:
        load_config(PretrainConfig, str(config), [])
    figure(f"error: {error.value}; executed: {marker.exists()}")
    assert not marker.exists() and "\n" not in str(error.value) and str(config) in str(error.value)
