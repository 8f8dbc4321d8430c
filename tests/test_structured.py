"""response_format: the request checks, the grammar mask on its own, and the real server enforcing
a JSON Schema on the tiny random llama (which never writes JSON by itself) and on the built-in
model (20 answers, every one valid)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.response_format import check_response_format, read_response_format
from tests.test_serve import Server

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "minLength": 1, "maxLength": 12}},
    "required": ["name", "age", "city"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
HI = [{"role": "user", "content": "quick brown fox"}]


def _nested(depth: int) -> dict:
    schema = {"type": "array"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("value, problem", [
    ("json", "response_format must be an object"),
    ({"type": "xml"}, "response_format.type must be 'text', 'json_object' or 'json_schema'"),
    ({"type": "json_object", "schema": {}}, "unknown key 'schema'"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "json_schema.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}}, "got \"a b\""),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": "yes"}},
     "strict must be true or false"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}},
     "json_schema.schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema['type']: 'objekt' is not valid"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"age": {"type": "integer", "minimum": "0"}}}}},
     "schema['properties']['age']['minimum']: '0' is not of type 'number'"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "format": 1}},
     "json_schema: unknown key 'format'"),
    # Deeper than the checker recurses (the body parser allows ~1000 levels): a 400, not a 500.
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": _nested(400)}},
     "response_format.json_schema.schema: nested too deeply to check"),
])
def test_a_bad_response_format_names_its_problem(value, problem):
    with pytest.raises(MlxtuneError) as e:
        check_response_format(value)
    assert problem in str(e.value)
    assert "\n" not in str(e.value)


def test_good_response_formats_give_their_schema():
    assert check_response_format({"type": "text"}) is None
    assert check_response_format({"type": "json_object"}) == {"type": "object"}
    assert check_response_format(PERSON_FORMAT) == PERSON


def test_read_response_format_takes_a_bare_schema_or_a_whole_format(tmp_path):
    bare = tmp_path / "my person.json"
    bare.write_text(json.dumps(PERSON))
    fmt = read_response_format(bare)
    assert fmt == {"type": "json_schema", "json_schema": {"name": "my_person", "schema": PERSON,
                                                          "strict": True}}
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(PERSON_FORMAT))
    assert read_response_format(whole) == PERSON_FORMAT
    for text, problem in [("{nope", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                          ('{"type": "objekt"}', "schema['type']: 'objekt' is not valid")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(MlxtuneError, match="--response-format .*bad.json") as e:
            read_response_format(bad)
        assert problem in str(e.value)
    with pytest.raises(MlxtuneError, match="cannot read it"):
        read_response_format(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tokenizer(tiny_qmodel_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_qmodel_dir)


def test_the_mask_follows_the_grammar_and_allows_the_end_only_when_complete(tokenizer,
                                                                            tiny_qmodel_dir):
    import mlx.core as mx

    from mlxtune.serve.structured import grammar_mask

    vocab = json.loads((tiny_qmodel_dir / "config.json").read_text())["vocab_size"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    mask = grammar_mask(tokenizer, vocab, schema)
    eos = sorted(tokenizer.eos_token_ids)
    prompt = tokenizer.encode("quick brown fox")
    answer = tokenizer.encode('{"a": 12}', add_special_tokens=False)
    x_token = tokenizer.encode("x", add_special_tokens=False)[0]
    tokens = list(prompt)
    for i, token in enumerate(answer):
        out = mask(mx.array(tokens), mx.zeros((1, vocab)))
        allowed = (out[0] > -mx.inf).tolist()
        assert allowed[token], f"step {i}: the answer's own token was masked"
        assert not any(allowed[e] for e in eos), f"step {i}: end allowed mid-answer"
        assert not allowed[x_token]
        tokens.append(token)
    out = mask(mx.array(tokens), mx.zeros((1, vocab)))
    allowed = (out[0] > -mx.inf).tolist()
    # The object is closed: the end, and nothing else, may come next (every EOS id the model has).
    assert [i for i, a in enumerate(allowed) if a] == eos
    # Padding rows of the output head past the tokenizer's vocabulary are never sampled.
    assert vocab > len(tokenizer.vocab)


def test_a_dead_end_ends_the_row_instead_of_sampling_from_nothing(tokenizer, tiny_qmodel_dir):
    from mlxtune.serve.structured import grammar_mask

    vocab = json.loads((tiny_qmodel_dir / "config.json").read_text())["vocab_size"]
    mask = grammar_mask(tokenizer, vocab, {"type": "object"})
    x_token = tokenizer.encode("x", add_special_tokens=False)[0]
    assert not mask.matcher.consume_token(x_token)  # the engine is now in its error state
    allowed = mask.allowed()
    assert [i for i, a in enumerate(allowed) if a] == sorted(tokenizer.eos_token_ids)


def test_a_schema_the_engine_cannot_enforce_is_refused(tokenizer, tiny_qmodel_dir):
    from mlxtune.serve.structured import grammar_mask

    schema = {"type": "string", "pattern": "(?<=a)b"}  # valid JSON Schema, look-behind regex
    with pytest.raises(MlxtuneError, match="cannot enforce this schema: regex parse error"):
        grammar_mask(tokenizer, 512, schema)


@pytest.fixture(scope="module")
def tiny_server(tiny_qmodel_dir):
    from mlxtune.serve import build_registry

    srv = Server(build_registry(str(tiny_qmodel_dir), say=lambda s: None), api_key=None)
    yield srv
    srv.close()


def _chat(client, model, **kw):
    # Room for the longest answer PERSON allows even when every character is a \uXXXX escape
    # spelt a byte a token (2 x 12 x 6 + ~20): a constrained answer always ends on its own.
    kw = {"temperature": 0, "max_tokens": 400, "messages": HI, **kw}
    return client.chat.completions.create(model=model, **kw)


def test_the_tiny_model_answers_valid_json_only_when_asked(tiny_server, tiny_qmodel_dir):
    client, model = tiny_server.client(), str(tiny_qmodel_dir)
    free = _chat(client, model).choices[0]
    with pytest.raises(ValueError):
        json.loads(free.message.content)  # a random model writes no JSON of its own
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0,
                                                                     "seed": 2}):
        r = _chat(client, model, response_format=PERSON_FORMAT, **kw).choices[0]
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.message.content), PERSON)
    # JSON mode bounds nothing (a random model may write one string forever): it must open an
    # object, and any answer that ends on its own is a whole object.
    for seed in (1, 2, 3):
        r = _chat(client, model, response_format={"type": "json_object"}, temperature=1.0,
                  seed=seed, max_tokens=40).choices[0]
        assert r.message.content.startswith("{")
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.message.content), dict)
    # /v1/completions takes it too, and a stream carries the same valid answer.
    whole = client.completions.create(model=model, prompt="quick brown fox", temperature=0,
                                      max_tokens=400, extra_body={"response_format":
                                                                  PERSON_FORMAT})
    jsonschema.validate(json.loads(whole.choices[0].text), PERSON)
    streamed = client.completions.create(model=model, prompt="quick brown fox", temperature=0,
                                         max_tokens=400, stream=True,
                                         extra_body={"response_format": PERSON_FORMAT})
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


@pytest.mark.numerics  # compares greedy answers alone and batched
def test_a_batch_mixes_constrained_and_free_rows(tiny_server, tiny_qmodel_dir):
    client, model = tiny_server.client(), str(tiny_qmodel_dir)
    prompts = [[{"role": "user", "content": p}] for p in
               ("quick brown fox", "lazy dog France", "alpha capital fox", "brown dog")]
    alone = [_chat(client, model, messages=m, max_tokens=24).choices[0].message.content
             for m in prompts]
    # Hold the model's thread for a moment so all eight requests wait and start as one batch.
    tiny_server.server.config.app.state.generator.call(time.sleep, 2.0)
    with ThreadPoolExecutor(8) as pool:
        free = [pool.submit(_chat, client, model, messages=m, max_tokens=24) for m in prompts]
        constrained = [pool.submit(_chat, client, model, messages=m,
                                   response_format=PERSON_FORMAT) for m in prompts]
        free = [f.result().choices[0].message.content for f in free]
        constrained = [f.result().choices[0] for f in constrained]
    assert free == alone  # the mask of one row never touches another's logits
    for c in constrained:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


@pytest.mark.parametrize("response_format, problem", [
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema['type']: 'objekt' is not valid"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}, "cannot enforce this schema"),
    ({"type": "grammar"}, "response_format.type must be"),
])
def test_the_server_answers_400_naming_the_schema_problem(tiny_server, tiny_qmodel_dir,
                                                          response_format, problem):
    status, body = tiny_server.raw("POST", "/v1/chat/completions", {
        "model": str(tiny_qmodel_dir), "messages": HI, "response_format": response_format},
        key=None)
    assert status == 400
    assert problem in body["error"]["message"]
    assert body["error"]["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        _chat(tiny_server.client(), str(tiny_qmodel_dir), response_format=response_format)


PEOPLE = [("Alice", 30, "Paris"), ("Bob", 42, "Berlin"), ("Chen", 25, "Shanghai"),
          ("Dana", 37, "Denver"), ("Emil", 61, "Oslo"), ("Farah", 29, "Cairo"),
          ("Goran", 50, "Zagreb"), ("Hana", 19, "Tokyo"), ("Ivan", 44, "Moscow"),
          ("Julia", 33, "Madrid"), ("Kofi", 27, "Accra"), ("Lena", 58, "Vienna"),
          ("Marco", 46, "Rome"), ("Nina", 22, "Lisbon"), ("Omar", 39, "Dubai"),
          ("Priya", 31, "Mumbai"), ("Quinn", 48, "Dublin"), ("Rosa", 65, "Lima"),
          ("Sven", 36, "Stockholm"), ("Tara", 24, "Sydney")]


@pytest.mark.slow
def test_the_builtin_model_answers_20_valid_people_only_with_the_schema(builtin_model_dir,
                                                                        capsys):
    from mlxtune.serve import build_registry

    srv = Server(build_registry(str(builtin_model_dir), say=lambda s: None), api_key=None)
    try:
        client, model = srv.client(timeout=600), str(builtin_model_dir)
        # The prompts do not say "JSON": that is the schema's job (asked for JSON in words, this
        # model wrote valid answers to 18 of these 20 on its own).
        prompts = [[{"role": "user", "content": f"{n} is {a} years old and lives in {c}. Give "
                     "this person's name, age and city."}] for n, a, c in PEOPLE]

        def ask(messages, **kw):
            return _chat(client, model, messages=messages, max_tokens=200, **kw).choices[0]

        with ThreadPoolExecutor(8) as pool:
            constrained = list(pool.map(lambda m: ask(m, response_format=PERSON_FORMAT),
                                        prompts))
            free = list(pool.map(ask, prompts))
    finally:
        srv.close()
    for c in constrained:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)

    def valid(text):
        try:
            jsonschema.validate(json.loads(text), PERSON)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    n_free = sum(valid(f.message.content) for f in free)
    with capsys.disabled():
        print(f"\nbuilt-in model, 20 people: {n_free}/20 valid without response_format, "
              f"20/20 with it; e.g. {constrained[0].message.content}")
    assert n_free <= 10


# --- mlxtune eval --response-format -----------------------------------------------------------


def _people_data(tmp_path):
    data = tmp_path / "test.jsonl"
    with open(data, "w") as f:
        for n, a, c in PEOPLE[:4]:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{n}, {a}, {c}"},
                {"role": "assistant", "content": json.dumps({"name": n, "age": a, "city": c})}]})
                    + "\n")
    return data


def test_eval_sends_the_response_format_with_every_request(tiny_server, tiny_qmodel_dir,
                                                           tmp_path):
    from mlxtune.evaluate.run import run_eval

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    data, url, model = _people_data(tmp_path), tiny_server.base + "/v1", str(tiny_qmodel_dir)
    runs = {}
    for name, fmt in (("with", schema), ("without", None)):
        run_eval(data, tmp_path / name, model, url=url, metrics="json", max_tokens=400,
                 response_format=fmt)
        rows = [json.loads(line) for line in (tmp_path / name / "results.jsonl").open()]
        runs[name] = [r["answer"] for r in rows]
    assert len(runs["with"]) == 4
    for answer in runs["with"]:
        jsonschema.validate(json.loads(answer), PERSON)
    for answer in runs["without"]:  # the random model writes no JSON unless made to
        with pytest.raises(ValueError):
            json.loads(answer)


def test_eval_checks_the_response_format_file_before_any_request(tmp_path):
    import socket
    import subprocess
    import sys

    from mlxtune.evaluate.run import run_eval

    with socket.socket() as s:  # a port nobody listens on: reaching it would fail differently
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    data = _people_data(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"age": {"type": "integer", '
                   '"maximum": "old"}}}')
    with pytest.raises(MlxtuneError, match=r"bad.json: schema\['properties'\]\['age'\]"
                                           r"\['maximum'\]: 'old' is not of type"):
        run_eval(data, tmp_path / "out", "m", url=url, response_format=bad)
    with pytest.raises(MlxtuneError, match="--response-format is enforced by the server"):
        run_eval(data, tmp_path / "out", "m", response_format=_write(tmp_path / "ok.json",
                                                                     PERSON))
    r = subprocess.run([sys.executable, "-m", "mlxtune", "eval", "--data", str(data), "--url",
                        url, "--model", "m", "--out", str(tmp_path / "out"),
                        "--response-format", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.json: cannot read it" in lines[0], lines
    assert not (tmp_path / "out").exists()


def _write(path, value):
    path.write_text(json.dumps(value))
    return path
