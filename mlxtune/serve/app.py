"""The OpenAI-compatible HTTP API (FastAPI): models, chat and text completions, adapters, health.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: malformed JSON, bad
parameters and fields this server does not honour 400 (named, never ignored: requests.py), a
missing or wrong bearer key 401, an unknown model 404, a body over 4 MB 413, and past --max-batch +
--max-queue requests in progress 429 with Retry-After, and one still unfinished after
--request-timeout seconds 408. `max_tokens` is clipped
to what fits in the context after the prompt (finish_reason "length" says so); a prompt that
leaves no room at all is refused with 400 (code "context_length_exceeded"). The OpenAPI document
at /openapi.json describes every body and answer (api_schema.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlxtune.serve.api_schema import describe_api
from mlxtune.serve.generation import Generator, Job
from mlxtune.serve.playground import add_playground
from mlxtune.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mlxtune.serve.metrics import ServeMetrics
from mlxtune.serve.registry import AdapterError, AdapterRegistry
from mlxtune.serve.replies import Reply
from mlxtune.serve.requests import (CHAT_FIELDS, COMPLETION_FIELDS, DEFAULT_REQUEST_TIMEOUT,
                                    MAX_BODY_BYTES, APIError, adapter_fields, chat_messages,
                                    check_body_size, check_fields, completion_prompts, make_job,
                                    next_event, parse_body, stream_settings)

def _error(status: int, message: str, type_="invalid_request_error", param=None, code=None,
           headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def create_app(registry: AdapterRegistry, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, ui: bool = True,
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> FastAPI:
    """The FastAPI app serving `registry`'s base model and adapters (one generation worker);
    past `max_batch` + `max_queue` requests in progress, new ones get 429 with Retry-After;
    a request still running after `request_timeout` seconds is stopped with a 408; the
    playground page at / unless `ui` is False."""
    app = FastAPI(title="mlxtune serve", docs_url=None, redoc_url=None)
    service = Service(registry, max_batch, max_queue, request_timeout)
    app.state.registry, app.state.generator = registry, service.generator
    app.state.service = service
    app.router.on_shutdown.append(service.generator.stop)
    if api_key is not None:
        app.add_middleware(KeyCheck, api_key=api_key)
    _add_error_handlers(app, service)
    _add_info_routes(app, service)
    _add_adapter_routes(app, service)
    _add_completion_routes(app, service)
    if ui:
        add_playground(app)
    describe_api(app, registry, api_key is not None)
    return app


class Service:
    """What the routes share: the registry, the generation worker, the metrics and the count of
    requests in progress (the event loop's own, for admission)."""

    def __init__(self, registry: AdapterRegistry, max_batch: int, max_queue: int,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.registry, self.max_batch, self.max_queue = registry, max_batch, max_queue
        self.request_timeout = request_timeout
        self.generator = Generator(registry, max_batch=max_batch)
        self.metrics = ServeMetrics(registry, self.generator)
        self.generator.metrics = self.metrics
        self.busy = 0

    def admit(self, n: int) -> None:
        """Count `n` more requests in progress, or refuse them with 429 past the limit."""
        if self.busy + n > self.max_batch + self.max_queue:
            raise APIError(429, f"the server is busy ({self.busy} requests in progress, "
                           f"--max-queue {self.max_queue}); retry shortly", "rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"})
        self.busy += n

    def release(self, n: int) -> None:
        """`n` requests were answered (or abandoned)."""
        self.busy -= n

    async def on_worker(self, fn, *args):
        """`fn(*args)` run on the generation worker between steps, awaited."""
        return await asyncio.wrap_future(self.generator.call(fn, *args))

    async def complete(self, request: Request, body: dict, prompts: list[list[int]], chat: bool,
                       arrived: float):
        """Run one completion request (one job per prompt) that arrived at `arrived`
        (perf_counter); the whole reply or its stream."""
        stream, include_usage = stream_settings(body)
        jobs = [make_job(self.registry, body, p, chat=chat) for p in prompts]
        for job in jobs:
            job.arrived = arrived  # time to first token counts the parsing and the template
        self.admit(len(jobs))
        reply = Reply(chat, jobs[0].model, self.registry.tokenizer,
                      logprobs=jobs[0].top_logprobs is not None)
        queues = [_submit(self.generator, job) for job in jobs]
        # (when, how long): queueing counts too
        deadline = (time.monotonic() + self.request_timeout, self.request_timeout)
        if stream:
            return StreamingResponse(reply.stream(jobs[0], queues[0], include_usage,
                                                  lambda: self.release(1), deadline),
                                     media_type="text/event-stream")
        try:
            results = [await _result(request, job, q, deadline) for job, q in zip(jobs, queues)]
        finally:
            for job in jobs:
                job.cancelled = True  # finished ones are gone already; the rest stop now
            self.release(len(jobs))
        return reply.whole(jobs, results)


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        service.metrics.refused.labels(str(e.status)).inc()
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        # A bug still answers in OpenAI's shape (Starlette logs its traceback after this).
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        headers = e.headers
        if e.status_code == 405:  # Starlette's Allow names one route's methods, not the path's
            headers = {**(headers or {}), "Allow": _allowed(app, request.scope)}
        return _error(e.status_code, str(e.detail), kind, headers=headers)


def _add_info_routes(app: FastAPI, service: Service) -> None:
    registry = service.registry

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": registry.name,
                "resident_adapters": list(registry.resident),
                "requests_in_progress": service.busy}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": registry.name, "object": "model", "created": now, "owned_by": "mlxtune",
                 "root": str(registry.model_dir), "parent": None}]
        data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "mlxtune",
                  "root": a["path"], "parent": registry.name, "tier": a["tier"]}
                 for a in registry.describe()]
        return {"object": "list", "data": data}


