"""The training YAML: a superset of `mlx_lm.lora -c`, every key typed, ranged and documented."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from mlxtune.config import load_config, setting

OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor")


@dataclass
class LoraParameters:
    """LoRA/DoRA settings, as mlx-lm's `lora_parameters`."""

    keys: Optional[list[str]] = setting(
        None, "Modules to adapt: short names (q_proj, v_proj), full paths (self_attn.q_proj), "
              "or all-linear. Default (null): every linear layer of the adapted blocks.")
    rank: int = setting(8, "LoRA rank r.", min=1, max=4096)
    scale: Optional[float] = setting(
        None, "Multiplier of the LoRA update (mlx-lm's name). Default 20.0 when alpha is unset.")
    alpha: Optional[float] = setting(
        None, "PEFT-style alpha; the scale becomes alpha / rank. Give alpha or scale, not both.",
        min=0)
    dropout: float = setting(0.0, "Dropout on the LoRA input.", min=0.0, max=0.99)

    def check(self):
        if self.scale is not None and self.alpha is not None:
            yield "alpha", "give either alpha (PEFT style) or scale (mlx-lm style), not both"

    @property
    def effective_scale(self) -> float:
        """The multiplier applied to the LoRA update."""
        if self.alpha is not None:
            return self.alpha / self.rank
        return 20.0 if self.scale is None else self.scale


@dataclass
class Quantize:
    """Quantize a float base model at load (QLoRA from an fp16/bf16 checkpoint)."""

    bits: Literal[4, 8] = setting(4, "Bits per weight of the frozen base.")
    group_size: Literal[32, 64, 128] = setting(64, "Weights sharing one scale and bias.")


@dataclass
class LrSchedule:
    """A learning-rate schedule in mlx-lm's form (name + arguments), with linear warmup."""

    name: Literal["cosine_decay", "linear_schedule", "exponential_decay", "step_decay"] = setting(
        "cosine_decay", "An mlx.optimizers.schedulers function.")
    arguments: list[float] = setting(
        help="Its arguments; the first is the peak learning rate. cosine_decay: [lr, steps, "
             "end_lr]; linear_schedule: [lr, end_lr, steps]. Empty: [learning_rate, iters].",
        factory=list)
    warmup: int = setting(0, "Linear warmup steps before the schedule.", min=0)
    warmup_init: float = setting(0.0, "Learning rate the warmup starts from.", min=0.0)


@dataclass
class EarlyStopping:
    """Stop when the validation loss has not improved for a while."""

    patience: int = setting(3, "Evaluations without improvement before stopping.", min=1)
    min_delta: float = setting(0.0, "Smallest decrease that counts as an improvement.", min=0.0)


@dataclass
class Distributed:
    """Data-parallel training over processes or machines with MLX's own `mlx.launch`."""

    hosts: list[str] = setting(help="Hosts to run on (ssh-reachable, same paths), e.g. "
                                    "[mac1.local, mac2.local]; empty: this machine.",
                               factory=list)
    processes_per_host: int = setting(1, "Processes on each host.", min=1)
    backend: Literal["ring", "mpi", "jaccl", "nccl"] = setting(
        "ring", "mlx.launch backend: ring (TCP/Thunderbolt), mpi, jaccl (RDMA), nccl (CUDA).")
    hostfile: Optional[str] = setting(None, "An mlx.distributed_config host file instead of hosts.")


