"""One base model, many adapters: adapters are weight sets gathered per batch row, never a reload.

Every linear layer of every block is wrapped once in an `AdapterSlot`. The resident adapters'
low-rank pairs are stacked per layer by slot (rank zero-padded to the largest resident one; slot 0,
the base, all zeros), and each row of a batch carries its slot: a slot layer adds
`(x @ a[slot]) @ b[slot]` row by row (b pre-scaled), so the base and several adapters share one
forward pass, and a batch of base rows only runs at the plain model's speed.

Adapters live in three tiers, each least-recently-used first out: `max_loras` resident (in the
stacks the batch step reads), `max_cpu_loras` more as numpy copies in host memory (promoted in
a copy), the rest read again from disk. An adapter that rows of the running batch compute with
is pinned to its slot until they finish.
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
from mlxtune.serve.adapter_weights import read_pairs, stack_pairs

__all__ = ["AdapterError", "AdapterRegistry", "AdapterSlot", "Selection", "read_adapter_config"]

_LINEAR = (nn.Linear, nn.QuantizedLinear)


def compute_dtype(model: nn.Module):
    """The float type activations have in `model` (what adapter weights are cast to)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.RMSNorm | nn.LayerNorm) and "weight" in module:
            return module.weight.dtype
    return mx.float32


class Selection:
    """What the adapter slots compute with in this forward pass: per layer, the resident adapters'
    pairs stacked by slot (slot 0 is the base: zeros), and each row's slot and scale."""

    def __init__(self):
        # {layer path: (a [slots, in, R], b [slots, R, out], DoRA factor [slots, out] or None)}
        self.stacks: dict = {}
        self.rows: mx.array | None = None  # [batch] slot per row; None: every row is the base
        self.scales: mx.array | None = None  # [batch, 1, 1]; None: every row at scale 1

    def point(self, slots: list[int], scales: list[float]) -> None:
        """Make the next forward pass compute row i with adapter slot slots[i] at scales[i]."""
        # An all-base batch skips the low-rank work entirely: the plain model's speed.
        self.rows = mx.array(slots, dtype=mx.int32) if any(slots) else None
        self.scales = (mx.array(scales, dtype=mx.float32)[:, None, None]
                       if any(s != 1.0 for s in scales) else None)


class AdapterSlot(nn.Module):
    """A base linear layer plus, per row, its adapter's low-rank update for it (if any)."""

    def __init__(self, linear: nn.Module, path: str, selection: Selection):
        super().__init__()
        self.linear = linear
        # Plain attributes (not arrays): not parameters, never saved, shared across slots.
        self.path, self.selection = path, selection

    def __call__(self, x):
        y = self.linear(x)
        rows, stack = self.selection.rows, self.selection.stacks.get(self.path)
        if rows is None or stack is None:
            return y
        a, b, factor = stack
        # Punica/S-LoRA's gathered update: each row multiplies by its own adapter's pair (the
        # base's slot holds zeros), so one batched matmul serves every adapter in the batch.
        delta = (x @ a[rows]) @ b[rows]
        if self.selection.scales is not None:
            delta = delta * self.selection.scales
        y = y + delta.astype(y.dtype)
        return y if factor is None else factor[rows][:, None, :] * y


@dataclass
class Adapter:
    """An adapter the server knows: where it is on disk and, when loaded, its weights."""

    name: str
    path: Path
    rank: int
    kind: str
    device: dict | None = None  # {path: (a, b, factor)} as MLX arrays while resident
    host: dict | None = None  # the same as numpy arrays, kept in host memory after eviction
    info: dict = field(default_factory=dict)
    slot: int | None = None  # its index in the stacked pairs while resident
    pins: int = 0  # rows of the running batch computing with it (it cannot leave its slot)

    @property
    def tier(self) -> str:
        """'resident' (stacked, used by the batch step), 'host' (numpy copy) or 'disk'."""
        return "resident" if self.slot is not None else "host" if self.host is not None \
            else "disk"


