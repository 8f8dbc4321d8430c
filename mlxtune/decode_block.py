"""A decoder block of the STANDARD architectures (fastpath.py) as two compiled ops when decoding
on the CPU backend: `kernels.decode_qkv` (input norm, q/k/v projections with their biases and
qwen3's q/k norms, RoPE) and `kernels.decode_out` (attention, output projection, residual,
norm, SwiGLU MLP, residual); mlx-lm's own cache object updates the keys and values in between.

A step of SmolLM2-135M was ~750 MLX ops, ~25 a block: scheduling and building them cost more
than the arithmetic. The fused block computes the same formulas with the same routines as the
one-op kernels, so its numbers equal theirs to float rounding (tests/test_decode_block.py).

A decode step's Python work was then ~23 us a block (two op calls, mlx-lm's update_and_fetch,
the plan's checks) against ~10 ms of arithmetic for the whole model, and building and scheduling
a step's ~120 ops cost ~1 ms more: the plain stack of the STANDARD architectures now runs as one
`kernels.decode_stack` op a step, every block's decode_qkv, KV write and decode_out inside it.
It writes mlx-lm's own KVCache / BatchKVCache buffers where update_and_fetch would, in place
when nothing else holds a buffer (MLX's donation) and into a copy when something does, and the
stack's weights are gathered once (`kernels.stack_weights`, remade when a plan is). Where the
stack op does not apply, each block still runs decode_block when its cache is one of those two
with room, else the two ops with the cache's own update_and_fetch between them (a cache of
another kind, or buffers that must grow first).

Adapters ride along: the ops add each projection's low-rank delta themselves, for serve's
mixed batches (serve/registry.AdapterSlot: every row with its own adapter slot and scale) and for
mlx-lm's LoRALinear (eval's local backend with an adapter).

A block takes this path only when all of it is what the ops compute: 4/8-bit affine weights, no
bias but q/k/v's, nn.RoPE, RMSNorms, fp32, a plain KV cache (not a quantized one), at most
PACKED_ROWS tokens, and LoRA deltas only (no DoRA, no dropout while training). Anything else
runs mlx-lm's block unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from operator import getitem, is_

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxtune import kernels

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
               ("mlp", "down_proj"))


def _quantized(linear) -> nn.QuantizedLinear | None:
    """The plain quantized layer `linear` computes with (under any adapter), or None.

    A serving slot (serve/registry.AdapterSlot: `linear` plus a `selection` shared by the model)
    and mlx-lm's LoRALinear (`linear` plus `lora_a`, `lora_b`, `scale`) wrap one."""
    if _is_slot(linear) or _is_lora(linear):
        return _quantized(linear.linear)
    if isinstance(linear, nn.QuantizedLinear) and getattr(linear, "mode", "affine") == "affine" \
            and "biases" in linear:
        return linear
    return None


def _is_slot(m) -> bool:
    return "selection" in m.__dict__ and "linear" in m


def _is_lora(m) -> bool:
    return type(m).__name__ == "LoRALinear" and "lora_a" in m and "linear" in m


def _delta(m):
    """This call's low-rank pair of projection `m` as the ops take it: None (no delta), (A, B)
    with B scaled (mlx-lm's LoRALinear) or the slots' stacks (serve), or False when the ops
    cannot compute it (DoRA, dropout in training, another dtype)."""
    if _is_slot(m):
        if m.selection.rows is None:
            return None
        stack = m.selection.stacks.get(m.path)
        if stack is None:
            return None
        a, b, factor = stack
        return (a, b) if factor is None and a.dtype == b.dtype == mx.float32 else False
    if _is_lora(m):
        dropout = getattr(m, "dropout", None)
        if (m.training and getattr(dropout, "_p_1", 1.0) != 1.0) or m.lora_a.dtype != mx.float32:
            return False
        return m.lora_a, m.lora_b
    return None


@lru_cache(maxsize=64)
def _scale_rows(scale: float, batch: int) -> mx.array:
    """LoRALinear's scale as the ops' per-row scales: one constant array per scale and batch
    size, not one per block and token."""
    return mx.array([scale] * batch, dtype=mx.float32)


