"""Metric loggers behind one tiny Protocol: CSV and TensorBoard (always; TensorBoard is a dependency, but a
stripped install without it falls back to CSV), MLflow when installed."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log_dict(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class CSVLogger:
    """One row per (step, name, value) in ``metrics.csv``; on resume, rows after ``start_step`` are dropped."""

    def __init__(self, path: Path, start_step: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.exists() and start_step > 0:
            with path.open(newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if int(r[0]) <= start_step]
        self._file = path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["step", "name", "value"])
        self._writer.writerows(rows)
        self._file.flush()

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        self._writer.writerows([step, k, f"{v:.6g}"] for k, v in metrics.items())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self._writer = SummaryWriter(str(log_dir))

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


class MLflowLogger:
    def __init__(self, run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.start_run(run_name=run_name)

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def make_loggers(out_dir: Path, start_step: int, run_name: str) -> list[MetricLogger]:
    """CSV always; TensorBoard and MLflow when their packages are installed (one info line otherwise)."""
    loggers: list[MetricLogger] = [CSVLogger(out_dir / "metrics.csv", start_step)]
    for name, make in (("tensorboard", lambda: TensorBoardLogger(out_dir / "tensorboard")),
                       ("mlflow", lambda: MLflowLogger(run_name))):
        try:
            loggers.append(make())
        except ImportError:
            log.info("%s is not installed: metrics go to CSV only (pip install %s)", name, name)
    return loggers
