"""mlxtune fuse --gguf-adapter: the LoRA alone in llama.cpp's GGUF LoRA layout, read back with
gguf-py's reader; the delta it rebuilds (alpha / rank * lora_b @ lora_a, q/k rows put back in
Hugging Face order by our GGUF import's inverse permutation) is the adapter's own delta."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.fuse import fuse

MODULES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32),
           "self_attn.v_proj": (64, 32), "self_attn.o_proj": (64, 64),
           "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128), "mlp.down_proj": (128, 64)}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
RANK, SCALE = 4, 1.5


def _adapter(folder, model_dir, kind="lora"):
    """A LoRA on every linear of the tiny llama's 2 blocks, with random a and b (mlx-lm layout)."""
    rng = np.random.default_rng(0)
    weights = {}
    for i in range(2):
        for module, (n_in, n_out) in MODULES.items():
            p = f"model.layers.{i}.{module}"
            weights[f"{p}.lora_a"] = mx.array(rng.normal(size=(n_in, RANK)).astype(np.float32))
            weights[f"{p}.lora_b"] = mx.array(rng.normal(size=(RANK, n_out)).astype(np.float32))
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": kind, "num_layers": 2, "model": str(model_dir),
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0}}))
    return folder, {k: np.array(v) for k, v in weights.items()}


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0]


def test_gguf_lora_reads_back_to_the_adapters_own_delta(tmp_path, tiny_qmodel_dir):
    from gguf import GGUFReader

    from mlxtune.models.gguf import _unpermute_rows

    folder, weights = _adapter(tmp_path / "adapter", tiny_qmodel_dir)
    lines = []
    result = fuse(None, adapter=folder, gguf_adapter=tmp_path / "lora.gguf", say=lines.append)
    assert result.out is None and lines == [f"wrote {tmp_path / 'lora.gguf'} (GGUF LoRA, "
                                            f"alpha {SCALE * RANK:g}, 14 layers)"]
    reader = GGUFReader(str(result.gguf_adapter))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora"
    alpha = float(_field(reader, "adapter.lora.alpha"))
    assert alpha == pytest.approx(SCALE * RANK)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * 2 * len(MODULES)
    for i in range(2):
        for module, gguf_name in GGUF_NAMES.items():
            name = f"blk.{i}.{gguf_name}.weight"
            a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            n_in, n_out = MODULES[module]
            assert a.shape == (RANK, n_in) and b.shape == (n_out, RANK)  # as convert_lora_to_gguf
            delta = alpha / a.shape[0] * (b @ a)  # what llama.cpp adds to the base weight
            if gguf_name in ("attn_q", "attn_k"):  # back to Hugging Face row order
                delta = np.array(_unpermute_rows(mx.array(delta), 4 if gguf_name == "attn_q"
                                                 else 2))
            p = f"model.layers.{i}.{module}"
            own = SCALE * (weights[f"{p}.lora_a"] @ weights[f"{p}.lora_b"]).T
            np.testing.assert_allclose(delta, own, rtol=1e-5, atol=1e-5)


def test_gguf_adapter_refuses_what_llama_cpp_cannot_load(tmp_path, tiny_qmodel_dir):
    folder, _ = _adapter(tmp_path / "dora", tiny_qmodel_dir, kind="dora")
    with pytest.raises(MlxtuneError, match="llama.cpp loads LoRA adapters, not dora"):
        fuse(None, adapter=folder, gguf_adapter=tmp_path / "x.gguf")
    with pytest.raises(MlxtuneError, match="give --out DIR"):
        fuse(None, adapter=folder)
    assert not (tmp_path / "x.gguf").exists()
