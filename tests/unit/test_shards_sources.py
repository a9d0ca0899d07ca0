"""Round trips through `data-shards make` for every source kind, read back with webdataset."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from data_shards import read_manifest
from data_shards.cli import _make, build_parser, main
from data_shards.sources import read_idx
from gpt_vision.errors import UserError
from tests.helpers.fixtures_images import (
    random_images,
    read_split,
    write_cifar10_dir,
    write_cifar100_dir,
    write_idx,
    write_idx_dir,
    write_image_folder,
)


def make(*args: str) -> None:
    assert main(["make", *args]) == 0


def main_raising(*argv: str) -> None:
    """Run the make pipeline without the CLI's error printing, to assert on the exception."""
    _make(build_parser().parse_args(list(argv)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_round_trip(tmp_path, rng, gz):
    truth = {
        "train": (random_images(rng, 7, 5, 4), rng.integers(0, 10, 7)),
        "test": (random_images(rng, 3, 5, 4), rng.integers(0, 10, 3)),
    }
    src = write_idx_dir(tmp_path / "digits", truth, gz=gz)
    make("--source", "idx", "--input", str(src), "--out", str(tmp_path / "out"), "--name", "digits")

    manifest = read_manifest(tmp_path / "out")
    assert manifest["mode"] == "L" and manifest["image_size"] == [5, 4]
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 7, "test": 3}
    for split, (images, labels) in truth.items():
        keys, pixels, got_labels = read_split(tmp_path / "out", split)
        assert keys == [f"{split}-{i:07d}" for i in range(len(images))]
        np.testing.assert_array_equal(pixels, images)
        assert got_labels == labels.tolist()


def test_idx_fashion_directory_gets_fashion_class_names(tmp_path, rng):
    src = write_idx_dir(tmp_path / "Fashion-MNIST", {"train": (random_images(rng, 2, 3, 3), np.array([0, 9]))}, gz=True)
    make("--source", "idx", "--input", str(src), "--out", str(tmp_path / "out"), "--name", "f")
    classes = read_manifest(tmp_path / "out")["classes"]
    assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot" and len(classes) == 10


def test_class_names_option_replaces_source_names(tmp_path, rng):
    src = write_idx_dir(tmp_path / "d", {"train": (random_images(rng, 2, 3, 3), np.array([0, 1]))}, gz=False)
    names = ",".join(f"c{i}" for i in range(10))
    make("--source", "idx", "--input", str(src), "--out", str(tmp_path / "out"), "--name", "d", "--class-names", names)
    assert read_manifest(tmp_path / "out")["classes"] == [f"c{i}" for i in range(10)]


def test_idx_header_errors_name_the_file(tmp_path, rng):
    good = write_idx(tmp_path / "ok", random_images(rng, 4, 3, 3), gz=False)
    assert read_idx(good, ndim=3).shape == (4, 3, 3)

    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + good.read_bytes()[4:])
    with pytest.raises(UserError, match=r"magic.*bad magic 12340803"):
        read_idx(bad_magic, ndim=3)

    truncated = tmp_path / "short"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"dims \[4, 3, 3\].*has 47 bytes"):
        read_idx(truncated, ndim=3)

    with pytest.raises(UserError, match="has 3 dimensions, expected 1"):
        read_idx(good, ndim=1)


def test_idx_image_label_count_mismatch(tmp_path, rng):
    root = tmp_path / "d"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", random_images(rng, 4, 3, 3), gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(UserError, match="holds 4 images but .* holds 5 labels"):
        main_raising("make", "--source", "idx", "--input", str(root), "--out", str(tmp_path / "o"), "--name", "x")


def test_cifar10_round_trip(tmp_path, rng):
    truth = write_cifar10_dir(tmp_path / "cifar-10-batches-py", rng)
    make("--source", "cifar", "--input", str(tmp_path / "cifar-10-batches-py"), "--out", str(tmp_path / "out"),
         "--name", "c10", "--shard-size", "4")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["mode"] == "RGB" and manifest["image_size"] == [32, 32]
    assert manifest["classes"][:2] == ["airplane", "automobile"] and len(manifest["classes"]) == 10
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 2]
    for split, (images, labels) in truth.items():
        _, pixels, got_labels = read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(pixels, images)
        assert got_labels == labels.tolist()


def test_cifar100_uses_fine_labels(tmp_path, rng):
    truth = write_cifar100_dir(tmp_path / "cifar-100-python", rng)
    make("--source", "cifar", "--input", str(tmp_path / "cifar-100-python"), "--out", str(tmp_path / "out"),
         "--name", "c100")
    manifest = read_manifest(tmp_path / "out")
    assert len(manifest["classes"]) == 100 and manifest["classes"][7] == "fine7"
    for split, (images, labels) in truth.items():
        _, pixels, got_labels = read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(pixels, images)
        assert got_labels == labels.tolist()


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path, rng):
    root = tmp_path / "cifar"
    write_cifar10_dir(root, rng)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, f, protocol=2)
    with pytest.raises(UserError, match=r"data_batch_3 is not a CIFAR python pickle: refusing to load global \w+\.getcwd"):
        main_raising("make", "--source", "cifar", "--input", str(root), "--out", str(tmp_path / "o"), "--name", "x")


def test_folder_round_trip_mixed_formats_sorted_classes(tmp_path, rng):
    truth = {
        "zebra": [random_images(rng, 1, 6, 5, 3)[0] for _ in range(3)],
        "ant": [random_images(rng, 1, 6, 5, 3)[0] for _ in range(2)],
        "moth": [random_images(rng, 1, 6, 5, 3)[0] for _ in range(4)],
    }
    root = tmp_path / "tree"
    write_image_folder(root, {"zebra": truth["zebra"], "ant": truth["ant"]}, ext="png")
    write_image_folder(root, {"moth": truth["moth"]}, ext="bmp")
    (root / "ant" / "notes.txt").write_text("not an image, not a candidate")
    make("--source", "folder", "--input", str(root), "--out", str(tmp_path / "out"), "--name", "bugs")

    manifest = read_manifest(tmp_path / "out")
    assert manifest["classes"] == ["ant", "moth", "zebra"]
    assert manifest["mode"] == "RGB" and manifest["image_size"] == [6, 5]
    assert manifest["bad_samples"]["count"] == 0
    _, pixels, labels = read_split(tmp_path / "out", "train")
    got = sorted((label, img.tobytes()) for label, img in zip(labels, pixels))
    want = sorted((manifest["classes"].index(c), img.tobytes()) for c, imgs in truth.items() for img in imgs)
    assert got == want
    assert labels != sorted(labels), "folder samples are shuffled so shards mix classes"


def test_folder_with_split_dirs(tmp_path, rng):
    gray = lambda n: [random_images(rng, 1, 4, 4)[0] for _ in range(n)]  # noqa: E731
    write_image_folder(tmp_path / "tree" / "train", {"a": gray(3), "b": gray(2)})
    write_image_folder(tmp_path / "tree" / "test", {"a": gray(1), "b": gray(1)})
    make("--source", "folder", "--input", str(tmp_path / "tree"), "--out", str(tmp_path / "out"), "--name", "t")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["mode"] == "L" and manifest["classes"] == ["a", "b"]
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 5, "test": 2}


def test_folder_val_fraction_is_seeded_and_disjoint(tmp_path, rng):
    images = {c: [np.full((3, 3), 10 * k + i, np.uint8) for i in range(5)] for k, c in enumerate(["a", "b"])}
    write_image_folder(tmp_path / "tree", images)
    values = {}
    for run in ("one", "two", "other_seed"):
        seed = "9" if run == "other_seed" else "3"
        make("--source", "folder", "--input", str(tmp_path / "tree"), "--out", str(tmp_path / run), "--name", "t",
             "--val-fraction", "0.3", "--seed", seed)
        values[run] = {split: sorted(read_split(tmp_path / run, split)[1][:, 0, 0].tolist()) for split in ("train", "val")}
    assert len(values["one"]["val"]) == 3 and len(values["one"]["train"]) == 7
    assert set(values["one"]["val"]).isdisjoint(values["one"]["train"])
    assert sorted(values["one"]["val"] + values["one"]["train"]) == sorted(v for imgs in images.values() for v in
                                                                           [int(i[0, 0]) for i in imgs])
    assert values["one"] == values["two"]
    assert values["one"] != values["other_seed"]


def test_npz_labeled_rgb_and_unlabeled(tmp_path, rng):
    images = random_images(rng, 5, 4, 6, 3)
    np.savez(tmp_path / "labeled.npz", images=images, labels=np.array([0, 2, 1, 2, 0]))
    make("--source", "npz", "--input", str(tmp_path / "labeled.npz"), "--out", str(tmp_path / "a"), "--name", "a")
    manifest = read_manifest(tmp_path / "a")
    assert manifest["classes"] == ["0", "1", "2"] and manifest["mode"] == "RGB" and manifest["image_size"] == [4, 6]
    _, pixels, labels = read_split(tmp_path / "a", "train")
    np.testing.assert_array_equal(pixels, images)
    assert labels == [0, 2, 1, 2, 0]

    gray = random_images(rng, 4, 3, 3, 1)
    np.savez(tmp_path / "unlabeled.npz", images=gray)
    make("--source", "npz", "--input", str(tmp_path / "unlabeled.npz"), "--out", str(tmp_path / "b"), "--name", "b")
    manifest = read_manifest(tmp_path / "b")
    assert manifest["classes"] is None and manifest["mode"] == "L"
    _, pixels, labels = read_split(tmp_path / "b", "train")
    np.testing.assert_array_equal(pixels, gray[..., 0])
    assert labels is None


def test_npz_with_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="cannot read npz file .*evil.npz"):
        main_raising("make", "--source", "npz", "--input", str(tmp_path / "evil.npz"), "--out", str(tmp_path / "o"),
                     "--name", "x")


def test_resize_and_mode_conversion(tmp_path, rng):
    images = random_images(rng, 3, 8, 6, 3)
    images[0] = 200  # a flat image must stay flat through crop + resize
    np.savez(tmp_path / "x.npz", images=images, labels=np.array([0, 1, 0]))
    make("--source", "npz", "--input", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out"), "--name", "x",
         "--mode", "L", "--resize", "4")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["mode"] == "L" and manifest["image_size"] == [4, 4]
    _, pixels, _ = read_split(tmp_path / "out", "train")
    assert pixels.shape == (3, 4, 4)
    assert (pixels[0] == 200).all()
    expected = Image.fromarray(images[1]).convert("L").crop((0, 1, 6, 7)).resize((4, 4), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(pixels[1], np.array(expected))