class AdapterRegistry:
    """The base model, its tokenizer and the adapters served on it, at most `max_loras` resident."""

    def __init__(self, model_name: str, max_loras: int = 4, max_lora_rank: int = 64,
                 max_cpu_loras: int | None = None, served_name: str | None = None,
                 fuse_adapter: Path | None = None):
        from mlxtune.models.folder import load_model_folder
        from mlxtune.models.resolve import resolve_model

        if max_loras < 1 or max_lora_rank < 1:
            raise MlxtuneError("--max-loras and --max-lora-rank must be at least 1")
        if max_cpu_loras is not None and max_cpu_loras < 0:
            raise MlxtuneError(f"--max-cpu-loras must be 0 or more; got {max_cpu_loras}")
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
        # The three tiers, each in LRU order (oldest first): resident adapters hold a slot of
        # the stacked pairs (by_slot; slot 0 is the base), host ones a numpy copy, the rest
        # are read again from disk.
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.host: OrderedDict[str, None] = OrderedDict()
        self.by_slot: dict[int, Adapter] = {}
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

    # Registration ---------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> Adapter:
        """Register adapter folder `path` as `name` and load it now (refusing a too-high rank).
        Called on the generation worker's thread (it may restack the resident adapters)."""
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
            # Read (and checked against this model) before it is registered.
            adapter.device = read_pairs(adapter, self.slots, self.dtype, self.max_lora_rank,
                                        self.name)
            if name in self.adapters:
                self.remove(name)
            self.adapters[name] = adapter
            if not self._make_resident(adapter):  # every slot busy: it waits in host memory
                self._to_host(adapter)
        return adapter

    def remove(self, name: str) -> None:
        """Forget adapter `name`; rows running with it finish with it, then its slot frees."""
        with self.lock:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise AdapterError(f"no adapter {name!r}; loaded: "
                                   f"{', '.join(self.adapters) or 'none'}")
            self.host.pop(name, None)
            self.resident.pop(name, None)  # no longer evictable: it leaves when its rows do
            adapter.host = None
            if adapter.pins == 0:
                self._free_slot(adapter)

    def names(self) -> list[str]:
        """The names a request may use: the base and every registered adapter."""
        with self.lock:
            return [self.name, *self.adapters]

    def describe(self) -> list[dict]:
        """Each adapter with its path, rank and tier (where its weights are now)."""
        with self.lock:
            return [{"name": a.name, "path": str(a.path), "rank": a.rank, "type": a.kind,
                     "tier": a.tier, "resident": a.tier == "resident",
                     "in_host_memory": a.tier == "host"}
                    for a in self.adapters.values()]

    def tiers(self) -> dict[str, int]:
        """How many registered adapters are in each tier."""
        with self.lock:
            counts = {"resident": 0, "host": 0, "disk": 0}
            for a in self.adapters.values():
                counts[a.tier] += 1
            return counts

    def find(self, name: str) -> Adapter | None:
        """The adapter served as `name` (None for the base); an AdapterError if unknown."""
        with self.lock:
            if name == self.name:
                return None
            adapter = self.adapters.get(name)
            if adapter is None:
                raise AdapterError(f"no model {name!r}; serving: {', '.join(self.names())}")
            return adapter

    # The generation worker's side -------------------------------------------------------------

    def acquire(self, name: str) -> tuple[Adapter | None, int] | None:
        """(adapter, slot) for one more batch row of `name` (slot 0: the base), made resident
        first if need be; None when every slot is held by running rows (the row must wait)."""
        with self.lock:
            adapter = self.find(name)
            if adapter is None:
                return None, 0
            if adapter.slot is None and not self._make_resident(adapter):
                return None
            adapter.pins += 1
            self.resident.move_to_end(adapter.name)
            return adapter, adapter.slot

    def release(self, adapter: Adapter | None) -> None:
        """A row computing with `adapter` left the batch."""
        if adapter is None:
            return
        with self.lock:
            adapter.pins -= 1
            if adapter.pins == 0 and self.adapters.get(adapter.name) is not adapter:
                self._free_slot(adapter)  # removed while its rows ran

    # Tiers --------------------------------------------------------------------------------

    def _make_resident(self, adapter: Adapter) -> bool:
        free = [s for s in range(1, self.max_loras + 1) if s not in self.by_slot]
        if not free:
            idle = [n for n in self.resident if self.adapters[n].pins == 0]
            if not idle:
                return False
            victim = self.adapters[idle[0]]  # the least recently used that no row holds
            free = [victim.slot]
            self._free_slot(victim)
            self._to_host(victim)
        if adapter.device is None:
            adapter.device = self._from_host_or_disk(adapter)
        adapter.slot = free[0]
        self.by_slot[adapter.slot] = adapter
        self.resident[adapter.name] = None
        self.resident.move_to_end(adapter.name)
        self.selection.stacks = stack_pairs(self.by_slot)
        return True

    def _free_slot(self, adapter: Adapter) -> None:
        if adapter.slot is not None and self.by_slot.get(adapter.slot) is adapter:
            del self.by_slot[adapter.slot]
            self.selection.stacks = stack_pairs(self.by_slot)
        if self.adapters.get(adapter.name) is adapter:
            self.resident.pop(adapter.name, None)
        adapter.slot = None

    def _to_host(self, adapter: Adapter) -> None:
        # Keep a numpy copy for the most recently evicted max_cpu_loras; the rest go to disk.
        if self.max_cpu_loras > 0 and adapter.device is not None:
            adapter.host = {k: tuple(None if v is None else np.array(v) for v in pair)
                            for k, pair in adapter.device.items()}
            self.host[adapter.name] = None
            self.host.move_to_end(adapter.name)
            while len(self.host) > self.max_cpu_loras:
                old, _ = self.host.popitem(last=False)
                self.adapters[old].host = None
        adapter.device = None

    def _from_host_or_disk(self, adapter: Adapter) -> dict:
        if adapter.host is not None:
            pairs = {k: tuple(None if v is None else mx.array(v) for v in pair)
                     for k, pair in adapter.host.items()}
            adapter.host = None
            self.host.pop(adapter.name, None)
            return pairs
        return read_pairs(adapter, self.slots, self.dtype, self.max_lora_rank, self.name)


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
