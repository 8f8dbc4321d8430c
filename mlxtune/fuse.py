"""`mlxtune fuse`: merge an adapter into its base model and say how much the merge moved the model.

The merge is mlx-lm's own (`LoRALinear.fuse`, `DoRALinear.fuse`). A quantized base stays quantized
(each fused layer re-quantized with its own bits and group size), and because re-quantizing can
erase a small LoRA delta (mlx-examples #507), every fuse measures the drift: fused vs unfused logits
on a few validation examples. `--dequantize` writes fp16 weights in Hugging Face names that
transformers loads; `--gguf` also writes a llama.cpp file (see mlxtune/gguf_export.py), and
`--ollama` a folder `ollama create` takes (see mlxtune/ollama.py); `--gguf-adapter` writes the
adapter alone as a llama.cpp GGUF LoRA (see mlxtune/gguf_adapter.py), with or without a merge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import yaml

from mlxtune.errors import MlxtuneError
from mlxtune.models.adapters import base_model, load_adapter, read_adapter_config
from mlxtune.models.folder import load_model_folder

_BUILTIN_PROMPTS = ["The capital of France is", "Write one sentence about the sea.",
                    "Question: what is two plus two? Answer:", "List three colours:"]


@dataclass
class Drift:
    """How far the fused model's logits are from base + adapter, on the same tokens."""

    max_abs: float
    mean_abs: float
    agreement: float  # fraction of positions whose argmax (greedy next token) is the same
    positions: int
    source: str

    def line(self) -> str:
        """One line for the terminal."""
        return (f"fused vs unfused on {self.positions} positions ({self.source}): logits max "
                f"|diff| {self.max_abs:.4g}, mean {self.mean_abs:.4g}; greedy tokens agree "
                f"{100 * self.agreement:.1f}%")


@dataclass
class FuseResult:
    """What `fuse` wrote and what it measured."""

    out: Path | None  # None: only the GGUF adapter was written
    quantized: bool
    drift: Drift | None = None
    gguf: Path | None = None
    ollama: Path | None = None
    gguf_adapter: Path | None = None
    notes: list[str] = field(default_factory=list)


def find_adapter(run: Path | None, adapter: Path | None) -> tuple[Path, dict]:
    """The adapter folder named by --run (a run folder, or a name under runs/) or --adapter, and
    its adapter_config.json."""
    if (run is None) == (adapter is None):
        raise MlxtuneError("give exactly one of --run runs/NAME or --adapter DIR")
    path = Path(run if run is not None else adapter)
    if run is not None and not path.exists() and (Path("runs") / path).exists():
        path = Path("runs") / path
    return path, read_adapter_config(path)