@dataclass
class TrainConfig:
    """Everything `mlxtune train` needs. mlx-lm's `lora` keys mean the same here."""

    model: str = setting("smollm2-135m", "Model: folder, .gguf, built-in name or HF repo id.")
    data: str = setting("data/ready", "Folder with train.jsonl and valid.jsonl (mlx-lm formats).")
    fine_tune_type: Literal["lora", "dora", "full"] = setting(
        "lora", "lora, dora, or full (all weights; needs a float base).")
    training_mode: Literal["sft", "dpo", "orpo"] = setting(
        "sft", "sft (next-token loss on examples), or dpo / orpo (preference pairs: prompt, "
               "chosen, rejected, as mlxtune prepare writes them).")
    beta: float = setting(
        0.1, "dpo: how far the tuned model may move from the reference (TRL's beta); orpo: the "
             "weight lambda of the odds-ratio term.", min=1e-6)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = setting(
        "sigmoid", "DPO loss: sigmoid (the DPO paper's), ipo (on per-token average "
                   "log-probabilities), or hinge.")
    reference: Literal["base"] = setting(
        "base", "DPO's reference model: the base with the adapter switched off (the same weights, "
                "no second copy).")
    quantize: Optional[Quantize] = setting(
        None, "Quantize a float base at load (QLoRA). A quantized base is QLoRA already.")
    num_layers: int = setting(16, "Adapt the last N transformer blocks; -1 for all.", min=-1)
    lora_parameters: LoraParameters = setting(help="LoRA settings.", factory=LoraParameters)
    optimizer: Literal["adam", "adamw", "sgd", "adafactor"] = setting("adam", "Optimizer.")
    optimizer_config: dict = setting(
        help="Extra optimizer arguments per optimizer, e.g. {adamw: {weight_decay: 0.01}}.",
        factory=dict)
    learning_rate: float = setting(1e-5, "Peak learning rate.", min=0.0)
    lr_schedule: Optional[LrSchedule] = setting(None, "Learning-rate schedule; null: constant.")
    batch_size: int = setting(4, "Examples per step (per process).", min=1)
    grad_accumulation_steps: int = setting(1, "Micro-batches summed into one update.", min=1)
    max_seq_length: int = setting(2048, "Longer examples are truncated.", min=8)
    iters: int = setting(1000, "Optimizer updates to run (ignored when epochs is set).", min=1)
    epochs: Optional[int] = setting(None, "Passes over the training set; overrides iters.", min=1)
    mask_prompt: bool = setting(False, "Train only on answers: every assistant turn and its end "
                                       "token (chat), or the completion.")
    grad_checkpoint: bool = setting(False, "Recompute block activations in the backward pass.")
    cache_frozen_layers: bool = setting(
        False, "Keep each example's hidden state below the first adapted layer after the first "
               "epoch, so later epochs compute only the adapted layers (memory: tokens x hidden "
               "x 4 bytes, capped by what the plan leaves free). LoRA/DoRA on the top layers; "
               "llama, qwen2, qwen3.")
    seed: int = setting(0, "Seed for LoRA init, dropout and data order.")
    steps_per_report: int = setting(10, "Log train loss every N updates.", min=1)
    steps_per_eval: int = setting(200, "Validate every N updates (and at the end).", min=1)
    val_batches: int = setting(25, "Validation batches per evaluation; -1 for the whole set.",
                               min=-1)
    save_every: int = setting(100, "Checkpoint every N updates.", min=1)
    adapter_path: Optional[str] = setting(None, "Run folder. Default: runs/<config file stem>.")
    resume_adapter_file: Optional[str] = setting(
        None, "Start from these adapter weights (mlx-lm's key). For a full resume use --resume.")
    early_stopping: Optional[EarlyStopping] = setting(None, "Stop on a validation plateau.")
    keep_best: bool = setting(True, "Also keep the adapter with the best validation loss "
                                    "(best/adapters.safetensors).")
    distributed: Optional[Distributed] = setting(
        None, "Launch itself under mlx.launch across processes/hosts (data parallel).")
    max_memory_gb: Optional[float] = setting(
        None, "Cap MLX's memory (GB); default: the planned peak plus headroom.", min=0.1)
    # mlx-lm keys accepted for compatibility; IGNORED_KEYS below says which have no effect.
    train: bool = setting(True, "mlx-lm compatibility: mlxtune train always trains.")
    test: bool = setting(False, "Report the test-set loss at the end (needs test.jsonl).")
    test_batches: int = setting(500, "Test batches to evaluate; -1 for all.", min=-1)
    report_to: Optional[list[str]] = setting(
        None, "Experiment trackers to log metrics and the config to, besides metrics.jsonl: "
             "tensorboard, mlflow, wandb (offline), trackio; a list or 'a,b'. Each needs its "
             "extra: pip install 'mlxtune[NAME]'.")
    project_name: Optional[str] = setting(
        None, "Tracker project (MLflow experiment) name. Default: the run folder's name.")
    trust_remote_code: bool = setting(False, "mlx-lm compatibility; custom code is never run.")
    clear_cache_threshold: int = setting(0, "mlx-lm compatibility; unused.", min=0)

    def check(self):
        from mlxtune.train.trackers import tracker_problems

        for problem in tracker_problems(self.report_to):
            yield "report_to", problem
        unknown = set(self.optimizer_config) - set(OPTIMIZERS)
        for name in sorted(unknown):
            yield f"optimizer_config.{name}", f"unknown optimizer; one of {', '.join(OPTIMIZERS)}"
        for name, args in self.optimizer_config.items():
            if not isinstance(args, dict):
                yield f"optimizer_config.{name}", "expected a mapping of argument: value"
        if self.training_mode == "dpo" and self.fine_tune_type == "full":
            yield "training_mode", ("dpo's reference is the base with the adapter switched off; "
                                    "full fine-tuning has no adapter (it would need a second copy "
                                    "of the weights): use lora or dora")
        if self.training_mode != "dpo" and self.loss_type != "sigmoid":
            yield "loss_type", f"applies to training_mode dpo, not {self.training_mode}"
        if self.fine_tune_type == "full" and self.quantize is not None:
            yield "quantize", "full fine-tuning needs float weights; remove quantize or use lora"
        if self.cache_frozen_layers and self.training_mode != "sft":
            yield "cache_frozen_layers", (f"applies to training_mode sft, not "
                                          f"{self.training_mode} (its batches pair answers)")


