"""`prepare_dataset`: raw files in, mlx-lm's train/valid/test JSONL and a report out, streaming.

Order of work: check options and the output folder, open every file and detect its shape from
its first record, settle on one mlx-lm format, and only then load a tokenizer (if asked) and
stream every row once: read, normalise, deduplicate, count tokens, append to a spool; then cut
the spool into exact-size splits by a seeded content hash (mlxtune/prepare/splits.py).
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxtune.atomic import atomic_folder
from mlxtune.errors import ConfigError, DataError, ModelError
from mlxtune.prepare.fingerprints import FingerprintSet
from mlxtune.prepare.pairs import detect_pairs, to_pair, with_system
from mlxtune.prepare.readers import Malformed, Source
from mlxtune.prepare.report import DropLog, Report, token_stats
from mlxtune.prepare.shapes import (FORMATS, Drop, Shape, as_chat, detect_shape, parse_columns,
                                    to_example)
from mlxtune.prepare.splits import (SPLITS, assign_splits, digest_example, split_sizes,
                                    write_splits)
from mlxtune.progress import ProgressBar

OUTPUT_FILES = {f"{s}.jsonl" for s in SPLITS} | {"report.json"}
# Inputs at least this large get a progress bar (on a terminal).
_LARGE = 64 << 20
_TICK = 8192


@dataclass
class PrepareOptions:
    """What `mlxtune prepare` takes besides the inputs and the output folder."""

    format: str = "auto"
    columns: dict | None = None  # or "prompt=Q,completion=A", parsed by check_options
    system: str | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    model: str | None = None
    max_tokens: int | None = None
    strict: bool = False
    progress: bool | None = None  # None: only for large inputs, only on a terminal
    split: str | None = None  # of Hugging Face dataset inputs; default train (or the only one)
    subset: str | None = None  # configuration of hub dataset inputs


def check_options(options: PrepareOptions) -> None:
    """Raise one ConfigError listing every problem with `options`."""
    o, problems = options, []
    if isinstance(o.columns, str):
        try:
            o.columns = parse_columns(o.columns)
        except ConfigError as e:
            problems += e.problems
    if o.format not in FORMATS:
        problems.append(f"--format {o.format!r}: use one of {', '.join(FORMATS)}")
    for name, value in (("--valid-fraction", o.valid_fraction), ("--test-fraction",
                                                                 o.test_fraction)):
        if not 0 <= value < 1:
            problems.append(f"{name} {value}: must be at least 0 and below 1")
    if o.valid_fraction + o.test_fraction >= 1:
        problems.append(f"--valid-fraction + --test-fraction = "
                        f"{o.valid_fraction + o.test_fraction:g} leaves nothing to train on")
    if o.max_tokens is not None and not o.model:
        problems.append("--max-tokens needs --model (tokens are counted with its tokenizer)")
    if o.max_tokens is not None and o.max_tokens < 1:
        problems.append(f"--max-tokens {o.max_tokens}: must be positive")
    if problems:
        raise ConfigError(problems)


def prepare_dataset(inputs: list, out: Path, options: PrepareOptions | None = None) -> Report:
    """Turn raw files into `out`/{train,valid,test}.jsonl and report.json; all or nothing."""
    options = options or PrepareOptions()
    check_options(options)
    if not inputs:
        raise ConfigError(["no input files given"])
    out = Path(out)
    _check_out(out)
    sources = [_open_source(p, options) for p in inputs]
    if (options.split or options.subset) and not any(s.kind == "dataset" for s in sources):
        raise ConfigError(["--split and --subset choose from Hugging Face datasets (a "
                           "save_to_disk folder or a hub id); no input is one"])
    shapes = [_file_shape(s, options) for s in sources]
    kind = _common_kind(sources, shapes, options)
    count = _token_counter(options.model, kind) if options.model else None
    report = Report(out=out, format=kind, options=asdict(options))
    with atomic_folder(out) as tmp:
        _stream(sources, shapes, kind, count, options, tmp, report)
    return report


def _open_source(raw, options: PrepareOptions):
    """A file's Source, or a DatasetSource for a save_to_disk folder or a hub dataset id."""
    from mlxtune.prepare import hf_datasets
    from mlxtune.prepare.readers import READERS

    if hf_datasets.is_saved_dataset(Path(raw)) or hf_datasets.looks_like_hub_id(str(raw),
                                                                                READERS):
        return hf_datasets.DatasetSource(str(raw), options.split, options.subset)
    return Source(raw)


