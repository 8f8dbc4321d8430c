"""The OpenAI API's `response_format`, checked before anything is generated: plain text, JSON mode
({"type": "json_object"}) or a JSON Schema ({"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}). The server enforces the schema while sampling (serve/structured.py); `mlxtune
eval --response-format` checks its file here before sending a single request."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlxtune.errors import MlxtuneError

# What JSON mode means: any JSON object (OpenAI's json_object never yields a bare array or string).
JSON_OBJECT_SCHEMA = {"type": "object"}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


def check_response_format(value: object, where: str = "response_format") -> dict | None:
    """The JSON Schema `value` asks answers to follow, None for plain text; a MlxtuneError naming
    the first problem (prefixed with `where`) otherwise."""
    if not isinstance(value, dict):
        raise MlxtuneError(f"{where} must be an object like {{\"type\": \"json_object\"}}; got "
                           f"{json.dumps(value)[:60]}")
    kind = value.get("type")
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise MlxtuneError(f"{where}: unknown key {extra[0]!r}; it takes 'type' and, for "
                           "json_schema, 'json_schema'")
    if kind == "text" and "json_schema" not in value:
        return None
    if kind == "json_object" and "json_schema" not in value:
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise MlxtuneError(f"{where}.type must be 'text', 'json_object' or 'json_schema' (with "
                           f"its 'json_schema' only for json_schema); got {json.dumps(kind)}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise MlxtuneError(f"{where}.json_schema must be an object with 'name' and 'schema'")
    unknown = sorted(set(spec) - _SCHEMA_KEYS)
    if unknown:
        raise MlxtuneError(f"{where}.json_schema: unknown key {unknown[0]!r}; it takes "
                           f"{', '.join(sorted(_SCHEMA_KEYS))}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise MlxtuneError(f"{where}.json_schema.name must be 1-64 letters, digits, '_' or '-'; "
                           f"got {json.dumps(name)}")
    if spec.get("strict") not in (None, True, False):
        raise MlxtuneError(f"{where}.json_schema.strict must be true or false")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise MlxtuneError(f"{where}.json_schema.schema must be a JSON Schema object; got "
                           f"{json.dumps(schema)[:60]}")
    check_schema(schema, f"{where}.json_schema.schema")
    return schema


def check_schema(schema: dict, where: str) -> None:
    """Raise a MlxtuneError naming the first place `schema` breaks its JSON Schema meta-schema."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        # The draft the schema names ($schema), else the latest: as a validator would read it.
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        path = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in e.path)
        raise MlxtuneError(f"{where}{path}: {e.message}") from None
    except RecursionError:  # the validator recurses per level; the body parser allows ~1000
        raise MlxtuneError(f"{where}: nested too deeply to check") from None


def read_response_format(path: Path) -> dict:
    """The response_format object in file `path`: either a whole response_format or a bare JSON
    Schema (wrapped as json_schema, named after the file); checked like the server checks it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MlxtuneError(f"--response-format {path}: cannot read it ({e.strerror or e})") \
            from None
    except ValueError as e:
        raise MlxtuneError(f"--response-format {path}: not valid JSON ({e})") from None
    if isinstance(value, dict) and value.get("type") in ("text", "json_object", "json_schema") \
            and set(value) <= {"type", "json_schema"}:
        check_response_format(value, where=f"--response-format {path}: response_format")
        return value
    if not isinstance(value, dict):
        raise MlxtuneError(f"--response-format {path}: expected a JSON object (a JSON Schema or "
                           "a whole response_format)")
    check_schema(value, f"--response-format {path}: schema")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": value, "strict": True}}
