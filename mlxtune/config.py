"""Typed configs: dataclasses loaded from YAML and `--set a.b=value`, every problem reported at once.

Precedence is defaults < YAML < overrides, and all three go through the same checks. An error
names the file and line (or the override), the dotted key, and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mlxtune.errors import ConfigError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
            max: float | None = None, factory: Any = None) -> Any:
    """A dataclass field with a help text and an optional range, for the config schemas."""
    meta = {"help": help, "min": min, "max": max}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Problems:
    """Collects problems with the place each one comes from."""

    def __init__(self, lines: dict[str, str]):
        self.lines = lines
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        # An override or a YAML line for this key, else the nearest parent that has one.
        parts = key.split(".")
        where = None
        while parts and where is None:
            where = self.lines.get(".".join(parts))
            parts.pop()
        where = where or self.lines.get("", "config")
        self.items.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    """The YAML mapping in `path` and, for every dotted key, 'file:line' where it is set."""
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{path}{line}: not valid YAML: {reason}"]) from None
    if data is None:
        return {}, {"": str(path)}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the config must be a mapping of keys to values"])
    lines: dict[str, str] = {"": str(path)}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[key] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key)

    walk(root, "")
    return data, lines


def _apply_override(data: dict, lines: dict[str, str], override: str, problems: list[str]) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"--set {override}: expected key=value, e.g. --set lora_parameters.rank=16")
        return
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    for i in range(1, len(parts) + 1):
        lines[".".join(parts[:i])] = "--set"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


_NO = object()


def _convert(value: Any, tp: Any, key: str, problems: _Problems) -> Any:
    """`value` as type `tp`, or _NO after recording why it is not."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.add(key, f"expected a mapping of {', '.join(_field_names(tp))}, got {value!r}")
            return _NO
        return _build(tp, value, key, problems)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = [str(a) for a in typing.get_args(tp)]
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        problems.add(key, f"expected {_type_name(tp)}, got {value!r}{hint}")
        return _NO
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.add(key, f"expected {_type_name(tp)}, got {value!r}")
            return _NO
        items = [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]", problems)
                 for i, v in enumerate(value)]
        return _NO if any(v is _NO for v in items) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.add(key, f"expected a mapping, got {value!r}")
            return _NO
        return value
    out = _convert_scalar(value, tp)
    if out is _NO:
        problems.add(key, f"expected {_type_name(tp)}, got {value!r}")
    return out


def _convert_union(value: Any, tp: Any, key: str, problems: _Problems) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    real = [a for a in args if a is not type(None)]
    if len(real) == 1:
        # Optional[X]: X's own checks say more than "expected X or None".
        return _convert(value, real[0], key, problems)
    for arg in real:
        scratch = _Problems({})
        out = _convert(value, arg, key, scratch)
        if out is not _NO and not scratch.items:
            return out
    problems.add(key, f"expected {_type_name(tp)}, got {value!r}")
    return _NO


def _convert_scalar(value: Any, tp: Any) -> Any:
    """`value` as bool, int, float, str (or Any), or _NO."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        # PyYAML reads 1e-5 (no dot) as a string; mlx-lm configs are full of those.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    return _NO


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _build(schema: type, data: dict, prefix: str, problems: _Problems) -> Any:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            near = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(fields)}"
            problems.add(key, f"unknown key{hint}")
            continue
        out = _convert(value, hints[name], key, problems)
        if out is _NO:
            continue
        low, high = fields[name].metadata.get("min"), fields[name].metadata.get("max")
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            if low is not None and out < low:
                problems.add(key, f"must be at least {low}, got {out}")
                continue
            if high is not None and out > high:
                problems.add(key, f"must be at most {high}, got {out}")
                continue
        values[name] = out
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            if name not in data:
                problems.add(f"{prefix}.{name}" if prefix else name, "required key is missing")
    try:
        obj = schema(**values)
    except TypeError:
        return _NO
    check = getattr(obj, "check", None)
    for key, message in (check() if check else []):
        problems.add(f"{prefix}.{key}" if prefix else key, message)
    return obj


def load_config(schema: type, path: str | Path | None = None, overrides: list[str] = (),
                data: dict | None = None) -> Any:
    """Build `schema` from defaults, the YAML file at `path` (or `data`), then `--set` overrides."""
    lines: dict[str, str] = {"": str(path) if path else "config"}
    if path is not None:
        data, lines = _read_yaml(Path(path))
    data = dict(data or {})
    syntax: list[str] = []
    for override in overrides:
        _apply_override(data, lines, override, syntax)
    problems = _Problems(lines)
    problems.items.extend(syntax)
    obj = _build(schema, data, "", problems)
    if problems.items:
        raise ConfigError(problems.items)
    return obj


def config_to_dict(obj: Any) -> dict:
    """A config as plain data, for saving beside the outputs it produced."""
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from mlxtune.atomic import write_text

    write_text(path, yaml.safe_dump(config_to_dict(obj), sort_keys=False))


def describe_schema(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key of `schema`, nested ones included."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        nested = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if dataclasses.is_dataclass(default):
            default = ""
        rows.append((key, "" if default is None and nested else repr(default),
                     f.metadata.get("help", "")))
        if nested:
            rows.extend(describe_schema(nested, key))
    return rows
