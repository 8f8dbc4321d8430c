"""Per-example scores of an answer against its reference, each in [0, 1] (None: does not apply).

ROUGE-L comes from rouge-score and chrF/BLEU from sacrebleu, the implementations papers cite, so
our numbers match theirs; exact match, contains and the JSON checks are ours.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from mlxtune.errors import MlxtuneError

METRICS = ("exact", "contains", "rouge", "chrf", "bleu", "json")
DEFAULT_METRICS = ("exact", "contains", "rouge", "chrf", "json")
# What each metric adds to an example's scores (json gives two numbers).
SCORE_NAMES = {"exact": ["exact"], "contains": ["contains"], "rouge": ["rouge_l"],
               "chrf": ["chrf"], "bleu": ["bleu"], "json": ["json_valid", "json_fields"]}


def parse_metrics(spec: str | None) -> list[str]:
    """The metric names in a comma-separated `spec` (the defaults when empty), checked."""
    names = [m.strip().lower() for m in (spec or "").split(",") if m.strip()]
    if not names:
        return list(DEFAULT_METRICS)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise MlxtuneError(f"--metrics: unknown metric {', '.join(unknown)}; choose from "
                           f"{', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def score_names(metrics: list[str]) -> list[str]:
    """The score columns `metrics` produce, in order."""
    return [name for m in metrics for name in SCORE_NAMES[m]]


def normalize(text: str) -> str:
    """Strip, casefold and collapse whitespace: what 'the same answer' means for exact match."""
    return " ".join(str(text).split()).casefold()


class _WordTokenizer:
    # rouge-score's default tokenizer keeps only [a-z0-9], which scores any non-Latin text 0.
    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.casefold())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 over words (casefolded, any script)."""
    return _rouge().score(reference, answer)["rougeL"].fmeasure


def chrf(answer: str, reference: str) -> float:
    """sacrebleu's sentence chrF, scaled to [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_chrf(answer, [reference]).score / 100


def bleu(answer: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (with its default smoothing), scaled to [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_bleu(answer, [reference]).score / 100


def parse_json(text: str):
    """The JSON value in `text` (the whole text, else the first object or array in it), or raise."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # Models often wrap JSON in prose or a code fence: take the first value that parses.
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = json.JSONDecoder().raw_decode(text, match.start())
            return value
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value")


def _reference_json(reference: str):
    text = reference.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def json_scores(answer: str, reference: str) -> dict:
    """json_valid (the answer holds JSON) and json_fields (share of the reference's top-level
    fields the answer has with equal values); None for both when the reference is not JSON."""
    ref = _reference_json(reference)
    if ref is None:
        return {"json_valid": None, "json_fields": None}
    try:
        got = parse_json(answer)
    except ValueError:
        return {"json_valid": 0.0, "json_fields": 0.0}
    if isinstance(ref, dict) and ref:
        same = sum(1 for k, v in ref.items() if isinstance(got, dict) and k in got and got[k] == v)
        fields = same / len(ref)
    else:
        fields = float(got == ref)
    return {"json_valid": 1.0, "json_fields": fields}


def score(answer: str, reference: str, metrics: list[str]) -> dict:
    """Every requested score of `answer` against `reference`."""
    scores = {}
    for m in metrics:
        if m == "exact":
            scores["exact"] = float(normalize(answer) == normalize(reference))
        elif m == "contains":
            scores["contains"] = float(normalize(reference) in normalize(answer))
        elif m == "rouge":
            scores["rouge_l"] = rouge_l(answer, reference)
        elif m == "chrf":
            scores["chrf"] = chrf(answer, reference)
        elif m == "bleu":
            scores["bleu"] = bleu(answer, reference)
        elif m == "json":
            scores.update(json_scores(answer, reference))
    return scores
