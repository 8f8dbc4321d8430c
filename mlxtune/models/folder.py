"""Model folders on disk: the Hugging Face layout that mlx-lm reads, written atomically."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx

from mlxtune.atomic import atomic_folder
from mlxtune.errors import ModelError

# What makes a folder a model: config.json plus weights. config.json is written last, so a folder
# whose writing was killed half-way never looks like a model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")


def is_model_folder(path: Path) -> bool:
    """True if `path` holds config.json and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def write_model_folder(out: Path, weights: dict, config: dict, files: dict[str, str]) -> Path:
    """Write weights, tokenizer files and config.json into `out`, all or nothing."""
    with atomic_folder(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return Path(out)


# What mlx-lm raises for a folder it cannot load (missing files, unknown model type, bad config).
_LOAD_ERRORS = (ValueError, KeyError, FileNotFoundError)


def load_model_folder(model_dir: Path, lazy: bool = False, tokenizer: bool = True):
    """(model, config, tokenizer or None) of the model folder `model_dir`, loaded by mlx-lm, or a
    one-line ModelError saying why it cannot be."""
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(Path(model_dir), lazy=lazy)
    except _LOAD_ERRORS as e:
        raise ModelError(f"{model_dir}: mlx-lm cannot load this model: {e}") from None
    return model, config, load_tokenizer(model_dir) if tokenizer else None


def load_tokenizer(model_dir: Path):
    """The tokenizer of the model folder `model_dir` (no weights are read), or a ModelError."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    try:
        return mlx_lm_load_tokenizer(Path(model_dir))
    except _LOAD_ERRORS as e:
        raise ModelError(f"{model_dir}: mlx-lm cannot load this model's tokenizer: {e}") from None


def read_config(path: Path) -> dict:
    """The model's config.json as a dict."""
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def safetensors_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """{name: (shape, dtype)} for every tensor in the folder's safetensors files, read from headers."""
    shapes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = (entry["shape"], entry["dtype"])
    return shapes