def fuse_layers(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every LoRA/DoRA layer of `model` by its merged layer (mlx-lm's fuse); returns how many."""
    from mlx.utils import tree_unflatten

    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def fuse_in_memory(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Load the adapter at `adapter_dir` into `model` and merge it (for `serve --fuse`)."""
    load_adapter(model, adapter_dir)
    fuse_layers(model)
    return model


def _load(model_dir: Path, adapter_dir: Path | None = None):
    model, config, tokenizer = load_model_folder(model_dir)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model, tokenizer, config


def fuse(out: Path | None, run: Path | None = None, adapter: Path | None = None,
         model: str | None = None, dequantize: bool = False, gguf: Path | None = None,
         gguf_type: str = "f16", ollama: Path | None = None, gguf_adapter: Path | None = None,
         say=print) -> FuseResult:
    """Merge the adapter into its base, write a model folder at `out` (and a GGUF, an Ollama
    folder), report drift; and/or write the adapter alone as a GGUF LoRA."""
    from mlxtune.models.resolve import resolve_model

    adapter_dir, adapter_cfg = find_adapter(run, adapter)
    model = model or base_model(adapter_dir, adapter_cfg)
    if out is None and (gguf_adapter is None or gguf is not None or ollama is not None
                        or dequantize):
        raise MlxtuneError("give --out DIR for the fused model (needed by --gguf, --ollama and "
                           "--dequantize), or --gguf-adapter FILE alone, or both")
    if gguf is not None or ollama is not None:
        from mlxtune.gguf_export import check_gguf_type

        check_gguf_type(gguf_type)
    model_dir = resolve_model(model)
    written = None
    if gguf_adapter is not None:
        # The adapter alone needs no weights of the base, so it comes before the merge.
        written = _write_gguf_adapter(adapter_dir, model_dir, Path(gguf_adapter), say)
        if out is None:
            return FuseResult(out=None, quantized=False, gguf_adapter=written)
    if ollama is not None:
        from mlx_lm.utils import load_tokenizer

        from mlxtune.ollama import chat_pieces

        chat_pieces(load_tokenizer(model_dir))  # a template Ollama cannot take fails here, early
    result = _merge(Path(out), model, model_dir, adapter_dir, adapter_cfg, dequantize, say)
    result.gguf_adapter = written
    _export(result, gguf, ollama, gguf_type, say)
    return result


def _merge(out: Path, model: str, model_dir: Path, adapter_dir: Path, adapter_cfg: dict,
           dequantize: bool, say) -> FuseResult:
    """Fuse, write the model folder at `out` atomically, and measure the drift."""
    from mlx_lm.utils import dequantize_model, save

    from mlxtune.atomic import atomic_folder
    from mlxtune.fastpath import cast_floats
    from mlxtune.models.folder import TOKENIZER_FILES

    net, tokenizer, config = _load(model_dir, adapter_dir)
    n = fuse_layers(net, dequantize=dequantize)
    say(f"merged {adapter_cfg.get('fine_tune_type', 'lora')} adapter into {n} layers of {model}")
    if dequantize:
        dequantize_model(net)
        # fp16 everywhere, the dtype transformers reads from torch_dtype.
        cast_floats(net, mx.float16)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float16"
    quantized = "quantization" in config
    with atomic_folder(out) as tmp:
        save(tmp, model_dir, net, tokenizer, config, donate_model=False)
        # Keep the chat template and other tokenizer files exactly as the base has them.
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file() and not (tmp / name).is_file():
                shutil.copy(model_dir / name, tmp / name)
        (tmp / "fused_from.json").write_text(json.dumps(
            {"model": model, "adapter": str(adapter_dir.resolve()),
             "dequantized": dequantize}, indent=2))
    del net
    result = FuseResult(out=out, quantized=quantized)
    say(f"wrote {out} ({'re-quantized, as the base' if quantized else 'float16'})")
    result.drift = measure_drift(model_dir, adapter_dir, out, tokenizer)
    say(result.drift.line())
    if quantized and result.drift.agreement < 0.99:
        note = ("re-quantizing moved the greedy tokens: consider --dequantize (fp16) to keep "
                "the fine-tune exactly")
        result.notes.append(note)
        say(f"note: {note}")
    return result


def _export(result: FuseResult, gguf: Path | None, ollama: Path | None, gguf_type: str,
            say) -> None:
    """Write the fused folder on as a GGUF file and/or an Ollama folder."""
    if gguf is not None:
        from mlxtune.gguf_export import write_gguf

        result.gguf = write_gguf(result.out, Path(gguf), gguf_type)
        say(f"wrote {result.gguf} ({gguf_type})")
    if ollama is not None:
        from mlxtune.ollama import write_ollama

        result.ollama = write_ollama(result.out, Path(ollama), gguf_type)
        say(f"wrote {result.ollama}: model.gguf ({gguf_type}) and Modelfile; then: "
            f"ollama create NAME -f {result.ollama / 'Modelfile'}")


def _write_gguf_adapter(adapter_dir: Path, model_dir: Path, path: Path, say) -> Path:
    from mlxtune.gguf_adapter import write_gguf_adapter

    written, alpha, layers = write_gguf_adapter(adapter_dir, model_dir, path)
    say(f"wrote {written} (GGUF LoRA, alpha {alpha:g}, {layers} layers)")
    return written


def drift_examples(adapter_dir: Path, tokenizer, n: int = 4, max_len: int = 128):
    """Token sequences to compare on: a few of the run's validation examples, else built-ins."""
    data = None
    config_file = adapter_dir / "config.yaml"
    if config_file.is_file():
        try:
            data = (yaml.safe_load(config_file.read_text()) or {}).get("data")
        except yaml.YAMLError:
            data = None
    for folder in ([Path(data), adapter_dir.parent / data] if data else []):
        valid = folder / "valid.jsonl"
        if valid.is_file():
            from mlxtune.train.data import tokenize_record

            rows = []
            for line in valid.read_text().splitlines():
                if line.strip() and len(rows) < n:
                    rows.append(tokenize_record(tokenizer, json.loads(line), True).tokens[:max_len])
            if rows:
                return [list(map(int, r)) for r in rows], f"{n} examples of {valid}"
    return [tokenizer.encode(p) for p in _BUILTIN_PROMPTS], "built-in prompts"


def _logits(net, sequences) -> list:
    import numpy as np

    return [np.array(net(mx.array(s)[None]).astype(mx.float32)[0]) for s in sequences]


def measure_drift(model_dir: Path, adapter_dir: Path, fused_dir: Path, tokenizer) -> Drift:
    """Fused vs base + adapter: logit differences and greedy-token agreement on a few examples."""
    import numpy as np

    from mlxtune.fastpath import prepare_for_inference

    sequences, source = drift_examples(adapter_dir, tokenizer)
    # One model at a time, each on this backend's fast path, so a big model never doubles.
    unfused, _, _ = _load(model_dir, adapter_dir)
    want = _logits(prepare_for_inference(unfused), sequences)
    del unfused
    fused, _, _ = _load(fused_dir)
    got = _logits(prepare_for_inference(fused), sequences)
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(want, got)])
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(want, got)])
    return Drift(float(diffs.max()), float(diffs.mean()), float(agree.mean()), int(agree.size),
                 source)