class _Plan:
    """What a block's fused path needs that does not change between tokens: its modules (to
    notice a swap), their quantized layers, the selection of a served model's slots, and the
    ops' settings."""

    def __init__(self, block, modules: list, layers: list, selection):
        attn = block.self_attn
        self.modules, self.layers, self.selection = modules, layers, selection
        heads = attn.n_heads
        rope = attn.rope
        self.qk_norms = [attn.q_norm, attn.k_norm] if hasattr(attn, "q_norm") else []
        self.has_bias = "bias" in layers[0]
        self.qkv = dict(eps=block.input_layernorm.eps, heads=heads, kv_heads=attn.n_kv_heads,
                        head_dim=layers[0]["weight"].shape[0] // heads, rope_dims=rope.dims,
                        traditional=rope.traditional, rope_base=float(rope.base),
                        rope_scale=float(rope.scale), has_bias=self.has_bias,
                        has_qk_norm=bool(self.qk_norms),
                        qk_eps=self.qk_norms[0].eps if self.qk_norms else 1e-6)
        specs = [n for layer in layers for n in (layer.group_size, layer.bits)]
        self.qkv["specs"], self.out_specs = specs[:6], specs[6:]
        self.out = dict(scale=attn.scale, eps=block.post_attention_layernorm.eps)
        self.params = kernels.block_params(**self.qkv, scale=attn.scale, out_eps=self.out["eps"],
                                           out_specs=self.out_specs)
        # No module wraps a layer (no slot, no LoRALinear): never an adapter delta to gather.
        self.plain = all(isinstance(m, nn.QuantizedLinear) for m in modules)
        norms = [block.input_layernorm, block.post_attention_layernorm]
        self.norms = [n.weight for n in norms]
        self.extras = [layer["bias"] for layer in layers[:3]] if self.has_bias else []
        self.extras += [n.weight for n in self.qk_norms]
        self.parents, self.keys, self.children = zip(*_watch(block, modules, layers,
                                                             norms + self.qk_norms))

    def swapped(self, block) -> bool:
        """Whether a module or array of the block is no longer the one planned for (~40 dict
        lookups, a decode step asks this of every block: in C, through map)."""
        return not all(map(is_, map(getitem, self.parents, self.keys), self.children))

    def adapters(self, batch: int) -> tuple | None:
        """This call's adapter inputs: (decode_qkv's arrays, decode_out's arrays, the q/k/v
        projections with a pair (a bit mask), the o/gate/up/down ones, whether each row has its
        slot, whether each row has its scale); None when a delta is one the ops cannot
        compute."""
        if self.plain or (self.selection is not None and self.selection.rows is None
                          and all(_is_slot(m) for m in self.modules)):
            return NO_ADAPTERS
        deltas = [_delta(m) for m in self.modules]
        if any(d is False for d in deltas):
            return None
        if not any(deltas):
            return NO_ADAPTERS
        rows = scales = None
        if self.selection is not None and self.selection.rows is not None:
            rows, scales = self.selection.rows, self.selection.scales
        else:  # LoRALinear: one adapter, its scale (all of a block's the same, or no fusing)
            found = {float(m.scale) for m, d in zip(self.modules, deltas) if d}
            if len(found) > 1:
                return None
            scales = _scale_rows(found.pop(), batch)
        arrays, masks = [], []
        for part in (deltas[:3], deltas[3:]):
            pairs = [x for d in part if d for x in d]
            arrays.append(pairs + [v for v in (rows, scales) if v is not None] if pairs else [])
            masks.append(sum(1 << i for i, d in enumerate(part) if d))
        return (*arrays, *masks, rows is not None, scales is not None)

    def weights(self) -> list:
        """The seven layers' (packed, scales, biases), in the ops' order."""
        return [layer[k] for layer in self.layers for k in ("weight", "scales", "biases")]


NO_ADAPTERS = ([], [], 0, 0, False, False)


def _watch(block, modules: list, layers: list, norms: list) -> list:
    """(parent, key, child) for every module and array a plan reads from the block: when one
    is replaced (an adapter loaded, weights updated), the plan and the stack's gathered weights
    are made again."""
    attn, mlp = block["self_attn"], block["mlp"]
    watch = [(block, "self_attn", attn), (block, "mlp", mlp),
             (block, "input_layernorm", norms[0]), (block, "post_attention_layernorm", norms[1])]
    watch += [(attn, name, norm) for name, norm in zip(("q_norm", "k_norm"), norms[2:])]
    watch += [(n, "weight", n["weight"]) for n in norms]
    for (a, b), module, layer in zip(PROJECTIONS, modules, layers):
        watch.append((block[a], b, module))
        while module is not layer:  # a slot's or LoRALinear's wrapped layer
            watch.append((module, "linear", module["linear"]))
            module = module["linear"]
        watch += [(layer, key, layer[key]) for key in ("weight", "scales", "biases", "bias")
                  if key in layer]
    return watch


