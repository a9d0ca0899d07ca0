"""The demo's printed summary: every result beside its baseline, for both kinds of pretraining."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
from demo import FULL, SMALL, format_summary  # noqa: E402


def summary(objective: str, val_bits_per_dim, val_loss: float) -> dict:
    return {
        "machine": "test machine",
        "pretrain": {"objective": objective, "steps": 1500, "parameters": 799748, "val_loss": val_loss,
                     "val_bits_per_dim": val_bits_per_dim, "tokens_per_s": 9902.0,
                     "online_probe": [{"step": 500, "top1": 0.786}], "online_probe_pixels": 0.8},
        "linear_probe": {"top1": 0.8645, "layer": 0, "parameters": 62730, "pixels_top1": 0.8405},
        "finetune": {"top1": 0.855, "parameters": 824334, "scratch_top1": 0.851, "pixels_top1": 0.841},
        "distill": {"top1": 0.634, "teacher_top1": 0.855, "labels_only_top1": 0.6335, "parameters": 114900},
        "seconds": {"pretrain": 268, "probe": 243, "finetune": 223, "distill": 139, "total": 938},
    }


@pytest.mark.parametrize("objective, bpd, expected", [("next_patch", None, "0.374 val MSE"),
                                                      ("next_pixel", 1.253, "1.253 bits/dim")])
def test_summary_reports_the_fit_each_objective_has(objective, bpd, expected):
    lines = format_summary(summary(objective, bpd, 0.374))
    first = lines[1]
    assert first.startswith(f"{objective}, 1500 steps") and expected in first
    text = "\n".join(lines)
    assert "86.5%" in text and "pixels 84.0%" in text and "scratch 85.1%, probe 86.5%" in text and "labels only 63.3%" in text


def test_only_a_next_pixel_recipe_samples():
    assert FULL.sample is None and not any("next_pixel" in o for o in FULL.pretrain)
    assert SMALL.sample and "model.objective=next_pixel" in SMALL.pretrain


@pytest.mark.parametrize("scale", [FULL, SMALL], ids=["full", "small"])
@pytest.mark.parametrize("step, yaml, extra", [
    ("probe", "linear_probe.yaml", ["init=demo_out/run"]),
    ("finetune", "finetune.yaml", ["init=demo_out/run"]),
    ("distill", "distill.yaml", ["distill.teacher=demo_out/finetune"]),
])
def test_each_demo_step_is_a_valid_config(scale, step, yaml, extra):
    """A mistyped key or value in the demo's overrides fails here, not 15 minutes into `make demo`."""
    from gpt_vision.config_loader import load_config
    from gpt_vision.run_configs import FinetuneConfig

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(FinetuneConfig, root / "configs" / "finetune" / yaml,
                      [*extra, "output_dir=demo_out/x", *getattr(scale, step)])
    cfg.check()
    assert cfg.task.kind == {"probe": "linear_probe"}.get(step, step)


def test_a_run_from_another_recipe_is_named_not_reused(tmp_path):
    """An older demo's run (14x14, 2x2 patches; four blocks; a shorter schedule) must not be reused or
    resumed as the current recipe."""
    import yaml

    from demo import _recipe_changes

    saved = tmp_path / "config.yaml"
    assert _recipe_changes(saved, FULL) == []  # no run yet
    model = {"objective": "next_patch", "image_size": FULL.image_size, "patch_size": 4, "n_layer": 2,
             "n_embd": 128, "n_head": 4}
    schedule = {"train": {"steps": 3600, "global_batch_size": 32, "log_every": 10}, "optim": {"lr": 2.0e-3},
                "schedule": {"warmup_steps": 50}}
    saved.write_text(yaml.safe_dump({"model": model, **schedule}))
    assert _recipe_changes(saved, FULL) == []
    saved.write_text(yaml.safe_dump({"model": {**model, "image_size": 14, "patch_size": 2}, **schedule}))
    assert _recipe_changes(saved, FULL) == [f"model.image_size: 14 -> {FULL.image_size}", "model.patch_size: 2 -> 4"]
    saved.write_text(yaml.safe_dump({"model": {**model, "n_layer": 4}, **schedule}))
    assert _recipe_changes(saved, FULL) == ["model.n_layer: 4 -> 2"]
    saved.write_text(yaml.safe_dump({"model": model, **schedule, "train": {"steps": 1500, "global_batch_size": 32}}))
    assert _recipe_changes(saved, FULL) == ["train.steps: 1500 -> 3600"]  # would resume on a stretched schedule
    saved.write_text(yaml.safe_dump({"model": model, **schedule, "optim": {"lr": 1.0e-3}}))
    assert _recipe_changes(saved, FULL) == ["optim.lr: 0.001 -> 0.002"]
