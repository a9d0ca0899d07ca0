"""The shard writer's guarantees: boundaries, checksums, no overwrite, crash safety, bad images."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_shards import read_manifest, verify_dir, write_dataset, write_shards
from data_shards.cli import main
from data_shards.splits import ArraySplit
from gpt_vision.errors import UserError
from tests.helpers.fixtures_images import random_images, read_split, write_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def tar_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tar"))


def test_shard_boundaries_and_contiguous_keys(tmp_path, rng):
    images, labels = random_images(rng, 25, 4, 4), rng.integers(0, 3, 25)
    manifest = write_shards(images, labels, tmp_path / "out", "b", shard_size=10)
    shards = manifest["splits"]["train"]["shards"]
    assert [(s["file"], s["num_samples"]) for s in shards] == [
        ("train-000000.tar", 10), ("train-000001.tar", 10), ("train-000002.tar", 5)]
    assert manifest["totals"] == {"num_samples": 25, "num_shards": 3}
    keys, pixels, got = read_split(tmp_path / "out", "train")
    assert keys == [f"train-{i:07d}" for i in range(25)]
    np.testing.assert_array_equal(pixels, images)
    assert got == labels.tolist()

    exact = write_shards(images[:20], labels[:20], tmp_path / "exact", "b", shard_size=10)
    assert [s["num_samples"] for s in exact["splits"]["train"]["shards"]] == [10, 10]
    assert tar_names(tmp_path / "exact") == ["train-000000.tar", "train-000001.tar"]


def test_manifest_checksums_match_files_and_output_is_deterministic(tmp_path, rng):
    splits = {"train": (random_images(rng, 6, 3, 5, 3), np.arange(6) % 2), "test": (random_images(rng, 2, 3, 5, 3), np.array([1, 0]))}
    first = write_shards(splits, None, tmp_path / "a", "d", shard_size=4, classes=["cat", "dog"])
    for split, entry in first["splits"].items():
        for shard in entry["shards"]:
            assert hashlib.sha256((tmp_path / "a" / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == first
    assert read_manifest(tmp_path / "a") == first
    assert first["classes"] == ["cat", "dog"] and first["image_size"] == [3, 5] and first["mode"] == "RGB"

    second = write_shards(splits, None, tmp_path / "b", "d", shard_size=4, classes=["cat", "dog"])
    assert second == first, "same arrays must give byte-identical shards"


def test_write_shards_argument_errors(tmp_path, rng):
    images = random_images(rng, 3, 2, 2)
    with pytest.raises(UserError, match="label 5 needs more than the 2 classes"):
        write_shards(images, np.array([0, 5, 1]), tmp_path, "x", classes=["a", "b"])
    with pytest.raises(UserError, match=r"labels must have shape \(3,\)"):
        write_shards(images, np.array([0, 1]), tmp_path, "x")
    with pytest.raises(UserError, match="images must be uint8"):
        write_shards(images.astype(np.float32), None, tmp_path, "x")
    with pytest.raises(UserError, match="mode 'CMYK'"):
        write_shards(images, None, tmp_path, "x", mode="CMYK")
    with pytest.raises(UserError, match="split name 'tr.ain' may only use letters, digits and '_'"):
        write_shards({"tr.ain": (images, None)}, None, tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output_without_force_and_force_replaces_after_completion(tmp_path, rng):
    out = tmp_path / "out"
    old = write_shards(random_images(rng, 30, 3, 3), None, out, "old", shard_size=10)
    assert tar_names(out) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with pytest.raises(UserError, match=r"already holds shards or a manifest \(manifest.json, train-000000.tar, "
                                        r"train-000001.tar, ...\); pass --force"):
        write_shards(random_images(rng, 5, 3, 3), None, out, "new")
    assert read_manifest(out) == old

    new_images = random_images(rng, 12, 3, 3)
    new = write_shards(new_images, None, out, "new", shard_size=100, force=True)
    assert read_manifest(out) == new and new["name"] == "new"
    assert tar_names(out) == ["train-000000.tar"], "stale shards of the old run are removed once the new one is complete"
    np.testing.assert_array_equal(read_split(out, "train")[1], new_images)
    assert verify_dir(out).ok


class _ExplodingSplit(ArraySplit):
    """Fails at sample `at`, like a crash or Ctrl-C in the middle of a long run."""

    def __init__(self, images, at: int):
        super().__init__(images, None, "boom")
        self.at = at

    def image(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return super().image(i)


def test_interrupted_write_publishes_nothing_and_keeps_previous_output(tmp_path, rng):
    out = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        write_dataset({"train": _ExplodingSplit(random_images(rng, 20, 3, 3), at=13)}, out, "x",
                      classes=None, shard_size=5)
    assert list(out.iterdir()) == [], "completed shards stay unpublished and partial files are removed"

    kept = tmp_path / "kept"
    old = write_shards(random_images(rng, 7, 3, 3), None, kept, "old", shard_size=5)
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        write_dataset({"train": _ExplodingSplit(random_images(rng, 20, 3, 3), at=13)}, kept, "x",
                      classes=None, shard_size=5, force=True)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    assert read_manifest(kept) == old and verify_dir(kept).ok


def test_killed_process_leaves_no_finished_looking_tar(tmp_path):
    """A hard kill (no cleanup runs) mid-way leaves only hidden .partial files, no *.tar, no manifest."""
    out = tmp_path / "out"
    script = f"""