def _make_plan(block) -> _Plan | None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None or not isinstance(getattr(attn, "rope", None), nn.RoPE):
        return None
    norms = [block.input_layernorm, block.post_attention_layernorm]
    norms += [attn.q_norm, attn.k_norm] if hasattr(attn, "q_norm") else []
    if not all(isinstance(n, nn.RMSNorm) and n.weight.dtype == mx.float32 for n in norms):
        return None
    modules = [getattr(getattr(block, a), b, None) for a, b in PROJECTIONS]
    layers = [_quantized(m) for m in modules]
    if any(layer is None for layer in layers):
        return None
    # Biases: q, k and v all or none (qwen2); none elsewhere.
    if any("bias" in layer for layer in layers[3:]) or len({"bias" in x for x in layers[:3]}) > 1:
        return None
    selections = {id(m.selection): m.selection for m in modules if _is_slot(m)}
    if len(selections) > 1:
        return None
    return _Plan(block, modules, layers, next(iter(selections.values()), None))


def decodes_fused(x: mx.array, mask, cache, max_tokens: int) -> bool:
    """Whether a block call with these arguments is one the fused ops take (before the block's
    own checks): at most max_tokens fp32 tokens with a plain KV cache and a mask the attention
    op reads."""
    return (kernels.decode_qkv is not None and cache is not None and x.dtype == mx.float32
            and x.ndim == 3 and x.shape[0] * x.shape[1] <= max_tokens
            and not hasattr(cache, "bits")
            and (mask is None or isinstance(mask, str)
                 or (mask.dtype in (mx.bool_, mx.float32) and mask.ndim <= 4)))


def _plan_for(block) -> _Plan | None:
    """The block's plan: made on its first call and again after a module was swapped."""
    plan = block.__dict__.get("_mlxtune_plan", False)
    if plan is False or (plan is not None and plan.swapped(block)):
        plan = _make_plan(block)
        object.__setattr__(block, "_mlxtune_plan", plan)  # a plain attribute, not a child
    return plan


def _offset(cache) -> mx.array:
    offset = cache.offset
    return offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)


def fused_stack_call(inner, inputs: mx.array, cache, input_embeddings,
                     max_tokens: int) -> mx.array | None:
    """The decoder stack's output (final norm included) for `inputs`, every block in one
    decode_stack op, or None when a block or cache is not one it takes (the caller then runs
    the model's own loop, whose blocks still fuse one by one where they can). Only the plain
    stack of the STANDARD architectures: no input embeddings, no sliding-window layers, no
    pipeline split, and mlx-lm's KVCache or BatchKVCache with room in every layer."""
    layers = inner.layers
    if (cache is None or input_embeddings is not None or len(cache) != len(layers)
            or getattr(inner, "swa_idx", None) is not None
            or getattr(inner, "pipeline_size", 1) != 1 or kernels.decode_stack is None):
        return None
    # A prompt (more tokens than the ops take) leaves before anything is built for it.
    if inputs.ndim != 2 or inputs.size > max_tokens:
        return None
    tokens, plans, rooms, adapters = inputs.shape[1], [], [], []
    for block, c in zip(layers, cache):
        plan = _plan_for(block) if hasattr(type(block), "_mlxtune_fused") else None
        room = _room(c, tokens) if plan is not None else None
        adapter = plan.adapters(inputs.shape[0]) if room is not None else None
        if adapter is None:
            return None
        plans.append(plan)
        rooms.append(room)
        adapters.append(adapter)
    # Every layer's cache holds the same positions (mlx-lm's models take all layers' attention
    # mask from cache[0] on that ground): one offset array serves every layer's RoPE, and one
    # advanced offset every BatchKVCache after (not 30 additions a step).
    kinds, starts = {type(c) for c in cache}, {room[2] for room in rooms}
    if len(kinds) != 1 or len(starts) != 1:
        return None
    h = inner.embed_tokens(inputs)
    mask = create_attention_mask(h, cache[0])
    if not decodes_fused(h, mask, cache[0], max_tokens):
        return None
    offset = _offset(cache[0])
    causal = isinstance(mask, str)
    lora = [list(column) for column in zip(*adapters)]
    out = kernels.decode_stack(h, _stack_weights(inner, plans), offset,
                               [room[0] for room in rooms], [room[1] for room in rooms],
                               starts.pop(), None if causal else mask, causal, *lora)
    n = len(layers)
    advanced = offset + tokens if BatchKVCache in kinds else None
    for i, c in enumerate(cache):
        _advance(c, out[1 + i], out[1 + n + i], tokens, advanced)
    return inner.norm(out[0])


