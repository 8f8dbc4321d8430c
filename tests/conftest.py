"""Test setup: no network, no user home, a tiny llama built in-process, the built-in model cached once."""

import os

# huggingface_hub reads these at import: keep every test offline and out of the user's caches.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import socket  # noqa: E402

import pytest  # noqa: E402

from tests.tiny import make_tiny_llama  # noqa: E402

_LOOPBACK = ("127.", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a connection beyond this machine's loopback (in-process)."""
    for name in ("connect", "connect_ex"):
        real = getattr(socket.socket, name)

        def guarded(self, address, _real=real):
            if self.family in (socket.AF_INET, socket.AF_INET6) \
                    and not str(address[0]).startswith(_LOOPBACK):
                raise AssertionError(f"a test tried to reach the network: {address}")
            return _real(self, address)

        monkeypatch.setattr(socket.socket, name, guarded)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Point MLXTUNE_HOME and the Hugging Face cache at a temp folder for every test."""
    home = tmp_path / "mlxtune-home"
    monkeypatch.setenv("MLXTUNE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-64 llama with a tokenizer trained in-process, saved as an MLX folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_qmodel_dir(tmp_path_factory):
    """The tiny llama quantized to 4 bits (group size 32), the QLoRA case."""
    return make_tiny_llama(tmp_path_factory.mktemp("tinyq") / "model", bits=4)


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory):
    """The built-in SmolLM2-135M converted once for the whole session."""
    from mlxtune.models.builtin import builtin_gguf
    from mlxtune.models.gguf import convert_gguf

    return convert_gguf(builtin_gguf("smollm2-135m"),
                        tmp_path_factory.mktemp("builtin") / "smollm2-135m")
