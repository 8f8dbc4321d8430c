"""`mlxtune models convert`: a Hugging Face folder or a GGUF file to an MLX folder, optionally quantized."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlxtune.atomic import atomic_folder
from mlxtune.errors import ModelError
from mlxtune.models.folder import TOKENIZER_FILES, is_model_folder, load_model_folder, read_config
from mlxtune.models.resolve import resolve_model

QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def convert_model(source: str, out: Path, bits: int | None = None, group_size: int = 64) -> Path:
    """Write model `source` (any name resolve_model takes) to `out` as MLX, quantized if `bits`."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model

    if bits is not None and bits not in QUANT_BITS:
        raise ModelError(f"--quantize {bits}: supported bits are {', '.join(map(str, QUANT_BITS))}")
    if group_size not in QUANT_GROUP_SIZES:
        raise ModelError(f"--group-size {group_size}: supported sizes are "
                         f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    out = Path(out)
    if out.exists() and not is_model_folder(out) and any(out.iterdir()):
        raise ModelError(f"{out}: exists and is not a model folder; choose another --out")
    folder = resolve_model(source)
    model, config, _ = load_model_folder(folder, lazy=True, tokenizer=False)
    config = dict(read_config(folder), **{k: v for k, v in config.items() if k in ("quantization",)})
    if bits is not None:
        if "quantization" in config:
            # Re-quantizing needs real weights: start again from de-quantized ones.
            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        model, config = quantize_model(model, config, group_size, bits)
    with atomic_folder(out) as tmp:
        mx.eval(model.parameters())
        save_model(tmp, model)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, tmp / name)
        # config.json last: even the temp folder never looks like a model until it is whole.
        save_config(config, tmp / "config.json")
    return out
