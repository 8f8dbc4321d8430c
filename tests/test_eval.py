"""mlxtune eval: metrics, bootstrap, stock mlx_lm.server and local models, base vs tuned, resume,
one-line errors, and the report page in a real headless browser."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlxtune.errors import DataError, MlxtuneError
from mlxtune.evaluate import metrics as M
from mlxtune.evaluate.stats import paired_bootstrap
from tests.adapters import ANSWERS, answer_adapters
from tests.test_cli import assert_one_line_error, invoke

# Greedy answers scored: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics

ANSWER = ANSWERS["json-bot"]

# Every request loop below is bounded by these; servers listen on loopback only.
START_TIMEOUT = 120
RUN_TIMEOUT = 300


@pytest.mark.parametrize("answer, reference, expected", [
    ("  The  Cat\nsat ", "the cat sat", {"exact": 1.0, "contains": 1.0, "rouge_l": 1.0}),
    ("the cat sat down", "the cat sat", {"exact": 0.0, "contains": 1.0, "rouge_l": 6 / 7}),
    ("a dog", "the cat sat", {"exact": 0.0, "contains": 0.0, "rouge_l": 0.0}),
    ("Straße café", "straße CAFÉ", {"exact": 1.0, "contains": 1.0, "rouge_l": 1.0}),
])
def test_text_metrics(answer, reference, expected):
    scores = M.score(answer, reference, ["exact", "contains", "rouge"])
    assert scores == pytest.approx(expected, abs=1e-9)


def test_chrf_and_bleu_come_from_sacrebleu():
    assert M.chrf("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert M.chrf("", "the cat sat") == 0.0
    assert M.chrf("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(0.659797,
                                                                                     abs=1e-6)
    assert M.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)


@pytest.mark.parametrize("answer, reference, valid, fields", [
    ('{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 36}', 1.0, 1.0),
    ('Sure: ```json\n{"age": 36, "name": "Bob"}\n```', '{"name": "Ada", "age": 36}', 1.0, 0.5),
    ('{"name": "Ada"', '{"name": "Ada", "age": 36}', 0.0, 0.0),
    ('[1, 2]', '[1, 2]', 1.0, 1.0),
    ('{"a": 1}', 'not json', None, None),
])
def test_json_metrics(answer, reference, valid, fields):
    assert M.json_scores(answer, reference) == {"json_valid": valid, "json_fields": fields}


def test_metric_names_are_checked():
    assert M.parse_metrics(None) == ["exact", "contains", "rouge", "chrf", "json"]
    assert M.score_names(M.parse_metrics("json,bleu")) == ["json_valid", "json_fields", "bleu"]
    with pytest.raises(MlxtuneError, match="unknown metric blue"):
        M.parse_metrics("exact,blue")


def test_paired_bootstrap_is_deterministic_and_sees_real_differences():
    better = [1.0] * 18 + [0.0] * 2
    worse = [0.0] * 16 + [1.0] * 4
    ci = paired_bootstrap(better, worse)
    assert ci == paired_bootstrap(better, worse)
    assert ci["diff"] == pytest.approx(0.7) and ci["n"] == 20
    assert 0 < ci["low"] < 0.7 < ci["high"] <= 1.0
    same = paired_bootstrap([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0])
    assert same["diff"] == 0.0 and same["low"] < 0 < same["high"]


def test_text_and_completions_examples(tmp_path):
    from mlxtune.evaluate.examples import read_examples

    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n\n"
                    + json.dumps({"text": "one two three four"}) + "\n")
    _, (a, b) = read_examples(tmp_path)
    assert (a.kind, a.messages, a.reference) == ("completions",
                                                 [{"role": "user", "content": "2+2?"}], "4")
    assert (b.kind, b.text, b.reference) == ("text", "one two ", "three four")
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: a chat example needs"):
        read_examples(path)


def test_report_escapes_everything(tmp_path):
    from mlxtune.evaluate.report import render_report, word_diff
    from mlxtune.evaluate.run import Summary

    assert word_diff("a <b> c", "a <b> d") == ('a &lt;b&gt; <span class="hl-del">c</span>',
                                              'a &lt;b&gt; <span class="hl-ins">d</span>')
    evil = "<script>alert(1)</script>"
    model = {"label": evil, "metrics": {"exact": 1.0}, "perplexity": None, "latency_s": 0.1,
             "tokens_per_s": None, "errors": 0}
    row = {"id": 0, "role": "model", "model": evil, "prompt": evil, "reference": evil,
           "answer": evil, "scores": {"exact": 1.0}, "error": None}
    page = render_report(Summary(evil, "out", 1, ["exact"], {"model": model}), [row])
    assert evil not in page and page.count("<script>") == 1


# --- against real servers and models -------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_qmodel_dir):
    """The tiny 4-bit llama, an adapter built to answer ANSWER to its data (tests/adapters.py),
    that data with a test split."""
    run = answer_adapters(tmp_path_factory.mktemp("adapters"), tiny_qmodel_dir)["json-bot"]
    return {"model": Path(tiny_qmodel_dir).resolve(), "adapter": run, "data": run.parent / "data"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as r:
                if json.loads(r.read() or b"null"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not start in {START_TIMEOUT} s")


@pytest.fixture(scope="module")
def stock_server(tuned, tmp_path_factory):
    """Stock mlx_lm.server on a free loopback port: "default_model" is the model with the adapter,
    the model's own path (what /v1/models lists) is the base."""
    hub = tmp_path_factory.mktemp("hub")  # its /v1/models fails without an existing HF cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model",
                             str(tuned["model"]), "--adapter-path", str(tuned["adapter"]),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_for(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server_eval(stock_server, tuned, tmp_path_factory):
    """Tuned vs base through the stock server, as the library call."""
    from mlxtune.evaluate.run import run_eval

    out = tmp_path_factory.mktemp("eval") / "out"
    summary = run_eval(tuned["data"], out, "default_model", url=stock_server,
                       compare=str(tuned["model"]), max_tokens=16, concurrency=2)
    return summary, out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_stock_mlx_lm_server_tuned_beats_base(server_eval):
    summary, out = server_eval
    tuned, base = summary.models["model"], summary.models["compare"]
    assert summary.examples == 8 and tuned["answered"] == base["answered"] == 8
    assert tuned["metrics"]["exact"] == 1.0 > base["metrics"]["exact"]
    assert tuned["metrics"]["json_fields"] == 1.0 > base["metrics"]["json_fields"]
    assert summary.comparison["exact"]["low"] > 0  # the interval excludes "no difference"
    assert len(summary.largest_differences) == 8
    rows = _rows(out)
    assert len(rows) == 16 and {r["role"] for r in rows} == {"model", "compare"}
    row = next(r for r in rows if r["role"] == "model")
    assert row["answer"].startswith(ANSWER) and row["reference"] == ANSWER
    assert row["prompt"].startswith("user: ") and row["completion_tokens"] > 0
    assert set(row) >= {"scores", "latency_s", "prompt_tokens", "tokens_per_s", "error"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"]["model"]["metrics"]["exact"] == 1.0
    assert saved["comparison"]["exact"]["diff"] == pytest.approx(1 - base["metrics"]["exact"])


def test_local_model_with_adapter_and_perplexity(tuned, tmp_path):
    from mlxtune.evaluate.run import run_eval

    summary = run_eval(tuned["data"], tmp_path / "out", str(tuned["model"]),
                       adapter=tuned["adapter"], compare=str(tuned["model"]), limit=4,
                       max_tokens=12, metrics="exact,json")
    tuned_m, base_m = summary.models["model"], summary.models["compare"]
    assert summary.scores == ["exact", "json_valid", "json_fields"]
    assert tuned_m["metrics"]["exact"] == 1.0 > base_m["metrics"]["exact"]
    # The adapter answers exactly these references: the test set got much less surprising.
    assert tuned_m["perplexity"] < 0.2 * base_m["perplexity"]
    assert len(_rows(tmp_path / "out")) == 8


def test_resume_answers_only_what_is_missing(server_eval, stock_server, tuned, tmp_path):
    from mlxtune.evaluate.run import run_eval

    summary, done = server_eval
    out = tmp_path / "out"
    out.mkdir()
    lines = (done / "results.jsonl").read_text().splitlines(keepends=True)
    # As if killed mid-write: five whole results and half of the sixth.
    (out / "results.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    args = (tuned["data"], out, "default_model")
    kw = {"url": stock_server, "compare": str(tuned["model"]), "max_tokens": 16}
    with pytest.raises(MlxtuneError, match="already has 5 results: finish that eval with --resume"):
        run_eval(*args, **kw)
    again = run_eval(*args, **kw, resume=True)
    rows = _rows(out)
    assert len(rows) == 16 and rows[:5] == [json.loads(x) for x in lines[:5]]
    assert sorted((r["role"], r["id"]) for r in rows) == sorted((r["role"], r["id"])
                                                                for r in _rows(done))
    assert again.models["model"]["metrics"] == summary.models["model"]["metrics"]
    assert again.comparison["exact"] == summary.comparison["exact"]
    with pytest.raises(MlxtuneError, match="holds answers of 'default_model'"):
        run_eval(tuned["data"], out, str(tuned["model"]), url=stock_server, resume=True)


def _eval_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mlxtune", "eval", *args], check=False,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, **kw)


@pytest.fixture
def gated_server(stock_server):
    """stock_server behind a relay that answers the first two completions (POSTs) and holds every
    later one until the test opens the gate: an interrupt then lands inside the eval on any
    machine, however fast (a fixed delay per request had let a quick eval finish first)."""
    upstream = stock_server.removesuffix("/v1")
    gate, posts = threading.Event(), []

    class Relay(BaseHTTPRequestHandler):
        def _relay(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "POST":
                posts.append(1)
                if len(posts) > 2:
                    gate.wait(RUN_TIMEOUT)
            request = urllib.request.Request(upstream + self.path, data=body or None,
                                             method=self.command, headers={
                                                 k: v for k, v in self.headers.items()
                                                 if k.lower() in ("content-type", "authorization")})
            try:
                with urllib.request.urlopen(request, timeout=RUN_TIMEOUT) as r:
                    status, kind, answer = r.status, r.headers.get("Content-Type"), r.read()
            except urllib.error.HTTPError as e:
                status, kind, answer = e.code, e.headers.get("Content-Type"), e.read()
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except OSError:  # the interrupted eval has hung up
                pass

        do_GET = do_POST = _relay

        def log_message(self, *args):
            pass

    relay = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{relay.server_address[1]}/v1", gate
    finally:
        gate.set()
        relay.shutdown()
        relay.server_close()


def test_ctrl_c_keeps_results_and_resume_finishes(gated_server, tuned, tmp_path):
    url, gate = gated_server
    out = tmp_path / "out"
    args = ["--data", str(tuned["data"]), "--url", url, "--model", str(tuned["model"]),
            "--out", str(out), "--max-tokens", "64", "--concurrency", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "mlxtune", "eval", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the third completion is held at the gate
    _, err = proc.communicate(timeout=RUN_TIMEOUT)
    gate.set()
    kept = len(results.read_text().splitlines())
    assert proc.returncode == 130 and kept == 2, (proc.returncode, kept, err[-500:])
    assert err.strip().splitlines()[-1].startswith("error: interrupted with ")
    assert "--resume" in err
    done = _eval_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert sorted(r["id"] for r in _rows(out)) == list(range(8))
    assert "exact" in done.stdout and (out / "report.html").is_file()


def test_user_errors_are_one_line_exit_2(stock_server, tuned, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    data = str(tuned["data"])
    cases = [
        (["--data", data, "--url", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m"],
         "cannot reach a server at"),
        (["--data", data, "--url", stock_server.replace("/v1", "/nope"), "--model", "m"],
         "answered HTTP 404"),
        (["--data", data, "--url", stock_server, "--model", "no-such-model"],
         "model 'no-such-model' is not served at"),
        (["--data", str(empty), "--url", stock_server, "--model", "default_model"],
         "empty.jsonl: has no examples"),
        (["--data", str(tmp_path / "missing"), "--model", "m"], "missing: no such file"),
    ]
    for args, message in cases:
        assert_one_line_error(invoke("eval", *args, "--out", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()  # cheap checks come before any output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (scripts/setup.sh "
                    "installs Debian's chromium when run as root with apt)")
def test_report_renders_in_headless_chromium(server_eval, tmp_path):
    summary, out = server_eval
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                        (out / "report.html").resolve().as_uri()],
                       check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                       # test.sh preloads OpenBLAS for MLX; chromium's GPU process dies with it.
                       env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    dom = r.stdout
    assert r.returncode == 0 and "<table" in dom, r.stderr[-2000:]
    # The page's script marks the body when it ran to the end and records any error it caught.
    assert '<body data-script-ok="yes">' in dom and '<pre id="script-errors"></pre>' in dom
    assert "8 of 8 shown" in dom
    assert dom.count('class="example"') == 8 and "<svg" in dom
    for label in ("default_model", str(summary.models["compare"]["label"])):
        assert f"<th>{label}</th>" in dom
    assert f'<span class="hl-ins">{ANSWER}</span>' in dom.replace("&quot;", '"')


@pytest.fixture(scope="module")
def mlxtune_server(tuned):
    """`mlxtune serve` on a free loopback port: the base under its path, the adapter as "tuned",
    behind an API key."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlxtune", "serve", "--model",
                             str(tuned["model"]), "--adapter", f"tuned={tuned['adapter']}",
                             "--host", "127.0.0.1", "--port", str(port), "--api-key", "sekret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlxtune serve exited: {proc.stderr.read()[-2000:]}")
            try:
                request = urllib.request.Request(url + "/models",
                                                 headers={"Authorization": "Bearer sekret"})
                with urllib.request.urlopen(request, timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_mlxtune_serve_tuned_beats_base(mlxtune_server, tuned, tmp_path):
    from mlxtune.evaluate.run import run_eval

    summary = run_eval(tuned["data"], tmp_path / "out", "tuned", url=mlxtune_server,
                       compare=str(tuned["model"]), api_key="sekret", max_tokens=16,
                       concurrency=4)
    tuned_m, base_m = summary.models["model"], summary.models["compare"]
    assert tuned_m["answered"] == base_m["answered"] == 8 and tuned_m["errors"] == 0
    assert tuned_m["metrics"]["exact"] == 1.0 > base_m["metrics"]["exact"]
    assert summary.comparison["exact"]["low"] > 0
    assert all(r["completion_tokens"] > 0 for r in _rows(tmp_path / "out"))
    with pytest.raises(MlxtuneError, match=r"model 'nope' is not served at .*it serves: .*tuned"):
        run_eval(tuned["data"], tmp_path / "other", "nope", url=mlxtune_server, api_key="sekret")
    with pytest.raises(MlxtuneError, match=r"refused the API key \(HTTP 401\)"):
        run_eval(tuned["data"], tmp_path / "other", "tuned", url=mlxtune_server, api_key="wrong")
