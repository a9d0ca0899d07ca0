"""`launch/pretrain.py --nproc_per_node N`: one exit code for N ranks' codes."""
import pytest

from gpt_vision.local_launch import launcher_exit_code


@pytest.mark.parametrize("codes, expected", [
    ([0, 0], 0),
    ([85, 85], 85),
    ([85], 85),
    ([2, -15], 2),  # a user error; the agent then terminated the other rank
    ([-15, 2], 2),
    ([85, -15], 143),  # one rank killed while the other saved: not a clean stop
    ([1, 2], 2),
    ([1, -9], 1),
    ([-9], 137),
])
def test_exit_code_mapping(codes, expected):
    assert launcher_exit_code(codes) == expected
