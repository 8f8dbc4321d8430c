"""Experiment trackers (`report_to`): each row of metrics.jsonl, and the resolved config as
hyperparameters, sent to TensorBoard, MLflow, Weights & Biases or Trackio through their own
libraries. Only rank 0 opens them; none of them is needed unless asked for.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# name -> (module that must import, the extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboardX", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


def chosen(names: list[str] | None) -> list[str]:
    """`report_to` without its spellings of "no tracker" (null, none, as mlx-lm and transformers
    write it)."""
    return [n for n in names or () if n.lower() != "none"]


def tracker_problems(names: list[str] | None) -> list[str]:
    """What is wrong with `report_to`: unknown names, or trackers whose library is missing.

    Checked with the config, so a missing extra stops the run before any weights load."""
    import difflib

    problems = []
    for name in chosen(names):
        if name not in TRACKERS:
            near = difflib.get_close_matches(name, list(TRACKERS), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"one of {', '.join(TRACKERS)}"
            problems.append(f"unknown tracker {name!r}; {hint}")
            continue
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"{name} needs the {module} package: pip install 'mlxtune[{extra}]'")
    return problems


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as {dotted.key: scalar}; lists and None become strings, as trackers'
    hyperparameter tables hold scalars only."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class TensorBoardTracker:
    """Scalars in run_dir/tensorboard, the config in its hparams plugin (subfolder hparams)."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(run_dir / "tensorboard"))
        self.writer.add_hparams(flatten(config), {}, name="hparams")

    def log(self, row: dict, step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run in experiment `project`, at MLFLOW_TRACKING_URI or run_dir/mlruns."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # A local file store by default: nothing leaves the machine and nothing more is needed
        # (a sqlite store needs SQLAlchemy). MLflow 3 keeps the file store behind an opt-in.
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(project)
        experiment = found.experiment_id if found else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, row: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in row.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A Weights & Biases run in offline mode (sync later with `wandb sync`), under run_dir."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        import wandb

        # Offline unless the user chose a mode: training never waits on the network.
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir),
                              config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run (local-first: its own database under the Hugging Face cache)."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_dir.name, config=config)

    def log(self, row: dict, step: int) -> None:
        self.trackio.log(row, step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker,
            "trackio": TrackioTracker}


def open_trackers(names: list[str] | None, run_dir: Path, project: str | None, config: dict) -> list:
    """The trackers named in `report_to`, each started with the resolved config."""
    from mlxtune.errors import MlxtuneError

    opened = []
    for name in chosen(names):
        try:
            opened.append(_CLASSES[name](Path(run_dir), project or Path(run_dir).name, config))
        except Exception as e:  # e.g. an MLFLOW_TRACKING_URI that does not answer
            for tracker in opened:
                tracker.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MlxtuneError(f"report_to {name}: could not start its run: {first}") from None
    return opened
