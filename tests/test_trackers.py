"""report_to: what metrics.jsonl holds, read back from each tracker with that tracker's own reader;
a missing extra is a config error before any weights load."""

import json
import sys
import types

import pytest

from mlxtune.errors import ConfigError
from mlxtune.train.run import run_training
from tests.adapters import train_config


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _series(rows, key) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def test_tensorboard_and_mlflow_get_the_metrics_and_the_config(tmp_path, tiny_qmodel_dir,
                                                               monkeypatch):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    pytest.importorskip("tensorboard", reason="TensorBoard's event reader is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = train_config(tmp_path, tiny_qmodel_dir, iters=10, steps_per_report=5,
                          steps_per_eval=5, report_to="tensorboard,mlflow", project_name="exp")
    result = run_training(config, say=lambda s: None)
    rows = _metrics(result.run_dir)
    keys = {"train_loss", "val_loss", "learning_rate", "tokens_per_sec", "peak_memory_gb"}
    assert {k for r in rows for k in r} == keys | {"step"}

    events = EventAccumulator(str(result.run_dir / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == keys
    for key in keys:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in _series(rows, key)]
    hp = EventAccumulator(str(result.run_dir / "tensorboard" / "hparams")).Reload()
    content = hp.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["lora_parameters.rank"].number_value == 8
    assert start.hparams["learning_rate"].number_value == pytest.approx(2e-3)

    client = MlflowClient(tracking_uri=(result.run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lora_parameters.rank"] == "8"
    assert run.data.params["report_to"] == "['tensorboard', 'mlflow']"
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [
            (s, pytest.approx(v, rel=1e-9)) for s, v in _series(rows, key)]


def test_wandb_and_trackio_are_called_offline_with_the_same_rows(tmp_path, tiny_qmodel_dir,
                                                                 monkeypatch):
    """Neither library is a dev dependency (wandb is ~62 MB with its Go core, trackio ~170 MB with
    its web stack): stand-ins record the calls, which follow each library's documented API (both
    were also run for real by hand; see the README)."""
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("wandb.log", step, row))

        def finish(self):
            calls.append(("wandb.finish",))

    def wandb_init(**kw):
        calls.append(("wandb.init", kw))
        return Run()

    fake_wandb = types.SimpleNamespace(init=wandb_init, __spec__=object())
    fake_trackio = types.SimpleNamespace(
        init=lambda **kw: calls.append(("trackio.init", kw)),
        log=lambda row, step: calls.append(("trackio.log", step, row)),
        finish=lambda: calls.append(("trackio.finish",)), __spec__=object())
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object()
                        if name in ("wandb", "trackio") else real(name, *a))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = train_config(tmp_path, tiny_qmodel_dir, iters=5, steps_per_report=5,
                          steps_per_eval=5, report_to=["wandb", "trackio"])
    result = run_training(config, say=lambda s: None)
    rows = [({k: v for k, v in r.items() if k != "step"}, r["step"])
            for r in _metrics(result.run_dir)]
    init = calls[0][1]
    assert init["mode"] == "offline" and init["project"] == "run"
    assert init["config"]["lora_parameters"]["rank"] == 8
    assert calls[1] == ("trackio.init", {"project": "run", "name": "run",
                                         "config": init["config"]})
    assert [(c[2], c[1]) for c in calls if c[0] == "wandb.log"] == rows
    assert [(c[2], c[1]) for c in calls if c[0] == "trackio.log"] == rows
    assert calls[-2:] == [("wandb.finish",), ("trackio.finish",)]


def test_a_missing_tracker_library_is_a_config_error_naming_the_pip_command(
        tmp_path, tiny_qmodel_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    config = train_config(tmp_path, tiny_qmodel_dir, report_to="wandb,mlfow,none")
    with pytest.raises(ConfigError) as e:
        run_training(config, say=lambda s: None)
    assert e.value.problems == [
        f"{config}:1: report_to: wandb needs the wandb package: pip install 'mlxtune[wandb]'",
        f"{config}:1: report_to: unknown tracker 'mlfow'; did you mean 'mlflow'?"]
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    from mlxtune.errors import MlxtuneError
    from mlxtune.train.trackers import open_trackers

    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknown-scheme://nowhere")
    with pytest.raises(MlxtuneError, match=r"^report_to mlflow: could not start its run: "):
        open_trackers(["mlflow"], tmp_path / "run", None, {"rank": 8})


def test_only_rank_0_logs_to_the_trackers(tmp_path, tiny_qmodel_dir):
    import subprocess

    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    pytest.importorskip("tensorboard", reason="TensorBoard's event reader is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = train_config(tmp_path, tiny_qmodel_dir, iters=2, batch_size=2, steps_per_report=1,
                          steps_per_eval=2, report_to="tensorboard")
    proc = subprocess.run([sys.executable, "-m", "mlxtune", "train", str(config), "-n", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    board = tmp_path / "run" / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 1  # one writer, not one per rank
    events = EventAccumulator(str(board)).Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("val_loss")] == [0, 2]