def _add_adapter_routes(app: FastAPI, service: Service) -> None:
    registry = service.registry

    async def load_adapter(name, path):
        try:
            # Loading evaluates MLX arrays: do it on the model's own thread, between steps.
            await service.on_worker(registry.add, name, path)
        except AdapterError as e:
            raise APIError(400, str(e), param="path") from None
        return {"object": "adapter", "name": name, "path": path, "status": "loaded"}

    async def unload_adapter(name):
        try:
            await service.on_worker(service.generator.remove_adapter, name)
        except AdapterError as e:
            raise APIError(404, str(e), "not_found_error", "name", "model_not_found") from None
        return {"object": "adapter", "name": name, "status": "unloaded"}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": registry.describe()}

    @app.post("/v1/adapters")
    async def post_adapter(request: Request):
        return await load_adapter(*adapter_fields(await _json(request), "load"))

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        return await unload_adapter(name)

    # vLLM's names for the same two operations.
    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request):
        return await load_adapter(*adapter_fields(await _json(request), "vllm_load"))

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request):
        return await unload_adapter(*adapter_fields(await _json(request), "vllm_unload"))


def _add_completion_routes(app: FastAPI, service: Service) -> None:
    tokenizer = service.registry.tokenizer

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.perf_counter()
        body = await _json(request)
        check_fields(body, CHAT_FIELDS)
        messages = chat_messages(body.get("messages"))
        return await service.complete(request, body, [_chat_prompt(tokenizer, messages)], True,
                                      arrived)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived = time.perf_counter()
        body = await _json(request)
        check_fields(body, COMPLETION_FIELDS)
        prompts = completion_prompts(body.get("prompt"), lambda text: _encode(tokenizer, text))
        if stream_settings(body)[0] and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt; send the others as their own "
                           "requests", param="prompt")
        return await service.complete(request, body, prompts, False, arrived)


def _allowed(app: FastAPI, scope) -> str:
    """Every method some route serves at this request's path (its 405's Allow header)."""
    from starlette.routing import Match

    return ", ".join(sorted({m for route in app.router.routes
                             if route.matches(scope)[0] != Match.NONE
                             for m in getattr(route, "methods", None) or ()}))


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


async def _result(request: Request, job: Job, events: asyncio.Queue,
                  deadline: tuple[float, float]) -> tuple[str, str, int, list]:
    """(text, finish reason, tokens, logprob entries) of a job; stops it if the client goes
    away meanwhile (past the deadline next_event raises the 408 and the caller cancels it)."""
    text, entries = "", []
    while True:
        event = await next_event(events, *deadline, poll=0.5)
        if event is None:
            if await request.is_disconnected():
                job.cancelled = True  # frees its batch row at the next step
                raise APIError(499, "the client closed the request", code="client_closed") \
                    from None
            continue
        if event[0] == "text":
            text += event[1]
            entries += event[2]
        elif event[0] == "error":
            raise _as_api_error(event[1])
        else:
            return text, event[1], event[2], entries


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
