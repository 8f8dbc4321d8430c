"""The OpenAI-compatible HTTP API (FastAPI): models, chat and text completions, adapters, health.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: malformed JSON and bad
parameters 400, a missing or wrong bearer key 401, an unknown model 404. `max_tokens` is clipped
to what fits in the context after the prompt (finish_reason "length" says so); a prompt that
leaves no room at all is refused with 400 (code "context_length_exceeded").
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlxtune.serve.generation import Generator, Job
from mlxtune.serve.registry import AdapterError, AdapterRegistry

DEFAULT_MAX_TOKENS = 512


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code


def _error(status: int, message: str, type_="invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status)


def create_app(registry: AdapterRegistry, api_key: str | None = None,
               max_batch: int = 8) -> FastAPI:
    """The FastAPI app serving `registry`'s base model and adapters (one generation worker)."""
    app = FastAPI(title="mlxtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    generator = Generator(registry, max_batch=max_batch)
    app.state.registry, app.state.generator = registry, generator
    app.router.on_shutdown.append(generator.stop)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        # /health stays open (as in vLLM) so load balancers can probe without the key.
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                              "authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": registry.name,
                "resident_adapters": list(registry.resident)}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": registry.name, "object": "model", "created": now, "owned_by": "mlxtune",
                 "root": str(registry.model_dir), "parent": None}]
        data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "mlxtune",
                  "root": a["path"], "parent": registry.name} for a in registry.describe()]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": registry.describe()}

    async def load_adapter(name, path):
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "send {\"name\": NAME, \"path\": ADAPTER_FOLDER}", param="name")
        try:
            # Loading evaluates MLX arrays: do it on the model's own thread, between steps.
            await asyncio.wrap_future(generator.call(registry.add, name, path))
        except AdapterError as e:
            raise APIError(400, str(e), param="path") from None
        return {"object": "adapter", "name": name, "path": path, "status": "loaded"}

    async def unload_adapter(name):
        try:
            registry.remove(name)
        except AdapterError as e:
            raise APIError(404, str(e), "not_found_error", "name", "model_not_found") from None
        return {"object": "adapter", "name": name, "status": "unloaded"}

    @app.post("/v1/adapters")
    async def post_adapter(request: Request):
        body = await _json(request)
        return await load_adapter(body.get("name"), body.get("path"))

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        return await unload_adapter(name)

    # vLLM's names for the same two operations.
    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request):
        body = await _json(request)
        return await load_adapter(body.get("lora_name"), body.get("lora_path"))

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request):
        body = await _json(request)
        return await unload_adapter(body.get("lora_name"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or \
                not all(isinstance(m, dict) and "role" in m for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects",
                           param="messages")
        return await _complete(request, body, _chat_prompt(registry.tokenizer, messages), True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        return await _complete(request, body, _encode(registry.tokenizer, prompt), False)

    async def _complete(request: Request, body: dict, prompt: list[int], chat: bool):
        job = _job(registry, body, prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        generator.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": n,
                    "total_tokens": len(prompt) + n}

        obj = "chat.completion" if chat else "text_completion"

        def choice(text, finish, delta=False):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if delta else "message"
            content = {"role": "assistant", "content": text} if not delta or text is not None \
                else {}
            return {"index": 0, key: content, "logprobs": None, "finish_reason": finish}

        if not body.get("stream"):
            text = ""
            while True:
                event = await events.get()
                if event[0] == "text":
                    text += event[1]
                elif event[0] == "error":
                    raise _as_api_error(event[1])
                else:
                    return {"id": rid, "object": obj, "created": created, "model": job.model,
                            "choices": [choice(text, event[1])], "usage": usage(event[2])}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def sse():
            try:
                while True:
                    event = await events.get()
                    if event[0] == "error":
                        err = {"message": str(event[1]), "type": "server_error",
                               "param": None, "code": None}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        break
                    text, finish = (event[1], None) if event[0] == "text" else (None, event[1])
                    if chat or text is not None:
                        c = choice(text if text is not None else ("" if not chat else None),
                                   finish, delta=True)
                        yield "data: " + json.dumps({"id": rid, "object": chunk_obj,
                                                     "created": created, "model": job.model,
                                                     "choices": [c]}) + "\n\n"
                    elif finish:
                        yield "data: " + json.dumps({"id": rid, "object": chunk_obj,
                                                     "created": created, "model": job.model,
                                                     "choices": [choice("", finish)]}) + "\n\n"
                    if finish:
                        if include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": chunk_obj,
                                                         "created": created, "model": job.model,
                                                         "choices": [],
                                                         "usage": usage(event[2])}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client that went away frees its batch row

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, AdapterError):
        return APIError(404 if "no model" in str(e) else 400, str(e), param="model")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default, lo, hi, kind=float):
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and value != int(value)) or not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'} "
                       f"from {lo} to {hi}; got {value!r}", param=key)
    return kind(value)


def _job(registry: AdapterRegistry, body: dict, prompt: list[int]) -> Job:
    """Check a request's fields against the served models and the context; build its Job."""
    model = body.get("model")
    names = registry.names()
    if not isinstance(model, str) or model not in names:
        raise APIError(404, f"the model {model!r} does not exist; serving: {', '.join(names)}",
                       "not_found_error", "model", "model_not_found")
    context = registry.context_length
    if len(prompt) >= context:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is "
                       f"{context} tokens, so at most {context - 1} fit with room to answer",
                       param="messages", code="context_length_exceeded")
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": requested}, "max_tokens", DEFAULT_MAX_TOKENS, 1,
                         10**9, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", 0, 0, 2**63 - 1, int)
    return Job(model=model, prompt=prompt,
               # Clipped, not refused, to the room left in the context (finish_reason "length").
               max_tokens=min(max_tokens, context - len(prompt)),
               temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
               top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=stop)


def _encode(tokenizer, text: str) -> list[int]:
    # As mlx-lm's generate does: add the BOS token unless the text already starts with it.
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))


def _chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    messages = [{**m, "content": _content(m.get("content"))} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # jinja errors from a template that rejects these messages
            raise APIError(400, f"the chat template rejected the messages: {e}",
                           param="messages") from None
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return _encode(tokenizer, text)


def _content(content) -> str:
    # OpenAI allows content as a list of parts; only text parts mean anything to a text model.
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
