"""Preference eval: how often a model gives the chosen answer a higher log-probability than the
rejected one, on a prepared preference test split, per model and paired under --compare.

It needs each answer's log-probability given the prompt, so it runs locally (a model and an
optional adapter, through the same compute path as training); an OpenAI-style server returns
log-probabilities of the tokens it generates, not of a given answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxtune.errors import DataError, MlxtuneError
from mlxtune.evaluate.client import LocalBackend
from mlxtune.evaluate.stats import comparison_table, paired_bootstrap
from mlxtune.train.data import read_records

SCORES = ("prefers_chosen", "logp_margin")


def is_preference_file(path: Path) -> bool:
    """Whether a test file holds preference pairs (its first record has chosen and rejected)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "chosen" in record and "rejected" in record
    return False


@dataclass
class PreferenceSummary:
    """summary.json of a preference eval: per-model accuracy and margin, the paired difference."""

    data: str
    out: str
    examples: int
    scores: list[str]
    models: dict[str, dict]
    comparison: dict[str, dict] = field(default_factory=dict)
    written: str = "results.jsonl, summary.json"

    def to_dict(self) -> dict:
        """summary.json's content."""
        return asdict(self)

    def table(self) -> tuple[list[str], list[dict]]:
        """Columns and rows for the terminal, as the generation eval prints them."""
        return comparison_table(self.models, self.comparison, self.scores)


def read_pairs(path: Path, limit: int | None) -> list[dict]:
    """The first `limit` pair records of a test file, checked."""
    records = []
    for line_no, record in read_records(path):
        if not ("chosen" in record and "rejected" in record):
            raise DataError(f"{path}:{line_no}: expected a preference pair (prompt, chosen, "
                            "rejected) like the lines before it")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path}: has no pairs to evaluate")
    return records


def score_pairs(backend: LocalBackend, records: list[dict]) -> list[dict]:
    """Per pair: both answers' summed log-probabilities under the backend's model, the margin,
    and 1 / 0.5 / 0 when chosen is more / equally / less likely."""
    from mlxtune.train.data import tokenize_pair
    from mlxtune.train.preference import pair_logps

    backend.load()
    pairs = [tokenize_pair(backend.tokenizer, r, 4096) for r in records]
    kept = [(i, p) for i, p in enumerate(pairs) if p is not None]
    chosen, rejected = pair_logps(backend.model, [p for _, p in kept])
    rows = []
    for (i, _), c, r in zip(kept, chosen, rejected):
        win = 1.0 if c > r else 0.5 if c == r else 0.0
        rows.append({"id": i, "model": backend.label, "chosen_logp": c, "rejected_logp": r,
                     "logp_margin": c - r, "prefers_chosen": win})
    return rows


def run_preference_eval(path: Path, out: Path, model: str, *, url: str | None = None,
                        adapter: Path | None = None, compare: str | None = None,
                        limit: int | None = None) -> PreferenceSummary:
    """Score every pair of `path` with the model (and --compare's); writes out/results.jsonl
    and out/summary.json."""
    if url:
        raise MlxtuneError("a preference eval needs the log-probability of the given chosen and "
                           "rejected answers, which an OpenAI-style server (mlxtune serve "
                           "included) does not return; run it locally: --model NAME [--adapter "
                           "DIR], without --url")
    records = read_pairs(path, limit)
    backends = {"model": LocalBackend(model, Path(adapter) if adapter else None)}
    if compare:
        backends["compare"] = LocalBackend(compare)
    if compare and backends["compare"].label == backends["model"].label:
        raise MlxtuneError(f"--compare {compare} is the same model as --model; compare with a "
                           "different model (or the same one with --adapter)")
    for backend in backends.values():
        backend.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_role, models = {}, {}
    for role, backend in backends.items():
        rows = score_pairs(backend, records)
        by_role[role] = {r["id"]: r for r in rows}
        models[role] = {**backend.describe(), "answered": len(rows),
                        "metrics": {s: sum(r[s] for r in rows) / max(len(rows), 1)
                                    for s in SCORES}}
        backend.model = None  # free one model's weights before the next loads
    summary = PreferenceSummary(str(path), str(out), len(records), list(SCORES), models)
    if compare:
        both = sorted(set(by_role["model"]) & set(by_role["compare"]))
        for s in SCORES:
            summary.comparison[s] = paired_bootstrap([by_role["model"][i][s] for i in both],
                                                     [by_role["compare"][i][s] for i in both])
    from mlxtune.atomic import write_text

    write_text(out / "results.jsonl", "".join(json.dumps({"role": role, **r}) + "\n"
                                               for role, rows in by_role.items()
                                               for r in rows.values()))
    write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary
