"""benchmarks/quality.py's recipes: each stage's overrides load as a valid config, and the rows measured
before the demo went to two blocks still build the four-block model they were measured with."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import RECIPES  # noqa: E402


def _pretrain(recipe):
    from gpt_vision.config_loader import load_config
    from gpt_vision.run_configs import PretrainConfig

    return load_config(PretrainConfig, ROOT / "configs" / "pretrain" / "fmnist_demo.yaml",
                       ["run_dir=bench_out/x", *recipe.pretrain])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_stage_of_a_recipe_is_a_valid_config(name):
    """A mistyped key in a recipe fails here, not after its pretraining has run for minutes."""
    from gpt_vision.config_loader import load_config
    from gpt_vision.run_configs import FinetuneConfig

    recipe = RECIPES[name]
    _pretrain(recipe).check()
    for yaml, overrides in (("linear_probe.yaml", recipe.probe), ("finetune.yaml", recipe.finetune)):
        cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / yaml,
                          ["init=bench_out/run", "output_dir=bench_out/x", *overrides])
        cfg.check()


@pytest.mark.parametrize("name, n_layer", [("pixel-mean", 4), ("pixel-grid4", 4), ("masked-grid4", 4),
                                           ("patch2-grid4", 4), ("blocks4", 4), ("full", 4),
                                           ("patch2-mini-grid4", 8), ("demo", 2), ("full2", 2)])
def test_each_recipe_builds_the_depth_its_results_were_measured_with(name, n_layer):
    assert _pretrain(RECIPES[name]).model.resolved().n_layer == n_layer
