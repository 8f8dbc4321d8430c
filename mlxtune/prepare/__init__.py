"""Raw data (JSON, JSONL, CSV/TSV, text, Parquet) -> mlx-lm's train/valid/test JSONL, checked."""

from mlxtune.prepare.report import Report
from mlxtune.prepare.run import PrepareOptions, prepare_dataset
from mlxtune.prepare.shapes import parse_columns

__all__ = ["PrepareOptions", "Report", "parse_columns", "prepare_dataset"]
