"""What a request may ask for, checked before it reaches the model: every field either works as
the OpenAI API defines it or is refused with a 400 that names it (never silently ignored), bodies
are bounded in size and nesting before they are parsed, and prompts come in every shape the API
allows (a string, a list of strings, token ids, lists of token ids). The OpenAPI document
(api_schema.py) is built from the same tables, so what it says and what is checked cannot drift.
A request also has a deadline (--request-timeout): past it, 408."""

from __future__ import annotations

import asyncio
import json
import math
import time

from mlxtune.errors import MlxtuneError
from mlxtune.response_format import check_response_format
from mlxtune.serve.generation import Job
from mlxtune.serve.registry import AdapterRegistry

DEFAULT_MAX_TOKENS = 512
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds; the openai client's own default, so we never outwait it
MAX_BODY_BYTES = 4 << 20  # a long prompt is well under this; beyond it, 413 before parsing

# Fields that change nothing here (identifiers, bookkeeping), with the JSON type each must have.
PASSIVE = {"user": (str,), "metadata": (dict,), "store": (bool,), "service_tier": (str,)}
_PASSIVE = set(PASSIVE)
_JSON_TYPE = {str: "string", dict: "JSON object", bool: "boolean"}
# adapter_scale is this server's extension (llama-server's per-request `lora` scale, for the one
# adapter the request names): 0 gives the base's answer, 1 the adapter as trained.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "stream",
           "stream_options", "response_format", "logprobs", "adapter_scale"} | _PASSIVE
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt"}
MAX_TOP_LOGPROBS = 20
MAX_ADAPTER_SCALE = 10.0
# Fields clients often send at their neutral value: accepted at that value, refused otherwise.
_NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
            "echo": (False,), "best_of": (1,), "suffix": (None, ""),
            "parallel_tool_calls": (True, False), "tool_choice": ("none",), "tools": ([],),
            "n": (1, None)}
NEUTRAL = _NEUTRAL  # the public name, for api_schema.py
# Numeric fields: (lowest, highest, int or float); null means the default.
LIMITS = {"max_tokens": (1, 10**9, int), "max_completion_tokens": (1, 10**9, int),
          "temperature": (0.0, 2.0, float), "top_p": (0.0, 1.0, float), "seed": (0, 2**63 - 1, int)}
MAX_STOP = 4
# The adapter endpoints' bodies: ours and vLLM's names for the same (name, path).
ADAPTER_FIELDS = {"load": ("name", "path"), "vllm_load": ("lora_name", "lora_path"),
                  "vllm_unload": ("lora_name",)}


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code
        self.headers = headers


def check_body_size(size: int) -> None:
    """413 for a body over MAX_BODY_BYTES."""
    if size > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {size} bytes; at most {MAX_BODY_BYTES} are "
                       "accepted", code="request_too_large")


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body, or a 400/413 APIError saying why not."""
    check_body_size(len(raw))
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") \
            from None
    except RecursionError:  # Python's parser gives up near 1000 levels
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _not_json(name: str):
    # Python's parser takes NaN and Infinity; JSON has neither, and no field here means them.
    raise ValueError(f"{name} is not a JSON value")


def check_fields(body: dict, allowed: set[str]) -> None:
    """Refuse, naming it, any field this server would otherwise ignore."""
    for key, value in body.items():
        if key in allowed and key not in _NEUTRAL:
            continue
        if key in _NEUTRAL and any(value == v and type(value) is type(v) or value is v
                                   for v in _NEUTRAL[key]):
            continue
        what = "is not supported by this server" if key in _NEUTRAL or key.startswith(
            ("tool", "function")) else "is not a field of this endpoint"
        raise APIError(400, f"'{key}' {what} (got {json.dumps(value)[:60]}); remove it",
                       param=key, code="unsupported_parameter")
    for key, types in PASSIVE.items():
        value = body.get(key)
        if value is not None and not isinstance(value, types):
            raise APIError(400, f"'{key}' must be a {_JSON_TYPE[types[0]]} or null", param=key)


def adapter_fields(body: dict, kind: str) -> list[str]:
    """The string fields of an adapter request (ADAPTER_FIELDS[kind]), each checked; any other
    field is refused by name, as on the completion endpoints."""
    names = ADAPTER_FIELDS[kind]
    for key in body:
        if key not in names:
            raise APIError(400, f"'{key}' is not a field of this endpoint; send "
                           f"{', '.join(names)}", param=key, code="unsupported_parameter")
    for key in names:
        if not isinstance(body.get(key), str) or not body[key]:
            raise APIError(400, f"'{key}' must be a non-empty string; send "
                           + json.dumps({n: n.rsplit("_", 1)[-1].upper() for n in names}),
                           param=key)
    return [body[key] for key in names]


def chat_messages(messages: object) -> list[dict]:
    """`messages` checked: a non-empty list of {role, content} objects, each role a string and
    each content a string, null or a list of text parts (other parts would be dropped unseen)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects",
                       param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content):
            raise APIError(400, f"messages[{i}].content must be a string, null or a list of "
                           "{\"type\": \"text\", \"text\": ...} parts (this model reads text "
                           "only)", param=f"messages[{i}].content")
    return messages


def stream_settings(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) of a request, each a boolean or absent."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false; got {json.dumps(stream)[:40]}",
                       param="stream")
    if options is None:
        return bool(stream), False
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(usage, (bool, type(None))):
        raise APIError(400, "'stream_options' must be {\"include_usage\": true or false}",
                       param="stream_options")
    return bool(stream), bool(usage)


