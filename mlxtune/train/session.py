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
    """The model (quantized at load if asked, set up for this backend's fast path) and tokenizer."""
    from mlx_lm.utils import quantize_model

    from mlxtune.models.folder import load_model_folder

    model, model_config, tokenizer = load_model_folder(model_dir)
    if config.quantize is not None and "quantization" not in model_config:
        model, _ = quantize_model(model, model_config, config.quantize.group_size,
                                  config.quantize.bits)
    from mlxtune.fastpath import prepare_for_training

    # The one place the compute path is chosen: on the CPU, de-quantize per layer and use fp32.
    prepare_for_training(model)
    return model, tokenizer


def _rewards(stats: dict) -> str:
    """', reward accuracy A, margin M' for a preference run's statistics; '' for SFT."""
    if not stats:
        return ""
    return f", reward accuracy {stats['reward_accuracy']:.3f}, margin {stats['reward_margin']:.3f}"


class TrainingSession:
    """State shared by the hooks of one run: model, optimizer, logs, best loss, patience."""

    def __init__(self, config: TrainConfig, config_path, model_dir: Path, files: dict,
                 world, say):
        self.config, self.config_path, self.model_dir = config, config_path, model_dir
        self.files, self.world, self.say = files, world, say
        self.main = world.rank() == 0
        if not self.main:
            self.say = lambda line: None
        from mlxtune.train.config import run_folder

        self.run_dir = run_folder(config, config_path)
        self.best = math.inf
        self.bad_evals = 0
        self.stop_reason = "finished"
        self.interrupted = False

    def _write(self, fn, *args) -> None:
        # Only rank 0 writes the run folder; every rank can read it back to resume.
        if self.main:
            fn(*args)

    def run(self, resume: bool, result):
        """Load everything, train, save; returns the filled-in TrainResult."""
        from mlxtune.train.lora import apply_lora, trainable_count

        cfg = self.config
        model, tokenizer = load_for_training(self.model_dir, cfg)
        adapter_config = apply_lora(model, cfg)
        if cfg.resume_adapter_file:
            model.load_weights(cfg.resume_adapter_file, strict=False)
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        mode = cfg.training_mode
        train_set = load_split(self.files["train"], tokenizer, cfg.mask_prompt, cfg.max_seq_length,
                               mode)
        valid_set = load_split(self.files["valid"], tokenizer, cfg.mask_prompt, cfg.max_seq_length,
                               mode)
        self.loss, self.count = choose_loss(cfg)
        global_batch = cfg.batch_size * self.world.size()
        per_epoch = batches_per_epoch(len(train_set), global_batch)
        total = (math.ceil(cfg.epochs * per_epoch / cfg.grad_accumulation_steps)
                 if cfg.epochs else cfg.iters)
        optimizer = build_optimizer(cfg, total)
        start = 0
        if resume:
            last = ckpt.list_checkpoints(self.run_dir)[-1]
            loop_state = ckpt.load_checkpoint(last, model, optimizer)
            start, self.best = loop_state["step"], loop_state.get("best", math.inf)
            self.bad_evals = loop_state.get("bad_evals", 0)
            self.say(f"resuming {self.run_dir} from step {start} ({last.name})")
        self.model, self.optimizer, self.valid_set = model, optimizer, valid_set
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            write_json(self.run_dir / "adapter_config.json", adapter_config)
        self.adapter_config = adapter_config
        self.metrics = None
        if self.main:
            from mlxtune.config import config_to_dict
            from mlxtune.train.trackers import open_trackers

            trackers = open_trackers(cfg.report_to, self.run_dir, cfg.project_name,
                                     config_to_dict(cfg))
            self.metrics = MetricsLog(self.run_dir, start if resume else None, trackers)
        what = "examples" if mode == "sft" else f"preference pairs ({mode})"
        self.say(f"training {trainable_count(model) / 1e6:.3f}M parameters "
                 f"({cfg.fine_tune_type}) on {len(train_set)} {what} for {total} steps; "
                 f"run folder {self.run_dir}")
        batches = iterate_batches(train_set, cfg.batch_size, cfg.seed,
                                  start * cfg.grad_accumulation_steps, self.world.rank(),
                                  self.world.size())
        # Only rank 0 of a distributed run shows anything; the report lines stay on stdout.
        self.progress = ProgressBar("step {task.completed}/{task.total}", "bar", "{task.fields[info]}",
                                    "eta", enabled=self.main and sys.stderr.isatty(),
                                    transient=False, stderr=False)
        self.bar_task = self.progress.add("train", total, start, info="")
        self.total = total
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            if start == 0:
                self._eval(0)
            self._new_window()
            done = train(model, optimizer, batches, total, loss=self.loss, count=self.count,
                         accumulation=cfg.grad_accumulation_steps, start_step=start,
                         seed=cfg.seed, on_step=self._on_step)
        finally:
            signal.signal(signal.SIGINT, previous)
            self.progress.close()
            if self.metrics:
                self.metrics.close()
        return self._finish(done, result, tokenizer)

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
        val, stats = evaluate_with_stats(self.model, eval_batches(mine, cfg.batch_size,
                                                                   cfg.val_batches), self.loss)
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
        ckpt.save_adapters(self.run_dir / ckpt.ADAPTERS, self.model)
        ckpt.save_checkpoint(self.run_dir, step, self.model, self.optimizer,
                             {"best": self.best, "bad_evals": self.bad_evals})

    def _finish(self, done: int, result, tokenizer):
        cfg = self.config
        result.steps, result.stopped = done, self.stop_reason
        result.val_loss = getattr(self, "last_val", None)
        result.val_stats = getattr(self, "last_val_stats", {})
        result.best_val_loss = self.best if math.isfinite(self.best) else None
        if cfg.test and "test" in self.files:
            test_set = load_split(self.files["test"], tokenizer, cfg.mask_prompt,
                                  cfg.max_seq_length, cfg.training_mode)
            result.test_loss, _ = evaluate_with_stats(
                self.model, eval_batches(test_set, cfg.batch_size, cfg.test_batches), self.loss)
            self.say(f"test loss {result.test_loss:.4f}")
        if self.stop_reason == "interrupted":
            raise Interrupted(f"interrupted at step {done}; checkpoint saved in {self.run_dir}; "
                               "continue with --resume")
        self.say(f"{self.stop_reason} at step {done}; adapters in {self.run_dir}")
        return result
