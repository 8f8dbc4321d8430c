"""mlxtune serve's mixed batches: the base and several adapters in one continuous batch (each row
with its own low-rank pair), adapter tiers, per-request adapter_scale, logprobs, /metrics and
the first token sent right after prefill. The adapters are built in closed form (tests/adapters.py),
so their answers are known on every CPU."""

import asyncio
import re
import threading

import mlx.core as mx
import openai
import pytest

from tests.adapters import ANSWERS, answer_adapters, build_adapter
from tests.test_serve import QUESTION, Server, _ask

# Greedy answers through the server: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics

MORE = {"dog-bot": "lazy dog", "alpha-bot": "alpha France"}
ALL = {**ANSWERS, **MORE}


@pytest.fixture(scope="session")
def four(tmp_path_factory, tiny_qmodel_dir):
    """Four run folders on the 4-bit tiny llama, each answering ALL[name]."""
    runs = dict(answer_adapters(tmp_path_factory.mktemp("adapters"), tiny_qmodel_dir))
    root = tmp_path_factory.mktemp("more-adapters")
    for name, answer in MORE.items():
        runs[name] = build_adapter(root / name, tiny_qmodel_dir, answer)
    return runs


def _registry(tiny_qmodel_dir, runs, **kw):
    from mlxtune.serve import build_registry

    return build_registry(str(tiny_qmodel_dir), [f"{n}={p}" for n, p in runs.items()],
                          say=lambda s: None, **kw)


@pytest.fixture(scope="module")
def mixed(four, tiny_qmodel_dir):
    """The base and three adapters, all resident, a batch of 12."""
    runs = {n: four[n] for n in ("json-bot", "fox-bot", "dog-bot")}
    srv = Server(_registry(tiny_qmodel_dir, runs, max_loras=3), api_key=None, max_batch=12)
    yield srv
    srv.close()


