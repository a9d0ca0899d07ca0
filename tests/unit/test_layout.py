"""gpt_vision.layout: which kind a folder is, what `init=` resolves to, and the atomic writers
(nothing half-written, nothing left behind, modes that follow the umask)."""
import json
import os
import stat

import pytest
from safetensors.torch import save_file

from gpt_vision import layout
from gpt_vision.errors import UserError
from gpt_vision.layout import Kind


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("x")
    return folder


def step(checkpoints, number, complete=True):
    folder = touch(checkpoints / layout.step_dir_name(number), layout.META_FILE, layout.MODEL_FILE, layout.OPTIMIZER_FILE)
    if complete:
        (folder / layout.COMMIT_MARKER).write_text(f"{number}\n")
    return folder


@pytest.fixture
def run(tmp_path):
    run = touch(tmp_path / "run", layout.CONFIG_FILE, layout.PALETTE_FILE)
    checkpoints = run / layout.CHECKPOINTS_DIR
    step(checkpoints, 2), step(checkpoints, 4), step(checkpoints, 6, complete=False)
    (checkpoints / layout.LATEST_FILE).write_text("step-0000004\n")
    return run


def test_every_kind_is_told_apart_and_a_single_strategy_step_is_not_an_export(run, tmp_path):
    single_step = run / "checkpoints" / "step-0000004"
    assert (single_step / layout.MODEL_FILE).is_file()  # what made it look like an export before
    renamed = tmp_path / "copied-step"
    renamed.mkdir()
    for name in (layout.META_FILE, layout.COMMIT_MARKER, layout.MODEL_FILE):
        (renamed / name).write_bytes((single_step / name).read_bytes())
    kinds = {
        run: Kind.RUN,
        run / "checkpoints": Kind.CHECKPOINTS,
        single_step: Kind.STEP,
        renamed: Kind.STEP,
        touch(tmp_path / "export", layout.MODEL_FILE, layout.CONFIG_FILE, layout.PALETTE_FILE): Kind.EXPORT,
        touch(tmp_path / "hf", layout.HF_CONFIG_FILE, layout.HF_LEGACY_FILE): Kind.HF,
        touch(tmp_path / "tuned", layout.MODEL_FILE, layout.CLASSIFIER_FILE, layout.CONFIG_FILE): Kind.FINETUNED,
        touch(tmp_path / "other", "notes.txt"): None,
        tmp_path / "missing": None,
    }
    assert {path: layout.kind_of(path) for path in kinds} == kinds


def test_init_resolves_runs_to_their_newest_complete_step(run, tmp_path):
    newest = run / "checkpoints" / "step-0000004"
    assert layout.resolve_init(run) == layout.Init(Kind.STEP, newest, run)
    assert layout.resolve_init(run / "checkpoints") == layout.Init(Kind.STEP, newest, run)
    older = run / "checkpoints" / "step-0000002"
    assert layout.resolve_init(older) == layout.Init(Kind.STEP, older, run)
    export = touch(tmp_path / "export", layout.MODEL_FILE, layout.CONFIG_FILE)
    assert layout.resolve_init(export) == layout.Init(Kind.EXPORT, export)


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("incomplete", "is incomplete"),
    ("empty", "holds no complete checkpoint"),
    ("finetuned", "is a fine-tune output"),
])
def test_bad_init_is_one_line_naming_the_path(run, tmp_path, case, expected):
    path = {"missing": tmp_path / "nope", "incomplete": run / "checkpoints" / "step-0000006",
            "empty": touch(tmp_path / "empty"),
            "finetuned": touch(tmp_path / "tuned", layout.MODEL_FILE, layout.CLASSIFIER_FILE)}[case]
    with pytest.raises(UserError, match=expected) as error:
        layout.resolve_init(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, expected", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_damaged_meta_json_is_one_line(tmp_path, text, expected):
    (tmp_path / layout.META_FILE).write_text(text)
    with pytest.raises(UserError, match=expected) as error:
        layout.read_meta(tmp_path)
    assert str(tmp_path / layout.META_FILE) in str(error.value) and "\n" not in str(error.value)


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writers_follow_the_umask_and_leave_no_temporary_files(tmp_path, umask_002):
    layout.write_atomic(tmp_path / "a.json", json.dumps({"v": 1}))
    with layout.atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({}, str(tmp))
    with layout.atomic_dir(tmp_path / "staged") as staging:
        (staging / "inside.txt").write_text("x")
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert [mode(tmp_path / name) for name in ("a.json", "w.safetensors", "staged/inside.txt")] == [0o664] * 3
    assert mode(tmp_path / "staged") == 0o775
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "staged", "w.safetensors"]


def test_a_failed_write_keeps_the_previous_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "meta.json"
    layout.write_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with layout.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    with pytest.raises(RuntimeError):
        with layout.atomic_dir(tmp_path / "export") as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
