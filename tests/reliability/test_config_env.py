"""Drills 9 and 14: bad configuration and environment through the real CLI in a subprocess: one
clear line each, a non-zero exit code, and nothing that existed is changed; a new run into an
existing run directory without resume refuses."""
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers.drills import overrides, run_cli


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gpt-vision-pretrain: error:")]


def test_bad_config_and_environment_fail_with_one_line_and_touch_nothing(manifest, tmp_path, figure):
    run = tmp_path / "existing"
    run.mkdir()
    (run / "notes.txt").write_text("the user's notes\n")
    empty = tmp_path / "empty" / "manifest.json"
    empty.parent.mkdir()
    empty.write_text("")
    no_splits = tmp_path / "nosplits" / "manifest.json"
    no_splits.parent.mkdir()
    no_splits.write_text(json.dumps({"format": "gpt_vision-shards/1", "name": "x", "mode": "L", "image_size": [8, 8],
                                     "classes": None, "splits": {}}))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    not_ckpt = tmp_path / "not-a-checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "model.bin").write_text("junk")
    cases = {  # name: (processes, overrides, text the error must contain)
        "unknown key": (1, overrides(manifest, run, "model.n_layerz=3"), "n_layerz"),
        "wrong type": (1, overrides(manifest, run, "train.steps=many"), "train.steps"),
        "missing shard path": (1, overrides(tmp_path / "nowhere" / "manifest.json", run), "nowhere"),
        "empty manifest": (1, overrides(empty, run), str(empty)),
        "manifest without splits": (1, overrides(no_splits, run), "train"),
        "world size vs global batch": (2, overrides(manifest, run, "train.micro_batch_size=6", "train.global_batch_size=18"),
                                       "global_batch_size=18"),
        "run dir not writable": (1, overrides(manifest, blocker / "run"), str(blocker)),
        "resume from a non-checkpoint": (1, overrides(manifest, run, f"checkpoint.resume={not_ckpt}"), str(not_ckpt)),
    }
    before = tree_digest(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        procs = dict(zip(cases, pool.map(lambda case: run_cli(case[1], case[0]), cases.values())))
    report = []
    for name, proc in procs.items():
        lines = error_lines(proc.stderr)
        report.append(f"{name}: exit {proc.returncode}, {lines[-1] if lines else proc.stderr[-300:]!r}")
    figure("\n    " + "\n    ".join(report))
    for name, proc in procs.items():
        lines = error_lines(proc.stderr)
        # torchrun reports a failed child as its own exit code 1 (the ranks exit 2)
        assert proc.returncode == (2 if cases[name][0] == 1 else 1), (name, proc.stderr[-2000:])
        assert len(set(lines)) == 1 and cases[name][2] in lines[0], (name, proc.stderr[-2000:])
        if cases[name][0] == 1:  # torchrun adds its own traceback of the failed child
            assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    assert tree_digest(tmp_path) == before


def test_new_run_into_an_existing_run_dir_without_resume_refuses(manifest, tmp_path, figure):
    run = tmp_path / "run"
    first = run_cli(overrides(manifest, run, "train.steps=2", "schedule.warmup_steps=1"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_digest(run)
    second = run_cli(overrides(manifest, run, "train.steps=2", "schedule.warmup_steps=1", "checkpoint.resume=never"))
    lines = error_lines(second.stderr)
    figure(f"exit {second.returncode}: {lines}")
    assert second.returncode == 2 and len(lines) == 1 and "already holds a run" in lines[0]
    assert tree_digest(run) == before
