"""One training run: load the model, add adapters, then train with reports, evals and checkpoints."""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlxtune.atomic import write_json
from mlxtune.config import save_config
from mlxtune.errors import Interrupted, MlxtuneError
from mlxtune.progress import ProgressBar
from mlxtune.train import checkpoint as ckpt
from mlxtune.train.config import TrainConfig
from mlxtune.train.data import batches_per_epoch, eval_batches, iterate_batches, load_split
from mlxtune.train.loop import evaluate_with_stats, masked_loss, token_count, train
from mlxtune.train.metrics import MetricsLog
from mlxtune.train.lora import trainable_count
from mlxtune.train.optimizer import build_optimizer


def choose_loss(config: TrainConfig):
    """(loss, count) for the config's training_mode: the token-mean SFT loss, or a pair-mean
    preference loss."""
    from functools import partial

    from mlxtune.train.preference import dpo_loss, orpo_loss, pair_count

    if config.training_mode == "dpo":
        return partial(dpo_loss, beta=config.beta, loss_type=config.loss_type), pair_count
    if config.training_mode == "orpo":
        return partial(orpo_loss, beta=config.beta), pair_count
    return masked_loss, token_count


def load_for_training(model_dir: Path, config: TrainConfig):
    """The model, quantized at load if asked and set up for this backend's fast path."""
    from mlx_lm.utils import quantize_model

    from mlxtune.fastpath import prepare_for_training
    from mlxtune.models.folder import load_model_folder

    model, model_config, _ = load_model_folder(model_dir, tokenizer=False)
    if config.quantize is not None and "quantization" not in model_config:
        model, _ = quantize_model(model, model_config, config.quantize.group_size,
                                  config.quantize.bits)
    # The one place the compute path is chosen: on the CPU, de-quantize per layer and use fp32.
    prepare_for_training(model)
    return model


def _rewards(stats: dict) -> str:
    """', reward accuracy A, margin M' for a preference run's statistics; '' for SFT."""
    if not stats:
        return ""
    return f", reward accuracy {stats['reward_accuracy']:.3f}, margin {stats['reward_margin']:.3f}"