import os, numpy as np
from data_shards import write_dataset
from data_shards.splits import ArraySplit
class Dies(ArraySplit):
    def image(self, i):
        if i == 13:
            os._exit(9)
        return super().image(i)
images = np.zeros((20, 3, 3), np.uint8)
write_dataset({{"train": Dies(images, None, "x")}}, {str(out)!r}, "x", classes=None, shard_size=5)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith(".train-") and name.endswith(".partial") for name in left)
    assert tar_names(out) == [] and not (out / "manifest.json").exists()
    assert main(["make", "--source", "npz", "--input", str(tmp_path / "missing.npz"), "--out", str(out),
                 "--name", "x"]) == 2  # leftovers do not count as an earlier output, the missing input does


def _folder_with_bad(root: Path, rng, good: int, broken: int) -> list[Path]:
    write_image_folder(root, {"a": [random_images(rng, 1, 4, 4)[0] for _ in range(good)]})
    bad = []
    for i in range(broken):
        path = root / "a" / f"broken{i}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 3)
        bad.append(path)
    return bad


def test_bad_images_within_budget_are_skipped_and_recorded(tmp_path, rng, capsys):
    bad = _folder_with_bad(tmp_path / "tree", rng, good=9, broken=1)
    assert main(["make", "--source", "folder", "--input", str(tmp_path / "tree"), "--out", str(tmp_path / "out"),
                 "--name", "x", "--max-bad-fraction", "0.1"]) == 0
    err = capsys.readouterr().err
    assert f"skipping bad image {bad[0]}: OSError: Truncated File Read" in err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["num_samples"] == 9
    assert manifest["bad_samples"]["count"] == 1
    assert manifest["bad_samples"]["samples"][0]["path"] == str(bad[0])
    assert verify_dir(tmp_path / "out").ok


def test_bad_images_over_budget_fail_without_output(tmp_path, rng, capsys):
    _folder_with_bad(tmp_path / "tree", rng, good=8, broken=2)
    assert main(["make", "--source", "folder", "--input", str(tmp_path / "tree"), "--out", str(tmp_path / "out"),
                 "--name", "x", "--max-bad-fraction", "0.1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("data-shards: error: too many bad images: 2 of 10 unreadable so far (max 10.00% = 1)")
    assert list((tmp_path / "out").iterdir()) == []


def test_differently_sized_image_is_a_bad_sample_unless_resized(tmp_path, rng):
    write_image_folder(tmp_path / "tree", {"a": [random_images(rng, 1, 4, 4)[0]] * 3, "b": [np.zeros((5, 4), np.uint8)]})
    args = ["make", "--source", "folder", "--input", str(tmp_path / "tree"), "--name", "x", "--max-bad-fraction", "0.5"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 0
    manifest = read_manifest(tmp_path / "o1")
    assert manifest["bad_samples"]["count"] == 1 and "use --resize" in manifest["bad_samples"]["samples"][0]["reason"]
    assert main([*args, "--out", str(tmp_path / "o2"), "--resize", "4"]) == 0
    assert read_manifest(tmp_path / "o2")["splits"]["train"]["num_samples"] == 4


@pytest.mark.parametrize("content, message", [
    (None, "manifest.json does not exist"),
    ("", "is empty"),
    ("{not json", "is not valid JSON"),
    ('{"format": "other/1"}', "field 'format' is 'other/1'"),
])
def test_read_manifest_rejects_missing_empty_and_malformed(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=message):
        read_manifest(tmp_path)


def test_read_manifest_rejects_escaping_shard_paths(tmp_path, rng):
    manifest = write_shards(random_images(rng, 2, 2, 2), None, tmp_path, "x")
    manifest["splits"]["train"]["shards"][0]["file"] = "../elsewhere.tar"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"splits.train.shards\[0\].file' is '../elsewhere.tar'"):
        read_manifest(tmp_path / "manifest.json")
