"""Full fine-tuning and distillation on brightness-bucket shards: losses fall, the teacher stays
frozen, the distillation token is used at inference, and results.json matches predictions.npz."""
import json

import numpy as np
import pytest
import torch

from tests.helpers.finetune_fixtures import one_thread, finetune_overrides, random_init_export, write_brightness_shards  # noqa: F401
from gpt_vision.config_loader import load_config
from gpt_vision.data.stream import ShardLoader
from gpt_vision.errors import ConfigError, UserError
from gpt_vision.model.student import Student, resolve_student
from gpt_vision.run_configs import FinetuneConfig
from gpt_vision.tasks.backbone import state_checksum
from gpt_vision.tasks.finetune import fold_probe_into_head, layer_decay_groups, load_finetuned
from gpt_vision.tasks.linear import LinearProbe
from gpt_vision.tasks.finetune_cli import run
from gpt_vision.tasks.scores import classification_metrics

RESULT_KEYS = {"top1", "top5", "model", "baselines", "data", "chosen_layer", "per_layer", "parameters", "wall_time_s", "init"}
NAMES = ["b0", "b1", "b2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    manifest = write_brightness_shards(root / "shards")
    init = random_init_export(manifest, root / "random-init", n_layer=2, n_embd=64)
    cfg = load_config(FinetuneConfig, None, finetune_overrides(
        manifest, root / "teacher", f"init={init}", "task.kind=finetune", "train.steps=40", "train.batch_size=16",
        "optim.lr=2e-3", "task.generative_weight=0.5", "task.layer_decay=0.8", "task.label_smoothing=0.1",
        "data.augment.flip=true"))
    return manifest, root / "teacher", run(cfg)


def recomputed(out):
    saved = json.loads((out / "results.json").read_text())
    predictions = np.load(out / "predictions.npz")
    again = classification_metrics(predictions["labels"], predictions["logits"], NAMES)
    return saved, again, predictions


def mean_losses(out, tag):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == tag]


def test_finetune_learns_and_reports_consistently(setup):
    manifest, out, results = setup
    assert RESULT_KEYS <= set(results)
    assert results["final_train_loss"] < results["first_train_loss"]
    losses = mean_losses(out, "finetune")
    assert np.mean(losses[-3:]) < np.mean(losses[:2])
    assert results["top1"] >= 0.8
    saved, again, predictions = recomputed(out)
    assert again == saved["model"] and again["top1"] == saved["top1"] and again["top5"] == saved["top5"]
    assert list(saved["model"]["per_class"]) == saved["data"]["classes"] == NAMES
    assert sorted(predictions["keys"].tolist()) == sorted(set(predictions["keys"].tolist())) and saved["samples"] == 90
    assert saved["parameters"]["trainable"] == saved["parameters"]["backbone"] + saved["parameters"]["head"]
    scratch, pixels = saved["baselines"]["scratch"], saved["baselines"]["pixels"]
    assert scratch["samples"] == pixels["samples"] == 90 and list(scratch["per_class"]) == NAMES
    assert pixels["top1"] == 1.0  # brightness buckets are linearly separable in pixels
    assert scratch["final_train_loss"] > 0 and scratch["top1"] == classification_metrics(
        predictions["labels"], predictions["scratch_logits"], NAMES)["top1"]


def test_finetune_mechanics_follow_their_keys(setup):
    """generative_weight=0.5, warmup 5 steps then cosine at optim.lr=2e-3, and the scratch baseline
    for the same 40 steps with labels only, all read back from metrics.jsonl."""
    _, out, _ = setup
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    finetune = [r for r in rows if r["split"] == "finetune"]
    for row in finetune:
        assert row["loss"] == pytest.approx(row["class_loss"] + 0.5 * row["generative_loss"], rel=1e-4)
    lr = {r["step"]: r["lr"] for r in finetune}
    assert lr[0] == pytest.approx(2e-3 / 5) and lr[5] == pytest.approx(2e-3)  # warmup, then the peak
    assert lr[20] == pytest.approx(2e-4 + 1.8e-3 * (1 + np.cos(np.pi * 15 / 35)) / 2)  # cosine to min_lr_ratio=0.1
    scratch = [r for r in rows if r["split"] == "baseline_scratch"]
    assert max(r["step"] for r in scratch) == 39 and all("generative_loss" not in r for r in scratch)