class TrainingSession:
    """State shared by the hooks of one run: model, optimizer, logs, best loss, patience."""

    def __init__(self, config: TrainConfig, config_path, model_dir: Path, files: dict,
                 world, say, cache_bytes: int = 0):
        from mlxtune.train.config import run_folder

        self.config, self.config_path, self.model_dir = config, config_path, model_dir
        self.files, self.world = files, world
        self.main = world.rank() == 0
        self.say = say if self.main else (lambda line: None)
        self.run_dir = run_folder(config, config_path)
        self.loss, self.count = choose_loss(config)
        self.best, self.bad_evals = math.inf, 0
        self.stop_reason, self.interrupted = "finished", False
        # Set by run() before any hook runs.
        self.model = self.optimizer = self.metrics = None
        self.adapter_config: dict = {}
        self.valid_set: list = []
        self.total = 0
        self.last_val: float | None = None
        self.last_val_stats: dict = {}
        self.window: dict = {}
        self.progress, self.bar_task = ProgressBar(enabled=False), None
        self.cache_bytes, self.prefix = cache_bytes, None  # the frozen-layer cache, when on

    def run(self, resume: bool, result):
        """Load everything, train, save; returns the filled-in TrainResult."""
        from mlxtune.models.folder import load_tokenizer

        cfg = self.config
        # Every example is tokenized before the weights load: a bad one fails in seconds.
        tokenizer = load_tokenizer(self.model_dir)
        train_set = self._split("train", tokenizer)
        self.valid_set = self._split("valid", tokenizer)
        self.model = self._load_model()
        per_epoch = batches_per_epoch(len(train_set), cfg.batch_size * self.world.size())
        self.total = (math.ceil(cfg.epochs * per_epoch / cfg.grad_accumulation_steps)
                      if cfg.epochs else cfg.iters)
        self.optimizer = build_optimizer(cfg, self.total)
        start = self._resume() if resume else 0
        self._open_run_folder(start if resume else None)
        what = ("examples" if cfg.training_mode == "sft"
                else f"preference pairs ({cfg.training_mode})")
        self.say(f"training {trainable_count(self.model) / 1e6:.3f}M parameters "
                 f"({cfg.fine_tune_type}) on {len(train_set)} {what} for {self.total} steps; "
                 f"run folder {self.run_dir}")
        batches = iterate_batches(train_set, cfg.batch_size, cfg.seed,
                                  start * cfg.grad_accumulation_steps, self.world.rank(),
                                  self.world.size())
        if cfg.cache_frozen_layers:
            batches = self._frozen_prefix(train_set).batches(batches)
        # Only rank 0 of a distributed run shows anything; the report lines stay on stdout.
        self.progress = ProgressBar("step {task.completed}/{task.total}", "bar",
                                    "{task.fields[info]}", "eta",
                                    enabled=self.main and sys.stderr.isatty(), transient=False,
                                    stderr=False)
        self.bar_task = self.progress.add("train", self.total, start, info="")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            if start == 0:
                self._eval(0)
            self._new_window()
            done = train(self.model, self.optimizer, batches, self.total, loss=self.loss,
                         count=self.count, accumulation=cfg.grad_accumulation_steps,
                         start_step=start, seed=cfg.seed, on_step=self._on_step)
        finally:
            signal.signal(signal.SIGINT, previous)
            self.progress.close()
            if self.metrics:
                self.metrics.close()
        return self._finish(done, result, tokenizer)

    def _eval_batches(self, examples: list, limit: int):
        batches = eval_batches(examples, self.config.batch_size, limit)
        return self.prefix.eval_batches(batches) if self.prefix else batches

    def _frozen_prefix(self, train_set: list):
        """Start the frozen-layer cache (train/frozen_prefix.py) and say what it will hold."""
        from mlxtune.train.frozen_prefix import FrozenPrefix, kept_tokens

        self.prefix = FrozenPrefix(self.model, self.cache_bytes)
        start, blocks = self.prefix.start, len(self.model.model.layers)
        if start == 0:
            self.say("cache_frozen_layers: every layer trains, nothing to cache")
            return self.prefix
        tokens = kept_tokens(train_set + self.valid_set)
        need = tokens * self.prefix.dim * 4
        fits = "" if need <= self.cache_bytes else \
            f"; only {self.cache_bytes / 1e9:.2f} GB is spare, the rest is computed each time"
        self.say(f"cache_frozen_layers: blocks 0-{start - 1} of {blocks} run once per example "
                 f"after the first epoch ({need / 1e9:.2f} GB for {tokens} tokens{fits})")
        return self.prefix

    def _split(self, split: str, tokenizer) -> list:
        cfg = self.config
        return load_split(self.files[split], tokenizer, cfg.mask_prompt, cfg.max_seq_length,
                          cfg.training_mode)

    def _load_model(self):
        """The model with its adapters (or unfrozen blocks) in place, ready to train."""
        from mlxtune.train.lora import apply_lora

        cfg = self.config
        model = load_for_training(self.model_dir, cfg)
        self.adapter_config = apply_lora(model, cfg)
        if cfg.resume_adapter_file:
            model.load_weights(cfg.resume_adapter_file, strict=False)
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        return model

    def _resume(self) -> int:
        """Restore the last checkpoint into the model and optimizer; returns its step."""
        last = ckpt.list_checkpoints(self.run_dir)[-1]
        loop_state = ckpt.load_checkpoint(last, self.model, self.optimizer)
        self.best = loop_state.get("best", math.inf)
        self.bad_evals = loop_state.get("bad_evals", 0)
        self.say(f"resuming {self.run_dir} from step {loop_state['step']} ({last.name})")
        return loop_state["step"]

    def _open_run_folder(self, resume_step: int | None) -> None:
        """Rank 0 writes the resolved config and adapter config and opens the metrics log."""
        if not self.main:
            return
        from mlxtune.config import config_to_dict
        from mlxtune.train.trackers import open_trackers

        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        write_json(self.run_dir / "adapter_config.json", self.adapter_config)
        trackers = open_trackers(cfg.report_to, self.run_dir, cfg.project_name,
                                 config_to_dict(cfg))
        self.metrics = MetricsLog(self.run_dir, resume_step, trackers)

    def _report(self, line: str) -> None:
        if self.main:
            self.progress.print(line)

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.say("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def _new_window(self) -> None:
        # What the next report line averages: every update since the last one.
        self.window = {"tokens": 0, "loss": 0.0, "time": time.perf_counter(), "steps": 0,
                       "stats": {}}

    def _on_step(self, step: int, loss: float, ntoks: int, stats: dict) -> bool:
        cfg, w = self.config, self.window
        if not math.isfinite(loss):
            last = ckpt.list_checkpoints(self.run_dir)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved"
            raise MlxtuneError(
                f"step {step}: the training loss is {loss}; {where}. Lower learning_rate "
                f"(now {cfg.learning_rate}), add warmup, or check the data for empty answers")
        w["tokens"] += ntoks
        # SFT losses are token means (weighted by tokens), preference losses pair means (each
        # update has the same number of pairs).
        weight = ntoks if cfg.training_mode == "sft" else 1
        w["loss"] += loss * weight
        w["steps"] += 1
        w["stats"] = {k: w["stats"].get(k, 0.0) + v for k, v in stats.items()}
        elapsed = time.perf_counter() - w["time"]
        tps = w["tokens"] / max(elapsed, 1e-9)  # tokens are already summed over ranks
        peak = mx.get_peak_memory() / 1024**3
        self.progress.update(self.bar_task, completed=step,
                             info=f"loss {loss:.3f}  {tps:,.0f} tok/s  {peak:.2f} GB")
        if step % cfg.steps_per_report == 0 or step == self.total:
            train_loss = w["loss"] / max(w["tokens"] if cfg.training_mode == "sft" else
                                         w["steps"], 1)
            means = {k: v / w["steps"] for k, v in w["stats"].items()}
            lr = self.optimizer.learning_rate.item()
            self._report(f"step {step}/{self.total}: train loss {train_loss:.4f}"
                              f"{_rewards(means)}, "
                              f"lr {lr:.2e}, {tps:,.0f} tok/s, peak {peak:.2f} GB")
            if self.main:
                self.metrics.add(step=step, train_loss=train_loss, learning_rate=lr,
                                 tokens_per_sec=tps, peak_memory_gb=peak, **means)
            self._new_window()
        stop = False
        if step % cfg.steps_per_eval == 0 or step == self.total:
            stop = self._eval(step)
        if step % cfg.save_every == 0 or step == self.total or stop or self.interrupted:
            self._save(step)
        if self.interrupted:
            self.stop_reason = "interrupted"
            return True
        return stop

    def _eval(self, step: int) -> bool:
        cfg = self.config
        # Each rank scores its own share; evaluate() sums across ranks.
        mine = self.valid_set[self.world.rank()::self.world.size()]
        val, stats = evaluate_with_stats(self.model, self._eval_batches(mine, cfg.val_batches),
                                         self.loss)
        self.last_val, self.last_val_stats = val, stats
        self._report(f"step {step}: val loss {val:.4f}{_rewards(stats)}")
        if self.main:
            self.metrics.add(step=step, val_loss=val, **{f"val_{k}": v for k, v in stats.items()})
            self.metrics.plot()
        improved = val < self.best - (cfg.early_stopping.min_delta if cfg.early_stopping else 0)
        if improved:
            self.best, self.bad_evals = val, 0
            if cfg.keep_best and step > 0 and self.main:
                best = self.run_dir / "best"
                best.mkdir(exist_ok=True)
                ckpt.save_adapters(best / ckpt.ADAPTERS, self.model)
                write_json(best / "adapter_config.json", self.adapter_config)
        elif step > 0:
            self.bad_evals += 1
            if cfg.early_stopping and self.bad_evals >= cfg.early_stopping.patience:
                self.stop_reason = f"early stopping: no improvement in {self.bad_evals} evals"
                return True
        return False

    def _save(self, step: int) -> None:
        if not self.main:
            return
        try:
            ckpt.save_adapters(self.run_dir / ckpt.ADAPTERS, self.model)
            ckpt.save_checkpoint(self.run_dir, step, self.model, self.optimizer,
                                 {"best": self.best, "bad_evals": self.bad_evals})
        except MlxtuneError as e:  # a full disk: each write left the old file or folder whole
            last = ckpt.list_checkpoints(self.run_dir)
            kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved"
            raise MlxtuneError(f"step {step}: cannot save a checkpoint: {e}; {kept}") from None

    def _finish(self, done: int, result, tokenizer):
        cfg = self.config
        result.steps, result.stopped = done, self.stop_reason
        result.val_loss, result.val_stats = self.last_val, self.last_val_stats
        result.best_val_loss = self.best if math.isfinite(self.best) else None
        if cfg.test and "test" in self.files:
            test_set = load_split(self.files["test"], tokenizer, cfg.mask_prompt,
                                  cfg.max_seq_length, cfg.training_mode)
            result.test_loss, _ = evaluate_with_stats(
                self.model, self._eval_batches(test_set, cfg.test_batches), self.loss)
            self.say(f"test loss {result.test_loss:.4f}")
        if self.prefix:
            self.prefix.remove()
        if self.stop_reason == "interrupted":
            raise Interrupted(f"interrupted at step {done}; checkpoint saved in {self.run_dir}; "
                               "continue with --resume")
        self.say(f"{self.stop_reason} at step {done}; adapters in {self.run_dir}")
        return result
