"""Shard names in a manifest are data, never commands: `pipe:` entries are refused (a marker file
proves nothing ran) unless `data.allow_pipe` is set; other schemes, absolute paths and `..`
escapes are refused with one line naming the manifest and the entry; http(s) works without curl."""
import json
from pathlib import Path

import numpy as np
import pytest

from data_shards import verify_dir
from gpt_vision.data import DataConfig, ShardLoader, TokenizerConfig, load_manifest, load_or_fit_palette
from gpt_vision.data.palette import Palette
from gpt_vision.errors import UserError
from gpt_vision.sampling import first_images
from tests.helpers.shardgen import serve_http, write_dataset

GRAY = Palette(np.linspace(0, 255, 8, dtype=np.float32)[:, None])
PIPE_REFUSED = "a pipe: name runs a shell command; refused unless data.allow_pipe: true"


def set_first_file(manifest: Path, file: str) -> None:
    doc = json.loads(manifest.read_text())
    doc["splits"]["train"]["shards"][0]["file"] = file
    manifest.write_text(json.dumps(doc))


@pytest.fixture()
def piped(tmp_path):
    """A manifest whose first train shard is `pipe:touch MARKER; cat <the real shard>`."""
    manifest = write_dataset(tmp_path / "set", {"train": [4, 4], "test": [2]})
    marker = tmp_path / "marker"
    entry = f"pipe:touch {marker}; cat {tmp_path / 'set' / 'train-000000.tar'}"
    set_first_file(manifest, entry)
    return manifest, marker, entry


def keys(loader) -> list[str]:
    return sorted(key for batch in loader for key in batch["key"])


def test_pipe_entries_run_nowhere(piped, tmp_path):
    manifest, marker, entry = piped
    line = f"shard manifest {manifest}: field 'splits.train.shards[0].file' is {entry!r}: {PIPE_REFUSED}"
    attempts = {
        "loader": lambda: ShardLoader(DataConfig(manifest=str(manifest), num_workers=0), "train", GRAY, 2),
        "palette": lambda: load_or_fit_palette(DataConfig(manifest=str(manifest)),
                                               TokenizerConfig(clusters=4, sample_pixels=100, path=str(tmp_path / "p.npy"))),
        "sampling": lambda: first_images(str(manifest), "train", 2, GRAY),
        "manifest": lambda: load_manifest(manifest),
    }
    for name, attempt in attempts.items():
        with pytest.raises(UserError) as raised:
            attempt()
        assert str(raised.value) == line, name
    report = verify_dir(manifest.parent)
    assert report.problems == [line]
    assert not marker.exists()


def test_pipe_entries_run_when_the_user_allows_them(piped):
    manifest, marker, _ = piped
    loader = ShardLoader(DataConfig(manifest=str(manifest), num_workers=0, allow_pipe=True), "train", GRAY, 2,
                         train=False)
    assert keys(loader) == [f"train{s:03d}-{i:05d}" for s in range(2) for i in range(4)]
    assert marker.exists()


def test_a_pipe_manifest_location_is_refused(piped, tmp_path):
    manifest, marker, _ = piped
    location = f"pipe:touch {marker}; cat {manifest}"
    with pytest.raises(UserError) as raised:
        ShardLoader(DataConfig(manifest=location), "train", GRAY, 2)
    assert str(raised.value) == f"shard manifest {location}: {PIPE_REFUSED}"
    assert not marker.exists()


@pytest.mark.parametrize("file, problem", [
    ("/etc/passwd", "an absolute path; name shards relative to the manifest's folder"),
    ("../train-000000.tar", "a path leaving the manifest's folder"),
    ("sub/../../train-000000.tar", "a path leaving the manifest's folder"),
    ("file:///etc/passwd", "a path leaving the manifest's folder"),
    ("s3://bucket/train-000000.tar",
     "s3:// needs a storage client gpt_vision does not use; copy the shards locally or serve them over https"),
    ("ftp://host/train-000000.tar", "scheme 'ftp:' is not allowed (allowed: relative paths, file://, http://, https://)"),
])
def test_unsafe_entries_are_one_line_naming_manifest_and_entry(tmp_path, file, problem):
    manifest = write_dataset(tmp_path, {"train": [2]})
    set_first_file(manifest, file)
    with pytest.raises(UserError) as raised:
        load_manifest(manifest)
    assert str(raised.value) == f"shard manifest {manifest}: field 'splits.train.shards[0].file' is {file!r}: {problem}"


def test_entries_inside_the_folder_are_read(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [3, 3]})
    doc = json.loads(manifest.read_text())
    doc["splits"]["train"]["shards"][0]["file"] = "sub/../train-000000.tar"
    doc["splits"]["train"]["shards"][1]["file"] = f"file://{tmp_path / 'train-000001.tar'}"
    manifest.write_text(json.dumps(doc))
    loader = ShardLoader(DataConfig(manifest=str(manifest), num_workers=0), "train", GRAY, 2, train=False)
    assert keys(loader) == [f"train{s:03d}-{i:05d}" for s in range(2) for i in range(3)]


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "served"
    write_dataset(root, {"train": [3, 2]})
    with serve_http(root) as base:
        yield base


def test_http_manifests_and_shards_are_read(served):
    base = served
    manifest = load_manifest(base)
    assert manifest.location == f"{base}/manifest.json" and manifest.local_dir is None
    assert [s.url for s in manifest.splits["train"]] == [f"{base}/train-000000.tar", f"{base}/train-000001.tar"]
    loader = ShardLoader(DataConfig(manifest=base, num_workers=0), "train", GRAY, 2, train=False)
    assert keys(loader) == ["train000-00000", "train000-00001", "train000-00002", "train001-00000", "train001-00001"]
