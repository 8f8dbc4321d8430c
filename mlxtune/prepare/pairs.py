"""Preference data: the shapes people publish pairs in, turned into one prepared form.

The prepared form is TRL's conversational preference format, one JSON object per line:
    {"prompt": [messages ending with a user turn],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}
Shapes read:
- `preference`: `prompt` (or question/instruction) with `chosen` and `rejected`, each a string or
  a message list (TRL writes both; UltraFeedback-binarized's chosen/rejected repeat the prompt);
- `hh`: Anthropic HH-RLHF, `chosen` and `rejected` only, each a whole conversation (a
  "\\n\\nHuman: ... \\n\\nAssistant: ..." string or a message list) sharing all but the last answer;
- `ultrafeedback`: a prompt and a list of scored answers (`completions`/`responses`, each with a
  response text and a score); the best-scored one is chosen, the worst rejected.
Rows dropped: an empty side or prompt (empty), chosen equal to rejected (identical), chosen and
rejected that differ before their answers (no_shared_prompt), all answers scored alike (tied).
"""

from __future__ import annotations

import re

from mlxtune.errors import DataError
from mlxtune.prepare.shapes import ROLES, Drop, Shape, _keys, text_of

PROMPT_KEYS = ("prompt", "question", "instruction", "input", "query")
LIST_KEYS = ("completions", "responses", "answers")
TEXT_KEYS = ("response", "text", "completion", "content", "output", "answer")
SCORE_KEYS = ("overall_score", "score", "rating", "reward", "fine_grained_score")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|H|A): ?")


def detect_pairs(label: str, record: object, fmt: str = "auto") -> Shape | None:
    """The preference shape of a file from its first record, or None when it holds no pairs
    (an error instead when `fmt` is preference)."""
    shape = _pair_shape(_keys(record), record) if isinstance(record, dict) else None
    if shape is None and fmt == "preference":
        found = ", ".join(map(str, record)) if isinstance(record, dict) else "plain text"
        raise DataError(f"{label}: --format preference needs 'chosen' and 'rejected' fields, or "
                        f"a prompt and scored 'completions'; found {found}")
    return shape if fmt in ("auto", "preference") else None


def _pair_shape(keys: dict[str, str], record: dict) -> Shape | None:
    prompt = next((keys[k] for k in PROMPT_KEYS if k in keys), None)
    if "chosen" in keys and "rejected" in keys:
        fields = {"chosen": keys["chosen"], "rejected": keys["rejected"]}
        if prompt:
            return Shape("preference", "preference", {"prompt": prompt, **fields})
        return Shape("hh", "preference", fields)
    listed = next((keys[k] for k in LIST_KEYS if k in keys), None)
    if prompt and listed and isinstance(record.get(listed), list):
        return Shape("ultrafeedback", "preference", {"prompt": prompt, "answers": listed})
    return None


def _turns(value: object, default_role: str, what: str) -> list[dict]:
    """A string (one turn of `default_role`, or an HH conversation) or a message list, as
    messages with our role names and text content."""
    if isinstance(value, str):
        parts = _HH_TURN.split(value)
        if len(parts) < 3:
            return [{"role": default_role, "content": value.strip()}]
        # split() gives [before, role, text, role, text, ...]
        return [{"role": "user" if role in ("Human", "H") else "assistant", "content": text.strip()}
                for role, text in zip(parts[1::2], parts[2::2])]
    if not isinstance(value, list):
        raise Drop("malformed", f"{what} is a {type(value).__name__}, not text or messages")
    out = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise Drop("malformed", f"{what} message {i} is not an object")
        role = turn.get("role", turn.get("from"))
        mapped = ROLES.get(str(role).strip().lower()) if role is not None else None
        if mapped is None:
            raise Drop("malformed", f"{what} message {i} has role {role!r}")
        content = turn["content"] if "content" in turn else turn.get("value")
        out.append({"role": mapped, "content": text_of(content, f"{what} message {i}")})
    return out


def _blank(messages: list[dict]) -> bool:
    return not any(m["content"].strip() for m in messages)


def make_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    """The prepared pair; the turns chosen and rejected share become (or replace) the prompt."""
    shared = 0
    while (shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]):
        shared += 1
    if shared:
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for side, name in ((chosen, "chosen"), (rejected, "rejected")):
        if not side or _blank(side):
            raise Drop("empty", f"empty {name} answer")
        if any(m["role"] != "assistant" for m in side):
            raise Drop("no_shared_prompt", "chosen and rejected differ before their answers")
    if chosen == rejected:
        raise Drop("identical", "chosen and rejected are the same answer")
    if not prompt or _blank(prompt):
        raise Drop("no_shared_prompt" if not prompt else "empty", "no prompt before the answers")
    if prompt[-1]["role"] == "assistant":
        raise Drop("malformed", "the prompt ends with an assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _score(answer: dict) -> float | None:
    keys = {re.sub(r"[\s_\-]+", "_", str(k)).lower(): k for k in answer}
    for name in SCORE_KEYS:
        value = answer.get(keys.get(name))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _best_and_worst(answers: list) -> tuple[str, str]:
    scored = []
    for a in answers:
        if isinstance(a, dict) and _score(a) is not None:
            text = next((a[k] for k in TEXT_KEYS if isinstance(a.get(k), str)), None)
            if text is not None and text.strip():
                scored.append((_score(a), text))
    if len(scored) < 2:
        raise Drop("malformed", f"{len(scored)} scored answer(s); a pair needs two")
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best[0] == worst[0]:
        raise Drop("tied", "every answer has the same score")
    return best[1], worst[1]


def to_pair(shape: Shape, record: dict) -> dict:
    """One record of a preference shape as a prepared pair; raises Drop for rows to leave out."""
    if not isinstance(record, dict):
        raise Drop("malformed", f"a JSON {type(record).__name__}, not an object")
    f = shape.fields
    for key in f.values():
        if key not in record:
            raise Drop("malformed", f"no {key!r} field")
    prompt = _turns(record[f["prompt"]], "user", "prompt") if "prompt" in f else []
    if shape.name == "ultrafeedback":
        good, bad = _best_and_worst(record[f["answers"]])
        return make_pair(prompt, [{"role": "assistant", "content": good}],
                         [{"role": "assistant", "content": bad}])
    return make_pair(prompt, _turns(record[f["chosen"]], "assistant", "chosen"),
                     _turns(record[f["rejected"]], "assistant", "rejected"))


def with_system(pair: dict, system: str | None) -> dict:
    """`pair` with a system message first in its prompt, where it has none."""
    if not system or not system.strip() or pair["prompt"][0]["role"] == "system":
        return pair
    return dict(pair, prompt=[{"role": "system", "content": system}, *pair["prompt"]])
