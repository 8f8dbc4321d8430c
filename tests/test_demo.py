"""The README's first command, scripts/demo.sh, end to end on a cut-down run: every step runs,
every artifact exists and loads, and the server it started is stopped."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_script_runs_every_step_and_leaves_loadable_artifacts(tmp_path):
    from mlx_lm import load
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load_adapters

    out, port = tmp_path / "demo", _free_port()
    # The suite's own setup already ran (scripts/test.sh): the demo must not install anything.
    env = dict(os.environ, DEMO_OUT=str(out), DEMO_PORT=str(port), DEMO_SETUP="0",
               DEMO_TRAIN_ARGS="--set iters=4 --set steps_per_eval=4 --set save_every=4",
               DEMO_EVAL_ARGS="--limit 4")
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "report:" in proc.stdout and "demo: server stopped" in proc.stdout
    with socket.socket() as s:  # the server is gone: nothing listens on its port any more
        # SO_REUSEADDR: the closed server's connections may linger in TIME_WAIT; a listener would
        # still make bind fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))

    for split in ("train", "valid", "test"):
        rows = [json.loads(x) for x in (out / "data" / f"{split}.jsonl").read_text().splitlines()]
        assert rows and all(set(r) == {"prompt", "completion"} for r in rows)
    assert json.loads((out / "data" / "report.json").read_text())
    model, tokenizer = load(str(out / "fused"))
    assert model.args.num_hidden_layers == 30
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and (out / "run" / "loss.png").stat().st_size > 1000
    from mlxtune.models.resolve import resolve_model

    base, _ = load(str(resolve_model("smollm2-135m")))
    load_adapters(base, str(out / "run"))
    train_set, _, _ = load_dataset(type("Args", (), {"data": str(out / "data"), "train": True,
                                                     "test": False, "hf_dataset": None,
                                                     "mask_prompt": False})(), tokenizer)
    assert len(train_set) > 300
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["examples"] == 4
    assert [summary["models"][k]["name"] for k in ("model", "compare")] == ["tuned",
                                                                             "smollm2-135m"]
    assert all(m["answered"] == 4 for m in summary["models"].values())
    results = (out / "eval" / "results.jsonl").read_text().splitlines()
    assert len(results) == 8  # 4 examples x 2 models
    assert "<html" in (out / "eval" / "report.html").read_text().lower()
