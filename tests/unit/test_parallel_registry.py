"""Strategy names are registered once (parallel/registry.py): config validation, building,
consolidation and the README's list all follow that one table."""
import re
from pathlib import Path

import pytest

from gpt_vision.errors import ConfigError
from gpt_vision.parallel import BatchLayout, ParallelConfig, build_strategy
from gpt_vision.parallel.base import Strategy
from gpt_vision.parallel.full_replica import FullReplicaStrategy
from gpt_vision.parallel.registry import STRATEGIES, resolve

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_registered_name_resolves_to_a_strategy_and_a_consolidator(name):
    assert issubclass(resolve(name, "strategy"), Strategy)
    assert callable(resolve(name, "consolidate"))


def test_the_full_replica_strategies_share_one_base():
    assert {name for name in STRATEGIES if issubclass(resolve(name, "strategy"), FullReplicaStrategy)} == {
        "single", "ddp", "fairscale"}


def test_a_built_strategy_carries_its_name_and_batch_layout():
    strategy = build_strategy(ParallelConfig(), 0, 1, 0, BatchLayout(micro_batch_size=4, grad_accum=2))
    assert type(strategy).__name__ == "SingleStrategy"
    assert strategy.name == "single" and strategy.batch == BatchLayout(4, 2)


def test_an_unknown_name_is_one_line_listing_the_registered_ones():
    with pytest.raises(ConfigError) as info:
        ParallelConfig(strategy="horovod").check()
    assert str(info.value) == f"config key 'strategy': must be one of {', '.join(STRATEGIES)}; got 'horovod'"
    with pytest.raises(ConfigError, match="unknown strategy 'horovod'; choose one of single, ddp"):
        resolve("horovod", "consolidate")


def test_the_readme_lists_the_registered_names():
    listed = re.search(r"`parallel\.strategy=([a-z|]+)`", README.read_text()).group(1).split("|")
    assert sorted(listed) == sorted(STRATEGIES)
