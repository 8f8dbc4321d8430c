"""The shapes people export data in, recognised per file and turned into mlx-lm's three formats.

An example is a dict in mlx-lm's own form: chat `{"messages": [...]}`, completions
`{"prompt", "completion"}` or text `{"text"}`. A row that cannot become one raises `Drop`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mlxtune.errors import ConfigError, DataError

FORMATS = ("auto", "alpaca", "sharegpt", "chat", "completions", "text", "preference")
COLUMN_ROLES = ("prompt", "completion", "system", "text")

# ShareGPT and its descendants spell roles many ways; unknown roles are rejected, not guessed.
ROLES = {"user": "user", "human": "user", "prompter": "user",
         "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
         "chatgpt": "assistant", "ai": "assistant",
         "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
# Header names that, in this order of preference, hold the prompt / the answer / a whole text.
PROMPT_NAMES = ("prompt", "question", "instruction", "input", "query", "user", "human", "source",
                "q")
ANSWER_NAMES = ("completion", "answer", "response", "output", "target", "assistant", "reply",
                "gpt", "a")
TEXT_NAMES = ("text", "content", "document", "body")


class Drop(Exception):
    """A row that is left out: `reason` is malformed, empty or no_answer; `why` says more."""

    def __init__(self, reason: str, why: str):
        super().__init__(why)
        self.reason, self.why = reason, why


@dataclass(frozen=True)
class Shape:
    """How one file's records are laid out: shape name, the mlx-lm format it maps to, its keys."""

    name: str
    kind: str
    fields: dict = field(default_factory=dict)

    def describe(self) -> str:
        """The shape's name, with the mapping when columns were guessed or given."""
        if self.name != "columns":
            return self.name
        return "columns " + ", ".join(f"{role}={key}" for role, key in self.fields.items())


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=Q,completion=A` -> {"prompt": "Q", "completion": "A"}, checked."""
    if not spec:
        return {}
    columns, problems = {}, []
    for part in spec.split(","):
        role, eq, column = part.partition("=")
        role, column = role.strip().lower(), column.strip()
        if not eq or not column:
            problems.append(f"--columns: {part.strip()!r} is not ROLE=COLUMN")
        elif role not in COLUMN_ROLES:
            problems.append(f"--columns: unknown role {role!r}; use {', '.join(COLUMN_ROLES)}")
        else:
            columns[role] = column
    if columns and "text" not in columns and not {"prompt", "completion"} <= set(columns):
        problems.append("--columns needs both prompt= and completion= (or text=)")
    if "text" in columns and len(columns) > 1:
        problems.append("--columns text= cannot be combined with other columns")
    if problems:
        raise ConfigError(problems)
    return columns


def _keys(record: dict) -> dict[str, str]:
    """{normalised name: actual key}, so 'Question ', 'question' and 'QUESTION' all match."""
    return {re.sub(r"[\s_\-]+", "", str(k)).lower(): k for k in record}


def detect_shape(label: str, record: object, fmt: str = "auto",
                 columns: dict[str, str] | None = None) -> Shape:
    """A file's shape, from its first record (or CSV header) and the user's --format/--columns."""
    if isinstance(record, str):
        if fmt not in ("auto", "text"):
            raise DataError(f"{label}: holds plain text, which cannot be read as --format {fmt}")
        return Shape("text", "text")
    if not isinstance(record, dict):
        raise DataError(f"{label}: expected objects or rows, got {type(record).__name__}")
    keys = _keys(record)
    listing = ", ".join(map(str, record)) or "(none)"
    chat_key = keys.get("messages")
    share_key = keys.get("conversations") or keys.get("conversation")
    if fmt in ("auto", "chat") and chat_key:
        return Shape("chat", "chat", {"messages": chat_key})
    if fmt in ("auto", "sharegpt") and (share_key or chat_key):
        return Shape("sharegpt", "chat", {"messages": share_key or chat_key})
    if fmt in ("chat", "sharegpt"):
        raise DataError(f"{label}: --format {fmt} needs a 'messages' or 'conversations' field; "
                        f"found {listing}")
    if columns:
        return _column_shape(label, keys, columns, listing)
    answer = keys.get("output") or keys.get("response")
    if fmt in ("auto", "alpaca") and "instruction" in keys and answer:
        return Shape("alpaca", "completions", {"instruction": keys["instruction"],
                                               "input": keys.get("input") or keys.get("context"),
                                               "output": answer})
    if fmt == "alpaca":
        raise DataError(f"{label}: --format alpaca needs 'instruction' and 'output' fields; "
                        f"found {listing}")
    if fmt in ("auto", "completions") and "prompt" in keys and "completion" in keys:
        return Shape("completions", "completions",
                     {"prompt": keys["prompt"], "completion": keys["completion"]})
    text = next((keys[n] for n in TEXT_NAMES if n in keys), None)
    if fmt == "text" or (fmt == "auto" and text and (len(keys) == 1 or "text" in keys)):
        if text is None:
            raise DataError(f"{label}: --format text needs a 'text' field; found {listing}; "
                            "pass --columns text=COLUMN")
        return Shape("text", "text", {"text": text})
    prompt = next((keys[n] for n in PROMPT_NAMES if n in keys), None)
    answer = next((keys[n] for n in ANSWER_NAMES if n in keys and keys[n] != prompt), None)
    if prompt and answer:
        return Shape("columns", "completions", {"prompt": prompt, "completion": answer})
    raise DataError(f"{label}: cannot tell which fields hold the prompt and the answer (found "
                    f"{listing}); pass --columns prompt=NAME,completion=NAME")


def _column_shape(label: str, keys: dict, columns: dict, listing: str) -> Shape:
    fields = {}
    for role, name in columns.items():
        actual = keys.get(re.sub(r"[\s_\-]+", "", name).lower())
        if actual is None:
            raise DataError(f"{label}: no column {name!r} for --columns {role}=; found {listing}")
        fields[role] = actual
    kind = "text" if "text" in fields else "chat" if "system" in fields else "completions"
    return Shape("columns", kind, fields)


def text_of(value: object, what: str) -> str:
    """A field's value as text: strings as they are, numbers written out, content parts joined."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise Drop("malformed", f"{what} is a {type(value).__name__}, not text")


def to_example(shape: Shape, record: object) -> dict:
    """One record as an mlx-lm example of `shape.kind`; raises Drop for rows to leave out."""
    if isinstance(record, str):
        if shape.name != "text":
            raise Drop("malformed", "plain text where objects were expected")
        return _text(record)
    if not isinstance(record, dict):
        raise Drop("malformed", f"a JSON {type(record).__name__}, not an object")
    f = shape.fields
    if shape.name in ("chat", "sharegpt"):
        return _chat(record, f["messages"])
    if shape.name == "text" or shape.kind == "text":
        if "text" not in f:
            raise Drop("malformed", "an object where plain text was expected")
        return _text(text_of(_get(record, f["text"]), repr(f["text"])))
    if shape.name == "alpaca":
        instruction = text_of(_get(record, f["instruction"]), "'instruction'")
        extra = text_of(record.get(f["input"]), "'input'") if f["input"] else ""
        # The usual Alpaca prompt: the instruction, then the input (if any) after a blank line.
        prompt = f"{instruction}\n\n{extra}" if extra.strip() and instruction.strip() else \
            instruction if instruction.strip() else extra
        completion = text_of(_get(record, f["output"]), "'output'")
    else:
        prompt = text_of(_get(record, f["prompt"]), repr(f["prompt"]))
        completion = text_of(_get(record, f["completion"]), repr(f["completion"]))
    _check_pair(prompt, completion)
    if shape.kind == "chat":
        system = text_of(record.get(f["system"]), repr(f["system"]))
        return as_chat({"prompt": prompt, "completion": completion}, system)
    return {"prompt": prompt, "completion": completion}


def as_chat(example: dict, system: str | None = None) -> dict:
    """`example` in chat form (completions become a user and an assistant turn), with `system` added
    where it has no system message."""
    if "messages" not in example:
        example = {"messages": [{"role": "user", "content": example["prompt"]},
                                {"role": "assistant", "content": example["completion"]}]}
    if system and system.strip() and example["messages"][0]["role"] != "system":
        example = dict(example, messages=[{"role": "system", "content": system},
                                          *example["messages"]])
    return example


def _get(record: dict, key: str) -> object:
    if key not in record:
        raise Drop("malformed", f"no {key!r} field")
    return record[key]


def _text(text: str) -> dict:
    if not text.strip():
        raise Drop("empty", "empty text")
    return {"text": text}


def _check_pair(prompt: str, completion: str) -> None:
    if not prompt.strip() and not completion.strip():
        raise Drop("empty", "empty prompt and answer")
    if not completion.strip():
        raise Drop("no_answer", "empty answer")
    if not prompt.strip():
        raise Drop("empty", "empty prompt")


def _chat(record: dict, key: str) -> dict:
    turns = _get(record, key)
    if isinstance(turns, str):  # a conversation stored as JSON text in a spreadsheet cell
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise Drop("malformed", f"{key!r} is text that is not a JSON list") from None
    if not isinstance(turns, list):
        raise Drop("malformed", f"{key!r} is a {type(turns).__name__}, not a list of messages")
    messages, any_text, last_answer = [], False, -1
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise Drop("malformed", f"message {i} is not an object")
        role = turn.get("role", turn.get("from"))
        # The common spellings hit the table directly; others are normalised first.
        mapped = ROLES.get(role) if isinstance(role, str) else None
        if mapped is None:
            if role is None:
                raise Drop("malformed", f"message {i} has no 'role' (or 'from')")
            mapped = ROLES.get(str(role).strip().lower())
            if mapped is None:
                raise Drop("malformed", f"message {i} has unknown role {role!r}")
        content = turn["content"] if "content" in turn else turn.get("value")
        if not isinstance(content, str):
            content = text_of(content, f"message {i} content")
        message = {"role": mapped, "content": content}
        if len(turn) > 2:
            for extra in ("name", "tool_calls", "tool_call_id"):
                if turn.get(extra) is not None:
                    message[extra] = turn[extra]
        has_text = (content != "" and not content.isspace()) or "tool_calls" in message
        any_text = any_text or has_text
        if has_text and mapped == "assistant":
            last_answer = i - 1
        messages.append(message)
    if not any_text:
        raise Drop("empty", "no message has any text")
    if last_answer < 0:
        raise Drop("no_answer", "no assistant answer")
    # Turns after the last answer teach nothing, and mlx-lm's prompt masking assumes the
    # conversation ends with the answer.
    example = {"messages": messages[:last_answer + 1]}
    if isinstance(record.get("tools"), list) and record["tools"]:
        example["tools"] = record["tools"]
    return example
