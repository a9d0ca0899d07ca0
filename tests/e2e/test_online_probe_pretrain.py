"""The online probe inside a real single-process pretraining run: logged at the expected steps,
with values that mean something (above chance on learnable toy classes, a pixel baseline once)."""
import json

from gpt_vision.config_loader import load_config
from gpt_vision.distributed import DistEnv
from gpt_vision.run_configs import PretrainConfig
from gpt_vision.tasks.pretrain import run_pretraining
from gpt_vision.train import preemption
from tests.helpers.toydata import tiny_overrides, write_toy_shards

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                 master_port=29500, launcher="python")


def test_probe_rows_at_every_probe_step_and_at_the_end(tmp_path):
    manifest = write_toy_shards(tmp_path / "shards", train=256, test=64)
    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, tiny_overrides(
        manifest, run, "train.steps=7", "train.probe_every=3", "online_probe.train_images=160",
        "online_probe.test_images=64", "online_probe.pooling=grid", "model.n_layer=3"))
    preemption.clear()
    run_pretraining(cfg, SINGLE)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = {row["step"]: row for row in rows if row["split"] == "probe"}
    assert sorted(probes) == [3, 6, 7]
    for row in probes.values():
        per_layer = {key: value for key, value in row.items() if key.startswith("top1/layer")}
        assert sorted(per_layer) == ["top1/layer0", "top1/layer1", "top1/layer2"]
        assert all(0.0 <= value <= 1.0 for value in per_layer.values())
        assert row["top1"] == per_layer[f"top1/layer{int(row['best_layer'])}"]
        assert row["top1"] >= 0.6  # 4 classes: chance is 0.25
        assert 0 < row["seconds"] <= row["seconds_total"] and 0 < row["run_fraction"] < 1
    assert "pixels_top1" in probes[3] and "pixels_top1" not in probes[6]
    assert probes[3]["pixels_top1"] >= 0.6
