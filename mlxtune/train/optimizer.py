"""The optimizer a training config names, with its learning-rate schedule."""

from __future__ import annotations

from mlxtune.errors import MlxtuneError
from mlxtune.train.config import TrainConfig


def build_optimizer(config: TrainConfig, total_steps: int):
    """The optimizer named in the config, with its learning-rate schedule and extra arguments."""
    import mlx.optimizers as optim

    lr = config.learning_rate
    if config.lr_schedule is not None:
        s = config.lr_schedule
        decay_steps = max(1, total_steps - s.warmup)
        defaults = {"cosine_decay": [lr, decay_steps, 0.0], "linear_schedule": [lr, 0.0, decay_steps],
                    "exponential_decay": [lr, 0.999], "step_decay": [lr, 0.5, decay_steps]}
        args = list(s.arguments) or defaults[s.name]
        int_args = {"cosine_decay": (1,), "linear_schedule": (2,), "step_decay": (2,)}
        args = [int(a) if i in int_args.get(s.name, ()) else a for i, a in enumerate(args)]
        lr = getattr(optim.schedulers, s.name)(*args)
        if s.warmup:
            warm = optim.schedulers.linear_schedule(s.warmup_init, args[0], s.warmup)
            lr = optim.schedulers.join_schedules([warm, lr], [s.warmup + 1])
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
           "adafactor": optim.Adafactor}[config.optimizer]
    extra = dict(config.optimizer_config.get(config.optimizer, {}))
    try:
        return cls(learning_rate=lr, **extra)
    except TypeError as e:
        raise MlxtuneError(f"optimizer_config.{config.optimizer}: {e}") from None
