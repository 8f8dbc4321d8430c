"""Test examples from a prepared split: what to send (the conversation minus its last answer)
and the reference answer to score against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import DataError
from mlxtune.train.data import read_records


@dataclass
class Example:
    """One test prompt: chat messages (chat, completions) or raw text (text), and its reference."""

    id: int
    kind: str
    messages: list[dict] | None
    text: str | None
    reference: str
    record: dict

    def prompt_text(self) -> str:
        """The prompt as one string, for results and the report."""
        if self.messages is None:
            return self.text
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in self.messages)


def find_test_file(data: Path) -> Path:
    """The test split: `data` itself, or `data`/test.jsonl for a prepared folder."""
    data = Path(data)
    path = data / "test.jsonl" if data.is_dir() else data
    if not path.is_file():
        hint = (f"{data} has no test.jsonl" if data.is_dir() else f"{data}: no such file")
        raise DataError(f"{hint} (make one with: mlxtune prepare RAW --out DIR)")
    return path


def _example(record, path: Path, line_no: int, index: int) -> Example | None:
    where = f"{path}:{line_no}"
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict)
                    and m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(f"{where}: a chat example needs a prompt and a final assistant "
                            "answer to score against")
        return Example(index, "chat", messages[:last], None, str(messages[last].get("content", "")),
                       record)
    if "prompt" in record and "completion" in record:
        return Example(index, "completions", [{"role": "user", "content": str(record["prompt"])}],
                       None, str(record["completion"]), record)
    if isinstance(record.get("text"), str):
        # Plain text has no answer: the model continues the first half and is scored on the rest.
        words = record["text"].split(" ")
        if len(words) < 2:
            return None
        half = len(words) // 2
        return Example(index, "text", None, " ".join(words[:half]) + " ",
                       " ".join(words[half:]), record)
    raise DataError(f"{where}: expected mlx-lm's chat ('messages'), completions ('prompt', "
                    f"'completion') or text ('text') format, got keys {sorted(record)}")


def read_examples(data: Path, limit: int | None = None) -> tuple[Path, list[Example]]:
    """The test file and its first `limit` examples (all when None), checked line by line."""
    path = find_test_file(data)
    examples = []
    for line_no, record in read_records(path):
        example = _example(record, path, line_no, len(examples))
        if example is not None:
            examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: has no examples to evaluate")
    return path, examples
