"""The strict config loader: composition, overrides, and one clear line per failure kind."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from gpt_vision.config_loader import dump_config, load_config, shipped_configs
from gpt_vision.errors import ConfigError, UserError
from gpt_vision.run_configs import FinetuneConfig, PretrainConfig

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def configs(tmp_path):
    root = tmp_path / "configs"
    write(root / "model" / "small.yaml", "preset: igpt-tiny\nn_layer: 2\n")
    write(root / "data" / "toy.yaml", "manifest: /data/toy\nnum_workers: 0\n")
    main = write(root / "pretrain" / "run.yaml", """
        defaults:
          - model/small
          - data/toy
        name: toy
        optim:
          lr: 3e-4
        train:
          steps: 200
    """)
    return main


def test_defaults_nest_by_group_and_file_overrides_win(configs):
    cfg = load_config(PretrainConfig, configs)
    assert cfg.model.preset == "igpt-tiny" and cfg.model.n_layer == 2
    assert cfg.data.manifest == "/data/toy" and cfg.data.num_workers == 0
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; we accept it as a float
    assert cfg.train.steps == 200


def test_dotted_overrides_apply_last_and_parse_values(configs):
    cfg = load_config(PretrainConfig, configs, ["optim.lr=1e-3", "parallel.strategy=fsdp", "optim.betas=[0.9, 0.99]", "model.n_layer=3"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.parallel.strategy == "fsdp"
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.n_layer == 3


def test_the_shipped_pretrain_config_loads():
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/fmnist_tiny.yaml")
    assert cfg.model.preset == "igpt-tiny"
    assert cfg.data.manifest.endswith("manifest.json")


@pytest.mark.parametrize(
    "override, key, words",
    [
        (["optim.learning_rate=1"], "optim.learning_rate", "unknown key"),
        (["train.steps=many"], "train.steps", "expected int"),
        (["train.steps=1.5"], "train.steps", "expected int"),
        (["parallel.strategy=horovod"], "parallel.strategy", "must be one of"),
        (["data.manifest="], "data.manifest", "is required"),
        (["model.n_head=3"], "model.n_head", "does not divide"),
        (["parallel.zero_stage=4"], "parallel.zero_stage", "0, 1, 2 or 3"),
        (["parallel.fsdp_cpu_offload=true"], "parallel.fsdp_cpu_offload", "needs strategy=fsdp"),
        (["schedule.warmup_steps=500"], "schedule.warmup_steps", "exceeds train.steps"),
        (["logging.tensorboard=yes please"], "logging.tensorboard", "expected bool"),
    ],
)
def test_each_failure_names_the_dotted_key(configs, override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, configs, override)
    assert info.value.key == key
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unknown_key_in_a_file_names_that_file(configs, tmp_path):
    bad = write(tmp_path / "configs" / "pretrain" / "bad.yaml", "defaults: [model/small]\nname: x\nmodel:\n  n_layers: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, bad, ["data.manifest=/d"])
    assert info.value.key == "model.n_layers"
    assert str(bad) in str(info.value)


def test_a_bad_value_in_an_included_file_names_the_included_file(configs, tmp_path):
    write(tmp_path / "configs" / "model" / "small.yaml", "preset: igpt-nano\n")
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, configs)
    assert info.value.key == "model.preset" and "small.yaml" in str(info.value)


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.nan", "optim.lr=.inf", "optim.lr=-inf",
                                      "optim.lr=Infinity", "optim.lr=1e999", "train.peak_flops=-.inf"])
def test_non_finite_floats_on_the_command_line_are_refused(configs, override):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, configs, [override])
    assert info.value.key == override.split("=")[0]
    assert "must be a finite number" in info.value.message and str(info.value).endswith("(in command line)")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, key", [("optim:\n  lr: .nan\n", "optim.lr"), ("optim:\n  betas: [0.9, .inf]\n", "optim.betas[1]"),
                                       ("schedule:\n  min_lr_ratio: nan\n", "schedule.min_lr_ratio"),
                                       ("task:\n  label_smoothing: -.inf\n", "task.label_smoothing")])
def test_non_finite_floats_in_a_file_name_the_key_and_the_file(tmp_path, text, key):
    cls = FinetuneConfig if text.startswith("task") else PretrainConfig
    head = "output_dir: o\ninit: i\n" if cls is FinetuneConfig else "name: x\n"
    bad = write(tmp_path / "bad.yaml", head + text)
    with pytest.raises(ConfigError) as info:
        load_config(cls, bad, ["data.manifest=/d"])
    assert info.value.key == key
    assert "must be a finite number" in str(info.value) and str(bad) in str(info.value)


def test_defaults_of_a_config_outside_the_repo_use_its_folder_then_the_shipped_presets(tmp_path):
    mine = tmp_path / "elsewhere"
    write(mine / "data" / "mine.yaml", "manifest: /my/shards/manifest.json\n")
    main = write(mine / "run.yaml", "defaults: [model/igpt-tiny, data/mine]\nname: outside\n")
    cfg = load_config(PretrainConfig, main)
    assert cfg.model.preset == "igpt-tiny"  # from the shipped configs/model/igpt-tiny.yaml
    assert cfg.data.manifest == "/my/shards/manifest.json"  # from the config's own folder
    write(mine / "model" / "igpt-tiny.yaml", "preset: igpt-tiny\nn_layer: 1\n")
    assert load_config(PretrainConfig, main).model.n_layer == 1  # the config's folder comes first


def test_shipped_configs_are_the_repos_configs_folder():
    assert shipped_configs() == REPO / "configs"
    assert (shipped_configs() / "model" / "igpt-tiny.yaml").is_file()


def test_missing_default_and_missing_file_are_clear(tmp_path):
    main = write(tmp_path / "configs" / "x.yaml", "defaults: [model/none]\n")
    with pytest.raises(ConfigError, match="'model/none' not found"):
        load_config(PretrainConfig, main)
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(PretrainConfig, tmp_path / "absent.yaml")


def test_python_tags_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    evil = write(tmp_path / "evil.yaml", f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(PretrainConfig, evil)
    assert not marker.exists()


def test_resolved_config_round_trips(configs, tmp_path):
    cfg = load_config(PretrainConfig, configs, ["optim.lr=1e-3", "parallel.strategy=deepspeed"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(PretrainConfig, out) == cfg
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == pytest.approx(1e-3)


def test_bad_override_syntax_is_one_line(configs):
    with pytest.raises(UserError, match="must look like key=value"):
        load_config(PretrainConfig, configs, ["optim.lr"])


def test_cli_prints_one_line_and_exits_2(configs):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(configs), "optim.lr=-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["gpt-vision-pretrain: error: config key 'optim.lr': must be a finite number > 0, got -1.0 (in command line)"]
