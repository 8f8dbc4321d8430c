"""Raw data files -> (position, record) pairs, read lazily so a 1 GB file never sits in memory.

A record is a dict (a JSON object, a CSV row keyed by its header, a Parquet row), a str (a text
paragraph, a string in a JSON array) or a `Malformed` naming what was wrong with that row.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import DataError

# A JSON array larger than this is parsed item by item instead of with one json.load.
_CHUNK = 1 << 20
# An item that does not parse within this many characters is broken, not merely long.
_MAX_ITEM = 256 << 20
READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".tab": "tsv", ".txt": "text", ".text": "text", ".md": "text", ".parquet": "parquet",
           ".pq": "parquet"}

# A spreadsheet cell may hold a whole document; the csv module's default 128 KB limit is for
# catching runaway quotes, which we catch instead by the cell count of the row.
csv.field_size_limit(2**31 - 1)


@dataclass(frozen=True)
class Malformed:
    """A row that could not be read, and why."""

    why: str


class Source:
    """One raw file: its kind, how its positions are named, and its rows in order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.kind = READERS.get(self.path.suffix.lower())
        if self.kind is None:
            known = ", ".join(sorted(READERS))
            raise DataError(f"{self.path}: unknown file type {self.path.suffix or '(none)'!r}; "
                            f"expected one of {known}")
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self.size = self.path.stat().st_size
        # "line" for line-based files, "item" for JSON arrays, "row" for Parquet.
        self.unit = {"json": "item", "parquet": "row"}.get(self.kind, "line")
        self._tell = lambda: 0

    def where(self, position: int) -> str:
        """`file:line` for line-based files, `file: item N` / `file: row N` for the others."""
        if self.unit == "line":
            return f"{self.path}:{position}"
        return f"{self.path}: {self.unit} {position}"

    def tell(self) -> int:
        """Roughly how many bytes of the file have been read, for a progress bar."""
        return self._tell()

    def rows(self) -> Iterator[tuple[int, object]]:
        """(position, record) for every row of the file, lazily."""
        return getattr(self, f"_rows_{self.kind}")()

    def _rows_jsonl(self) -> Iterator[tuple[int, object]]:
        done = 0
        self._tell = lambda: done
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                done += len(line)
                if line_no == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                if not line.strip():
                    continue  # blank lines separate nothing in JSONL; they are not rows
                # Without its line end, an error at the end of a line reports a useful column.
                yield line_no, _parse_json_line(line.rstrip())

    def _rows_json(self) -> Iterator[tuple[int, object]]:
        with open(self.path, "rb") as f:
            head = f.read(_CHUNK).removeprefix(codecs.BOM_UTF8).lstrip()
        if head.startswith(b"["):
            yield from self._json_array_items()
            return
        first, _, rest = head.partition(b"\n")
        if rest.strip() and isinstance(_parse_json_line(first), dict):
            # Many "*.json" exports are really one object per line: stream them as JSONL.
            self.unit = "line"
            yield from self._rows_jsonl()
            return
        try:
            # An object holding the array is read whole: such files are small in practice,
            # while the big exports are top-level arrays (streamed above) or JSON lines.
            data = json.loads(self.path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{self.path}: {_TOO_DEEP}") from None
        self._tell = lambda: self.size
        for i, item in enumerate(_records_in(data, self.path), 1):
            yield i, item

    def _json_array_items(self) -> Iterator[tuple[int, object]]:
        """Items of a top-level JSON array, decoded one at a time from a sliding buffer."""
        decoder = json.JSONDecoder()
        consumed = 0
        self._tell = lambda: consumed
        with open(self.path, "rb") as raw:
            f = io.TextIOWrapper(raw, encoding="utf-8-sig")
            buf, pos, eof, index = "", 0, False, 0
            started = False
            while True:
                # Skip whitespace, the opening bracket and the commas between items.
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if pos < len(buf) or eof:
                        break
                    buf, pos = buf[pos:] + _read(f, self.path), 0
                    eof = pos == len(buf)
                if pos == len(buf):
                    raise DataError(f"{self.path}: the JSON array is not closed with ']'")
                char = buf[pos]
                if not started:
                    started, pos = True, pos + 1
                    continue
                if char == "]":
                    return
                if char == "," and index:
                    pos += 1
                    continue
                while True:
                    try:
                        item, end = decoder.raw_decode(buf, pos)
                        break
                    except RecursionError:
                        raise DataError(f"{self.path}: item {index + 1}: {_TOO_DEEP}") from None
                    except json.JSONDecodeError as e:
                        if eof or len(buf) - pos > _MAX_ITEM:
                            raise DataError(f"{self.path}: item {index + 1}: not valid JSON "
                                            f"({e.msg}); a JSON file cannot be read past a broken "
                                            "item") from None
                        more = _read(f, self.path, max(_CHUNK, len(buf)))
                        eof = not more
                        buf, pos = buf[pos:] + more, 0
                index += 1
                consumed = raw.tell()
                yield index, item
                buf, pos = buf[end:], 0

    def _rows_csv(self, delimiter: str = ",") -> Iterator[tuple[int, object]]:
        with self._open_text() as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = None
            while True:
                start = reader.line_num + 1  # a row with multi-line cells starts here
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(f"{self.path}:{start}: not readable as CSV ({e})") from None
                if not cells or not any(c.strip() for c in cells) and header is None:
                    continue  # blank lines, before or between rows, are not rows
                if header is None:
                    header = [h.strip() for h in cells]
                    self.header = header
                    continue
                yield start, _row_dict(header, cells)

    def _rows_tsv(self) -> Iterator[tuple[int, object]]:
        return self._rows_csv("\t")

    def _rows_text(self) -> Iterator[tuple[int, object]]:
        with self._open_text() as f:
            lines: list[str] = []
            first = 0
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    if not lines:
                        first = line_no
                    lines.append(line.rstrip("\r\n"))
                elif lines:
                    yield first, "\n".join(lines)
                    lines = []
            if lines:
                yield first, "\n".join(lines)

    def _rows_parquet(self) -> Iterator[tuple[int, object]]:
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises its own error types for a file it cannot read
            raise DataError(f"{self.path}: not a readable Parquet file ({e})") from None
        total = max(file.metadata.num_rows, 1)
        done = 0
        self._tell = lambda: self.size * done // total
        # Row-group batches keep memory flat however large the file is.
        for batch in file.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                done += 1
                yield done, record

    def _open_text(self):
        """The file as text: UTF-8 with or without BOM, or UTF-16 (Excel's 'Unicode text')."""
        raw = open(self.path, "rb")
        start = raw.read(2)
        raw.seek(0)
        encoding = "utf-16" if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
        self._tell = raw.tell
        # newline="" hands CRLF and line breaks inside quoted cells to the csv module untouched.
        return _DecodeErrors(io.TextIOWrapper(raw, encoding=encoding, newline=""), self.path)


class _DecodeErrors:
    """A text file whose decoding errors become a DataError naming the file."""

    def __init__(self, f: io.TextIOWrapper, path: Path):
        self._f, self._path = f, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        try:
            yield from self._f
        except UnicodeDecodeError as e:
            raise DataError(f"{self._path}: not UTF-8 text ({e.reason}); save it as UTF-8 "
                            "(\"CSV UTF-8\" in Excel)") from None


def _read(f: io.TextIOWrapper, path: Path, size: int = _CHUNK) -> str:
    try:
        return f.read(size)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason})") from None


