"""`python -m data_shards` as users run it: exit codes, one-line errors, and `verify` catching damage."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_shards import write_shards
from tests.helpers.fixtures_images import random_images, write_idx_dir

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_shards", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("data-shards: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def shards(tmp_path) -> Path:
    rng = np.random.default_rng(2)
    splits = {"train": (random_images(rng, 12, 4, 4), rng.integers(0, 3, 12)),
              "test": (random_images(rng, 3, 4, 4), np.array([0, 1, 2]))}
    write_shards(splits, None, tmp_path / "out", "tiny", shard_size=5, classes=["a", "b", "c"])
    return tmp_path / "out"


def test_make_and_verify_succeed_end_to_end(tmp_path):
    rng = np.random.default_rng(3)
    src = write_idx_dir(tmp_path / "digits", {"train": (random_images(rng, 6, 3, 3), rng.integers(0, 10, 6)),
                                              "test": (random_images(rng, 2, 3, 3), np.array([1, 2]))}, gz=True)
    proc = run("make", "--source", "idx", "--input", str(src), "--out", str(tmp_path / "out"), "--name", "d",
               "--split", "test")
    assert proc.returncode == 0, proc.stderr
    assert "test: 2 samples in 1 shards" in proc.stdout and "train" not in proc.stdout.split("images:")[0]
    verified = run("verify", str(tmp_path / "out"))
    assert verified.returncode == 0, verified.stderr
    assert "OK; read 1 shards, samples: test 2" in verified.stdout


@pytest.mark.parametrize("args, message", [
    (["make", "--source", "idx", "--input", "/nonexistent/x", "--out", "o", "--name", "n"],
     "input /nonexistent/x does not exist"),
    (["make", "--source", "tiff", "--input", ".", "--out", "o", "--name", "n"],
     "argument --source: invalid choice: 'tiff'"),
    (["make", "--source", "idx", "--input", "."], "the following arguments are required: --out, --name"),
    (["make", "--source", "npz", "--input", "x.npz", "--out", "o", "--name", "n", "--split", "a", "--val-fraction", "0.1"],
     "argument --val-fraction: not allowed with argument --split"),
    (["verify", "/nonexistent/shards"], "/nonexistent/shards does not exist"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2(args, message):
    assert message in one_error_line(run(*args))


def test_bad_split_spec_and_bad_idx_magic(tmp_path):
    rng = np.random.default_rng(4)
    src = write_idx_dir(tmp_path / "digits", {"train": (random_images(rng, 2, 3, 3), np.array([0, 1]))}, gz=False)
    base = ["make", "--source", "idx", "--input", str(src), "--out", str(tmp_path / "out"), "--name", "d"]
    line = one_error_line(run(*base, "--split", "train,validation"))
    assert "bad split spec 'train,validation': input has no split 'validation' (has: train)" in line
    assert "bad split spec: --val-fraction must be between 0 and 1" in one_error_line(run(*base, "--val-fraction", "1.5"))

    images = src / "train-images-idx3-ubyte"
    images.write_bytes(b"\x00\x01\x08\x03" + images.read_bytes()[4:])
    assert f"{images} is not an IDX file (bad magic 00010803)" in one_error_line(run(*base))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_refusal_without_force_is_one_line(shards, tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4), np.uint8))
    args = ["make", "--source", "npz", "--input", str(tmp_path / "x.npz"), "--out", str(shards), "--name", "x"]
    assert "pass --force to replace them" in one_error_line(run(*args))
    forced = run(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json", "train-000000.tar"]


def verify_problems(path: Path) -> list[str]:
    proc = run("verify", str(path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("data-shards: problem: ") for line in lines)
    return lines


def test_verify_passes_on_fresh_output(shards):
    proc = run("verify", str(shards))
    assert proc.returncode == 0 and proc.stderr == ""
    assert "OK; read 4 shards, samples: train 12, test 3" in proc.stdout


def test_verify_catches_modified_shard(shards):
    shard = shards / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[512 + 45] ^= 0xFF  # inside the IDAT chunk of the first member's PNG (data starts after a 512-byte header)
    shard.write_bytes(bytes(data))
    problems = verify_problems(shards)
    assert any("train-000001.tar: sha256" in p and "does not match manifest" in p for p in problems)
    assert any("train-000001.tar:train-0000005: png does not decode" in p for p in problems)


def test_verify_catches_deleted_shard(shards):
    (shards / "train-000002.tar").unlink()
    problems = verify_problems(shards)
    assert any("train-000002.tar: shard file is missing" in p for p in problems)
    assert any("split 'train': manifest says 12 samples, shards hold 10" in p for p in problems)


def test_verify_catches_count_mismatch(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["num_samples"] = 4
    (shards / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_problems(shards)
    assert any("test-000000.tar: manifest says 4 samples, shard holds 3" in p for p in problems)
    assert any("split 'test': manifest num_samples 3 != sum over its shards 4" in p for p in problems)


def test_verify_reports_malformed_manifest(shards):
    (shards / "manifest.json").write_text("")
    assert verify_problems(shards) == [f"data-shards: problem: shard manifest {shards / 'manifest.json'} is empty"]


def test_verify_fails_on_an_empty_shard_set(shards):
    doc = json.loads((shards / "manifest.json").read_text())
    doc["splits"] = {"train": {"num_samples": 0, "shards": []}, "test": doc["splits"]["test"]}
    (shards / "manifest.json").write_text(json.dumps(doc))
    assert verify_problems(shards) == [
        f"data-shards: problem: {shards / 'manifest.json'}: split 'train' is empty (no shards or no samples)"]
