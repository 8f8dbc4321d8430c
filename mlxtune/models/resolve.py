"""Turn any model name a user may give into a local MLX model folder. The one place names resolve."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from mlxtune.errors import ModelError
from mlxtune.home import models_dir
from mlxtune.models.builtin import BUILTIN_MODELS, CONVERTER_VERSION, builtin_path
from mlxtune.models.folder import is_model_folder

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _gguf_cache_path(path: Path) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}"
    return models_dir() / f"gguf-{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def gguf_folder(path: Path) -> Path:
    """The MLX folder for GGUF file `path`, converted into the cache once."""
    from mlxtune.models.gguf import convert_gguf

    out = _gguf_cache_path(path)
    if is_model_folder(out):
        return out
    return convert_gguf(path, out)


def resolve_model(name: str) -> Path:
    """A local folder holding model `name`: a folder, a GGUF file, a built-in name or a hub repo id."""
    name = str(name).strip()
    if name in BUILTIN_MODELS:
        return builtin_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if is_model_folder(path):
            return path.resolve()
        raise ModelError(f"{path}: not a model folder (needs config.json and *.safetensors)")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_folder(path)
        raise ModelError(f"{path}: not a model (expected a model folder or a .gguf file)")
    if _REPO_ID.match(name) and not name.startswith((".", "/")):
        from mlxtune.models.hub import fetch_repo

        folder = fetch_repo(name)
        if not is_model_folder(folder):
            raise ModelError(f"{name}: the repo has no config.json with safetensors weights")
        return folder
    known = ", ".join(BUILTIN_MODELS)
    raise ModelError(f"no model {name!r}: not a folder, a .gguf file, a built-in model ({known}) "
                     "or a Hugging Face repo id like mlx-community/Qwen2.5-0.5B-Instruct-4bit")


def cached_models() -> list[dict]:
    """The models mlxtune knows locally: built-in ones, its own conversions, the hub cache."""
    rows = []
    for name, entry in BUILTIN_MODELS.items():
        folder = models_dir() / name
        rows.append({"name": name, "kind": "built-in",
                     "path": str(folder) if is_model_folder(folder) else "(converted on first use)",
                     "about": entry["about"]})
    if models_dir().is_dir():
        for folder in sorted(models_dir().iterdir()):
            if folder.name not in BUILTIN_MODELS and is_model_folder(folder):
                rows.append({"name": str(folder), "kind": "converted", "path": str(folder),
                             "about": _about(folder)})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            for rev in repo.revisions:
                if repo.repo_type == "model" and is_model_folder(Path(rev.snapshot_path)):
                    rows.append({"name": repo.repo_id, "kind": "hub cache",
                                 "path": str(rev.snapshot_path), "about": _about(rev.snapshot_path)})
                    break
    except Exception:  # no hub cache yet, or one huggingface_hub cannot read: nothing to list
        pass
    return rows


def _about(folder: Path) -> str:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    q = config.get("quantization")
    bits = f", {q['bits']}-bit" if isinstance(q, dict) and "bits" in q else ""
    return f"{config.get('model_type', '?')}{bits}"