# Python's JSON parser recurses once per nesting level and gives up near 1000; no training
# record is nested like that, so such input is reported like any other broken JSON.
_TOO_DEEP = "JSON nested too deeply to be a training record"


def _parse_json_line(line: bytes) -> object:
    try:
        return json.loads(line.decode("utf-8"))
    except json.JSONDecodeError as e:
        return Malformed(f"not valid JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        return Malformed(f"not UTF-8 ({e.reason})")
    except RecursionError:
        return Malformed(_TOO_DEEP)


def _row_dict(header: list[str], cells: list[str]) -> object:
    if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
        return Malformed(f"{len(cells)} cells where the header has {len(header)} (an unquoted "
                         "comma or quote?)")
    # Spreadsheets leave out trailing empty cells; keep CRLF inside cells as plain newlines.
    cells = cells + [""] * (len(header) - len(cells))
    return {h: c.replace("\r\n", "\n") for h, c in zip(header, cells)}


def _records_in(data: object, path: Path) -> list:
    """The examples in a parsed JSON document: the array, or the one array an object holds."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list) and v
                 and all(isinstance(x, (dict, str)) for x in v[:10])}
        if len(lists) == 1:
            return next(iter(lists.values()))
        for key in ("data", "train", "examples", "rows", "records", "items"):
            if key in lists:
                return lists[key]
        if lists:
            raise DataError(f"{path}: the JSON object holds several arrays ({', '.join(lists)}); "
                            "keep one, or pass each as its own file")
        return [data]  # a single example
    raise DataError(f"{path}: expected a JSON array of examples or an object holding one")
