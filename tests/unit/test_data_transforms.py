import numpy as np

from gpt_vision.data import AugmentConfig, build_transform
from gpt_vision.data.transforms import center_crop, random_crop, random_horizontal_flip, resize_shorter_side

IMAGE = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)


def test_center_crop_takes_the_middle():
    assert np.array_equal(center_crop(IMAGE, 4), IMAGE[1:5, 2:6])


def test_resize_scales_the_shorter_side_and_keeps_grayscale_channel():
    assert resize_shorter_side(IMAGE, 3).shape == (3, 4, 3)
    gray = np.full((10, 10, 1), 77, dtype=np.uint8)
    resized = resize_shorter_side(gray, 5)
    assert resized.shape == (5, 5, 1) and np.all(resized == 77)


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    rng = np.random.default_rng(0)
    padded = np.pad(IMAGE, ((2, 2), (2, 2), (0, 0)))
    windows = {tuple(padded[t:t + 6, l:l + 8].ravel()): (t, l) for t in range(5) for l in range(5)}
    offsets = {windows[tuple(random_crop(IMAGE, 2, rng).ravel())] for _ in range(40)}
    assert len(offsets) > 5


def test_flip_mirrors_columns_and_depends_only_on_the_generator():
    flips = [np.array_equal(random_horizontal_flip(IMAGE, np.random.default_rng(s)), IMAGE[:, ::-1]) for s in range(20)]
    kept = [np.array_equal(random_horizontal_flip(IMAGE, np.random.default_rng(s)), IMAGE) for s in range(20)]
    assert all(f != k for f, k in zip(flips, kept)) and any(flips) and any(kept)
    again = [np.array_equal(random_horizontal_flip(IMAGE, np.random.default_rng(s)), IMAGE[:, ::-1]) for s in range(20)]
    assert flips == again


def test_build_transform_keeps_only_deterministic_steps_for_evaluation():
    cfg = AugmentConfig(resize=4, center_crop=4, random_crop_padding=1, flip=True)
    assert build_transform(AugmentConfig(), train=True) is None
    assert build_transform(AugmentConfig(flip=True), train=False) is None
    evaluation = build_transform(cfg, train=False)
    expected = center_crop(resize_shorter_side(IMAGE, 4), 4)
    assert np.array_equal(evaluation(IMAGE, np.random.default_rng(0)), expected)
    training = build_transform(cfg, train=True)
    outputs = {training(IMAGE, np.random.default_rng(s)).tobytes() for s in range(10)}
    assert training(IMAGE, np.random.default_rng(0)).shape == (4, 4, 3) and len(outputs) > 1
