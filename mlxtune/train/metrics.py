"""metrics.jsonl (one JSON object per report or evaluation) and the loss-curve PNG beside it."""

from __future__ import annotations

import json
from pathlib import Path

from mlxtune.atomic import storage_error, write_file, write_text

# Preference runs (training_mode dpo/orpo) add the reward statistics, for training and validation.
REWARDS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
KEYS = ("step", "train_loss", "val_loss", "learning_rate", "tokens_per_sec", "peak_memory_gb",
        *REWARDS, *(f"val_{k}" for k in REWARDS))


class MetricsLog:
    """Appends metric rows to run_dir/metrics.jsonl and redraws run_dir/loss.png on request."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, trackers: list = ()):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict] = []
        # Experiment trackers (mlxtune.train.trackers) get every row this log writes.
        self.trackers = list(trackers)
        if resume_step is not None and self.path.is_file():
            # Rows after the checkpoint came from steps the resumed run will do again.
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines())
                         if r.get("step", 0) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, **row) -> None:
        """Record one row; keys not measured at this step are left out."""
        row = {k: row[k] for k in KEYS if row.get(k) is not None}
        self.rows.append(row)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise storage_error(self.path, e) or e from None
        values = {k: v for k, v in row.items() if k != "step"}
        for tracker in self.trackers:
            tracker.log(values, row["step"])

    def close(self) -> None:
        """End the trackers' runs (metrics.jsonl itself is always complete)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def plot(self) -> Path:
        """Draw train and validation loss against step into loss.png (atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path.with_name("loss.png")
        write_file(out, fig.savefig)
        plt.close(fig)
        return out
