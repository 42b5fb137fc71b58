"""The run's log: one row per logged step in log.csv and log.jsonl, and a loss curve in loss.png.

On resume, rows past the checkpoint's step are dropped first, so the log reads as if the run had
never stopped. The PNG needs matplotlib (`pip install 'llmos[all]'`, which `make run` installs); without it the curve is
skipped and the CSV has the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

COLUMNS = ("step", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "grad_norm", "tok_per_s", "elapsed_s")


class RunLog:
    def __init__(self, run: Path, resume_step: int | None = None) -> None:
        self.csv, self.jsonl, self.png = run / "log.csv", run / "log.jsonl", run / "loss.png"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # the last line of a killed run may be cut short
                    continue
                if row.get("step", math.inf) <= resume_step:
                    self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        self.rows.append(row)
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self) -> bool:
        """Write loss.png; False when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, never a window
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        train = [(r["step"], r["train_loss"]) for r in self.rows if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.png)
        return True
