"""Put LoRA/DoRA layers on a model with mlx-lm's own layers, and describe them as mlx-lm does."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.errors import ConfigError
from mlxtune.train.config import TrainConfig

_LINEAR = (nn.Linear, nn.QuantizedLinear)


def adapted_blocks(num_layers: int, n_blocks: int) -> int:
    """How many of the last blocks get adapters: `num_layers`, or all for -1, 0 or too many."""
    return n_blocks if num_layers in (-1, 0) else min(num_layers, n_blocks)


def all_linear(keys: list[str] | None) -> bool:
    """Whether lora_parameters.keys selects every linear layer of a block (unset, all-linear)."""
    return not keys or keys in (["all-linear"], ["all_linear"])


def key_matches(path: str, key: str) -> bool:
    """Whether layer `path` (e.g. self_attn.q_proj) is what `key` names: the path or its last part."""
    return path == key or path.split(".")[-1] == key


def _block_linear_paths(model: nn.Module) -> list[str]:
    """Relative paths of the linear layers inside one transformer block (e.g. self_attn.q_proj)."""
    paths = []
    model.layers[0].apply_to_modules(
        lambda p, m: paths.append(p) if isinstance(m, _LINEAR) or hasattr(m, "to_lora") else None)
    return [p for p in paths if p]


def expand_keys(model: nn.Module, keys: list[str] | None) -> list[str] | None:
    """Full module paths for `keys`: short names (q_proj) match the path's last part; None and
    'all-linear' mean every linear layer of a block."""
    if all_linear(keys):
        return None
    available = _block_linear_paths(model)
    out: list[str] = []
    for key in keys:
        hits = [p for p in available if key_matches(p, key)]
        if not hits:
            names = sorted({p.split(".")[-1] for p in available})
            raise ConfigError([f"lora_parameters.keys: {key!r} is not a linear layer of this "
                               f"model's blocks; choose from {', '.join(names)} or all-linear"])
        out.extend(h for h in hits if h not in out)
    return out


def adapter_config(config: TrainConfig, keys: list[str] | None, num_layers: int) -> dict:
    """The adapter_config.json that stock mlx-lm's load_adapters reads."""
    lora = {"rank": config.lora_parameters.rank, "scale": config.lora_parameters.effective_scale,
            "dropout": config.lora_parameters.dropout}
    if keys is not None:
        lora["keys"] = keys
    return {"fine_tune_type": config.fine_tune_type, "num_layers": num_layers,
            "lora_parameters": lora, "model": config.model}


def apply_lora(model: nn.Module, config: TrainConfig) -> dict:
    """Freeze the base and add adapters (or unfreeze all for full fine-tuning); returns the
    adapter config to save beside the weights."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = adapted_blocks(config.num_layers, len(model.layers))
    if config.fine_tune_type == "full":
        quantized = [p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
        if quantized:
            raise ConfigError([f"fine_tune_type: full needs float weights but {quantized[0]} is "
                               "quantized; use lora (QLoRA) or a float model"])
        model.freeze()
        for block in model.layers[-num_layers:]:
            block.unfreeze()
        return adapter_config(config, None, num_layers)
    keys = expand_keys(model, config.lora_parameters.keys)
    model.freeze()
    mx.random.seed(config.seed)
    settings = {"rank": config.lora_parameters.rank,
                "scale": config.lora_parameters.effective_scale,
                "dropout": config.lora_parameters.dropout}
    if keys is not None:
        settings["keys"] = keys
    linear_to_lora_layers(model, num_layers, settings, use_dora=config.fine_tune_type == "dora")
    return adapter_config(config, keys, num_layers)


def trainable_count(model: nn.Module) -> int:
    """Number of parameters the optimizer updates."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
