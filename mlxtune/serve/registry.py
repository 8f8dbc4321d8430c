"""One base model, many adapters: adapters are weight sets swapped in per request, never a reload.

Every linear layer of every block is wrapped once in an `AdapterSlot`. A slot computes the base
layer and, when the selected adapter has a low-rank pair for it, adds `(x @ a) @ b` (b pre-scaled).
Switching adapters only points the shared `Selection` at another dict of pairs, so it costs
microseconds, and the base model ("no adapter") runs at the plain model's speed.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune.errors import AdapterError, MlxtuneError
from mlxtune.fastpath import prepare_for_inference
from mlxtune.models.adapters import read_adapter_config

_LINEAR = (nn.Linear, nn.QuantizedLinear)


def compute_dtype(model: nn.Module):
    """The float type activations have in `model` (what adapter weights are cast to)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.RMSNorm | nn.LayerNorm) and "weight" in module:
            return module.weight.dtype
    return mx.float32


class Selection:
    """Which adapter's pairs the slots use now: {layer path: (a, b, dora factor or None)}."""

    def __init__(self):
        self.pairs: dict = {}


class AdapterSlot(nn.Module):
    """A base linear layer plus the selected adapter's low-rank update for it, if any."""

    def __init__(self, linear: nn.Module, path: str, selection: Selection):
        super().__init__()
        self.linear = linear
        # Plain attributes (not arrays): not parameters, never saved, shared across slots.
        self.path, self.selection = path, selection

    def __call__(self, x):
        y = self.linear(x)
        pair = self.selection.pairs.get(self.path)
        if pair is None:
            return y
        a, b, factor = pair
        y = y + ((x @ a) @ b).astype(y.dtype)
        return y if factor is None else factor * y


@dataclass
class Adapter:
    """An adapter the server knows: where it is on disk and, when loaded, its weights."""

    name: str
    path: Path
    rank: int
    kind: str
    device: dict | None = None  # {path: (a, b, factor)} as MLX arrays, ready to select
    host: dict | None = None  # the same as numpy arrays, kept in host memory after eviction
    info: dict = field(default_factory=dict)