# mlx-lm keys accepted so its configs load, with what mlxtune does instead; setting one to
# anything else draws a warning (load_train_config), since the value has no effect.
IGNORED_KEYS = {"train": "mlxtune train always trains",
                "trust_remote_code": "no model code is ever run",
                "clear_cache_threshold": "mlxtune never clears MLX's cache mid-run"}


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The training config from YAML `path` (or defaults) and `--set` overrides, fully checked."""
    config = load_config(TrainConfig, path, overrides)
    ignored = tuple(k for k in IGNORED_KEYS
                    if getattr(config, k) != TrainConfig.__dataclass_fields__[k].default)
    if ignored:
        _warn_ignored(str(path or "config"), ignored)
    return config


@functools.cache
def _warn_ignored(where: str, keys: tuple[str, ...]) -> None:
    # Cached: a distributed launch loads the config twice in one process; say it once. Ranks
    # other than 0 say nothing, like the rest of a run's output.
    if os.environ.get("MLX_RANK", "0") == "0":
        print(f"warning: {where}: ignoring mlx-lm keys that have no effect here: "
              + ", ".join(f"{k} ({IGNORED_KEYS[k]})" for k in keys), file=sys.stderr)


def run_folder(config: TrainConfig, config_path: str | Path | None) -> Path:
    """Where this run writes: adapter_path, else runs/<config stem>."""
    if config.adapter_path:
        return Path(config.adapter_path)
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / stem


def launch_command(config: TrainConfig, argv: list[str]) -> list[str] | None:
    """The mlx.launch command that runs `mlxtune train` with `argv` on every rank, or None when
    this process should train itself (no distributed section, or already a launched rank)."""
    import os
    import sys

    d = config.distributed
    if d is None or "MLX_RANK" in os.environ:
        return None
    # mlx.launch's own entry point, run by this interpreter so the venv needs nothing on PATH.
    launcher = "from mlx._distributed_utils.launch import main; main()"
    cmd = [sys.executable, "-c", launcher, "--backend", d.backend]
    if d.hostfile:
        cmd += ["--hostfile", d.hostfile]
    elif d.hosts:
        cmd += ["--hosts", ",".join(d.hosts)]
    cmd += ["-n", str(d.processes_per_host), "--", sys.executable, "-m", "mlxtune", "train", *argv]
    return cmd
