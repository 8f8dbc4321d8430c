"""Plan a training run's peak memory before loading any weights, from config.json and file headers.

The plan counts what MLX keeps alive at the peak of one step: the weights, the trainable
parameters with their gradients and optimizer moments, the activations the backward pass needs
(all adapted blocks, or one block plus each block's input with gradient checkpointing), and the
logits. `scripts/bench_memory.py` checks it against MLX's own peak counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxtune import kernels
from mlxtune.cpu_math import kernel_matmul_fits, logit_chunks, row_chunks
from mlxtune.fastpath import standard_model_type
from mlxtune.models.folder import read_config, safetensors_shapes
from mlxtune.train.config import TrainConfig
from mlxtune.train.lora import adapted_blocks, all_linear, key_matches

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F64": 8}
GB = 1024**3
# scripts/bench_memory.py measured peaks at 0.76-0.97 of the plan (the CPU path with the kernels,
# SmolLM2 at 512 and 2048 tokens and a 7B-shaped llama at 512; checkpointed runs lowest, their
# loss and recomputed block counted as if alive together; two other shapes, measured before the
# training matmul kernel, at up to 1.04): a run refused for memory is one planned more than this
# far over what is available.
PLAN_ERROR = 0.15


@dataclass
class MemoryPlan:
    """Predicted bytes per component and the verdict against the machine's memory."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    activations_other: int  # the activations with the opposite grad_checkpoint setting
    logits: int
    peak: int
    available: int
    trainable_params: int
    reference: int = 0  # DPO's reference forward pass (the base, adapters off, no gradient)

    @property
    def fits(self) -> bool:
        """Whether the predicted peak fits in the memory available now."""
        return self.available == 0 or self.peak <= self.available

    def lever(self, config: TrainConfig) -> str:
        """The one change that would save the most memory."""
        if not config.grad_checkpoint and self.activations > 2 * self.activations_other:
            return (f"set grad_checkpoint: true (activations {self.activations / GB:.2f} GB -> "
                    f"{self.activations_other / GB:.2f} GB)")
        if self.weights > self.activations + self.logits and config.quantize is None:
            return "quantize the base (quantize: {bits: 4}) for QLoRA"
        return (f"lower batch_size ({config.batch_size}) or max_seq_length "
                f"({config.max_seq_length}): activations and logits scale with both")

    def lines(self, config: TrainConfig) -> list[str]:
        """The plan as printable lines."""
        ckpt = "with" if config.grad_checkpoint else "without"
        other = "with" if not config.grad_checkpoint else "without"
        rows = [
            ("weights", self.weights),
            (f"trainable ({self.trainable_params / 1e6:.2f}M params)", self.trainable),
            ("gradients", self.gradients),
            (f"optimizer ({config.optimizer})", self.optimizer),
            (f"activations ({ckpt} checkpointing)", self.activations),
            ("logits and loss", self.logits),
        ]
        if config.training_mode == "dpo":
            rows.append(("reference forward (dpo, no gradient)", self.reference))
        out = [f"  {name:<40} {size / GB:8.2f} GB" for name, size in rows]
        out.append(f"  {'(activations ' + other + ' checkpointing)':<40} "
                   f"{self.activations_other / GB:8.2f} GB")
        out.append(f"  {'predicted peak':<40} {self.peak / GB:8.2f} GB")
        if self.available:
            head = (self.available - self.peak) / GB
            verdict = (f"fits: {head:.1f} GB headroom of {self.available / GB:.1f} GB available"
                       if self.fits else
                       f"does NOT fit: {-head:.1f} GB over the {self.available / GB:.1f} GB "
                       f"available; {self.lever(config)}")
            out.append(f"  {verdict}")
        return out


