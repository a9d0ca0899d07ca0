import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt_vision.data.palette as palette_module
from gpt_vision.data import DataConfig, Palette, TokenizerConfig, fit_palette, load_or_fit_palette
from gpt_vision.errors import UserError
from tests.helpers.shardgen import write_dataset

COLORS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [17, 99, 200],
                   [128, 128, 128], [255, 255, 255]], dtype=np.uint8)


@pytest.fixture(scope="module")
def eight_color_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("eight")
    return write_dataset(root, {"train": [12, 12]}, size=(6, 6), mode="RGB", colors=COLORS, seed=3)


def test_image_of_exactly_k_colors_round_trips_losslessly(eight_color_set):
    palette = fit_palette(str(eight_color_set), "train", clusters=8, sample_pixels=5000, iterations=10, seed=0)
    assert sorted(map(tuple, palette.decode(torch.arange(8)).tolist())) == sorted(map(tuple, COLORS.tolist()))
    image = COLORS[np.random.default_rng(1).integers(0, 8, size=(2, 6, 6))]
    tokens = palette.encode(image)
    assert tokens.shape == (2, 6, 6) and tokens.dtype == torch.int64
    assert np.array_equal(palette.decode(tokens).numpy(), image)


def test_fit_is_deterministic_for_a_seed(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [10, 10]}, size=(8, 8), mode="RGB")
    first = fit_palette(str(manifest), "train", clusters=16, sample_pixels=1000, iterations=5, seed=7)
    second = fit_palette(str(manifest), "train", clusters=16, sample_pixels=1000, iterations=5, seed=7)
    assert np.array_equal(first.centroids, second.centroids)
    assert first.centroids.shape == (16, 3) and first.centroids.dtype == np.float32


def test_encode_decode_shapes_for_grayscale_and_rgb():
    gray = Palette(np.array([[0.0], [100.0], [255.0]]))
    pixels = np.array([[[10, 90], [240, 130]]], dtype=np.uint8)  # [1, H, W] without channel
    assert gray.encode(pixels).tolist() == [[[0, 1], [2, 1]]]
    assert gray.encode(pixels[..., None]).shape == (1, 2, 2)
    assert gray.decode(gray.encode(pixels)).shape == (1, 2, 2, 1)
    assert gray.decode(gray.encode(pixels))[..., 0].tolist() == [[[0, 100], [255, 100]]]

    rgb = Palette(COLORS.astype(np.float32))
    batch = torch.from_numpy(COLORS[np.random.default_rng(0).integers(0, 8, size=(3, 4, 5))])
    tokens = rgb.encode(batch)
    assert tokens.shape == (3, 4, 5)
    assert rgb.decode(tokens.reshape(3, 20)).shape == (3, 20, 3)
    with pytest.raises(ValueError, match="channels"):
        rgb.encode(np.zeros((2, 2, 1), dtype=np.uint8))


def test_chunked_encode_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    palette = Palette(rng.uniform(0, 255, size=(32, 3)).astype(np.float32))
    pixels = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    monkeypatch.setattr(palette_module, "DISTANCE_ELEMENTS_PER_CHUNK", 32 * 7)
    expected = ((pixels[:, None, :].astype(np.float64) - palette.centroids[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(palette.encode(pixels).numpy(), expected)


def test_save_load_round_trip_and_bad_files(tmp_path):
    palette = Palette(np.array([[1.5, 2.0, 3.0], [200.0, 100.0, 50.0]]))
    palette.save(tmp_path / "p.npy")
    assert np.array_equal(Palette.load(tmp_path / "p.npy").centroids, palette.centroids)
    assert [p.name for p in tmp_path.iterdir()] == ["p.npy"]

    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    with pytest.raises(UserError, match="garbage.npy.*not a valid .npy"):
        Palette.load(tmp_path / "garbage.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="objects.npy"):
        Palette.load(tmp_path / "objects.npy")
    np.save(tmp_path / "shape.npy", np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(UserError, match=r"shape.npy.*\[K, 1\|3\]"):
        Palette.load(tmp_path / "shape.npy")
    np.save(tmp_path / "range.npy", np.full((4, 3), 300.0, dtype=np.float32))
    with pytest.raises(UserError, match=r"range.npy.*\[0, 255\]"):
        Palette.load(tmp_path / "range.npy")
    with pytest.raises(UserError, match="missing.npy does not exist"):
        Palette.load(tmp_path / "missing.npy")


def test_load_or_fit_saves_next_to_shards_then_reuses(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [8]}, size=(8, 8), mode="L")
    data_cfg = DataConfig(manifest=str(tmp_path))
    tok_cfg = TokenizerConfig(clusters=4, sample_pixels=500, iterations=3)
    fitted = load_or_fit_palette(data_cfg, tok_cfg)
    saved = manifest.parent / "palette-4.npy"
    assert saved.exists() and fitted.centroids.shape == (4, 1)

    planted = Palette(np.array([[0.0], [10.0], [20.0], [30.0]]))
    planted.save(saved)
    assert np.array_equal(load_or_fit_palette(data_cfg, tok_cfg).centroids, planted.centroids)

    with pytest.raises(UserError, match="has 4 colors"):
        load_or_fit_palette(data_cfg, TokenizerConfig(clusters=8, path=str(saved)))


def make_read_only(folder, monkeypatch) -> None:
    """A folder nothing can be written into: chmod for ordinary users, the immutable flag for root;
    where the OS offers neither, writes into it fail as on a read-only mount."""
    folder.chmod(0o555)
    if folder_is_writable(folder) and os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if folder_is_writable(folder):
        real_open = open

        def read_only_open(path, mode="r", *args, **kwargs):
            if "w" in mode and Path(path).parent == folder:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", read_only_open)


def folder_is_writable(folder) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_a_read_only_shard_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    manifest = write_dataset(tmp_path / "ro", {"train": [6]})
    make_read_only(manifest.parent, monkeypatch)
    try:
        with pytest.raises(UserError) as raised:
            load_or_fit_palette(DataConfig(manifest=str(manifest)), TokenizerConfig(clusters=4, sample_pixels=200))
    finally:
        subprocess.run(["chattr", "-i", str(manifest.parent)], capture_output=True)
        manifest.parent.chmod(0o755)
    message = str(raised.value)
    assert message.startswith(f"cannot write palette palette-4.npy into {manifest.parent} (")
    assert message.endswith("): set tokenizer.path to a writable file")
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["manifest.json", "train-000000.tar"]


def test_the_fit_log_names_manifest_and_split(tmp_path, caplog):
    manifest = write_dataset(tmp_path, {"train": [4]})
    with caplog.at_level("INFO", logger="gpt_vision.data.palette"):
        fit_palette(str(manifest), "train", clusters=4, sample_pixels=200, iterations=2, seed=0)
    assert f"pixels of {manifest} [split train]" in caplog.text
