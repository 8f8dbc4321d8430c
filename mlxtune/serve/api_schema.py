"""The OpenAPI document of `mlxtune serve` (/openapi.json): FastAPI's own, with every request body
and answer described. The endpoints read their bodies by hand (requests.py checks each field and
names the one it refuses), so the bodies are described here, built from requests.py's field
tables: a field added there without a description here shows up as undocumented
(`undocumented_fields`), and what the document allows is what the server accepts.
"""

from __future__ import annotations

import json

from fastapi.openapi.utils import get_openapi

from mlxtune import __version__
from mlxtune.serve.requests import (ADAPTER_FIELDS, CHAT_FIELDS, COMPLETION_FIELDS, LIMITS,
                                    MAX_ADAPTER_SCALE, MAX_STOP, MAX_TOP_LOGPROBS, NEUTRAL,
                                    PASSIVE)

_JSON_TYPES = {str: "string", dict: "object", bool: "boolean", int: "integer", float: "number"}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "description": "system, user, assistant, ... (the chat template "
                                              "decides what it accepts)"},
    "content": {"anyOf": [{"type": "string"}, {"type": "null"},
                          {"type": "array", "items": _TEXT_PART}]}}}

# The honoured fields; NEUTRAL and PASSIVE fields are described from their tables.
_FIELDS = {
    "model": {"type": "string", "description": "the base model or an adapter (GET /v1/models)"},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "stop": {"anyOf": [{"type": "null"}, {"type": "string"},
                       {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string"}}]},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"anyOf": [{"type": "null"}, {
        "type": "object", "additionalProperties": False,
        "properties": {"include_usage": {"type": ["boolean", "null"]}}}]},
    "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                     "description": "alternatives per token; needs logprobs: true"},
    "adapter_scale": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_ADAPTER_SCALE,
                      "description": "this server's extension: scales the named adapter's "
                                     "update (0: the base's answer, 1: as trained); not for the "
                                     "base model or a DoRA adapter"},
    "response_format": {"anyOf": [
        {"type": "null"},
        {"type": "object", "additionalProperties": False, "required": ["type"],
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "additionalProperties": False, "required": ["type", "json_schema"],
         "properties": {"type": {"const": "json_schema"}, "json_schema": {
             "type": "object", "additionalProperties": False, "required": ["name", "schema"],
             "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                            "description": {}, "strict": {"type": ["boolean", "null"]},
                            "schema": {"type": "object", "description": "a JSON Schema the "
                                       "answer is constrained to"}}}}}]},
}
# logprobs differs per endpoint, as in OpenAI's API.
_LOGPROBS = {"chat": {"type": ["boolean", "null"]},
             "text": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                      "description": "alternatives per token (0: the chosen token's only)"}}
_NOTES = {"max_tokens": "clipped to the room the prompt leaves in the context",
          "max_completion_tokens": "the newer name of max_tokens; wins when both are sent",
          "seed": "a seeded request runs alone, so the seed reproduces its answer"}


def _prompt(vocab: int | None) -> dict:
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    if vocab:
        ids["items"]["maximum"] = vocab - 1
    return {"description": "a string, a list of strings, token ids or lists of token ids (one "
                           "choice each); a single prompt when streaming",
            "anyOf": [{"type": "string"}, ids, {"type": "array", "minItems": 1, "items": {
                "anyOf": [{"type": "string"}, ids]}}]}


def _limit(key: str) -> dict:
    lo, hi, kind = LIMITS[key]
    schema = {"type": [_JSON_TYPES[kind], "null"], "minimum": lo, "maximum": hi}
    return {**schema, "description": _NOTES[key]} if key in _NOTES else schema


def _neutral(values: tuple) -> dict:
    # JSON Schema's enum compares 0 and 0.0 as equal and wants its items unique.
    unique = {(type(v) is bool, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list))
               else v): v for v in values}
    return {"enum": list(unique.values()),
            "description": "not supported: accepted only at this neutral value"}


def field_schema(key: str, vocab: int | None = None, chat: bool = True) -> dict | None:
    """The JSON schema of body field `key` of a chat (or text) completion request (token ids
    below `vocab`), None if undocumented."""
    if key == "prompt":
        return _prompt(vocab)
    if key == "logprobs":
        return _LOGPROBS["chat" if chat else "text"]
    if key in _FIELDS:
        return _FIELDS[key]
    if key in LIMITS:
        return _limit(key)
    if key in NEUTRAL:
        return _neutral(NEUTRAL[key])
    if key in PASSIVE:
        return {"type": [_JSON_TYPES[PASSIVE[key][0]], "null"], "description": "recorded nowhere"}
    return None


def undocumented_fields() -> set[str]:
    """Fields the completion endpoints accept that this document does not describe."""
    return {k for k in CHAT_FIELDS | COMPLETION_FIELDS | set(NEUTRAL) if field_schema(k) is None}


def _request(fields: set[str], required: list[str], names: list[str], vocab) -> dict:
    chat = "messages" in fields
    properties = {k: field_schema(k, vocab, chat) or {} for k in sorted(fields | set(NEUTRAL))}
    properties["model"] = {**_FIELDS["model"], "enum": names}  # served now; others get 404
    return {"type": "object", "required": required, "properties": properties,
            "additionalProperties": False}


def _adapter_request(kind: str) -> dict:
    names = ADAPTER_FIELDS[kind]
    return {"type": "object", "required": list(names), "additionalProperties": False,
            "properties": {n: {"type": "string", "minLength": 1} for n in names}}


def _object(required: dict, **optional) -> dict:
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


