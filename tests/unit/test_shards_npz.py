"""`data-shards make --source npz` with predefined splits: several files, `split=path` pairs, and
per-split keys in one file (`x_train`/`y_train`, `images_test`/`labels_test`)."""

import numpy as np
import pytest

from data_shards import read_manifest
from data_shards.cli import main
from tests.helpers.fixtures_images import random_images, read_split


def make(*args: str) -> None:
    assert main(["make", "--source", "npz", *args]) == 0


def error_line(capsys, *args: str) -> str:
    assert main(["make", "--source", "npz", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("data-shards: error: "), lines
    return lines[0].removeprefix("data-shards: error: ")


@pytest.fixture
def arrays():
    rng = np.random.default_rng(5)
    return {"train": (random_images(rng, 6, 4, 4, 1)[..., 0], np.array([0, 1, 2, 0, 1, 2])),
            "test": (random_images(rng, 3, 4, 4, 1)[..., 0], np.array([2, 2, 1]))}


def assert_splits(out, arrays) -> None:
    manifest = read_manifest(out)
    assert set(manifest["splits"]) == set(arrays) and manifest["classes"] == ["0", "1", "2"]
    for split, (images, labels) in arrays.items():
        _, pixels, read_labels = read_split(out, split)
        np.testing.assert_array_equal(pixels, images)
        assert read_labels == labels.tolist()


def test_split_path_pairs(tmp_path, arrays):
    for split, (images, labels) in arrays.items():
        np.savez(tmp_path / f"{split}.npz", images=images, labels=labels)
    make("--input", f"train={tmp_path / 'train.npz'}", "--input", f"test={tmp_path / 'test.npz'}",
         "--out", str(tmp_path / "out"), "--name", "pairs")
    assert_splits(tmp_path / "out", arrays)


@pytest.mark.parametrize("prefixes", [("x_", "y_"), ("images_", "labels_")])
def test_per_split_keys_in_one_file(tmp_path, arrays, prefixes):
    image_key, label_key = prefixes
    content = {}
    for split, (images, labels) in arrays.items():
        content[image_key + split], content[label_key + split] = images, labels
    np.savez(tmp_path / "all.npz", **content)
    make("--input", str(tmp_path / "all.npz"), "--out", str(tmp_path / "out"), "--name", "keys")
    assert_splits(tmp_path / "out", arrays)


def test_a_plain_file_and_a_named_one(tmp_path, arrays):
    np.savez(tmp_path / "a.npz", images=arrays["train"][0], labels=arrays["train"][1])
    np.savez(tmp_path / "b.npz", images=arrays["test"][0], labels=arrays["test"][1])
    make("--input", str(tmp_path / "a.npz"), "--input", f"test={tmp_path / 'b.npz'}",
         "--out", str(tmp_path / "out"), "--name", "mixed")
    assert_splits(tmp_path / "out", arrays)


def test_bad_split_inputs_are_one_line(tmp_path, arrays, capsys):
    images, labels = arrays["train"]
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    np.savez(tmp_path / "odd.npz", x_train=images, x_valid=images)
    np.savez(tmp_path / "nolabels.npz", y_test=labels)
    np.savez(tmp_path / "nothing.npz", pixels=images)
    np.savez(tmp_path / "plain.npz", images=images)
    out = ["--out", str(tmp_path / "out"), "--name", "n"]
    a = tmp_path / "a.npz"
    assert error_line(capsys, "--input", f"dev={a}", *out) == f"--input dev={a}: unknown split 'dev' (use train, val, test)"
    assert error_line(capsys, "--input", str(tmp_path / "odd.npz"), *out) == (
        f"{tmp_path / 'odd.npz'}: array 'x_valid' names unknown split 'valid' (use train, val, test)")
    assert error_line(capsys, "--input", str(tmp_path / "nolabels.npz"), *out) == (
        f"{tmp_path / 'nolabels.npz'}: array 'y_test' has no images 'x_test'")
    assert error_line(capsys, "--input", f"test={tmp_path / 'nothing.npz'}", *out) == (
        f"{tmp_path / 'nothing.npz'} has no 'images' array for split 'test' (has: pixels)")
    assert error_line(capsys, "--input", str(tmp_path / "nothing.npz"), *out) == (
        f"{tmp_path / 'nothing.npz'} has no 'images' array nor per-split arrays images_<split> / x_<split> (has: pixels)")
    assert error_line(capsys, "--input", str(a), "--input", str(a), *out) == f"split 'train' is given twice ({a} and {a})"
    assert error_line(capsys, "--input", str(a), "--input", f"test={tmp_path / 'plain.npz'}", *out) == (
        "npz inputs label splits train but not test")
    assert not (tmp_path / "out").exists()


def test_other_sources_take_one_directory(tmp_path, capsys):
    assert main(["make", "--source", "idx", "--input", str(tmp_path), "--input", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--name", "n"]) == 2
    assert capsys.readouterr().err.strip() == (
        "data-shards: error: source 'idx' takes one --input directory; several inputs and split=path are for npz")