def completion_prompts(prompt: object, encode) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions request: a string, a list of strings, a list
    of token ids, or a list of such lists."""
    def ids(p):
        if isinstance(p, str):
            return encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                             and t >= 0 for t in p):
            return list(p)
        return None

    one = ids(prompt)
    if one is not None:
        return [one]
    many = [ids(p) for p in prompt] if isinstance(prompt, list) and prompt else [None]
    if any(p is None for p in many):
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids "
                       "or a list of token-id lists", param="prompt")
    return many


def number(body: dict, key: str, default, lo=None, hi=None, kind=None):
    """body[key] (or `default`) checked to be a number in [lo, hi] (LIMITS[key] by default)."""
    if lo is None:
        lo, hi, kind = LIMITS[key]
    kind = kind or float
    value = body.get(key, default)
    if value is None:
        value = default
    # Finite first: int() of an inf (1e400 parses to one) or NaN raises.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or (kind is int and value != int(value)) or \
            not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'} "
                       f"from {lo} to {hi}; got {value!r}", param=key)
    return kind(value)


def top_logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token a request wants logprobs for (0: the chosen token's
    only), or None for no logprobs: chat's logprobs + top_logprobs, or completions' logprobs."""
    if not chat:
        if body.get("logprobs") is None:
            return None
        return number(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, int)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError(400, f"'logprobs' must be true or false; got {wanted!r}", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        top = number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, int)
        if not wanted:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def adapter_scale(registry: AdapterRegistry, body: dict, model: str) -> float:
    """The request's adapter_scale (1.0 when absent), refused where it cannot apply."""
    if body.get("adapter_scale") is None:
        return 1.0
    scale = number(body, "adapter_scale", 1.0, 0.0, MAX_ADAPTER_SCALE)
    adapter = registry.find(model)
    if adapter is None:
        raise APIError(400, f"'adapter_scale' scales an adapter; {model!r} is the base model",
                       param="adapter_scale")
    if adapter.kind == "dora" and scale != 1.0:
        # DoRA's magnitude factor is fixed for the trained scale; another scale is not DoRA.
        raise APIError(400, f"'adapter_scale' is not supported for the DoRA adapter {model!r}",
                       param="adapter_scale", code="unsupported_parameter")
    return scale


def make_job(registry: AdapterRegistry, body: dict, prompt: list[int], chat: bool = True) -> Job:
    """Check a request's fields against the served models and the context; build its Job."""
    model = body.get("model")
    names = registry.names()
    if not isinstance(model, str) or model not in names:
        raise APIError(404, f"the model {model!r} does not exist; serving: {', '.join(names)}",
                       "not_found_error", "model", "model_not_found")
    context = registry.context_length
    param = "messages" if "messages" in body else "prompt"
    if not prompt:  # the generator has nothing to start from; it would never answer
        raise APIError(400, "the prompt is empty (0 tokens); send at least one token",
                       param=param)
    if len(prompt) >= context:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is "
                       f"{context} tokens, so at most {context - 1} fit with room to answer",
                       param=param, code="context_length_exceeded")
    vocab = registry.config.get("vocab_size")
    if isinstance(vocab, int) and max(prompt, default=0) >= vocab:
        raise APIError(400, f"token id {max(prompt)} is outside this model's vocabulary of "
                       f"{vocab}", param="prompt")
    # Both are checked; the newer name wins when both are sent.
    limits = [number(body, k, None) for k in ("max_completion_tokens", "max_tokens")
              if body.get(k) is not None]
    max_tokens = limits[0] if limits else DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or \
            len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOP} strings",
                       param="stop")
    seed = body.get("seed")
    if seed is not None:
        seed = number(body, "seed", 0)
    return Job(model=model, prompt=prompt,
               # Clipped, not refused, to the room left in the context (finish_reason "length").
               max_tokens=min(max_tokens, context - len(prompt)),
               temperature=number(body, "temperature", 1.0),
               top_p=number(body, "top_p", 1.0), seed=seed, stop=stop,
               top_logprobs=top_logprobs(body, chat),
               adapter_scale=adapter_scale(registry, body, model),
               logits_processors=response_processors(registry, body.get("response_format")))


def response_processors(registry: AdapterRegistry, response_format) -> list:
    """The logits processors one row needs for `response_format` (none for plain text)."""
    if response_format is None:
        return []
    from mlxtune.serve.structured import grammar_mask

    try:
        schema = check_response_format(response_format)
        if schema is None:
            return []
        vocab = registry.config.get("vocab_size") or len(registry.tokenizer.vocab)
        return [grammar_mask(registry.tokenizer, vocab, schema)]
    except MlxtuneError as e:
        raise APIError(400, str(e), param="response_format",
                       code="invalid_response_format") from None


def timeout_error(seconds: float) -> APIError:
    """The 408 of a request that ran past --request-timeout."""
    return APIError(408, f"the request did not finish within --request-timeout {seconds:g} s; "
                    "ask for fewer tokens or retry when the server is less busy", "timeout_error",
                    code="request_timeout")


async def next_event(events: asyncio.Queue, deadline: float, timeout: float,
                     poll: float | None = None):
    """A job's next event, or None when `poll` seconds pass without one; past `deadline`
    (time.monotonic()) the 408 of `timeout` seconds instead."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error(timeout)
    try:
        return await asyncio.wait_for(events.get(), min(left, poll or left))
    except asyncio.TimeoutError:
        if time.monotonic() >= deadline:
            raise timeout_error(timeout) from None
        return None