def _metric(srv, name, **labels) -> float:
    text = _get_text(srv, "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as exposed
    pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    assert found, (name, labels, text)
    return float(found.group(1))


def _get_text(srv, path) -> str:
    import urllib.request

    with urllib.request.urlopen(srv.base + path, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/plain")
        return r.read().decode()


def test_one_forward_pass_computes_each_row_with_its_own_adapter(four, tiny_qmodel_dir):
    """Rows of the base and three adapters in one call give the logits each gives alone."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlxtune.serve.rows import MixedModel, RowTag

    registry = _registry(tiny_qmodel_dir, {n: four[n] for n in ("json-bot", "fox-bot",
                                                                "dog-bot")}, max_loras=3)
    model = MixedModel(registry.model, registry.selection)
    tokens = mx.array([registry.tokenizer.encode("quick brown fox")] * 4)
    names = [registry.name, "json-bot", "fox-bot", "dog-bot"]
    held = [registry.acquire(n) for n in names]
    slots = [slot for _, slot in held]
    assert sorted(slots) == [0, 1, 2, 3]

    def logits(rows, idx):
        cache = [*make_prompt_cache(registry.model), RowTag([slots[i] for i in idx],
                                                            [1.0] * len(idx))]
        return model(rows, cache=cache)[:, -1].astype(mx.float32)

    together = logits(tokens, range(4))
    for i in range(4):
        alone = logits(tokens[i:i + 1], [i])
        assert mx.allclose(together[i], alone[0], atol=1e-3, rtol=1e-3).item(), names[i]
    # And they differ: each row really computed with its own pair.
    firsts = {int(mx.argmax(together[i])) for i in range(4)}
    assert len(firsts) == 4
    for adapter, _ in held:
        registry.release(adapter)


def test_twelve_requests_over_base_and_three_adapters_share_one_batch(mixed, tiny_qmodel_dir):
    """12 requests (base + 3 adapters, prompts of three lengths, none cached) arrive together:
    one prefill pass and one decode batch hold them all, and each answer is the one it gets
    alone."""
    client = mixed.client(key="none")
    names = [str(tiny_qmodel_dir), "json-bot", "fox-bot", "dog-bot"]
    questions = ["quick brown fox", "lazy dog France alpha bravo capital", "alpha"]
    order = [(names[i % 4], questions[i % 3]) for i in range(12)]  # every pair once
    alone = {(n, q): _ask(client, n, [{"role": "user", "content": q}]).choices[0].message.content
             for n, q in order}
    for n in names[1:]:
        assert alone[(n, questions[0])].startswith(ALL[n])
    generator = mixed.server.config.app.state.generator
    seen = []
    point = mixed.registry.selection.point

    def spy(slots, scales):
        seen.append((len(slots), len(set(slots))))
        point(slots, scales)

    gate = threading.Event()
    held = generator.call(gate.wait, 60)  # all 12 arrive before the worker takes any
    generator.call(generator.prefix.clear)  # every prompt prefills in full, at its own length
    mixed.registry.selection.point = spy

    async def many():
        aclient = openai.AsyncOpenAI(base_url=mixed.base + "/v1", api_key="none",
                                     max_retries=0)
        tasks = [asyncio.create_task(aclient.chat.completions.create(
            model=n, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12))
            for n, q in order]
        while generator.queue_depth() < 13:  # the 12 and the clear wait behind the held call
            await asyncio.sleep(0.02)
        gate.set()
        return [r.choices[0].message.content for r in await asyncio.gather(*tasks)]

    try:
        texts = asyncio.run(many())
    finally:
        gate.set()
        mixed.registry.selection.point = point
    held.result(timeout=60)
    assert texts == [alone[pair] for pair in order]
    # The first call is the prefill of all 12 rows at once; decode steps hold all four too.
    assert seen[0] == (12, 4) and seen.count((12, 4)) >= 2


def test_seeded_request_keeps_its_stream_amid_other_requests(mixed, tiny_qmodel_dir):
    client = mixed.client(key="none")
    base = str(tiny_qmodel_dir)
    kw = {"temperature": 1.5, "top_p": 0.95, "seed": 11, "max_tokens": 10}
    alone = _ask(client, base, **kw).choices[0].message.content

    async def crowd():
        aclient = openai.AsyncOpenAI(base_url=mixed.base + "/v1", api_key="none",
                                     max_retries=0)
        others = [aclient.chat.completions.create(model=n, messages=QUESTION, temperature=1.0,
                                                  max_tokens=10)
                  for n in ("json-bot", "fox-bot", base, "dog-bot")]
        mine = aclient.chat.completions.create(model=base, messages=QUESTION, **kw)
        return (await asyncio.gather(mine, *others))[0].choices[0].message.content

    assert asyncio.run(crowd()) == alone


def test_first_token_is_sent_right_after_prefill(mixed, monkeypatch):
    """One model call before the first text, the whole prompt's (BatchGenerator alone makes
    three: the prompt less its last token, the last token, then the decode step it returns the
    first token after)."""
    from mlxtune.serve.generation import Job
    from mlxtune.serve.rows import MixedModel

    calls = []
    real = MixedModel.__call__
    monkeypatch.setattr(MixedModel, "__call__",
                        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    events, first = [], threading.Event()

    def emit(event):
        if event[0] == "text" and not first.is_set():
            events.append(len(calls))
            first.set()

    tok = mixed.registry.tokenizer
    prompt = tok.encode("lazy dog France alpha bravo")  # not cached: a full prefill
    generator = mixed.server.config.app.state.generator
    job = generator.submit(Job(model="fox-bot", prompt=prompt, max_tokens=6, emit=emit))
    assert first.wait(60)
    job.cancelled = True
    assert events == [1]


def test_prefix_cache_is_kept_per_adapter_in_the_mixed_batch(mixed):
    client = mixed.client(key="none")
    prefix = mixed.server.config.app.state.generator.prefix
    # No other test's prompt starts like this one (the prefix cache reuses 4 tokens or more).
    prompt = "bravo capital dog brown lazy France"

    def ask(model):
        return client.completions.create(model=model, prompt=prompt, max_tokens=6,
                                         temperature=0).choices[0].text

    first = ask("json-bot")
    hits = prefix.hits
    other = ask("fox-bot")
    assert prefix.hits == hits  # json-bot's KV entries are not fox-bot's
    again = ask("json-bot")
    assert prefix.hits == hits + 1 and first == again
    assert other == ask("fox-bot") and prefix.hits == hits + 2
    assert other != first


def test_adapter_scale_zero_is_the_base_and_one_the_adapter(mixed, tiny_qmodel_dir):
    client = mixed.client(key="none")
    base = _ask(client, str(tiny_qmodel_dir)).choices[0].message.content
    scaled = {s: _ask(client, "json-bot", extra_body={"adapter_scale": s})
              .choices[0].message.content for s in (0.0, 1.0)}
    assert scaled[0.0] == base and scaled[1.0].startswith(ALL["json-bot"])
    for model, value, words in [(str(tiny_qmodel_dir), 0.5, "is the base model"),
                                ("json-bot", -1, "from 0.0 to 10.0"),
                                ("json-bot", "x", "must be a number")]:
        status, body = mixed.raw("POST", "/v1/chat/completions",
                                 {"model": model, "messages": QUESTION, "adapter_scale": value},
                                 key=None)
        assert status == 400 and body["error"]["param"] == "adapter_scale", body
        assert words in body["error"]["message"]


def test_logprobs_in_the_openai_shape(mixed):
    client = mixed.client(key="none")
    r = _ask(client, "json-bot", logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(tops[0])
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token
    streamed = list(_ask(client, "json-bot", logprobs=True, top_logprobs=3, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    plain = _ask(client, "json-bot")
    assert plain.choices[0].logprobs is None
    text = "<|im_start|>user\nquick brown fox<|im_end|>\n<|im_start|>assistant\n"
    c = client.completions.create(model="fox-bot", prompt=text, max_tokens=8, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for body, param in [({"top_logprobs": 2}, "top_logprobs"),
                        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"logprobs": "yes"}, "logprobs")]:
        status, err = mixed.raw("POST", "/v1/chat/completions",
                                {"model": "json-bot", "messages": QUESTION, **body}, key=None)
        assert status == 400 and err["error"]["param"] == param, err


def test_tiers_cycle_four_adapters_through_one_resident_and_one_in_host(four, tiny_qmodel_dir):
    """--max-loras 1 --max-cpu-loras 1, four adapters: each request's adapter becomes resident,
    the one before waits in host memory, the other two on disk; every answer is right, one at a
    time and all at once; /v1/adapters and /metrics say where each is."""
    srv = Server(_registry(tiny_qmodel_dir, four, max_loras=1, max_cpu_loras=1), api_key=None)
    try:
        client = srv.client(key="none")
        names = list(four)
        for i, name in enumerate(names * 2):
            assert _ask(client, name).choices[0].message.content.startswith(ALL[name])
            tiers = {a["name"]: a["tier"] for a in srv.raw("GET", "/v1/adapters")[1]["data"]}
            previous = (names * 2)[i - 1]  # before the first: the last added
            assert tiers[name] == "resident"
            assert [n for n, t in tiers.items() if t == "host"] == [previous]
            models = {m["id"]: m.get("tier") for m in srv.raw("GET", "/v1/models")[1]["data"]}
            assert models[name] == "resident"
            assert _metric(srv, "mlxtune_adapters", tier="resident") == 1
            assert _metric(srv, "mlxtune_adapters", tier="host") == 1
            assert _metric(srv, "mlxtune_adapters", tier="disk") == 2

        async def together():
            aclient = openai.AsyncOpenAI(base_url=srv.base + "/v1", api_key="none",
                                         max_retries=0)
            order = [names[i % 4] for i in range(8)]
            replies = await asyncio.gather(*(aclient.chat.completions.create(
                model=n, messages=QUESTION, temperature=0, max_tokens=12) for n in order))
            return order, [r.choices[0].message.content for r in replies]

        order, texts = asyncio.run(together())
        for name, text in zip(order, texts):
            assert text.startswith(ALL[name]), (name, text)
        assert _metric(srv, "mlxtune_requests_total", model="fox-bot", finish_reason="stop") >= 4
        assert _metric(srv, "mlxtune_queue_depth") == 0
        assert _metric(srv, "mlxtune_batch_rows") == 0
        assert _metric(srv, "mlxtune_time_to_first_token_seconds_count") >= 16
    finally:
        srv.close()


def test_a_pinned_adapter_keeps_its_slot_until_its_rows_finish(four, tiny_qmodel_dir):
    registry = _registry(tiny_qmodel_dir, {n: four[n] for n in ("json-bot", "fox-bot")},
                         max_loras=1, max_cpu_loras=0)
    adapter, slot = registry.acquire("json-bot")
    assert slot == 1 and registry.acquire("fox-bot") is None  # the one slot is busy
    registry.remove("json-bot")  # rows running with it finish with it
    assert registry.acquire("fox-bot") is None and registry.by_slot[1] is adapter
    registry.release(adapter)
    fox, slot = registry.acquire("fox-bot")
    assert slot == 1 and registry.by_slot[1] is fox
    assert {a["name"]: a["tier"] for a in registry.describe()} == {"fox-bot": "resident"}
    registry.release(fox)


def test_dora_rows_get_their_magnitude_factor_in_a_mixed_pass(four, tiny_qmodel_dir, tmp_path):
    """A DoRA adapter (json-bot's pair with a magnitude vector) beside a LoRA one and the base:
    in one forward pass each row gives the logits it gives alone."""
    import json
    import shutil

    from mlx_lm.models.cache import make_prompt_cache

    from mlxtune.serve.rows import MixedModel, RowTag

    dora = tmp_path / "dora"
    shutil.copytree(four["json-bot"], dora)
    weights = mx.load(str(dora / "adapters.safetensors"))
    for key in [k for k in weights if k.endswith(".lora_b")]:
        out = weights[key].shape[1]
        weights[key[: -len(".lora_b")] + ".m"] = mx.random.uniform(0.5, 1.5, (out,),
                                                                    key=mx.random.key(0))
    mx.save_safetensors(str(dora / "adapters.safetensors"), weights)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "fine_tune_type": "dora"}))
    registry = _registry(tiny_qmodel_dir, {"dora-bot": dora, "fox-bot": four["fox-bot"]},
                         max_loras=2)
    assert registry.adapters["dora-bot"].kind == "dora"
    model = MixedModel(registry.model, registry.selection)
    slots = [registry.acquire(n)[1] for n in (registry.name, "dora-bot", "fox-bot")]
    tokens = mx.array([registry.tokenizer.encode("quick brown fox")] * 3)

    def logits(rows, idx):
        cache = [*make_prompt_cache(registry.model), RowTag([slots[i] for i in idx],
                                                            [1.0] * len(idx))]
        return model(rows, cache=cache)[:, -1].astype(mx.float32)

    together = logits(tokens, range(3))
    alone = [logits(tokens[i:i + 1], [i])[0] for i in range(3)]
    for i in range(3):
        assert mx.allclose(together[i], alone[i], atol=1e-3, rtol=1e-3).item(), i
    assert registry.selection.stacks  # stacked with a factor for the DoRA layer
    assert any(s[2] is not None for s in registry.selection.stacks.values())