def _stack_weights(inner, plans: list) -> object:
    """The stack's weights and settings for decode_stack, gathered once for these plans (a
    replaced module or array makes a new plan, and so new stack weights)."""
    cached = inner.__dict__.get("_mlxtune_stack")
    if cached is not None and len(cached[0]) == len(plans) \
            and all(a is b for a, b in zip(cached[0], plans)):
        return cached[1]
    stack = kernels.stack_weights([p.params for p in plans], [w for p in plans for w in p.norms],
                                  [p.weights() for p in plans], [p.extras for p in plans])
    object.__setattr__(inner, "_mlxtune_stack", (tuple(plans), stack))  # not a child module
    return stack


def fused_block_call(block, x: mx.array, mask, cache, max_tokens: int) -> mx.array | None:
    """The block's output through the two fused ops, or None when this call is not one they
    take (the caller then runs mlx-lm's block)."""
    if not decodes_fused(x, mask, cache, max_tokens):
        return None
    plan = _plan_for(block)
    if plan is None:
        return None
    adapters = plan.adapters(x.shape[0])
    if adapters is None:
        return None
    extras, (norm_in, norm_post) = plan.extras, plan.norms
    offset = _offset(cache)
    weights = plan.weights()
    causal = isinstance(mask, str)
    mask = None if causal else mask
    room = _room(cache, x.shape[1])
    if room is not None:
        h, keys, values = kernels.decode_block(plan.params, x, norm_in, norm_post, weights,
                                               offset, extras, *room, mask, causal, *adapters)
        _advance(cache, keys, values, x.shape[1])
        return h
    # Any other cache, or one that must grow first: its own update between the two ops.
    lora_qkv, lora_out, qkv_mask, out_mask, rows, scales = adapters
    q, k, v = kernels.decode_qkv(x, norm_in, weights[:9], offset, extras, **plan.qkv,
                                 lora=lora_qkv, lora_mask=qkv_mask, lora_rows=rows and qkv_mask != 0,
                                 lora_scales=scales and qkv_mask != 0)
    keys, values = cache.update_and_fetch(k, v)
    return kernels.decode_out(x, q, keys, values, weights[9:], norm_post, mask, causal=causal,
                              specs=plan.out_specs, **plan.out, lora=lora_out,
                              lora_mask=out_mask, lora_rows=rows and out_mask != 0,
                              lora_scales=scales and out_mask != 0)


def _room(cache, tokens: int) -> tuple | None:
    """(keys buffer, values buffer, where the new tokens go) of mlx-lm's KVCache or
    BatchKVCache when its buffers have room for `tokens` more, which decode_block then writes;
    None for any other cache or when the buffers must grow first (update_and_fetch does)."""
    kind = type(cache)
    if kind is KVCache:
        prev = cache.offset
    elif kind is BatchKVCache:
        prev = cache._idx
    else:
        return None
    keys = cache.keys
    if keys is None or prev + tokens > keys.shape[2]:
        return None
    return keys, cache.values, prev


def _advance(cache, keys: mx.array, values: mx.array, tokens: int,
             offset: mx.array | None = None) -> None:
    """The cache's bookkeeping after decode_block wrote `tokens` entries, as update_and_fetch
    keeps it (a BatchKVCache's new offset: `offset` when the caller computed it once for all
    layers)."""
    cache.keys, cache.values = keys, values
    if type(cache) is KVCache:
        cache.offset += tokens
    else:
        cache._idx += tokens
        cache.offset = cache.offset + tokens if offset is None else offset
