"""run_eval: answer every test prompt with one or two models, score, compare, write the results.

results.jsonl is appended and flushed one example at a time, so an interrupted or crashed eval
keeps what it did and `resume=True` answers only the rest. summary.json and report.html are
written whole (temp file + rename) from results.jsonl at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxtune.atomic import write_text
from mlxtune.errors import Interrupted, MlxtuneError
from mlxtune.evaluate import metrics as M
from mlxtune.evaluate.client import LocalBackend, ServerBackend
from mlxtune.evaluate.examples import read_examples
from mlxtune.evaluate.stats import comparison_table, paired_bootstrap
from mlxtune.progress import ProgressBar

ROLES = ("model", "compare")


@dataclass
class Summary:
    """What summary.json holds: per-model means, the paired comparison, where answers differ."""

    data: str
    out: str
    examples: int
    scores: list[str]
    models: dict[str, dict]
    comparison: dict[str, dict] = field(default_factory=dict)
    largest_differences: list[dict] = field(default_factory=list)
    written: str = "results.jsonl, summary.json, report.html"

    def to_dict(self) -> dict:
        """summary.json's content."""
        return asdict(self)

    def table(self) -> tuple[list[str], list[dict]]:
        """Columns and rows for the terminal: a row per score, both models, their difference."""
        return comparison_table(self.models, self.comparison,
                                [*self.scores, "perplexity", "latency_s", "tokens_per_s", "errors"])


def _backends(model, url, adapter, compare, api_key, timeout, retries, max_tokens, concurrency,
              response_format=None):
    if url:
        if adapter:
            raise MlxtuneError("--adapter is for a local model; a server picks adapters by "
                               "--model name")
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        backends = {role: ServerBackend(url, name, key, timeout, retries, max_tokens,
                                        concurrency, response_format)
                    for role, name in (("model", model), ("compare", compare)) if name}
    else:
        if response_format:
            raise MlxtuneError("--response-format is enforced by the server: use it with --url "
                               "(e.g. mlxtune serve)")
        backends = {"model": LocalBackend(model, Path(adapter) if adapter else None, max_tokens)}
        if compare:
            backends["compare"] = LocalBackend(compare, None, max_tokens)
    if compare and backends["compare"].label == backends["model"].label:
        raise MlxtuneError(f"--compare {compare} is the same model as --model; compare with a "
                           "different model (or the same one with --adapter)")
    return backends


def _read_results(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that example is simply answered again
    return rows


def _prior_results(results: Path, resume: bool, backends: dict) -> list[dict]:
    rows = _read_results(results)
    if rows and not resume:
        raise MlxtuneError(f"{results} already has {len(rows)} results: finish that eval with "
                           "--resume, or choose another --out")
    for row in rows:
        backend = backends.get(row.get("role"))
        if backend is None or row.get("model") != backend.label:
            raise MlxtuneError(f"{results} holds answers of {row.get('model')!r} as "
                               f"{row.get('role')}, not this eval's models; use another --out")
    # Rewrite without any torn last line so appended rows start on a line of their own.
    write_text(results, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _row(role, label, example, answer, names) -> dict:
    scores = M.score(answer.text, example.reference, names)
    tps = (answer.completion_tokens / answer.latency_s
           if answer.completion_tokens and answer.latency_s > 0 else None)
    return {"id": example.id, "role": role, "model": label, "prompt": example.prompt_text(),
            "reference": example.reference, "answer": answer.text, "scores": scores,
            "latency_s": round(answer.latency_s, 4), "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "tokens_per_s": round(tps, 2) if tps else None, "error": answer.error}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], backends: dict, scores: list[str], data: Path, out: Path,
              n_examples: int, perplexity: dict) -> Summary:
    """Per-model means, paired bootstrap differences and the most different examples."""
    by_role = {role: {r["id"]: r for r in rows if r["role"] == role} for role in backends}
    models = {}
    for role, backend in backends.items():
        mine = list(by_role[role].values())
        tokens = sum(r["completion_tokens"] or 0 for r in mine)
        seconds = sum(r["latency_s"] for r in mine)
        models[role] = {**backend.describe(), "answered": len(mine),
                        "metrics": {s: _mean(r["scores"].get(s) for r in mine) for s in scores},
                        "perplexity": perplexity.get(role),
                        "latency_s": _mean(r["latency_s"] for r in mine),
                        "tokens_per_s": tokens / seconds if seconds > 0 and tokens else None,
                        "errors": sum(1 for r in mine if r["error"])}
    summary = Summary(str(data), str(out), n_examples, scores, models)
    if "compare" not in backends:
        return summary
    a, b = by_role["model"], by_role["compare"]
    both = sorted(set(a) & set(b))
    for s in scores:
        pairs = [(a[i]["scores"].get(s), b[i]["scores"].get(s)) for i in both]
        pairs = [p for p in pairs if None not in p]
        summary.comparison[s] = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])
    diffs = []
    for i in both:
        d = _mean(a[i]["scores"][s] - b[i]["scores"][s] for s in scores
                  if a[i]["scores"].get(s) is not None and b[i]["scores"].get(s) is not None)
        if d:
            diffs.append({"id": i, "difference": d})
    diffs.sort(key=lambda x: -abs(x["difference"]))
    summary.largest_differences = diffs[:10]
    return summary


