"""The playground page at /: served (and not with --no-ui), self-contained, and driven in a real
headless Chromium (through playwright, which drives the system browser: nothing is downloaded):
it lists the served models and streams one message's answers into both panes."""

import json
import os
import re
import shutil
import urllib.request

import jsonschema
import pytest

from tests.adapters import ANSWERS, answer_adapters
from tests.test_serve import KEY, Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SMALL = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["word", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qmodel_dir):
    """The tiny 4-bit base and the two answer adapters, behind an API key, with the page."""
    from mlxtune.serve import build_registry

    runs = answer_adapters(tmp_path_factory.mktemp("adapters"), tiny_qmodel_dir)
    registry = build_registry(str(tiny_qmodel_dir), [f"{n}={p}" for n, p in runs.items()],
                              say=lambda s: None)
    srv = Server(registry)
    yield srv
    srv.close()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def test_the_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(server):
    status, kind, html = _get(server.base + "/")
    assert status == 200 and kind.startswith("text/html")
    assert "<title>mlxtune playground</title>" in html
    # No external script, style, font or image: it works on a machine with no internet.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"""@import|url\(\s*["']?(https?:)?//""", html)
    # The page is open; the API behind it still wants the key.
    assert server.raw("GET", "/v1/models", key=None)[0] == 401


def test_no_ui_serves_no_page(tiny_qmodel_dir):
    from mlxtune.serve import build_registry

    srv = Server(build_registry(str(tiny_qmodel_dir), say=lambda s: None), api_key=None,
                 ui=False)
    try:
        assert _get(srv.base + "/")[0] == 404
        assert srv.raw("GET", "/v1/models", key=None)[0] == 200
    finally:
        srv.close()


@pytest.mark.numerics  # compares greedy answers of the random base, streamed and whole
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh "
                    "installs Debian's chromium when run as root with apt)")
def test_two_panes_stream_their_own_models_answers_in_chromium(server, tiny_qmodel_dir):
    from playwright.sync_api import expect, sync_playwright

    base = str(tiny_qmodel_dir)
    client = server.client()
    # What each model answers the question on its own, through the plain (unstreamed) API.
    expected = {m: client.chat.completions.create(
        model=m, messages=[{"role": "user", "content": "quick brown fox"}], temperature=0,
        max_tokens=16).choices[0].message.content for m in (base, "fox-bot")}
    assert expected["fox-bot"].startswith(ANSWERS["fox-bot"]) and expected[base] != \
        expected["fox-bot"]
    # test.sh preloads OpenBLAS for MLX; chromium's processes must not inherit it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, env=env,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.base + "/")
            # Without the key the page says why it has no models; with it, it lists them all.
            expect(page.locator("#status")).to_contain_text("cannot list the models")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            expect(page.locator("body")).to_have_attribute("data-models", "loaded")
            options = page.eval_on_selector_all("#model-a option", "els => els.map(e => e.value)")
            assert options == [base, "json-bot", "fox-bot"]
            # Left: the base by default; right: the first adapter. Pick fox-bot on the right.
            assert page.input_value("#model-a") == base
            assert page.input_value("#model-b") == "json-bot"
            page.select_option("#model-b", "fox-bot")
            page.fill("#max-tokens", "16")
            page.fill("#prompt", "quick brown fox")
            page.click("#send")
            for pane in ("#pane-a", "#pane-b"):
                expect(page.locator(pane)).to_have_attribute("data-state", "done",
                                                             timeout=120_000)
            answers = {m: page.locator(f"{pane} .msg.assistant").text_content()
                       for m, pane in ((base, "#pane-a"), ("fox-bot", "#pane-b"))}
            # Each pane shows its own model's answer, the same as the API gives unstreamed; the
            # base's 16 tokens arrived as many chunks, not at once.
            assert answers == expected
            assert int(page.get_attribute("#pane-a", "data-chunks")) > 3
            assert int(page.get_attribute("#pane-b", "data-chunks")) >= 1
            assert page.locator("#pane-a .msg.user").inner_text() == "quick brown fox"
            assert "tokens" in page.inner_text("#pane-a .info")
            # With a JSON Schema, both answer in it (the random base too); a schema that is not
            # JSON is an error in each pane, and the conversations go on after it.
            page.click("#format-box summary")
            page.check("input[name=format][value=json_schema]")
            page.fill("#schema", json.dumps(SMALL))
            page.fill("#max-tokens", "200")
            page.fill("#prompt", "lazy dog")
            page.click("#send")
            for pane in ("#pane-a", "#pane-b"):
                expect(page.locator(pane)).to_have_attribute("data-state", "done",
                                                             timeout=120_000)
                text = page.locator(f"{pane} .msg.assistant").nth(1).text_content()
                jsonschema.validate(json.loads(text), SMALL)
            page.fill("#schema", "{not json")
            page.fill("#prompt", "brown fox")
            page.click("#send")
            for pane in ("#pane-a", "#pane-b"):
                expect(page.locator(pane)).to_have_attribute("data-state", "error")
                assert "does not hold JSON" in page.locator(f"{pane} .msg.error").text_content()
            assert page.locator("#pane-a .msg.assistant").count() == 2
            assert errors == []
        finally:
            browser.close()


def test_the_serve_command_takes_no_ui(tiny_qmodel_dir):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlxtune", "serve", "--model",
                             str(tiny_qmodel_dir), "--port", str(port), "--no-ui"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        started = json.loads(proc.stdout.readline())  # printed once it is about to listen
        assert started["url"] == f"http://127.0.0.1:{port}/v1" and "playground" not in started
        status = None
        for _ in range(300):
            try:
                status = _get(f"http://127.0.0.1:{port}/")[0]
                break
            except OSError:
                time.sleep(0.1)
        assert status == 404
        assert _get(f"http://127.0.0.1:{port}/v1/models")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
