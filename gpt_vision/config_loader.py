"""The generic YAML config loader: `defaults:` composition, dotted overrides, strict dataclass building.

Each component owns its dataclass next to its code and the root configs live in `run_configs`;
this module only knows how to fill any dataclass tree from YAML and reject what does not fit,
naming the dotted key and the file. It imports nothing of the package but `errors`.
"""
from __future__ import annotations

import dataclasses
import math
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
# Spellings of nan/inf that YAML leaves as strings (`nan`, `inf`, `-Infinity`); `.nan`/`.inf` load as floats.
_NONFINITE_RE = re.compile(r"^[+-]?(nan|inf|infinity)$", re.IGNORECASE)


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
    """The nearest enclosing `configs/` folder (a copied configs tree keeps its own presets)."""
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return path.resolve().parent


def shipped_configs() -> Path:
    """The presets shipped with the package: the checkout's `configs/`, or `gpt_vision/configs` once installed."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "configs"
    if (package.parent / "setup.py").is_file() and checkout.is_dir():
        return checkout
    return package / "configs"


def default_search_path(path: Path) -> list[Path]:
    """Where a `defaults:` entry of the config file `path` is looked up, in order."""
    places: list[Path] = []
    for place in (path.resolve().parent, _configs_root(path), shipped_configs()):
        if place not in places:
            places.append(place)
    return places


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
    for entry in defaults:
        if not isinstance(entry, str):
            raise ConfigError("defaults", f"entries must be strings like 'model/igpt-tiny', got {entry!r}", str(path))
        name = entry if entry.endswith((".yaml", ".yml")) else entry + ".yaml"
        places = [path.resolve().parent] if name.startswith(".") else default_search_path(path)
        target = next((place / name for place in places if (place / name).is_file()), None)
        if target is None:
            looked = ", ".join(str(place / name) for place in places)
            raise ConfigError("defaults", f"'{entry}' not found (looked for {looked})", str(path))
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
    source = sources.get(key) or sources.get(re.sub(r"(\[\d+\])+$", "", key))  # a list item: the list's file
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and (_FLOAT_RE.match(value.strip()) or _NONFINITE_RE.match(value.strip())):
            number = float(value)  # PyYAML reads 3e-4 as a string (YAML 1.1); accept it as a number
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(key, f"must be a finite number, got {value!r}", source)
            return number
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
