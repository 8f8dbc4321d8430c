"""mlxtune serve under time pressure: a request still unfinished after --request-timeout is stopped
(its batch row freed at the next step, as for a client that went away) and answered with OpenAI's
error shape, a 408, or mid-stream a final error event. The model's worker is held on purpose
(Generator.call runs a function between steps), so no test depends on how fast the model runs."""

import json
import threading
import time
import urllib.request

import openai
import pytest

from tests.test_serve import KEY, QUESTION, Server


@pytest.fixture
def serve(tiny_qmodel_dir):
    """start(timeout) -> a server on the tiny model with that --request-timeout; closed after."""
    from mlxtune.serve import build_registry

    registry = build_registry(str(tiny_qmodel_dir), say=lambda s: None)
    started = []

    def start(timeout):
        srv = Server(registry, request_timeout=timeout)
        srv.jobs = []  # every Job the app submits, to see that the timed-out ones are cancelled
        generator = srv.server.config.app.state.generator
        submit = generator.submit
        generator.submit = lambda job: (srv.jobs.append(job), submit(job))[1]
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()


def _hold(srv) -> threading.Event:
    """Hold the model's worker between two steps until the returned event is set."""
    gate = threading.Event()
    srv.server.config.app.state.generator.call(gate.wait, 60)
    return gate


def _events(srv, body) -> tuple[int, list]:
    """(status, the data of each server-sent event) of a streaming request."""
    req = urllib.request.Request(srv.base + "/v1/chat/completions", method="POST",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line.decode().strip() for line in r]
        return r.status, [line[len("data: "):] for line in lines if line.startswith("data: ")]


def _settled(srv) -> dict:
    """/health once the server's own bookkeeping has caught up (a stream releases its place as
    its generator closes, just after the client has read the end)."""
    for _ in range(200):
        health = srv.raw("GET", "/health")[1]
        if health["requests_in_progress"] == 0:
            return health
        time.sleep(0.05)
    return health


def test_a_request_past_the_timeout_gets_408_and_is_cancelled(serve, tiny_qmodel_dir):
    srv = serve(0.5)
    gate = _hold(srv)
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=str(tiny_qmodel_dir), prompt=["a", "b"],
                                      max_tokens=4)
        assert e.value.status_code == 408
        error = e.value.body
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
        assert "--request-timeout 0.5 s" in error["message"]
        # Both prompts' jobs stop; nothing holds a place in the queue any more.
        assert len(srv.jobs) == 2 and all(job.cancelled for job in srv.jobs)
        assert _settled(srv)["requests_in_progress"] == 0
    finally:
        gate.set()


def test_a_stream_past_the_timeout_ends_with_an_error_event(serve, tiny_qmodel_dir):
    srv = serve(0.5)
    gate = _hold(srv)
    try:
        status, events = _events(srv, {"model": str(tiny_qmodel_dir), "messages": QUESTION,
                                       "max_tokens": 4})
    finally:
        gate.set()
    # The 200 went out with the headers; the timeout arrives as the stream's last event.
    assert status == 200 and events[-1] == "[DONE]" and len(events) == 2
    error = json.loads(events[0])["error"]
    assert error["code"] == "request_timeout" and set(error) == {"message", "type", "param",
                                                                 "code"}
    assert srv.jobs[0].cancelled and _settled(srv)["requests_in_progress"] == 0


def test_a_stream_that_runs_out_of_time_midway_keeps_its_text_then_errors(serve,
                                                                         tiny_qmodel_dir):
    """The worker holds itself right after sending the first text, so the deadline passes
    mid-answer whatever the model's speed (5 s is room for a first token on a loaded machine)."""
    srv = serve(5.0)
    # No end-of-sequence token: the answer cannot end on its own before the deadline does.
    srv.registry.tokenizer.eos_token_ids = []
    gate = threading.Event()
    generator = srv.server.config.app.state.generator
    submit = generator.submit

    def submit_holding_after_first_text(job):
        emit = job.emit

        def emit_then_hold(event):  # runs on the worker thread: holding it stops the model
            emit(event)
            if event[0] == "text":
                gate.wait(60)
        job.emit = emit_then_hold
        return submit(job)

    generator.submit = submit_holding_after_first_text
    try:
        status, events = _events(srv, {"model": str(tiny_qmodel_dir), "messages": QUESTION,
                                       "max_tokens": 400})
    finally:
        gate.set()
    chunks = [json.loads(e) for e in events[:-2]]
    assert status == 200 and len(chunks) == 1  # the one text sent before the worker stopped
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["content"]
    assert chunks[0]["choices"][0]["finish_reason"] is None
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert events[-1] == "[DONE]"
    assert srv.jobs[0].cancelled and _settled(srv)["requests_in_progress"] == 0


def test_request_timeout_is_a_serve_option(tiny_qmodel_dir):
    from typer.testing import CliRunner

    from mlxtune.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--request-timeout" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_qmodel_dir),
                                      "--request-timeout", "0"])
    assert result.exit_code == 2 and "--request-timeout" in result.output
