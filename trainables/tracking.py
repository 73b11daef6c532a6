"""MLflow bookkeeping that trials do themselves: their run, found by trial id, and what they log.

Everything goes through `MlflowClient` with explicit run ids, so trial processes (which Ray
starts in other folders, maybe on other nodes) never depend on a fluent "active run" or on
their working directory. A child run is found again by its trial id, so retries, reused actors
and resumed sweeps continue the same run instead of creating duplicates. The driver's side
(experiments, parent runs, closing and tagging runs after a crash, the UI) is sweeper/tracking.py,
which builds on this module.
"""

from __future__ import annotations

import functools
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "sweeper.trial_id"
TAG_SWEEP = "sweeper.sweep"
TAG_ROLE = "sweeper.role"
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"       # its values: a sweep's parent run, a trial's run
TAG_STOP = "stop_reason"
TAG_ORPHANED = "sweeper.orphaned"   # a run of a trial that the interrupted sweep lost (see run.py)
TAG_STUDY_STORAGE = "sweeper.optuna_storage"   # parent run: the sweep's Optuna study (storage URL ...
TAG_STUDY_NAME = "sweeper.optuna_study"        # ... and study name), for the report and optuna-dashboard
TAG_SCHEDULER = "sweeper.scheduler"            # trial run stopped by a scheduler: which one (asha, ...)
TAG_ERRORS = "sweeper.errors"                  # parent run: which trials ended with an error


@functools.lru_cache(maxsize=8)
def client(tracking_uri: str):
    """One client per URI and process (a sqlite client holds a connection pool)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _with_retry(fn, *args, attempts: int = 8, **kwargs):
    """sqlite allows one writer at a time: retry briefly when the database is locked."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlalchemy's OperationalError in MlflowException
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested settings as MLflow params."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}


@dataclass
class RunHandle:
    """One MLflow run addressed by id: what the parent and each trial log through."""

    tracking_uri: str
    run_id: str

    @property
    def client(self):
        return client(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten("", dict(params)).items()]
        for i in range(0, len(items), 100):
            _with_retry(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v if math.isfinite(v) else float("nan"), now, step or 0)
                 for k, v in _numeric(metrics).items()]
        if items:
            _with_retry(self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        _with_retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """A step-indexed image: the UI's step slider shows it changing over epochs."""
        _with_retry(self.client.log_image, self.run_id, image, key=key, step=step)

    def log_image_file(self, image: np.ndarray, name: str) -> None:
        _with_retry(self.client.log_image, self.run_id, image, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        _with_retry(self.client.log_text, self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        _with_retry(self.client.log_figure, self.run_id, figure, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        _with_retry(self.client.log_artifact, self.run_id, str(path), folder)

    def last_step(self, key: str) -> int:
        """The highest step logged for metric `key` (0 if none)."""
        history = _with_retry(self.client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=0)

    def terminate(self, status: str = "FINISHED") -> None:
        _with_retry(self.client.set_terminated, self.run_id, status)

    def reopen(self) -> None:
        _with_retry(self.client.update_run, self.run_id, status="RUNNING")


def find_child(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = client(tracking_uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=2)
    return runs[0] if runs else None


def open_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                   trial_name: str, params: Mapping[str, Any], sweep_name: str) -> RunHandle:
    """The trial's child run: found by trial id and reopened, or created with its params."""
    existing = find_child(tracking_uri, experiment_id, parent_run_id, trial_id)
    if existing is not None:
        handle = RunHandle(tracking_uri, existing.info.run_id)
        handle.reopen()
        return handle
    run = _with_retry(client(tracking_uri).create_run, experiment_id, run_name=trial_name,
                      tags={TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_SWEEP: sweep_name,
                            TAG_ROLE: ROLE_TRIAL})
    handle = RunHandle(tracking_uri, run.info.run_id)
    handle.log_params(params)
    return handle


def ll_histogram_figure(per_image_ll: Iterable[float], title: str):
    """Histogram of the per-image test log-likelihood (nats)."""
    from matplotlib.figure import Figure

    values = np.asarray(list(per_image_ll), dtype=float)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    ax.hist(values, bins=min(60, max(5, values.size // 10)), color="#3465a4")
    ax.axvline(values.mean(), color="k", linestyle="--", linewidth=1, label=f"mean {values.mean():.2f}")
    ax.set_xlabel("test log-likelihood per image (nats)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def per_image_csv(per_image_ll: Iterable[float]) -> str:
    values = np.asarray(list(per_image_ll), dtype=float)
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack([np.arange(values.size), values]), fmt=["%d", "%.6f"],
               delimiter=",", header="index,log_likelihood", comments="")
    return buf.getvalue()
