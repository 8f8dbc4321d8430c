"""`mlxtune models info`: what a model folder holds, read from its config and weight headers."""

from __future__ import annotations

from pathlib import Path

from mlxtune.models.folder import read_config, safetensors_shapes


def count_parameters(shapes: dict, config: dict) -> int:
    """Parameters the model has, counting each packed quantized weight as its unpacked size."""
    quant = config.get("quantization") or {}
    total = 0
    for name, (shape, dtype) in shapes.items():
        if name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.weight" in shapes \
                and shapes[f"{name.rsplit('.', 1)[0]}.weight"][1] == "U32":
            continue
        n = 1
        for d in shape:
            n *= d
        if dtype == "U32" and name.endswith(".weight"):
            layer = name[: -len(".weight")]
            bits = (quant.get(layer) or {}).get("bits", quant.get("bits", 4))
            n = n * 32 // bits
        total += n
    return total


def model_info(folder: Path) -> dict:
    """Architecture, size, quantization and disk use of the model folder `folder`."""
    config = read_config(folder)
    shapes = safetensors_shapes(folder)
    quant = config.get("quantization")
    disk = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    return {
        "path": str(folder),
        "architecture": config.get("model_type", "?"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "context_length": config.get("max_position_embeddings"),
        "parameters": count_parameters(shapes, config),
        "quantization": (f"{quant['bits']}-bit, group size {quant['group_size']}"
                         + (" (some layers differ)" if any(isinstance(v, dict)
                                                           for v in quant.values()) else "")
                         if quant else "none"),
        "weights_dtype": sorted({d for _, d in shapes.values()}),
        "disk_gb": round(disk / 2**30, 3),
    }