class AdapterRegistry:
    """The base model, its tokenizer and the adapters served on it, at most `max_loras` resident."""

    def __init__(self, model_name: str, max_loras: int = 4, max_lora_rank: int = 64,
                 max_cpu_loras: int | None = None, served_name: str | None = None,
                 fuse_adapter: Path | None = None):
        from mlxtune.models.folder import load_model_folder
        from mlxtune.models.resolve import resolve_model

        if max_loras < 1 or max_lora_rank < 1:
            raise MlxtuneError("--max-loras and --max-lora-rank must be at least 1")
        self.model_dir = resolve_model(model_name)
        self.name = served_name or model_name
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        self.model, self.config, self.tokenizer = load_model_folder(self.model_dir)
        if fuse_adapter is not None:
            from mlxtune.fuse import fuse_in_memory

            fuse_in_memory(self.model, fuse_adapter)
        prepare_for_inference(self.model)
        self.dtype = compute_dtype(self.model)
        self.selection = Selection()
        self.slots = self._wrap_linears()
        self.adapters: dict[str, Adapter] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # LRU order, oldest first
        self.active: str | None = None
        self.lock = threading.RLock()
        mx.eval(self.model.parameters())
        # The model's thousands of Python objects live as long as the server: keep the garbage
        # collector from walking them again and again while it generates (~5% of a step).
        gc.collect()
        gc.freeze()

    @property
    def context_length(self) -> int:
        """Longest prompt + answer the model takes, in tokens."""
        for key in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and limit < 10**7 else 4096

    def _wrap_linears(self) -> dict[str, AdapterSlot]:
        slots = {}
        for i, block in enumerate(self.model.layers):
            prefix = f"{_layers_path(self.model)}.{i}"
            found = [(p, m) for p, m in block.named_modules() if p and isinstance(m, _LINEAR)]
            wrapped = []
            for rel, module in found:
                slot = AdapterSlot(module, f"{prefix}.{rel}", self.selection)
                slots[slot.path] = slot
                wrapped.append((rel, slot))
            from mlx.utils import tree_unflatten

            block.update_modules(tree_unflatten(wrapped))
        return slots

    # Registration and loading -------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> Adapter:
        """Register adapter folder `path` as `name` and load it now (refusing a too-high rank)."""
        if not name or name == self.name or "/" in name and Path(name).exists():
            raise AdapterError(f"adapter name {name!r} is empty, the base model's name or a path; "
                               "pick another name")
        cfg = read_adapter_config(Path(path))
        kind = cfg.get("fine_tune_type", "lora")
        if kind not in ("lora", "dora"):
            raise AdapterError(f"{path}: a {kind!r} fine-tune changes every weight and cannot be "
                               "swapped per request; fuse it (mlxtune fuse) and serve the result")
        rank = int(cfg.get("lora_parameters", {}).get("rank", 8))
        if rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r} has rank {rank}, above --max-lora-rank "
                               f"{self.max_lora_rank}; restart with --max-lora-rank {rank} or more")
        adapter = Adapter(name, Path(path), rank, kind, info=cfg)
        with self.lock:
            self._load(adapter)  # fails before registering if shapes don't fit this model
            self.adapters[name] = adapter
            self._touch(name)
        return adapter

    def remove(self, name: str) -> None:
        """Forget adapter `name` (requests already running with it finish with it)."""
        with self.lock:
            if name not in self.adapters:
                raise AdapterError(f"no adapter {name!r}; loaded: "
                                   f"{', '.join(self.adapters) or 'none'}")
            del self.adapters[name]
            self.resident.pop(name, None)
            if self.active == name:
                self.active = None

    def names(self) -> list[str]:
        """The names a request may use: the base and every registered adapter."""
        with self.lock:
            return [self.name, *self.adapters]

    def describe(self) -> list[dict]:
        """Each adapter with its path, rank and where its weights are now."""
        with self.lock:
            return [{"name": a.name, "path": str(a.path), "rank": a.rank, "type": a.kind,
                     "resident": a.name in self.resident,
                     "in_host_memory": a.host is not None and a.name not in self.resident}
                    for a in self.adapters.values()]

    def select(self, name: str) -> dict:
        """Make `name` (the base or an adapter) the one the model computes with; returns its
        pairs. Called by the generation worker only, between batches."""
        with self.lock:
            if name == self.name:
                pairs = {}
            else:
                adapter = self.adapters.get(name)
                if adapter is None:
                    raise AdapterError(f"no model {name!r}; serving: {', '.join(self.names())}")
                if adapter.device is None:
                    self._load(adapter)
                self._touch(name)
                pairs = adapter.device
            self.selection.pairs = pairs
            self.active = name
            return pairs

    def _touch(self, name: str) -> None:
        self.resident[name] = None
        self.resident.move_to_end(name)
        while len(self.resident) > self.max_loras:
            old, _ = self.resident.popitem(last=False)
            self._evict(self.adapters[old])

    def _evict(self, adapter: Adapter) -> None:
        # Keep a host copy for the most recently evicted max_cpu_loras; the rest reload from disk.
        if self.max_cpu_loras > 0 and adapter.device is not None:
            adapter.host = {k: tuple(None if v is None else np.array(v) for v in pair)
                            for k, pair in adapter.device.items()}
            in_host = [a for a in self.adapters.values()
                       if a.host is not None and a.name not in self.resident and a is not adapter]
            for extra in in_host[: max(0, len(in_host) + 1 - self.max_cpu_loras)]:
                extra.host = None
        adapter.device = None

    def _load(self, adapter: Adapter) -> None:
        if adapter.host is not None:
            adapter.device = {k: tuple(None if v is None else mx.array(v) for v in pair)
                              for k, pair in adapter.host.items()}
            adapter.host = None
            return
        cfg = adapter.info
        scale = float(cfg.get("lora_parameters", {}).get("scale", 20.0))
        try:
            weights = mx.load(str(adapter.path / "adapters.safetensors"))
        except Exception as e:  # mx.load raises plain RuntimeError on a bad file
            raise AdapterError(f"{adapter.path}: cannot read adapters.safetensors: {e}") from None
        pairs = {}
        for key in weights:
            if not key.endswith(".lora_a"):
                continue
            layer = key[: -len(".lora_a")]
            slot = self.slots.get(layer)
            if slot is None:
                raise AdapterError(f"{adapter.path}: {layer} is not a linear layer of "
                                   f"{self.name}; was the adapter trained on another model?")
            a, b = weights[key], weights.get(f"{layer}.lora_b")
            out_dims, in_dims = _linear_dims(slot.linear)
            if b is None or a.shape != (in_dims, a.shape[1]) or b.shape != (a.shape[1], out_dims):
                raise AdapterError(f"{adapter.path}: {layer} has shapes {a.shape} / "
                                   f"{None if b is None else b.shape}, but {self.name}'s layer is "
                                   f"{out_dims}x{in_dims}; the adapter belongs to another model")
            if a.shape[1] > self.max_lora_rank:
                raise AdapterError(f"adapter {adapter.name!r} has rank {a.shape[1]}, above "
                                   f"--max-lora-rank {self.max_lora_rank}")
            a = a.astype(self.dtype)
            b = (scale * b.astype(mx.float32)).astype(self.dtype)
            factor = None
            if f"{layer}.m" in weights:
                factor = _dora_factor(slot.linear, a, b, weights[f"{layer}.m"], self.dtype)
            pairs[layer] = (a, b, factor)
        if not pairs:
            raise AdapterError(f"{adapter.path}: adapters.safetensors has no LoRA weights")
        mx.eval([x for pair in pairs.values() for x in pair if x is not None])
        adapter.device = pairs


def _layers_path(model: nn.Module) -> str:
    """The dotted path of model.layers (e.g. model.layers), as adapter weight names spell it."""
    target = model.layers
    for path, module in model.named_modules():
        if isinstance(module, list):
            continue
        for key, value in module.children().items():
            if value is target:
                return f"{path}.{key}" if path else key
    return "model.layers"


def _linear_dims(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return out_dims, in_dims


def _dequantized(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales.astype(mx.float32),
                             linear.get("biases").astype(mx.float32)
                             if linear.get("biases") is not None else None,
                             group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return linear.weight.astype(mx.float32)


def _dora_factor(linear, a, b, m, dtype) -> mx.array:
    # DoRA rescales each output row to magnitude m: m / ||W + B^T A^T||, fixed per adapter.
    adapted = _dequantized(linear) + (b.astype(mx.float32).T @ a.astype(mx.float32).T)
    return (m.astype(mx.float32) / mx.linalg.norm(adapted, axis=1)).astype(dtype)
