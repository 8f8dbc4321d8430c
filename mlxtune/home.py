"""Where mlxtune keeps its own files: converted models and other caches, under MLXTUNE_HOME."""

import os
from pathlib import Path


def mlxtune_home() -> Path:
    """The cache root: $MLXTUNE_HOME, else ~/.cache/mlxtune."""
    env = os.environ.get("MLXTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlxtune"


def models_dir() -> Path:
    """The folder holding models mlxtune converted itself (built-in, GGUF imports)."""
    return mlxtune_home() / "models"