def _check_out(out: Path) -> None:
    # The swap replaces `out` whole: never let a typo like --out . delete a folder of other work.
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if others:
            raise DataError(f"{out}: holds other files ({', '.join(others[:5])}), so prepare "
                            "will not replace it; choose a new folder")


def _file_shape(source: Source, options: PrepareOptions) -> Shape | None:
    """The file's shape, from its first readable record (or a CSV header); None if it has none."""
    if source.kind == "text":
        return detect_shape(str(source.path), "", options.format)
    rows = source.rows()
    try:
        for _, record in rows:
            if isinstance(record, (dict, str)):  # a stray array or number is one bad row
                pairs = detect_pairs(str(source.path), record, options.format)
                if pairs:
                    return pairs
                return detect_shape(str(source.path), record, options.format, options.columns)
    finally:
        rows.close()
    header = getattr(source, "header", None)
    if header:
        return detect_shape(str(source.path), dict.fromkeys(header, ""), options.format,
                            options.columns)
    return None


def _common_kind(sources: list[Source], shapes: list, options: PrepareOptions) -> str:
    """The one mlx-lm format every split file will hold, since mlx-lm reads one per file."""
    kinds = {shape.kind for shape in shapes if shape}
    if "preference" in kinds and len(kinds) > 1:
        pairs = [str(s.path) for s, sh in zip(sources, shapes) if sh and sh.kind == "preference"]
        other = [str(s.path) for s, sh in zip(sources, shapes) if sh and sh.kind != "preference"]
        raise DataError(f"cannot mix preference pairs ({', '.join(pairs)}) with SFT examples "
                        f"({', '.join(other)}): they train differently; prepare them into "
                        "separate folders")
    if "text" in kinds and (len(kinds) > 1 or options.system):
        text = [str(s.path) for s, sh in zip(sources, shapes) if sh and sh.kind == "text"]
        if options.system:
            raise DataError(f"--system needs chat or prompt/completion data; {text[0]} is text")
        other = [str(s.path) for s, sh in zip(sources, shapes) if sh and sh.kind != "text"]
        raise DataError(f"cannot mix text ({', '.join(text)}) with chat or prompt/completion "
                        f"data ({', '.join(other)}): mlx-lm reads one format per file; prepare "
                        "them into separate folders")
    # Chat is the common form: mlx-lm renders completions as a user and an assistant turn anyway.
    if "chat" in kinds or (options.system and kinds != {"preference"}):
        return "chat"
    return kinds.pop() if kinds else "completions"


