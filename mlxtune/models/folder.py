"""Model folders on disk: the Hugging Face layout that mlx-lm reads, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import mlx.core as mx

# What makes a folder a model: config.json plus weights. config.json is written last, so a folder
# whose writing was killed half-way never looks like a model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")


def is_model_folder(path: Path) -> bool:
    """True if `path` holds config.json and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def atomic_folder(out: Path):
    """A scratch folder beside `out` to write into, and a function that swaps it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def commit() -> Path:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out

    return tmp, commit


def write_model_folder(out: Path, weights: dict, config: dict, files: dict[str, str]) -> Path:
    """Write weights, tokenizer files and config.json into `out`, all or nothing."""
    tmp, commit = atomic_folder(out)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
