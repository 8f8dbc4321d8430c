"""Hugging Face `datasets` as prepare inputs: a folder written by `save_to_disk`, or a hub id
resolved through the datasets cache (mlxtune.models.hub fetches; HF_HUB_OFFLINE is obeyed).

A dataset is memory-mapped Arrow, so rows stream in batches as a Parquet file's do, and go
through the same shape detection, cleaning and report as any file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mlxtune.errors import ConfigError, DataError

# What a hub dataset id looks like (namespace/name); a missing path with a file suffix is a file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BATCH = 4096
INSTALL = "pip install 'mlxtune[datasets]'"


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by Dataset/DatasetDict.save_to_disk."""
    return path.is_dir() and any((path / name).is_file() for name in
                                 ("dataset_dict.json", "state.json", "dataset_info.json"))


def looks_like_hub_id(raw: str, known_suffixes) -> bool:
    """A missing path shaped like namespace/name with no data-file suffix: a hub dataset id."""
    path = Path(raw)
    return (not path.exists() and bool(_HUB_ID.match(raw))
            and path.suffix.lower() not in known_suffixes)


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError([f"reading Hugging Face datasets needs the datasets package: "
                           f"{INSTALL}"]) from None
    return datasets


def _pick_split(found, label: str, split: str | None):
    """The one Dataset to read from a DatasetDict (or a Dataset), by --split or by default."""
    if not hasattr(found, "keys"):  # a single Dataset
        name = str(found.split) if getattr(found, "split", None) else None
        if split and name and name != split:
            raise DataError(f"{label}: holds only the {name!r} split, not --split {split!r}")
        return found, name
    names = list(found.keys())
    if split is None:
        # The usual layout has train (and test); prepare makes its own valid/test from it.
        split = "train" if "train" in names else names[0] if len(names) == 1 else None
        if split is None:
            raise DataError(f"{label}: has splits {', '.join(names)}; choose one with --split")
    if split not in names:
        raise DataError(f"{label}: no split {split!r}; it has {', '.join(names)}")
    return found[split], split


class DatasetSource:
    """A `datasets` Dataset read like a file: rows in order, positions named `row N`."""

    kind, unit = "dataset", "row"

    def __init__(self, raw: str, split: str | None = None, subset: str | None = None):
        datasets = _require_datasets()
        if is_saved_dataset(Path(raw)):
            if subset:
                raise ConfigError([f"--subset {subset!r}: {raw} is a saved dataset folder; "
                                   "--subset chooses a configuration of a hub dataset"])
            try:
                found = datasets.load_from_disk(raw)
            except Exception as e:  # datasets raises several types for a folder it cannot read
                raise DataError(f"{raw}: not a readable saved dataset ({e})") from None
        else:
            from mlxtune.models.hub import load_hub_dataset

            found = load_hub_dataset(raw, subset)
        self.dataset, split = _pick_split(found, raw, split)
        self.path = f"{raw}[{split}]" if split else raw
        self.size = max(int(self.dataset.data.nbytes), 1)
        self._done = 0

    def where(self, position: int) -> str:
        """`name[split]: row N`."""
        return f"{self.path}: row {position}"

    def tell(self) -> int:
        """Roughly how many bytes have been read, for a progress bar."""
        return self.size * self._done // max(len(self.dataset), 1)

    def rows(self) -> Iterator[tuple[int, object]]:
        """(row number from 1, row as a dict) for every row, in Arrow batches."""
        # The arrow format honours a selection or shuffle (an indices mapping) on the dataset.
        row = self._done = 0
        for table in self.dataset.with_format("arrow").iter(batch_size=_BATCH):
            for record in table.to_pylist():
                row = self._done = row + 1
                yield row, record
