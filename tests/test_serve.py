"""mlxtune serve: the real server on a free port, talked to with the real openai client (sync,
async, streaming), one tiny 4-bit base and two adapters built to give different answers."""

import asyncio
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from mlxtune.errors import MlxtuneError
from tests.adapters import ANSWERS, answer_adapters

# Greedy answers through the server: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics

KEY = "test-key"
QUESTION = [{"role": "user", "content": "quick brown fox"}]


class Server:
    """uvicorn serving create_app(registry) in a thread, on a port the OS picked."""

    def __init__(self, registry, api_key=KEY, **app_options):
        import uvicorn

        from mlxtune.serve import bind_socket
        from mlxtune.serve.app import create_app

        sock = bind_socket("127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.registry = registry
        self.server = uvicorn.Server(uvicorn.Config(create_app(registry, api_key=api_key,
                                                               **app_options),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, **kw)

    def raw(self, method, path, body=None, key=KEY):
        """(status, JSON body) of a plain HTTP request; `body` bytes are sent as they are."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_qmodel_dir):
    """The json-bot and fox-bot run folders on the 4-bit tiny llama (built, not trained)."""
    return answer_adapters(tmp_path_factory.mktemp("adapters"), tiny_qmodel_dir)


@pytest.fixture(scope="module")
def server(runs, tiny_qmodel_dir):
    """The base and both adapters, behind an API key."""
    from mlxtune.serve import build_registry

    registry = build_registry(str(tiny_qmodel_dir), [f"{n}={p}" for n, p in runs.items()],
                              say=lambda s: None)
    srv = Server(registry)
    yield srv
    srv.close()


def _ask(client, model, messages=QUESTION, **kw):
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    return client.chat.completions.create(model=model, messages=messages, **kw)


def test_models_listed_and_each_gives_its_own_answer(server, tiny_qmodel_dir):
    client = server.client()
    base = str(tiny_qmodel_dir)
    assert [m.id for m in client.models.list()] == [base, "json-bot", "fox-bot"]
    answers = {name: _ask(client, name) for name in (base, "json-bot", "fox-bot")}
    texts = {name: r.choices[0].message.content for name, r in answers.items()}
    assert texts["json-bot"].startswith(ANSWERS["json-bot"])
    assert texts["fox-bot"].startswith(ANSWERS["fox-bot"])
    assert len(set(texts.values())) == 3
    assert not any(texts[base].startswith(a[:5]) for a in ANSWERS.values())
    r = answers["json-bot"]
    prompt = server.registry.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                           tokenize=False)
    assert r.usage.prompt_tokens == len(server.registry.tokenizer.encode(prompt))
    assert r.choices[0].finish_reason == "stop" and 0 < r.usage.completion_tokens < 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert answers[base].choices[0].finish_reason == "length"
    assert answers[base].usage.completion_tokens == 12


def test_streaming_chat_and_completions_match_the_whole_answer(server):
    client = server.client()
    reply = _ask(client, "fox-bot")
    whole = reply.choices[0].message.content
    chunks = list(_ask(client, "fox-bot", stream=True,
                       stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(deltas) > 2 and "".join(deltas) == whole
    # The streamed usage counts the same tokens as the whole answer (it may stop before 12).
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    prompt = "<|im_start|>user\nquick brown fox<|im_end|>\n<|im_start|>assistant\n"
    full = client.completions.create(model="json-bot", prompt=prompt, temperature=0,
                                     max_tokens=12)
    streamed = client.completions.create(model="json-bot", prompt=prompt, temperature=0,
                                         max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert full.choices[0].text.startswith(ANSWERS["json-bot"])


def test_concurrent_async_requests_to_both_adapters_never_mix(server, tiny_qmodel_dir):
    client = server.client()
    names = ["json-bot", "fox-bot", str(tiny_qmodel_dir)]
    alone = {n: _ask(client, n).choices[0].message.content for n in names}

    async def many():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
        order = [names[i % 3] for i in range(12)]
        results = await asyncio.gather(*(aclient.chat.completions.create(
            model=n, messages=QUESTION, temperature=0, max_tokens=12) for n in order))
        return order, [r.choices[0].message.content for r in results]

    order, texts = asyncio.run(many())
    assert [alone[n] for n in order] == texts


def test_stop_strings_and_seeds(server):
    client = server.client()
    r = _ask(client, "fox-bot", stop=["fox"])
    assert r.choices[0].message.content == "quick " and r.choices[0].finish_reason == "stop"
    a, b = (_ask(client, "json-bot", temperature=1.5, top_p=0.95, seed=7).choices[0]
            .message.content for _ in range(2))
    assert a == b


def test_api_key_errors_and_limits(server, tiny_qmodel_dir):
    with pytest.raises(openai.AuthenticationError):
        _ask(server.client(key="wrong"), "json-bot")
    status, body = server.raw("GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert server.raw("GET", "/health", key=None)[0] == 200
    with pytest.raises(openai.NotFoundError) as e:
        _ask(server.client(), "charlie-bot")
    assert e.value.body["code"] == "model_not_found"
    status, body = server.raw("POST", "/v1/chat/completions", b'{"model": "json-bot", "mess')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in body["error"]["message"]
    long = [{"role": "user", "content": "quick brown fox " * 400}]
    with pytest.raises(openai.BadRequestError) as e:
        _ask(server.client(), "json-bot", messages=long)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _ask(server.client(), "json-bot", max_tokens=0)
    # max_tokens above what fits is clipped to the room the prompt leaves in the 512 context.
    near = [{"role": "user", "content": "quick brown fox " * 35}]
    r = _ask(server.client(), str(tiny_qmodel_dir), messages=near, max_tokens=100000)
    assert r.usage.total_tokens == 512 and r.choices[0].finish_reason == "length"


@pytest.fixture
def small_server(runs, tiny_qmodel_dir):
    """At most one adapter resident, ranks above 8 refused."""
    from mlxtune.serve import build_registry

    registry = build_registry(str(tiny_qmodel_dir), [f"{n}={p}" for n, p in runs.items()],
                              max_loras=1, max_lora_rank=8, say=lambda s: None)
    srv = Server(registry, api_key=None)
    yield srv
    srv.close()


def test_lru_eviction_unload_reload_and_rank_refusal(small_server, runs, tmp_path):
    client = small_server.client(key="none")
    _ask(client, "json-bot")
    assert small_server.raw("GET", "/health")[1]["resident_adapters"] == ["json-bot"]
    assert _ask(client, "fox-bot").choices[0].message.content.startswith(ANSWERS["fox-bot"])
    assert small_server.raw("GET", "/health")[1]["resident_adapters"] == ["fox-bot"]
    adapters = {a["name"]: a for a in small_server.raw("GET", "/v1/adapters")[1]["data"]}
    assert not adapters["json-bot"]["resident"] and adapters["json-bot"]["in_host_memory"]
    # Evicted, not forgotten: it comes back on its next request with the same answer.
    assert _ask(client, "json-bot").choices[0].message.content.startswith(ANSWERS["json-bot"])
    assert small_server.raw("DELETE", "/v1/adapters/fox-bot")[0] == 200
    with pytest.raises(openai.NotFoundError):
        _ask(client, "fox-bot")
    status, _ = small_server.raw("POST", "/v1/load_lora_adapter",
                                 {"lora_name": "fox-bot", "lora_path": str(runs["fox-bot"])})
    assert status == 200
    assert _ask(client, "fox-bot").choices[0].message.content.startswith(ANSWERS["fox-bot"])
    big = tmp_path / "rank16"
    shutil.copytree(runs["json-bot"], big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 16
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    status, body = small_server.raw("POST", "/v1/adapters", {"name": "big", "path": str(big)})
    assert status == 400 and "rank 16, above --max-lora-rank 8" in body["error"]["message"]
    status, body = small_server.raw("POST", "/v1/adapters", {"name": "x", "path": str(tmp_path)})
    assert status == 400 and "not an adapter folder" in body["error"]["message"]


def test_taken_port_is_a_user_error():
    # The command's one line and exit code: tests/test_cli.py, in-process.
    from mlxtune.serve import bind_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MlxtuneError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)


def test_run_folder_serves_its_adapter_or_fuses_it_in_memory(runs):
    from mlx_lm import generate

    from mlxtune.serve import build_registry

    run = runs["json-bot"]
    swapped = build_registry(run=run, say=lambda s: None)
    assert swapped.names() == [json.loads((run / "adapter_config.json").read_text())["model"],
                               run.name]
    fused = build_registry(run=run, fuse=True, say=lambda s: None)
    assert fused.names() == [run.name] and not fused.adapters
    prompt = fused.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                 tokenize=False)
    assert generate(fused.model, fused.tokenizer, prompt, max_tokens=12).startswith(ANSWERS["json-bot"])
    with pytest.raises(MlxtuneError, match="--fuse needs --run"):
        build_registry(model=str(run), fuse=True)


def test_every_field_works_or_is_refused_by_name(server):
    client = server.client()
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("frequency_penalty", 0.5), ("logit_bias", {"1": 5}), ("bogus", 1)]:
        status, body = server.raw("POST", "/v1/chat/completions",
                                  {"model": "json-bot", "messages": QUESTION, field: value})
        assert status == 400 and body["error"]["param"] == field, (field, body)
        assert body["error"]["code"] == "unsupported_parameter"
    # Neutral values that clients send by default are accepted.
    r = _ask(client, "json-bot", frequency_penalty=0, presence_penalty=0.0, logprobs=False, n=1)
    assert r.choices[0].message.content.startswith(ANSWERS["json-bot"])
    status, body = server.raw("POST", "/v1/completions", {"model": "json-bot", "prompt": "x",
                                                          "messages": QUESTION})
    assert status == 400 and body["error"]["param"] == "messages"


def test_completion_prompts_as_lists_and_token_ids(server):
    client = server.client()
    text = "<|im_start|>user\nquick brown fox<|im_end|>\n<|im_start|>assistant\n"
    other = "<|im_start|>user\nlazy dog<|im_end|>\n<|im_start|>assistant\n"
    ids = server.registry.tokenizer.encode(text)
    one = client.completions.create(model="fox-bot", prompt=text, max_tokens=8, temperature=0)
    two = client.completions.create(model="fox-bot", prompt=[text, other], max_tokens=8,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    assert two.choices[1].text.startswith(ANSWERS["fox-bot"])
    by_ids = client.completions.create(model="fox-bot", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="fox-bot", prompt=[ids, ids], max_tokens=8,
                                      temperature=0)
    assert [c.text for c in batch.choices] == [one.choices[0].text] * 2
    for bad in ([], [1, "a"], [[1], [-2]], {"text": text}, [10**9]):
        status, body = server.raw("POST", "/v1/completions", {"model": "fox-bot", "prompt": bad})
        assert status == 400 and body["error"]["param"] == "prompt", (bad, body)


def test_bodies_are_bounded_before_parsing(server):
    deep = b'{"model": "json-bot", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    status, body = server.raw("POST", "/v1/chat/completions", deep)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    from mlxtune.serve.requests import MAX_BODY_BYTES

    huge = json.dumps({"model": "json-bot", "prompt": "x" * MAX_BODY_BYTES}).encode()
    status, body = server.raw("POST", "/v1/completions", huge)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_overload_gets_429_with_retry_after_and_the_rest_are_answered(runs, tiny_qmodel_dir):
    """64 concurrent requests (loopback only) while the model's worker is held: 8 + 8 are
    admitted, the other 48 are refused at once; once the worker runs, every admitted one gets its
    right answer, no 5xx, and /health answers."""
    from mlxtune.serve import build_registry

    registry = build_registry(str(tiny_qmodel_dir), [f"{n}={p}" for n, p in runs.items()],
                              say=lambda s: None)
    srv = Server(registry, api_key=None, max_batch=8, max_queue=8)
    gate = threading.Event()
    held = srv.server.config.app.state.generator.call(gate.wait, 60)

    async def flood():
        client = openai.AsyncOpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0)

        async def one(i):
            try:
                return await client.chat.completions.create(
                    model=["json-bot", "fox-bot"][i % 2], messages=QUESTION, temperature=0,
                    max_tokens=12)
            except openai.APIStatusError as e:
                return e

        tasks = [asyncio.create_task(one(i)) for i in range(64)]
        # Every request has been admitted or refused before the worker is let go.
        while sum(t.done() for t in tasks) < 48:
            await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks)

    try:
        replies = asyncio.run(flood())
        held.result(timeout=60)
        refused = [r for r in replies if isinstance(r, openai.APIStatusError)]
        assert len(refused) == 48 and {r.status_code for r in refused} == {429}
        for r in refused:  # no 5xx: every refusal a 429 in OpenAI's shape, saying when to retry
            assert r.response.headers["retry-after"] == "1" and r.code == "server_busy"
            assert set(r.body) == {"message", "type", "param", "code"}
        for i, r in enumerate(replies):
            if not isinstance(r, openai.APIStatusError):
                want = ANSWERS[["json-bot", "fox-bot"][i % 2]]
                assert r.choices[0].message.content.startswith(want)
        status, health = srv.raw("GET", "/health", key=None)
        assert status == 200 and health["requests_in_progress"] == 0
        # A client that gives up frees its place while the worker is still busy.
        gate.clear()
        held = srv.server.config.app.state.generator.call(gate.wait, 60)
        with pytest.raises(openai.APITimeoutError):
            _ask(srv.client(key="none", timeout=1.0), "json-bot")
        for _ in range(100):
            if srv.raw("GET", "/health", key=None)[1]["requests_in_progress"] == 0:
                break
            time.sleep(0.05)
        assert srv.raw("GET", "/health", key=None)[1]["requests_in_progress"] == 0
    finally:
        gate.set()
        srv.close()

