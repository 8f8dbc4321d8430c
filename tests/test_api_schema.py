"""mlxtune serve against its own OpenAPI document (/openapi.json): the schemathesis command sends
requests that fit the document and requests that break it to a real server on the tiny model
(first each field missing, at its bounds and of each wrong type, then seeded random bodies);
every answer must be one the document lists (status, content type, headers, body), no 5xx,
every error in OpenAI's shape (tests/api_checks.py), and every body that breaks the document
refused."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import requests

from tests.api_checks import ERROR_FIELDS as _ERROR_FIELDS
from tests.test_serve import KEY, Server

CONTEXT = 64  # a short context: long prompts meet the 400, answers stay short
ROUTES = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/adapters"),
          ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
          ("DELETE", "/v1/adapters/{name}"), ("GET", "/v1/models"), ("GET", "/v1/adapters"),
          ("GET", "/health"), ("GET", "/metrics")}
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance",
          "negative_data_rejection", "unsupported_method", "allow_header_conformance",
          "ignored_auth", "missing_required_header", "openai_error_shape"]


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, tiny_qmodel_dir):
    """The 4-bit tiny llama with its context cut to CONTEXT tokens."""
    out = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(tiny_qmodel_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return out


@pytest.fixture(scope="module")
def server(short_model):
    """The short model behind an API key, each request given at most 60 s."""
    from mlxtune.serve import build_registry

    srv = Server(build_registry(str(short_model), say=lambda s: None), request_timeout=60)
    yield srv
    srv.close()


def test_every_answer_matches_the_document(server, tmp_path):
    report = tmp_path / "report.json"
    # No state kept between runs (it would replay old crashes first), nothing written to the repo.
    (tmp_path / "schemathesis.toml").write_text("[cache]\nenabled = false\n")
    cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color",
           "--config-file", str(tmp_path / "schemathesis.toml"), "run",
           server.base + "/openapi.json", "-H", f"Authorization: Bearer {KEY}",
           "--phases", "coverage,fuzzing", "--mode", "all", "--max-examples", "25",
           "--generation-deterministic",
           "--checks", ",".join(CHECKS), "--workers", "1", "--request-timeout", "120",
           "--suppress-health-check", "all", "--report", "json",
           "--report-json-path", str(report)]
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api_checks",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # It did test: every operation, hundreds of cases, and bodies that reached the model.
    totals = json.loads(report.read_text())
    assert totals["operations"]["tested"] == len(ROUTES) and not totals["failures"]
    assert totals["test_cases"]["generated"] >= 300
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert sum(phase["accepted"] for phase in totals["valid_rates"][f"POST {path}"].values())


def test_the_document_describes_every_field_and_route(server):
    from mlxtune.serve.api_schema import undocumented_fields
    from mlxtune.serve.requests import CHAT_FIELDS, COMPLETION_FIELDS, NEUTRAL

    assert not undocumented_fields()
    status, doc = server.raw("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == ROUTES
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    properties = chat["application/json"]["schema"]["properties"]
    assert set(properties) == CHAT_FIELDS | set(NEUTRAL)
    assert properties["model"]["enum"] == server.registry.names()
    text = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    assert set(text["application/json"]["schema"]["properties"]) == \
        COMPLETION_FIELDS | set(NEUTRAL)
    # The document sits behind the key like the rest; /health stays open.
    assert server.raw("GET", "/openapi.json", key=None)[0] == 401
    assert doc["paths"]["/health"]["get"]["security"] == []


@pytest.mark.parametrize("path, body, param", [
    # Each of these answered 500, hung, or was taken silently before the schema test found it.
    ("/v1/chat/completions", b'{"max_tokens": 1e400}', "max_tokens"),
    ("/v1/chat/completions", b'{"max_tokens": NaN}', None),
    ("/v1/chat/completions", b'{"temperature": Infinity}', None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": 5}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": None, "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"stream": True, "stream_options": [1]}, "stream_options"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": "yes"}}, "stream_options"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"stop": {}}, "stop"),
    ("/v1/chat/completions", {"stop": 0}, "stop"),
    ("/v1/chat/completions", {"max_tokens": "a", "max_completion_tokens": 2}, "max_tokens"),
    ("/v1/chat/completions", {"user": 5}, "user"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt"),
    ("/v1/completions", {"prompt": [1] * CONTEXT}, "prompt"),
    ("/v1/adapters", {"name": "a", "path": "/", "extra": 1}, "extra"),
    ("/v1/adapters", {"name": "", "path": "/"}, "name"),
    ("/v1/load_lora_adapter", {"lora_name": "a", "path": "/"}, "path"),
    ("/v1/unload_lora_adapter", {"lora_name": 3}, "lora_name"),
    ("/v1/unload_lora_adapter", {"lora_name": ["a"]}, "lora_name"),
])
def test_found_defects_are_400s_naming_the_field(server, path, body, param):
    if isinstance(body, dict):
        if path.endswith("completions"):
            body = {"model": server.registry.name, "max_tokens": 2,
                    **({"prompt": "x"} if path == "/v1/completions" else
                       {"messages": [{"role": "user", "content": "x"}]}), **body}
        body = json.dumps(body).encode()
    else:
        body = body.replace(b"{", b'{"model": "%s", "messages": [{"role": "user", "content": '
                            b'"x"}], ' % server.registry.name.encode(), 1)
    status, answer = server.raw("POST", path, body)
    assert status == 400 and set(answer["error"]) == _ERROR_FIELDS, answer
    assert param is None or answer["error"]["param"] == param, answer


def test_method_not_allowed_keeps_its_allow_header(server):
    response = requests.put(server.base + "/v1/models", timeout=30,
                            headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert set(response.json()["error"]) == _ERROR_FIELDS
    # /v1/adapters is two routes (GET lists, POST loads): Allow names both.
    response = requests.put(server.base + "/v1/adapters", timeout=30,
                            headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"


def test_prompt_and_max_tokens_are_capped_by_the_context(server):
    """A prompt of CONTEXT tokens is refused; one token less leaves room for one token, and a
    max_tokens far above that is clipped to it."""
    name = server.registry.name
    status, body = server.raw("POST", "/v1/completions",
                              {"model": name, "prompt": [5] * CONTEXT, "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"context is {CONTEXT} tokens" in body["error"]["message"]
    status, body = server.raw("POST", "/v1/completions",
                              {"model": name, "prompt": [5] * (CONTEXT - 1), "max_tokens": 10**9})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == CONTEXT - 1
    assert body["usage"]["total_tokens"] <= CONTEXT
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    status, body = server.raw("POST", "/v1/completions",
                              {"model": name, "prompt": [5] * 3, "max_tokens": 10**9 + 1})
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_a_bug_still_answers_in_openai_shape(server, monkeypatch):
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.registry, "describe", broken)
    response = requests.get(server.base + "/v1/adapters", timeout=30,
                            headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError: a bug" in error["message"]