def _lora_params(config: dict, train: TrainConfig, shapes: dict) -> int:
    """Trainable parameter count for the adapters (or the blocks, for full fine-tuning)."""
    n = adapted_blocks(train.num_layers, config["num_hidden_layers"])
    block = {}  # relative path -> (in, out) of each linear layer in block 0
    for name, (shape, dtype) in shapes.items():
        prefix = "model.layers.0."
        if name.startswith(prefix) and name.endswith(".weight") and len(shape) == 2:
            rel = name[len(prefix): -len(".weight")]
            block[rel] = (_in_out(shape, dtype, config, name) // shape[0], shape[0])
    if train.fine_tune_type == "full":
        return n * sum(i * o for i, o in block.values())
    keys = train.lora_parameters.keys
    if not all_linear(keys):
        block = {k: v for k, v in block.items() if any(key_matches(k, key) for key in keys)}
    r = train.lora_parameters.rank
    per_block = sum(r * (i + o) + (o if train.fine_tune_type == "dora" else 0)
                    for i, o in block.values())
    return n * per_block


def _bits(config: dict, name: str) -> int:
    quant = config.get("quantization") or {}
    layer = name.rsplit(".", 1)[0]
    return (quant.get(layer) or {}).get("bits", quant.get("bits", 4))


def plan_memory(model_dir: Path, train: TrainConfig, backend: str, available: int,
                world_size: int = 1) -> MemoryPlan:
    """Predict the peak memory of one training step of `train` on the model in `model_dir`."""
    config = read_config(model_dir)
    shapes = safetensors_shapes(model_dir)
    # On the CPU everything computes in fp32 (fp16 matmuls there skip BLAS).
    act = 4 if backend == "cpu" else 2
    weights = _weight_bytes(shapes, backend)
    h = config["hidden_size"]
    inter = config.get("intermediate_size", 4 * h)
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    hd = config.get("head_dim") or h // heads
    n = adapted_blocks(train.num_layers, config["num_hidden_layers"])
    b, t = train.batch_size, train.max_seq_length
    if train.training_mode != "sft":
        b *= 2  # a preference batch is its chosen answers and its rejected ones, one row each
    params = _lora_params(config, train, shapes)
    trainable = params * 4
    moments = {"adam": 2, "adamw": 2, "sgd": 0, "adafactor": 1}[train.optimizer]
    # The CPU path's attention kernel keeps one log-sum-exp a row where MLX's keeps the
    # probabilities (a heads x t matrix a token), and its backward briefly holds each query
    # head's key and value gradients where MLX's holds two more t x t matrices.
    flash = (backend == "cpu" and kernels.attention_train is not None
             and standard_model_type(config.get("model_type", "")))
    # What one block keeps for its backward pass, per token: norms, q/k/v, attention output,
    # residuals and the MLP's gate/up/product. With the kernel, fitted to bench_memory.py's
    # per-block slopes of three shapes (SmolLM2; h 1024 / inter 1024; h 256 / inter 3072: 8050,
    # 8950, 11195 floats a token, each planned to +3%): 3.5h + 2 heads*hd + 2 kv*hd + 3 inter
    # and one log-sum-exp a head. Without it (MLX's attention ops), as fitted before the kernel:
    # ~7h + 2 heads*hd + 2 kv*hd + 4 inter and one heads x t matrix (counting scores and
    # probabilities both over-planned SmolLM2 at 2048 by 24%).
    if flash:
        per_token = 7 * h // 2 + 2 * heads * hd + 2 * kv * hd + 3 * inter + heads
    else:
        per_token = 7 * h + 2 * heads * hd + 2 * kv * hd + 4 * inter + heads * t
    block = b * t * per_token * act
    full_acts = n * block
    # Checkpointing keeps each block's input; the block being recomputed holds its activations
    # plus the gradients flowing through it (~half as much again, measured).
    ckpt_acts = n * b * t * h * act + block * 3 // 2
    scratch = _dequant_scratch(shapes, config, backend, b * t, act)
    logits = _logit_bytes(config, backend, b * t)
    # The backward pass of one attention briefly holds the scores' gradient and its softmax's
    # beside the kept probabilities (~2 more heads x t x t matrices: measured at 2048 tokens once
    # the logits stopped hiding it); the kernel's, per-head key and value gradients.
    transient = 2 * b * heads * t * (hd if flash else t) * act
    acts = ckpt_acts if train.grad_checkpoint else full_acts
    other = full_acts if train.grad_checkpoint else ckpt_acts
    # DPO runs the same rows through the base once more without a gradient: nothing of it is kept
    # for the backward pass, so at most one block's activations and the loss's chunks are alive.
    reference = block + logits if train.training_mode == "dpo" else 0
    peak = weights + trainable * (2 + moments) + acts + logits + scratch + transient + reference
    return MemoryPlan(weights=weights, trainable=trainable, gradients=trainable,
                      optimizer=trainable * moments, activations=acts, activations_other=other,
                      logits=logits, peak=peak, available=available, trainable_params=params,
                      reference=reference)


def _weight_bytes(shapes: dict, backend: str) -> int:
    """The weights as stored, float halves counted twice on the CPU (cast to fp32 there)."""
    total = 0
    for shape, dtype in shapes.values():
        size = _BYTES.get(dtype, 4)
        for d in shape:
            size *= d
        if backend == "cpu" and dtype in ("F16", "BF16"):
            size *= 2
        total += size
    return total


def _kernel_matmul(backend: str, tokens: int, inner: int) -> bool:
    """Whether the CPU path computes a product of `tokens` rows summed over `inner` terms with
    kernels.dequant_matmul: then no fp32 copy of the weight exists."""
    return backend == "cpu" and kernel_matmul_fits(tokens, inner)


def _dequant_scratch(shapes: dict, config: dict, backend: str, tokens: int, act: int) -> int:
    """The largest de-quantized weight, briefly in fp32, twice (forward and backward). The CPU
    fast path de-quantizes big weights in row chunks and then concatenates the outputs; its fused
    loss de-quantizes the output head in vocabulary chunks (counted by _logit_bytes) and the
    embedding only at the looked-up rows, with the kernels' de-quantizer (MLX's ops, without
    it, hold unpacked copies as big as a whole head: measured)."""
    fused = (backend == "cpu" and kernels.dequantize is not None
             and standard_model_type(config.get("model_type", "")))
    scratch = 0
    for name, (shape, dtype) in shapes.items():
        if len(shape) != 2 or (fused and _is_head_or_embedding(name)):
            continue
        rows, cols = shape[0], _in_out(shape, dtype, config, name) // shape[0]
        if _kernel_matmul(backend, tokens, cols) and _kernel_matmul(backend, tokens, rows):
            continue
        chunks = row_chunks(rows, cols, tokens) if backend == "cpu" else [(0, rows)]
        size = 2 * (chunks[0][1] - chunks[0][0]) * cols * 4
        if len(chunks) > 1:
            size += tokens * rows * act
        scratch = max(scratch, size)
    return scratch


def _is_head_or_embedding(name: str) -> bool:
    return (name.startswith(("lm_head.", "embed_tokens."))
            or ".embed_tokens." in name)


def _logit_bytes(config: dict, backend: str, tokens: int) -> int:
    """The output layer's logits and loss. The fused loss of the CPU path
    (fastpath.token_losses) works through the vocabulary in chunks, not the whole logits three
    times over. Through the BLAS its peak, measured alone for SmolLM2's head (fwd + bwd at 128 /
    512 / 1024 / 2048 tokens: 0.18 / 0.33 / 0.26 / 0.23 GiB), is covered by ~3.5 de-quantized
    head chunks and ~6.5 chunks of logits (the first over-plans 128 tokens by 0.08 GiB, the rest
    within 1%); through kernels.dequant_matmul, by the logits alone."""
    vocab, h = config["vocab_size"], config["hidden_size"]
    if backend == "cpu" and standard_model_type(config.get("model_type", "")):
        a, z = logit_chunks(vocab, h, tokens)[0]
        if _kernel_matmul(backend, tokens, h) and _kernel_matmul(backend, tokens, z - a):
            # No head chunk de-quantized whole: ~7 chunks of logits (measured the same way:
            # 0.08 / 0.22 / 0.21 / 0.21 GiB, each planned to +3%).
            return 7 * tokens * (z - a) * 4 + 2 * tokens * h * 4
        return (13 * tokens * (z - a) + 7 * (z - a) * h) * 4 // 2 + 2 * tokens * h * 4
    return 3 * tokens * vocab * 4


def _in_out(shape, dtype, config, name) -> int:
    # Packed 4-bit (or other) weights are U32 words holding 32 / bits values each.
    cols = shape[1] * 32 // _bits(config, name) if dtype == "U32" else shape[1]
    return shape[0] * cols
