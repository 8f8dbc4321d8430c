"""Prepared JSONL splits -> token ids with a loss mask, and deterministic, resumable batches.

The mask trains every assistant turn and its end token (not only the last turn, as mlx-lm's
prompt masking does), so multi-turn data teaches every answer and the model learns to stop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxtune.errors import DataError

SPLITS = ("train", "valid", "test")


@dataclass
class Tokenized:
    """One example: token ids and, per token, whether predicting it carries loss."""

    tokens: np.ndarray
    loss_mask: np.ndarray


def check_data_folder(folder: Path, need: tuple[str, ...] = ("train", "valid"),
                      mode: str = "sft") -> dict[str, Path]:
    """The split files in `folder`, checked to exist and to hold, on every line, JSON of the kind
    `mode` trains on (pairs for dpo/orpo, examples for sft), before any model loads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder (make one with: mlxtune prepare RAW --out "
                        f"{folder})")
    found = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if path.is_file():
            found[split] = path
        elif split in need:
            raise DataError(f"{path}: missing; {folder} needs {' and '.join(need)} .jsonl files")
    for split, path in found.items():
        # Reading every line costs seconds at most; finding a bad one after the weights loaded
        # (or hours into training, for a split read late) costs far more.
        records = 0
        for line_no, record in read_records(path):
            _check_mode(_example_kind(record, path, line_no), mode, path, line_no)
            records += 1
        if not records and split in need:
            raise DataError(f"{path}: has no examples")
    return found


def read_records(path: Path):
    """(line number, record) for each non-blank line of a JSONL split, streamed; a DataError
    with file:line at the first line that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield line_no, _parse(line, path, line_no)


def _parse(line: str, path: Path, line_no: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object per line")
    return record


def _check_mode(kind: str, mode: str, path: Path, line_no: int) -> None:
    if mode == "sft" and kind == "preference":
        raise DataError(f"{path}:{line_no}: holds preference pairs (prompt, chosen, rejected), "
                        "which SFT cannot train on; set training_mode: dpo or orpo")
    if mode != "sft" and kind != "preference":
        raise DataError(f"{path}:{line_no}: training_mode {mode} needs preference pairs "
                        f"(prompt, chosen, rejected), got {kind} examples; prepare pair data "
                        "(mlxtune prepare) or set training_mode: sft")


def _example_kind(record: dict, path: Path, line_no: int) -> str:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if isinstance(record.get("messages"), list):
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completions"
    if isinstance(record.get("text"), str):
        return "text"
    raise DataError(f"{path}:{line_no}: expected mlx-lm's chat ('messages'), completions "
                    f"('prompt', 'completion') or text ('text') format, or preference pairs "
                    f"('prompt', 'chosen', 'rejected'), got keys {sorted(record)}")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template (a DataError if it refuses)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's errors and the template's own raise_exception()
        raise DataError(f"the model's chat template refused these messages: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def check_messages(messages: object) -> None:
    """A chat example's messages: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} messages")
    for i, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"message {i} is not a {{role, content}} pair of strings: "
                            f"{json.dumps(m)[:80]}")


def tokenize_chat(tokenizer, messages: list[dict], mask_prompt: bool) -> Tokenized:
    """Token ids of a conversation; with `mask_prompt`, loss only on assistant turns and their end."""
    check_messages(messages)
    tokens = render_chat(tokenizer, messages)
    mask = np.ones(len(tokens), dtype=bool)
    if mask_prompt:
        mask[:] = False
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            # The answer is what the template adds between "prompt for turn i" and "turn i done".
            start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(render_chat(tokenizer, messages[: i + 1]))
            mask[start:end] = True
    return Tokenized(np.array(tokens, dtype=np.int32), mask)


def tokenize_record(tokenizer, record: dict, mask_prompt: bool) -> Tokenized:
    """Token ids and loss mask of one mlx-lm JSONL record of any of the three formats."""
    if "messages" in record:
        return tokenize_chat(tokenizer, record["messages"], mask_prompt)
    if "prompt" in record:
        messages = [{"role": "user", "content": str(record["prompt"])},
                    {"role": "assistant", "content": str(record["completion"])}]
        if getattr(tokenizer, "chat_template", None):
            return tokenize_chat(tokenizer, messages, mask_prompt)
        prompt = tokenizer.encode(str(record["prompt"]))
        answer = tokenizer.encode(str(record["completion"]), add_special_tokens=False)
        tokens = prompt + answer + [tokenizer.eos_token_id]
        mask = np.ones(len(tokens), dtype=bool)
        if mask_prompt:
            mask[: len(prompt)] = False
        return Tokenized(np.array(tokens, dtype=np.int32), mask)
    tokens = tokenizer.encode(record["text"]) + [tokenizer.eos_token_id]
    return Tokenized(np.array(tokens, dtype=np.int32), np.ones(len(tokens), dtype=bool))