@pytest.mark.parametrize("pooling", ["grid", "concat"])
def test_pooled_heads_train_and_reload(setup, tmp_path, pooling):
    manifest, teacher_dir, _ = setup
    init = load_finetuned(teacher_dir)[2]["init"].split(" ", 1)[1]
    out = tmp_path / pooling
    results = run(load_config(FinetuneConfig, None, finetune_overrides(
        manifest, out, f"init={init}", "task.kind=finetune", f"task.pooling={pooling}", "task.grid_size=2",
        "task.layers=[0, 1]" if pooling == "concat" else "task.layers=[0]", "task.head_dropout=0.5",
        "task.baselines=[]", "train.steps=5", "train.batch_size=16", "schedule.warmup_steps=1")))
    classifier, _, described = load_finetuned(out)
    assert described["pooling"] == pooling and described["head_dropout"] == 0.5
    assert classifier.head.in_features == (4 * 64 if pooling == "grid" else 2 * 64)
    assert results["baselines"] == {} and results["chosen_layer"] == ([0, 1] if pooling == "concat" else 0)


def test_finetune_output_reloads_as_the_same_classifier(setup):
    manifest, out, _ = setup
    classifier, palette, described = load_finetuned(out)
    assert described["kind"] == "finetune" and described["num_classes"] == 3
    classifier.eval()
    data = load_config(FinetuneConfig, None, finetune_overrides(manifest, out, "init=x")).data
    keys, logits = [], []
    with torch.no_grad():
        for batch in ShardLoader(data, "test", palette, 32, train=False):
            keys.extend(batch["key"])
            logits.append(classifier(batch).numpy())
    predictions = np.load(out / "predictions.npz")
    assert keys == predictions["keys"].tolist()
    np.testing.assert_allclose(np.concatenate(logits), predictions["logits"], rtol=1e-5, atol=1e-5)


def test_layer_decay_scales_by_depth(setup):
    _, out, _ = setup
    classifier, _, _ = load_finetuned(out)
    cfg = load_config(FinetuneConfig, None, ["init=x", "output_dir=y", "data.manifest=m", "task.layer_decay=0.5"])
    scale = {}
    for group in layer_decay_groups(classifier, cfg):
        for p in group["params"]:
            scale[id(p)] = group["lr_scale"]
    names = dict(classifier.named_parameters())
    assert scale[id(names["head.weight"])] == 1.0
    assert scale[id(names["backbone.blocks.1.attn.c_attn.weight"])] == 0.5
    assert scale[id(names["backbone.blocks.0.attn.c_attn.weight"])] == 0.25
    assert scale[id(names["backbone.wte.weight"])] == 0.125
    assert len(scale) == sum(1 for _ in classifier.parameters())


