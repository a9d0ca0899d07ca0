import pytest

from gpt_vision.data import AugmentConfig, DataConfig, TokenizerConfig
from gpt_vision.errors import ConfigError


def test_defaults_are_valid_once_a_manifest_is_given():
    DataConfig(manifest="shards/mnist").check()
    TokenizerConfig().check()


@pytest.mark.parametrize("changes,key,words", [
    ({"manifest": ""}, "manifest", "is required"),
    ({"num_workers": -1}, "num_workers", "got -1"),
    ({"prefetch_factor": 0}, "prefetch_factor", "got 0"),
    ({"shuffle_buffer": -5}, "shuffle_buffer", "got -5"),
    ({"max_bad_fraction": 1.5}, "max_bad_fraction", "got 1.5"),
    ({"bad_window": 0}, "bad_window", "got 0"),
    ({"augment": AugmentConfig(center_crop=-2)}, "augment.center_crop", "got -2"),
])
def test_data_config_names_the_bad_key(changes, key, words):
    cfg = DataConfig(**{"manifest": "shards/mnist", **changes})
    with pytest.raises(ConfigError, match=words) as raised:
        cfg.check()
    assert raised.value.key == key


@pytest.mark.parametrize("changes,key", [
    ({"clusters": 1}, "clusters"),
    ({"clusters": 512, "sample_pixels": 100}, "sample_pixels"),
    ({"iterations": 0}, "iterations"),
])
def test_tokenizer_config_names_the_bad_key(changes, key):
    with pytest.raises(ConfigError) as raised:
        TokenizerConfig(**changes).check()
    assert raised.value.key == key