def _token_counter(model: str, kind: str) -> Callable[[dict], int]:
    """A function giving an example's length in tokens the way mlx-lm's datasets tokenize it."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.models.resolve import resolve_model

    # Only the tokenizer files are read; the weights stay on disk.
    tokenizer = load_tokenizer(resolve_model(model))
    if kind != "text" and not tokenizer.has_chat_template:
        raise ModelError(f"{model}: its tokenizer has no chat template, which {kind} data needs")

    def count(example: dict) -> int:
        if kind == "preference":  # the longer of the two sequences a pair trains on
            return max(len(tokenizer.apply_chat_template(example["prompt"] + example[side],
                                                         return_dict=False))
                       for side in ("chosen", "rejected"))
        if kind == "text":
            ids = tokenizer.encode(example["text"])
            return len(ids) + (not ids or ids[-1] != tokenizer.eos_token_id)
        # Completions too: mlx-lm's CompletionsDataset applies the chat template to them.
        return len(tokenizer.apply_chat_template(as_chat(example)["messages"],
                                                 tools=example.get("tools"), return_dict=False))

    return count


# Our examples are plain trees of dicts, lists and strings: no cycle check needed.
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode


def _row_line(record, shape, kind: str, options: PrepareOptions, seen: FingerprintSet, count):
    """(JSONL line, split score, token count or None) of one kept row; raises Drop otherwise."""
    if isinstance(record, Malformed):
        raise Drop("malformed", record.why)
    if kind == "preference":
        example = with_system(to_pair(shape, record), options.system)
    else:
        example = to_example(shape, record)
    if kind == "chat":
        example = as_chat(example, options.system)
    line = _encode(example).encode()
    fingerprint, score = digest_example(line, options.seed)
    if not seen.add(fingerprint):
        raise Drop("duplicate", "the same example as an earlier row")
    n = count(example) if count else None
    if options.max_tokens and n > options.max_tokens:
        raise Drop("too_long", f"{n} tokens, over --max-tokens {options.max_tokens}")
    return line, score, n


def _write_splits(spool: Path, scores, lengths, options: PrepareOptions, folder: Path,
                  report: Report, log: DropLog) -> None:
    """Cut the spooled examples into the split files and write report.json, in `folder`."""
    if not scores:
        reasons = ", ".join(f"{n} {r}" for r, n in report.dropped.items()) or "no rows"
        raise DataError(f"no examples left to write ({reasons}); nothing was written; run "
                        "with --strict to see the first bad row")
    report.kept, notes = split_sizes(len(scores), options.valid_fraction, options.test_fraction)
    report.notes += notes
    write_splits(spool, assign_splits(scores, report.kept), folder)
    report.tokens = token_stats(lengths)
    log.write_report(folder / "report.json")


def _stream(sources: list[Source], shapes: list, kind: str, count, options: PrepareOptions,
            folder: Path, report: Report) -> None:
    """Read every row once, spool each kept example, then write the splits into `folder`."""
    total = sum(s.size for s in sources)
    seen = FingerprintSet(min(max(1 << 16, 1 << (total // 256).bit_length()), 1 << 21))
    lengths = array("I")
    scores = array("Q")  # one per spooled line, in spool order
    log = DropLog(report, folder / ".dropped.jsonl")
    spool = folder / ".kept.jsonl"
    kept = open(spool, "wb", buffering=1 << 20)
    # A bar only for a big job on a terminal, unless --progress/--no-progress says otherwise.
    enabled = options.progress
    bar = ProgressBar("preparing", "bar", "bytes", "eta",
                      enabled=total >= _LARGE and sys.stderr.isatty() if enabled is None else enabled)
    task = bar.add("prepare", total)
    try:
        done = 0
        for source, shape in zip(sources, shapes):
            label = str(source.path)
            stats = {"file": label, "shape": shape.describe() if shape else "unreadable", "rows": 0,
                     "kept": 0, "dropped": 0}
            report.files.append(stats)
            for position, record in source.rows():
                stats["rows"] += 1
                if stats["rows"] % _TICK == 0:
                    bar.update(task, completed=done + source.tell())
                try:
                    line, score, n = _row_line(record, shape, kind, options, seen, count)
                except Drop as d:
                    if options.strict:
                        raise DataError(f"{source.where(position)}: {d.why} (--strict stops at "
                                        "the first row it would drop)") from None
                    stats["dropped"] += 1
                    log.add(label, source.unit, position, d.reason, d.why)
                    continue
                kept.write(line + b"\n")
                scores.append(score)
                stats["kept"] += 1
                if n is not None:
                    lengths.append(n)
            done += source.size
        kept.close()
        del seen  # its slots are no longer needed while the splits are cut and written
        _write_splits(spool, scores, lengths, options, folder, report, log)
    finally:
        kept.close()
        log.close()
        bar.close()