@dataclass
class Pair:
    """One preference example: the chosen and the rejected answer, each after the same prompt."""

    chosen: Tokenized
    rejected: Tokenized


def _messages(value, role: str) -> list[dict]:
    # Our prepared files hold message lists (TRL's conversational form); plain strings, as
    # mlx-lm-lora's DPO files have them, are one message of `role`.
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return list(value)


def tokenize_answer(tokenizer, prompt: list[dict], answer: list[dict]) -> Tokenized:
    """Token ids of prompt + answer with the loss mask on the answer (and its end token) only."""
    if getattr(tokenizer, "chat_template", None):
        start = len(render_chat(tokenizer, prompt, add_generation_prompt=True))
        tokens = render_chat(tokenizer, prompt + answer)
    else:
        head = tokenizer.encode("\n".join(str(m.get("content", "")) for m in prompt))
        tail = tokenizer.encode("".join(str(m.get("content", "")) for m in answer),
                                add_special_tokens=False)
        start, tokens = len(head), head + tail + [tokenizer.eos_token_id]
    mask = np.zeros(len(tokens), dtype=bool)
    mask[start:] = True
    return Tokenized(np.array(tokens, dtype=np.int32), mask)


def tokenize_pair(tokenizer, record: dict, max_seq_length: int) -> Pair | None:
    """A record as a Pair truncated to `max_seq_length` + 1 tokens; None if a side has no
    answer token left after truncation."""
    prompt = _messages(record.get("prompt", []), "user")
    sides = []
    for key in ("chosen", "rejected"):
        t = tokenize_answer(tokenizer, prompt, _messages(record[key], "assistant"))
        t = Tokenized(t.tokens[: max_seq_length + 1], t.loss_mask[: max_seq_length + 1])
        if not t.loss_mask[1:].any():
            return None
        sides.append(t)
    return Pair(*sides)


def load_split(path: Path, tokenizer, mask_prompt: bool, max_seq_length: int,
               mode: str = "sft") -> list:
    """Every example of one split file, tokenized and truncated to `max_seq_length` + 1 tokens:
    Tokenized examples for sft, preference Pairs for dpo/orpo."""
    examples = []
    for line_no, record in read_records(path):
        _check_mode(_example_kind(record, path, line_no), mode, path, line_no)
        try:
            if mode != "sft":
                pair = tokenize_pair(tokenizer, record, max_seq_length)
                if pair is not None:
                    examples.append(pair)
                continue
            ex = tokenize_record(tokenizer, record, mask_prompt)
        except DataError as e:
            raise DataError(f"{path}:{line_no}: {e}") from None
        # Inputs are tokens[:-1] and targets tokens[1:], so keep one token more than the window.
        ex = Tokenized(ex.tokens[: max_seq_length + 1], ex.loss_mask[: max_seq_length + 1])
        if ex.loss_mask[1:].any():
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no example has a token to train on")
    return examples


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    """How many batches one pass over `n_examples` makes (the last one may be smaller)."""
    return math.ceil(n_examples / batch_size)


def batch_indices(n_examples: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """Example indices of global batch `index`: a fresh shuffle every epoch, a pure function of
    (seed, index), so a resumed run reads exactly the batches the uninterrupted one would."""
    per_epoch = batches_per_epoch(n_examples, batch_size)
    epoch, within = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[within * batch_size: (within + 1) * batch_size]


def collate(examples: list, pad_id: int = 0, multiple: int = 8):
    """(inputs, targets, mask) int32/float32 arrays, padded to a multiple of `multiple` tokens.
    Preference pairs become 2n rows: the n chosen answers, then the n rejected ones."""
    import mlx.core as mx

    if examples and hasattr(examples[0], "chosen"):
        examples = [p.chosen for p in examples] + [p.rejected for p in examples]
    longest = max(len(e.tokens) for e in examples) - 1
    width = max(multiple, math.ceil(longest / multiple) * multiple)
    inputs = np.full((len(examples), width), pad_id, dtype=np.int32)
    targets = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[row, :n] = e.tokens[:-1]
        targets[row, :n] = e.tokens[1:]
        mask[row, :n] = e.loss_mask[1:]
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def iterate_batches(examples: list[Tokenized], batch_size: int, seed: int, start: int = 0,
                    rank: int = 0, world: int = 1):
    """Yield (index, inputs, targets, mask) forever from global batch `start` on; with `world` > 1
    each rank gets its own slice of every global batch."""
    index = start
    while True:
        ids = batch_indices(len(examples), batch_size * world, seed, index)
        mine = ids[rank::world] if world > 1 else ids
        yield (index, *collate([examples[i] for i in mine]))
        index += 1


def eval_batches(examples: list[Tokenized], batch_size: int, limit: int):
    """Fixed validation batches in file order: the first `limit` (all when limit is -1)."""
    count = batches_per_epoch(len(examples), batch_size)
    if limit >= 0:
        count = min(count, limit)
    for b in range(count):
        yield collate(examples[b * batch_size: (b + 1) * batch_size])
