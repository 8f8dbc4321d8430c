"""What a prepare run did: rows read per file, examples kept per split, every dropped row with its
file, position and reason, and token lengths. Written as report.json and shown as tables."""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.prepare.splits import SPLITS

REASONS = ("malformed", "empty", "no_answer", "duplicate", "too_long",
           # preference pairs only
           "identical", "no_shared_prompt", "tied")
# Dropped rows held in memory for the summary; report.json gets all of them, from a spool file.
_IN_MEMORY = 1000
_SHOWN = 20


@dataclass
class Report:
    """The outcome of `prepare_dataset`; `summary()` is report.json without the dropped rows."""

    out: Path
    format: str
    options: dict
    files: list[dict] = field(default_factory=list)
    kept: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    dropped: dict = field(default_factory=dict)
    dropped_rows: list[dict] = field(default_factory=list)
    tokens: dict | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the list of dropped rows, JSON-ready."""
        return {"out": str(self.out), "format": self.format, "options": self.options,
                "files": self.files, "kept": self.kept, "dropped": self.dropped,
                "tokens": self.tokens, "notes": self.notes}

    def tables(self) -> list[tuple[list[dict], list[str]]]:
        """(rows, columns) for each summary table the CLI prints."""
        tables = [(self.files, ["file", "shape", "rows", "kept", "dropped"]),
                  ([{"split": s, "examples": n, "format": self.format}
                    for s, n in self.kept.items()], ["split", "examples", "format"])]
        if self.dropped:
            tables.append(([{"dropped": r, "rows": n} for r, n in self.dropped.items()],
                           ["dropped", "rows"]))
            shown = [dict(row, where=where(row)) for row in self.dropped_rows[:_SHOWN]]
            total = sum(self.dropped.values())
            if total > len(shown):
                shown.append({"where": f"... {total - len(shown)} more in report.json"})
            tables.append((shown, ["where", "reason", "why"]))
        if self.tokens:
            tables.append(([self.tokens], ["examples", "min", "median", "p95", "max"]))
        return tables


def where(row: dict) -> str:
    """A dropped row's position as `file:line`, `file: item N` or `file: row N`."""
    if "line" in row:
        return f"{row['file']}:{row['line']}"
    unit = "item" if "item" in row else "row"
    return f"{row['file']}: {unit} {row[unit]}"


class DropLog:
    """Dropped rows: counted per reason, spooled to disk, the first ones also kept in memory."""

    def __init__(self, report: Report, spool: Path):
        self._report, self._spool_path = report, spool
        self._spool = open(spool, "w", encoding="utf-8")

    def add(self, file: str, unit: str, position: int, reason: str, why: str) -> None:
        """Record one dropped row."""
        row = {"file": file, unit: position, "reason": reason, "why": why}
        self._report.dropped[reason] = self._report.dropped.get(reason, 0) + 1
        if len(self._report.dropped_rows) < _IN_MEMORY:
            self._report.dropped_rows.append(row)
        self._spool.write(json.dumps(row, ensure_ascii=False) + "\n")

    def write_report(self, path: Path) -> None:
        """Write report.json: the summary, then every dropped row streamed from the spool."""
        self._spool.close()
        head = json.dumps(self._report.summary(), indent=2, ensure_ascii=False)
        with open(path, "w", encoding="utf-8") as out, \
                open(self._spool_path, encoding="utf-8") as spool:
            out.write(head[:-2] + ',\n  "dropped_rows": [')
            out.writelines(("\n    " if i == 0 else ",\n    ") + line.rstrip("\n")
                           for i, line in enumerate(spool))
            out.write("\n  ]\n}\n")
        self._spool_path.unlink()

    def close(self) -> None:
        """Close the spool (on failure; write_report closes it on success)."""
        self._spool.close()


def token_stats(lengths: array) -> dict | None:
    """min / median / p95 (nearest rank) / max of the token lengths, or None if there are none."""
    if not lengths:
        return None
    ordered = sorted(lengths)
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return {"examples": n, "min": ordered[0], "median": int(median) if median.is_integer()
            else median, "p95": ordered[math.ceil(0.95 * n) - 1], "max": ordered[-1]}
