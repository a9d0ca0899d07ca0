"""Strict YAML configuration: `defaults:` composition, dotted overrides, typed dataclass tree.

Each component owns its dataclass next to its code; this module only knows how to fill any
dataclass tree from YAML and reject what does not fit, naming the dotted key and the file.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gpt_vision.errors import ConfigError, UserError
from gpt_vision.layout import write_atomic

COMMAND_LINE = "command line"
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _configs_root(path: Path) -> Path:
    """The nearest enclosing `configs/` folder: `defaults:` entries are relative to it."""
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return path.resolve().parent


def _merge(base: dict, top: dict, sources: dict, source: str, prefix: str = "") -> None:
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, sources, source, dotted + ".")
        else:
            base[key] = value
            _record(value, sources, source, dotted)


def _record(value: Any, sources: dict, source: str, dotted: str) -> None:
    sources[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(sub, sources, source, f"{dotted}.{key}")


def compose_file(path: Path, section_names: set[str], sources: dict, _stack: tuple = ()) -> dict:
    """Load `path` after its `defaults:`; a default under `<section>/` nests into that section."""
    path = Path(path)
    if path.resolve() in _stack:
        raise UserError(f"config file {path} includes itself through defaults: {[str(p) for p in _stack]}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list):
        raise ConfigError("defaults", "must be a list of config files", str(path))
    merged: dict = {}
    root = _configs_root(path)
    for entry in defaults:
        if not isinstance(entry, str):
            raise ConfigError("defaults", f"entries must be strings like 'model/igpt-tiny', got {entry!r}", str(path))
        name = entry if entry.endswith((".yaml", ".yml")) else entry + ".yaml"
        target = (path.parent / name) if name.startswith(".") else (root / name)
        if not target.is_file():
            raise ConfigError("defaults", f"'{entry}' not found (looked for {target})", str(path))
        sub = compose_file(target, section_names, {}, _stack + (path.resolve(),))
        group = Path(entry).parts[0]
        if len(Path(entry).parts) > 1 and group in section_names:
            sub = {group: sub}
        _merge(merged, sub, sources, str(target))
    _merge(merged, data, sources, str(path))
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is a value, not a section", COMMAND_LINE)
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML (so lists and numbers work); `a.b=` is ''."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise UserError(f"override '{text}': '{key}' is not a dotted key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, sources: dict) -> Any:
    """Check `value` against the annotation `tp`, allowing only lossless widenings."""
    source = sources.get(key)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a section (mapping), got {value!r}", source)
        return build(tp, value, sources, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, sources)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(key, " or ".join(errors), source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}", source)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}", source)
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]", sources) if item is not Any else v for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}", source)
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, item, f"{key}.{k}", sources) if item is not Any else v for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads 3e-4 as a string (YAML 1.1); accept it as a number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(key, f"unsupported annotation {tp!r}", source)
    raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", source)


def build(cls: type, values: dict, sources: dict | None = None, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and bad types are errors."""
    sources = sources or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(dotted, f"unknown key (known keys here: {known})", sources.get(dotted))
        kwargs[key] = _coerce(value, hints[key], dotted, sources)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            full = f"{prefix}.{exc.key}" if prefix else exc.key
            raise ConfigError(full, exc.message, exc.source or sources.get(full) or _section_source(sources, prefix)) from None
    return obj


def _section_source(sources: dict, prefix: str) -> str | None:
    """The file that set something in this section, for errors about the section as a whole."""
    files = {src for key, src in sources.items() if key.startswith(prefix + ".") or not prefix}
    return ", ".join(sorted(files)) if files else None


def load_config(cls: type, path: str | os.PathLike | None, overrides: list[str] = ()) -> Any:
    """Compose `path` with its defaults, apply `key=value` overrides, build `cls` strictly."""
    section_names = {name for name, tp in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(tp)}
    sources: dict[str, str] = {}
    tree = compose_file(Path(path), section_names, sources) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        _record(value, sources, COMMAND_LINE, key)
    return build(cls, tree, sources)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (plain YAML, loadable by `load_config`) atomically."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---- the root configs: each section is owned by its component ---------------------------------

from dataclasses import dataclass, field  # noqa: E402

from gpt_vision.checkpoint import CheckpointConfig  # noqa: E402
from gpt_vision.data.config import DataConfig, TokenizerConfig  # noqa: E402
from gpt_vision.model.config import ModelConfig  # noqa: E402
from gpt_vision.parallel.config import ParallelConfig  # noqa: E402
from gpt_vision.slurm import SlurmConfig  # noqa: E402
from gpt_vision.train.config import LoggingConfig, OnlineProbeConfig, OptimConfig, ScheduleConfig, TrainConfig  # noqa: E402


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; written resolved into the run directory."""

    name: str = ""
    # Default: runs/<name>. Checkpoints, TensorBoard, metrics and the resolved config go here.
    run_dir: str = ""
    seed: int = 0
    # Bitwise-reproducible kernels (slower); resume-equality tests turn it on.
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> None:
        if not self.name and not self.run_dir:
            raise ConfigError("name", "is required (the run goes to runs/<name>), or set run_dir")
        if self.model.vocab_size and self.model.vocab_size != self.tokenizer.clusters:
            raise ConfigError(
                "model.vocab_size",
                f"{self.model.vocab_size} differs from tokenizer.clusters={self.tokenizer.clusters} (leave it 0 to follow the palette)",
            )
        if self.schedule.warmup_steps > self.train.steps:
            raise ConfigError("schedule.warmup_steps", f"{self.schedule.warmup_steps} exceeds train.steps={self.train.steps}")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name
