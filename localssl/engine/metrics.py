"""Metric logs: one JSON object per line, and the same rows as CSV."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricLog:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` in a run folder.

    On resume, rows logged after the checkpoint's step are dropped first, so
    the logs describe exactly one trajectory.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        rows = read_metrics(self.jsonl) if self.jsonl.exists() else []
        if resume_step is not None:
            rows = [r for r in rows if r.get("step", 0) <= resume_step]
        else:
            rows = []
        self.fields: list[str] = []
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.csv.write_text("")
        for r in rows:
            self._write_csv(r)

    def _write_csv(self, row: dict[str, Any]) -> None:
        if not self.fields:
            self.fields = list(row)
            with open(self.csv, "w", newline="") as fh:
                csv.DictWriter(fh, self.fields).writeheader()
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields, extrasaction="ignore").writerow(row)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._write_csv(row)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows
