"""The OpenAI-compatible HTTP API (FastAPI): models, chat and text completions, adapters, health.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: malformed JSON, bad
parameters and fields this server does not honour 400 (named, never ignored: requests.py), a
missing or wrong bearer key 401, an unknown model 404, a body over 4 MB 413, and past --max-batch +
--max-queue requests in progress 429 with Retry-After. `max_tokens` is clipped
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
from mlxtune.serve.playground import add_playground
from mlxtune.serve.registry import AdapterError, AdapterRegistry
from mlxtune.serve.requests import (CHAT_FIELDS, COMPLETION_FIELDS, MAX_BODY_BYTES, APIError,
                                    check_body_size, check_fields, completion_prompts, make_job,
                                    parse_body)

def _error(status: int, message: str, type_="invalid_request_error", param=None, code=None,
           headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def create_app(registry: AdapterRegistry, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, ui: bool = True) -> FastAPI:
    """The FastAPI app serving `registry`'s base model and adapters (one generation worker);
    past `max_batch` + `max_queue` requests in progress, new ones get 429 with Retry-After;
    the playground page at / unless `ui` is False."""
    app = FastAPI(title="mlxtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    generator = Generator(registry, max_batch=max_batch)
    app.state.registry, app.state.generator = registry, generator
    app.router.on_shutdown.append(generator.stop)

    if api_key is not None:
        app.add_middleware(KeyCheck, api_key=api_key)
    if ui:
        add_playground(app)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    busy = {"requests": 0}  # requests admitted and not yet answered (the event loop's own)

    def admit(n: int) -> None:
        if busy["requests"] + n > max_batch + max_queue:
            raise APIError(429, f"the server is busy ({busy['requests']} requests in progress, "
                           f"--max-queue {max_queue}); retry shortly", "rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"})
        busy["requests"] += n

    def release(n: int) -> None:
        busy["requests"] -= n

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": registry.name,
                "resident_adapters": list(registry.resident),
                "requests_in_progress": busy["requests"]}

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
        check_fields(body, CHAT_FIELDS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or \
                not all(isinstance(m, dict) and "role" in m for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects",
                           param="messages")
        return await complete(request, body, [_chat_prompt(registry.tokenizer, messages)], True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        check_fields(body, COMPLETION_FIELDS)
        prompts = completion_prompts(body.get("prompt"),
                                     lambda text: _encode(registry.tokenizer, text))
        if body.get("stream") and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt; send the others as their own "
                           "requests", param="prompt")
        return await complete(request, body, prompts, False)

    async def complete(request: Request, body: dict, prompts: list[list[int]], chat: bool):
        jobs = [make_job(registry, body, p) for p in prompts]
        admit(len(jobs))
        reply = Reply(chat, jobs[0].model)
        queues = [_submit(generator, job) for job in jobs]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(reply.stream(jobs[0], queues[0], include_usage,
                                                  lambda: release(1)),
                                     media_type="text/event-stream")
        try:
            results = [await _result(request, job, q) for job, q in zip(jobs, queues)]
        finally:
            for job in jobs:
                job.cancelled = True  # finished ones are gone already; the rest stop now
            release(len(jobs))
        return reply.whole(jobs, results)

    return app


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, AdapterError):
        return APIError(404 if "no model" in str(e) else 400, str(e), param="model")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


class KeyCheck:
    """ASGI middleware: 401 unless 'Authorization: Bearer KEY'. /health stays open (as in vLLM)
    so load balancers can probe without the key, and so does the playground page at / (static;
    it asks for the key and sends it with its API calls). Plain ASGI, not Starlette's
    BaseHTTPMiddleware, which hides a client's disconnect from the endpoint (its batch row would
    run on)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in ("/health", "/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer "
                                  "KEY'", "authentication_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json(request: Request) -> dict:
    # Read to the end (a client cut off mid-send sees a reset, not the 413) but keep at most
    # MAX_BODY_BYTES: memory stays bounded whatever is sent.
    kept, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            kept.append(chunk)
    check_body_size(size)
    return parse_body(b"".join(kept))


def _submit(generator: Generator, job: Job) -> asyncio.Queue:
    """Queue `job` on the generator; its events arrive on the returned queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    generator.submit(job)
    return events


async def _result(request: Request, job: Job, events: asyncio.Queue) -> tuple[str, str, int]:
    """(text, finish reason, tokens) of a job; stops it if the client goes away meanwhile."""
    text = ""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True  # frees its batch row at the next step
                raise APIError(499, "the client closed the request", code="client_closed") \
                    from None
            continue
        if event[0] == "text":
            text += event[1]
        elif event[0] == "error":
            raise _as_api_error(event[1])
        else:
            return text, event[1], event[2]


class Reply:
    """How a request's results become OpenAI response objects, whole or as server-sent events."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def choice(self, text, finish, index=0, delta=False) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        content = {"role": "assistant", "content": text} if not delta or text is not None else {}
        return {"index": index, key: content, "logprobs": None, "finish_reason": finish}

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, jobs: list[Job], results: list[tuple[str, str, int]]) -> dict:
        prompt = sum(len(j.prompt) for j in jobs)
        done = sum(n for _, _, n in results)
        return self._object("chat.completion" if self.chat else "text_completion",
                            [self.choice(text, finish, i)
                             for i, (text, finish, _) in enumerate(results)],
                            usage={"prompt_tokens": prompt, "completion_tokens": done,
                                   "total_tokens": prompt + done})

    async def stream(self, job: Job, events: asyncio.Queue, include_usage: bool, release):
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        try:
            while True:
                event = await events.get()
                if event[0] == "error":
                    err = {"message": str(event[1]), "type": "server_error", "param": None,
                           "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                text, finish = (event[1], None) if event[0] == "text" else (None, event[1])
                if self.chat or text is not None:
                    c = self.choice(text if text is not None or self.chat else "", finish,
                                    delta=True)
                else:
                    c = self.choice("", finish)
                yield f"data: {json.dumps(self._object(kind, [c]))}\n\n"
                if finish:
                    if include_usage:
                        n, p = event[2], len(job.prompt)
                        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
                        yield f"data: {json.dumps(self._object(kind, [], usage=usage))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client that went away frees its batch row
            release()


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