def _answer(backends: dict, examples: list, names: list, results: Path, rows: list) -> None:
    """Ask each backend every example not yet in `rows`, appending each scored row to
    `results` (and `rows`) as soon as it comes, so a killed eval loses at most one answer."""
    progress = ProgressBar("{task.description}", "bar", "count")
    try:
        with open(results, "a", encoding="utf-8") as f:
            # One model after the other: a server that swaps models per request reloads once.
            for role, backend in backends.items():
                done = {r["id"] for r in rows if r["role"] == role}
                todo = [ex for ex in examples if ex.id not in done]
                task = progress.add(backend.label[-40:], len(examples), len(examples) - len(todo))
                for example, answer in backend.answer_all(todo):
                    row = _row(role, backend.label, example, answer, names)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    rows.append(row)
                    progress.advance(task)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted with {len(rows)} results saved in {results}; finish "
                          "with --resume") from None
    finally:
        progress.close()


def run_eval(data: Path, out: Path, model: str, *, url: str | None = None,
             adapter: Path | None = None, compare: str | None = None, metrics: str | None = None,
             limit: int | None = None, concurrency: int = 4, max_tokens: int = 256,
             timeout: float = 120.0, retries: int = 3, api_key: str | None = None,
             resume: bool = False, response_format: Path | None = None) -> Summary:
    """Answer, score and compare; writes out/results.jsonl, summary.json and report.html.
    Preference pairs (prompt, chosen, rejected) are scored by log-probability instead.
    `response_format`: a JSON file (a JSON Schema or a whole response_format) sent with every
    request."""
    from mlxtune.evaluate.examples import find_test_file
    from mlxtune.evaluate.preference import is_preference_file, run_preference_eval
    from mlxtune.response_format import read_response_format

    if limit is not None and limit < 1:
        raise MlxtuneError(f"--limit must be at least 1, got {limit}")
    fmt = read_response_format(response_format) if response_format is not None else None
    if is_preference_file(find_test_file(data)):
        if fmt is not None:
            raise MlxtuneError("--response-format is for generated answers; preference pairs "
                               "are scored by log-probability")
        return run_preference_eval(find_test_file(data), out, model, url=url, adapter=adapter,
                                   compare=compare, limit=limit)
    names = M.parse_metrics(metrics)
    scores = M.score_names(names)
    data_path, examples = read_examples(data, limit)
    backends = _backends(model, url, adapter, compare, api_key, timeout, retries, max_tokens,
                         concurrency, fmt)
    for backend in backends.values():
        backend.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = _prior_results(results, resume, backends)
    wanted = {ex.id for ex in examples}
    _answer(backends, examples, names, results, rows)
    perplexity = {role: b.perplexity(examples) for role, b in backends.items()
                  if isinstance(b, LocalBackend)}
    rows = [r for r in rows if r["id"] in wanted]
    summary = summarize(rows, backends, scores, data_path, out, len(examples), perplexity)
    write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    from mlxtune.evaluate.report import render_report

    write_text(out / "report.html", render_report(summary, rows))
    return summary