@pytest.mark.parametrize("mode,preset", [("hard", "gpt-student-tiny"), ("soft", "vit-tiny")])
def test_distill_modes(setup, tmp_path, mode, preset):
    manifest, teacher_dir, _ = setup
    teacher_before = state_checksum(load_finetuned(teacher_dir)[0])
    out = tmp_path / mode
    cfg = load_config(FinetuneConfig, None, finetune_overrides(
        manifest, out, "task.kind=distill", f"distill.teacher={teacher_dir}", f"distill.mode={mode}",
        f"student.preset={preset}", "student.n_embd=16", "student.n_head=2", "student.n_layer=1",
        "train.steps=30", "train.batch_size=16", "optim.lr=3e-3"))
    results = run(cfg)
    assert state_checksum(load_finetuned(teacher_dir)[0]) == teacher_before == results["teacher_checksum"]
    assert results["final_train_loss"] < results["first_train_loss"]
    assert results["parameters"]["ratio"] <= 0.25
    assert {"teacher", "mode"} <= set(results) and RESULT_KEYS <= set(results)
    assert set(results["baselines"]) == {"labels_only", "pixels"}
    assert results["teacher_logit_cache_hits"] > 0  # no random augmentation: views repeat, logits are reused
    saved, again, predictions = recomputed(out)
    assert again == saved["model"] and again["top1"] == saved["top1"]
    teacher_again = classification_metrics(predictions["labels"], predictions["teacher_logits"], NAMES)
    assert teacher_again["top1"] == saved["teacher"]["top1"]
    # inference averages the class and distillation heads
    assert not np.allclose(predictions["logits"], predictions["class_head_logits"])


def test_distillation_token_is_used_at_inference():
    from gpt_vision.model import ModelConfig

    data = ModelConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=8, image_size=8).resolved()
    torch.manual_seed(0)
    student = Student(resolve_student("gpt-student-tiny", n_embd=16), data, 3).eval()
    batch = {"tokens": torch.randint(0, 8, (4, 64)), "pixels": torch.zeros(4, 8, 8, 1, dtype=torch.uint8)}
    with torch.no_grad():
        cls, dist = student(batch)
        torch.testing.assert_close(student.predict(batch), (cls + dist) / 2)
        before = student.predict(batch).clone()
        student.dist_head.weight.zero_()
        student.dist_head.bias.zero_()
        assert not torch.allclose(student.predict(batch), before)
        torch.testing.assert_close(student.predict(batch), cls / 2)


def test_grid_student_heads_read_the_cell_averages_of_its_patch_tokens():
    from gpt_vision.model import ModelConfig

    data = ModelConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=8, image_size=8).resolved()
    torch.manual_seed(0)
    shape = resolve_student("vit-tiny", n_layer=1, n_embd=16, patch_size=2, pooling="grid", grid_size=2)
    student = Student(shape, data, 3).eval()
    assert student.tokens is None and student.pos.shape == (16, 16)  # 4x4 patches, no class/distillation tokens
    assert student.head.in_features == student.dist_head.in_features == 2 * 2 * 16
    assert student.heads() == [student.head, student.dist_head]
    batch = {"pixels": torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)}
    with torch.no_grad():
        pooled = student.head_input(batch)
        cls, dist = student(batch)
        torch.testing.assert_close(cls, student.head(pooled))
        torch.testing.assert_close(dist, student.dist_head(pooled))
        torch.testing.assert_close(student.predict(batch), (cls + dist) / 2)
    with pytest.raises(ConfigError, match="grid_size"):
        Student(resolve_student("vit-tiny", n_embd=16, patch_size=2, pooling="grid", grid_size=5), data, 3)
    token_student = Student(resolve_student("vit-tiny", n_embd=16, patch_size=2), data, 3)
    assert token_student.heads() == [token_student.head]


def test_a_probe_head_needs_a_grid_student(setup, tmp_path):
    manifest, teacher_dir, _ = setup
    with pytest.raises(ConfigError, match="head_init"):
        load_config(FinetuneConfig, None, finetune_overrides(
            manifest, tmp_path / "out", "task.kind=distill", f"distill.teacher={teacher_dir}",
            "student.head_init=probe"))


