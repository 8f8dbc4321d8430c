"""Hugging Face Hub access through huggingface_hub: the only code that talks to a model hub.

(The other network code is HTTP to servers the user names: `mlxtune eval --url`, in
evaluate/client.py, and `mlxtune serve` itself.)
"""

from __future__ import annotations

from pathlib import Path

from mlxtune.errors import ModelError

# What a model needs; skips other formats' weights (.bin, .pt, .gguf) a repo may also carry.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def fetch_repo(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id`, downloaded unless cached (HF_HUB_OFFLINE is obeyed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelError(f"model {repo_id!r} is not in the Hugging Face cache and the hub cannot be "
                         "reached (offline); download it on a connected machine or give a local "
                         "folder") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model {repo_id!r} does not exist on the Hugging Face Hub "
                         "(or needs a token: huggingface-cli login)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"model {repo_id!r}: download failed: {str(e).splitlines()[0]}") from None


def load_hub_dataset(repo_id: str, subset: str | None = None):
    """The DatasetDict of hub dataset `repo_id` (configuration `subset`), from the datasets cache
    or downloaded into it; with HF_HUB_OFFLINE=1 only the cache is read."""
    import datasets
    from huggingface_hub.errors import RepositoryNotFoundError

    from mlxtune.errors import DataError

    try:
        return datasets.load_dataset(repo_id, subset)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError,
            RepositoryNotFoundError):
        where = ("in the datasets cache (offline: HF_HUB_OFFLINE=1)"
                 if datasets.config.HF_HUB_OFFLINE else "on the Hugging Face Hub or in the cache")
        raise DataError(f"{repo_id}: no such file or folder, and no dataset of that name {where}; "
                        "download it on a connected machine, or save_to_disk it and pass the "
                        "folder") from None
    except ValueError as e:  # e.g. a configuration that does not exist, or is not cached
        raise DataError(f"{repo_id}: {str(e).splitlines()[0]}") from None