_STR, _INT = {"type": "string"}, {"type": "integer"}
_NULLABLE_STR = {"type": ["string", "null"]}
_ERROR = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
    "error": {"type": "object", "additionalProperties": False,
              "required": ["message", "type", "param", "code"],
              "properties": {"message": _STR, "type": _STR, "param": _NULLABLE_STR,
                             "code": _NULLABLE_STR}}}}
ERROR = {"$ref": "#/components/schemas/Error"}
_USAGE = _object({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT})
_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", None]}
_CHOICE = {"index": _INT, "finish_reason": _FINISH, "logprobs": {"type": ["object", "null"]}}
_MESSAGE_OUT = _object({"role": {"const": "assistant"}, "content": _STR})


def _array(item: dict) -> dict:
    return {"type": "array", "items": item}


def _completion(kind: str, choice: dict) -> dict:
    return _object({"id": _STR, "object": {"const": kind}, "created": _INT, "model": _STR,
                    "choices": _array(_object({**_CHOICE, **choice})), "usage": _USAGE})


def _list(item: dict) -> dict:
    return _object({"object": {"const": "list"}, "data": _array(item)})


_CHAT = _completion("chat.completion", {"message": _MESSAGE_OUT})
_TEXT = _completion("text_completion", {"text": _STR})
_MODELS = _list(_object({"id": _STR, "object": {"const": "model"}, "created": _INT,
                         "owned_by": _STR, "root": _STR, "parent": _NULLABLE_STR}))
_ADAPTERS = _list(_object({"name": _STR, "path": _STR, "rank": _INT, "type": _STR,
                           "resident": {"type": "boolean"},
                           "in_host_memory": {"type": "boolean"}}))
_ADAPTER = _object({"object": {"const": "adapter"}, "name": _STR,
                    "status": {"enum": ["loaded", "unloaded"]}}, path=_STR)
_HEALTH = _object({"status": {"const": "ok"}, "model": _STR,
                   "resident_adapters": _array(_STR), "requests_in_progress": _INT})

_WHY = {400: "a malformed body, a bad value or an unsupported field (named in 'param')",
        401: "a missing or wrong API key", 404: "no such model or adapter",
        408: "not finished within --request-timeout",
        413: "a body over 4 MB", 429: "past --max-batch + --max-queue requests in progress",
        500: "generation failed (a server bug)"}


def _answers(ok: dict | None, errors: list[int], stream: bool = False) -> dict:
    # No `ok` schema: Prometheus's text format (/metrics).
    content = {"application/json": {"schema": ok}} if ok else {"text/plain": {"schema": _STR}}
    if stream:  # "stream": true answers with server-sent events (the schema is one event's)
        content["text/event-stream"] = {"schema": _object({"data": {
            "type": "string", "description": "a JSON chunk, at most one final {\"error\": ...} "
                                             "object, then [DONE]"}})}
    answers = {"200": {"description": "OK", "content": content}}
    for status in errors:
        answers[str(status)] = {"description": _WHY[status],
                                "content": {"application/json": {"schema": ERROR}}}
    if 429 in errors:
        answers["429"]["headers"] = {"Retry-After": {"required": True, "description": "seconds",
                                                     "schema": {"type": "string",
                                                                "pattern": "^[0-9]+$"}}}
    return answers


def build_document(routes, names: list[str], secured: bool, vocab: int | None = None) -> dict:
    """FastAPI's document for `routes`, with each operation's body and answers described
    (`names`: the models served, `vocab`: the model's vocabulary size, if known)."""
    doc = get_openapi(title="mlxtune serve", version=__version__, routes=routes,
                      description="An OpenAI-compatible API: one base model, many LoRA adapters.")
    auth = [401] if secured else []
    generate = [400, *auth, 404, 408, 413, 429, 500]
    chat = _request(CHAT_FIELDS, ["model", "messages"], names, vocab)
    text = _request(COMPLETION_FIELDS, ["model", "prompt"], names, vocab)
    bodies = {("/v1/chat/completions", "post"): (chat, _answers(_CHAT, generate, True)),
              ("/v1/completions", "post"): (text, _answers(_TEXT, generate, True)),
              ("/v1/adapters", "post"): (_adapter_request("load"),
                                         _answers(_ADAPTER, [400, *auth, 413])),
              ("/v1/load_lora_adapter", "post"): (_adapter_request("vllm_load"),
                                                  _answers(_ADAPTER, [400, *auth, 413])),
              ("/v1/unload_lora_adapter", "post"): (_adapter_request("vllm_unload"),
                                                    _answers(_ADAPTER, [400, *auth, 404, 413])),
              ("/v1/adapters/{name}", "delete"): (None, _answers(_ADAPTER, [*auth, 404])),
              ("/v1/models", "get"): (None, _answers(_MODELS, auth)),
              ("/metrics", "get"): (None, _answers(None, auth)),
              ("/v1/adapters", "get"): (None, _answers(_ADAPTERS, auth)),
              ("/health", "get"): (None, _answers(_HEALTH, []))}
    for (path, method), (body, answers) in bodies.items():
        operation = doc["paths"][path][method]
        if body is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": body}}}
        operation["responses"] = answers  # FastAPI's are a bare 200 and a 422 we never send
        if secured and path == "/health":
            operation["security"] = []  # open, so load balancers can probe it
    doc["components"] = {"schemas": {"Error": _ERROR}}  # FastAPI's were the unused 422's
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def describe_api(app, registry, secured: bool) -> None:
    """Serve build_document at app's /openapi.json, naming the models served at that moment."""
    vocab = registry.config.get("vocab_size")
    app.openapi = lambda: build_document(app.routes, registry.names(), secured,
                                         vocab if isinstance(vocab, int) else None)
