"""Write an mlx-lm LoRA adapter alone as a llama.cpp GGUF LoRA (`llama-cli -m base.gguf --lora`).

The layout is that of llama.cpp's convert_lora_to_gguf.py: general.type=adapter,
adapter.type=lora, adapter.lora.alpha, and per adapted weight `blk.N.attn_q.weight.lora_a`
(rank x in) and `.lora_b` (out x rank), so that llama.cpp adds (alpha / rank) * lora_b @ lora_a
to the base weight. mlx-lm stores the transposes (lora_a: in x rank, lora_b: rank x out) and
multiplies by `scale`, hence alpha = scale * rank. The base GGUF holds attn_q/attn_k rows in
llama.cpp's rope order, so lora_b's rows get the same per-head permutation (lora_a has no rows
of the output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxtune.errors import MlxtuneError
from mlxtune.gguf_export import _ARCHITECTURES, _gguf_names, _rename, gguf_file, permute_rows
from mlxtune.models.folder import read_config


def adapter_tensors(weights: dict, scale: float, heads: int, kv_heads: int
                    ) -> tuple[float, dict[str, np.ndarray]]:
    """(alpha, {GGUF name: float32 array}) for mlx-lm LoRA `weights` (name.lora_a/.lora_b)."""
    layer_names, top_names = _gguf_names()
    tensors, rank = {}, None
    for name in sorted(weights):
        if not name.endswith(".lora_a"):
            if not name.endswith(".lora_b"):
                raise MlxtuneError(f"adapter tensor {name!r} is not a LoRA a/b matrix: only LoRA "
                                   "adapters export to a GGUF LoRA (DoRA and full fine-tunes: "
                                   "fuse, then --gguf)")
            continue
        module = name[:-len(".lora_a")]
        target = _rename(f"{module}.weight", layer_names, top_names)
        if target is None:
            raise MlxtuneError(f"adapter layer {module!r} has no llama.cpp tensor name")
        a = np.asarray(weights[name], dtype=np.float32).T  # rank x in
        b = np.asarray(weights[f"{module}.lora_b"], dtype=np.float32).T  # out x rank
        if ".attn_q." in target:
            b = permute_rows(b, heads)
        elif ".attn_k." in target:
            b = permute_rows(b, kv_heads)
        rank = rank or a.shape[0]
        if a.shape[0] != rank:
            raise MlxtuneError("adapter layers have different ranks; a GGUF LoRA has one alpha")
        tensors[f"{target}.lora_a"], tensors[f"{target}.lora_b"] = a, b
    if not tensors:
        raise MlxtuneError("the adapter holds no LoRA matrices")
    return float(scale) * rank, tensors


def write_gguf_adapter(adapter_dir: Path, model_dir: Path, out: Path
                       ) -> tuple[Path, float, int]:
    """Write the LoRA adapter in `adapter_dir` (trained on `model_dir`) as GGUF LoRA file `out`;
    returns (out, alpha, adapted layers)."""
    import gguf
    import mlx.core as mx

    from mlxtune.models.adapters import read_adapter_config

    adapter_cfg = read_adapter_config(adapter_dir)
    kind = adapter_cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise MlxtuneError(f"--gguf-adapter: llama.cpp loads LoRA adapters, not {kind}; fuse it "
                           "and use --gguf instead")
    config = read_config(model_dir)
    if config.get("model_type") not in _ARCHITECTURES:
        raise MlxtuneError(f"--gguf-adapter supports llama-family models "
                           f"({', '.join(_ARCHITECTURES)}); this one is "
                           f"{config.get('model_type')!r}")
    heads = config["num_attention_heads"]
    scale = (adapter_cfg.get("lora_parameters") or {}).get("scale", 20.0)
    weights = {k: np.array(v.astype(mx.float32))
               for k, v in mx.load(str(adapter_dir / "adapters.safetensors")).items()}
    alpha, tensors = adapter_tensors(weights, scale, heads,
                                     config.get("num_key_value_heads", heads))
    with gguf_file(out) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for name, w in tensors.items():
            writer.add_tensor(name, w)
    return Path(out), alpha, len(tensors) // 2