def test_probe_head_init_starts_both_students_at_their_own_probe(setup, tmp_path):
    """With the LR at ~0 for one step, a grid student whose heads were fitted as the probe on its own
    random features classifies the separable test split, distilled and labels-only alike (both start
    from that one fit: at LR ~0 their predictions agree), and beats the same student with random heads."""
    manifest, teacher_dir, _ = setup
    results, probe_rows = {}, {}
    for head_init in ("probe", "random"):
        out = tmp_path / head_init
        results[head_init] = run(load_config(FinetuneConfig, None, finetune_overrides(
            manifest, out, "task.kind=distill", f"distill.teacher={teacher_dir}", "student.preset=vit-tiny",
            "student.n_layer=1", "student.n_embd=16", "student.patch_size=2", "student.pooling=grid",
            "student.grid_size=2", f"student.head_init={head_init}", "train.steps=1", "optim.lr=1e-12",
            "schedule.warmup_steps=0")))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        probe_rows[head_init] = [r for r in rows if "head_probe_val_accuracy" in r]
    # fitted once: the distilled and the labels-only student start from the same state
    assert len(probe_rows["probe"]) == 1 and probe_rows["probe"][0]["head_probe_val_accuracy"] >= 0.9
    assert probe_rows["random"] == []
    probe, random = results["probe"], results["random"]
    assert probe["top1"] >= 0.9 and probe["baselines"]["labels_only"]["top1"] >= 0.9
    assert probe["top1"] > random["top1"] and probe["baselines"]["labels_only"]["top1"] > random["baselines"]["labels_only"]["top1"]
    predictions = np.load(tmp_path / "probe" / "predictions.npz")
    np.testing.assert_allclose(predictions["logits"], predictions["labels_only_logits"], atol=1e-4)


def test_student_larger_than_a_quarter_of_the_teacher_is_refused(setup, tmp_path):
    manifest, teacher_dir, _ = setup
    cfg = load_config(FinetuneConfig, None, finetune_overrides(
        manifest, tmp_path / "out", "task.kind=distill", f"distill.teacher={teacher_dir}",
        "student.preset=gpt-student-small", "train.steps=5"))
    with pytest.raises(UserError, match="max_param_ratio"):
        run(cfg)


def test_a_probe_output_is_not_a_teacher(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "classifier.yaml").write_text("kind: linear_probe\n")
    with pytest.raises(UserError, match="finetune output"):
        load_finetuned(tmp_path)


@pytest.mark.parametrize("head_init", ["probe", "random"])
def test_probe_head_init_starts_the_fine_tune_at_the_probe(setup, tmp_path, head_init):
    """LP-FT: with the LR at ~0 for one step, a head fitted as the probe (its standardization folded
    into the Linear) already classifies the separable test split; a random head is near chance."""
    manifest, teacher_dir, _ = setup
    init = load_finetuned(teacher_dir)[2]["init"].split(" ", 1)[1]
    out = tmp_path / head_init
    results = run(load_config(FinetuneConfig, None, finetune_overrides(
        manifest, out, f"init={init}", "task.kind=finetune", f"task.head_init={head_init}", "task.pooling=grid",
        "task.grid_size=2", "task.layers=[1]", "task.baselines=[]", "task.head_dropout=0",
        "train.steps=1", "optim.lr=1e-12", "schedule.warmup_steps=0")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probe_rows = [r for r in rows if "head_probe_val_accuracy" in r]
    if head_init == "probe":
        assert len(probe_rows) == 1 and probe_rows[0]["head_probe_val_accuracy"] >= 0.9
        assert results["top1"] >= 0.9
    else:
        assert probe_rows == [] and results["top1"] <= 0.6


def test_folded_head_gives_the_probe_logits():
    torch.manual_seed(0)
    probe = LinearProbe(1, 12, 5).eval()
    with torch.no_grad():
        probe.norm.running_mean.copy_(torch.randn(12) * 3)
        probe.norm.running_var.copy_(torch.rand(12) * 4 + 0.1)
        probe.weight.normal_()
        probe.bias.normal_()
    head = torch.nn.Linear(12, 5)
    fold_probe_into_head(probe, head)
    x = torch.randn(64, 12) * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(head(x), probe(x[:, None, :])[:, 0], rtol=1e-5, atol=1e-5)
