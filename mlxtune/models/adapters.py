"""Adapter folders (mlx-lm's adapters.safetensors + adapter_config.json): check, read, load."""

from __future__ import annotations

import json
from pathlib import Path

from mlxtune.errors import AdapterError

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of the adapter folder `path`, with a clear error if it is not one."""
    path = Path(path)
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise AdapterError(f"{path}: not an adapter folder (no {name}); pass a run folder "
                               "from mlxtune train")
    try:
        return json.loads((path / "adapter_config.json").read_text())
    except ValueError as e:
        raise AdapterError(f"{path / 'adapter_config.json'}: not valid JSON ({e})") from None


def base_model(path: Path, config: dict) -> str:
    """The base model name the adapter at `path` (with config `config`) was trained on."""
    if not config.get("model"):
        raise AdapterError(f"{path}/adapter_config.json does not record its base model; "
                           "pass --model")
    return str(config["model"])


def load_adapter(model, adapter_dir: Path) -> None:
    """Add the adapter layers of `adapter_dir` to `model` and load their weights (mlx-lm's own
    loader), with a one-line error if they do not fit the model."""
    from mlx_lm.tuner.utils import load_adapters

    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:
        raise AdapterError(f"{adapter_dir}: the adapter does not fit this model: {e}") from None
