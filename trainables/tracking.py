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
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from trainables.vae.catalog import STOP_ERROR

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
TAG_MODEL_ID = "sweeper.model_id"              # trial run: the LoggedModel with its best-validation weights
TAG_NOTE = "mlflow.note.content"               # a run's description in the UI
# MLflow 3.x: an experiment's kind; "custom_model_development" is a model-training experiment
# (runs table), not a GenAI one (traces). MLflow 3.17's UI also reads the view from the URL:
# links add UI_QUERY so they open on the runs table whatever the browser last showed.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "?workflowType=machine_learning"
WEIGHTS_FILE = "weights.pt"                    # the LoggedModel's file: torch.load(weights_only=True)
# The key of a trial's Tune config that carries the sweep's bookkeeping, not training settings.
SWEEP_KEY = "sweeper"


@functools.lru_cache(maxsize=8)
def client(tracking_uri: str):
    """One client per URI and process (a sqlite client holds a connection pool)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _with_retry(fn, *args, attempts: int = 8, transient: tuple[str, ...] = ("locked",), **kwargs):
    """sqlite allows one writer at a time: retry briefly when the database is locked (or on
    another error named in `transient`)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlalchemy's OperationalError in MlflowException
            message = str(exc).lower()
            if not any(t in message for t in transient) or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)


# MLflow's log_inputs reads whether the experiment has the dataset, then inserts it: trials that
# start together race, and the loser's insert breaks the unique (experiment, name, digest) key
# (sqlite: "UNIQUE constraint failed", PostgreSQL/MySQL: "duplicate key"/"Duplicate entry").
# Its transaction is rolled back whole; tried again, it finds the winner's row.
DATASET_RACE = ("locked", "unique constraint", "duplicate key", "duplicate entry")


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
    created: bool = False          # open_trial_run made it now (not found again)
    experiment_id: str | None = None       # known to open_trial_run: saves a get_run where it is needed
    has_dataset: bool = False              # the run records a dataset input (as open_trial_run found it)

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

    def log_dataset(self, name: str, digest: str, source: Mapping[str, Any], profile: Mapping[str, Any],
                    tags: Mapping[str, Any]) -> None:
        """The run's training data as an MLflow dataset input (the UI's Datasets column). MLflow
        keeps one dataset per (name, digest) and experiment: `profile` describes the files, the
        run's own use of them (subsets) goes in `tags`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="url", source=json.dumps(dict(source)),
                          profile=json.dumps(dict(profile)))
        input_tags = [InputTag("mlflow.data.context", "training")] + [InputTag(k, str(v)) for k, v in tags.items()]
        _with_retry(self.client.log_inputs, self.run_id, datasets=[DatasetInput(dataset, input_tags)],
                    transient=DATASET_RACE)

    def log_weights(self, experiment_id: str, state: Mapping[str, Any], name: str, step: int,
                    params: Mapping[str, Any]) -> str:
        """`state` (tensors and plain values) as a LoggedModel of this run (the UI's Models column),
        saved as WEIGHTS_FILE for `torch.load(weights_only=True)`; the run is tagged with its id."""
        import torch
        from mlflow.entities import LoggedModelOutput

        model = _with_retry(self.client.create_logged_model, experiment_id, name=name, source_run_id=self.run_id,
                            params={k: str(v) for k, v in params.items()}, model_type="pytorch-state-dict")
        with tempfile.TemporaryDirectory(prefix="sweeper-weights-") as folder:
            torch.save(dict(state), Path(folder) / WEIGHTS_FILE)
            _with_retry(self.client.log_model_artifacts, model.model_id, folder)
        _with_retry(self.client.finalize_logged_model, model.model_id, "READY")
        _with_retry(self.client.log_outputs, self.run_id, [LoggedModelOutput(model.model_id, step)])
        self.set_tags({TAG_MODEL_ID: model.model_id})
        return model.model_id


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs, or of one run: `base` is the UI's address."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    return (f"{page}/runs/{run_id}" if run_id else f"{page}/runs") + UI_QUERY


def trial_run_name(config: Mapping[str, Any], trial_id: str) -> str:
    """A trial's run name from its Tune config (the sweep's `name_keys`), else `trial_<id>`."""
    keys = (config.get(SWEEP_KEY) or {}).get("name_keys", ("prior",))
    return run_name(config, keys) or f"trial_{trial_id}"


def run_name(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    """What a trial is, short: 'vamp K=13 lr=2.3e-3 seed=0' from its values of `keys` (words
    as they are, numbers to 2 significant digits); a None value (does not apply) is left out."""
    from trainables.vae.catalog import short

    parts = []
    for key in keys:
        value = config.get(key)
        if value is None or value is False:
            continue
        if isinstance(value, str):
            parts.append(value)
        elif value is True:
            parts.append(key)
        else:
            parts.append(f"{key}={short(value, 2)}")
    return " ".join(parts)


def find_child(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = client(tracking_uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=2)
    return runs[0] if runs else None


def open_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                   trial_name: str, params: Mapping[str, Any], sweep_name: str,
                   description: str = "") -> RunHandle:
    """The trial's child run: found by trial id and reopened, or created with its params (the
    Tune trial id is a tag; `trial_name` says what the trial is)."""
    existing = find_child(tracking_uri, experiment_id, parent_run_id, trial_id)
    if existing is not None:
        handle = RunHandle(tracking_uri, existing.info.run_id, experiment_id=experiment_id,
                           has_dataset=bool(existing.inputs.dataset_inputs))
        handle.reopen()
        if existing.data.tags.get(TAG_STOP) == STOP_ERROR:    # retried by Tune: it runs again
            for key in (TAG_STOP, "stop_detail"):
                _with_retry(handle.client.delete_tag, handle.run_id, key)
        return handle
    tags = {TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_SWEEP: sweep_name, TAG_ROLE: ROLE_TRIAL}
    if description:
        tags[TAG_NOTE] = description
    run = _with_retry(client(tracking_uri).create_run, experiment_id, run_name=trial_name, tags=tags)
    handle = RunHandle(tracking_uri, run.info.run_id, created=True, experiment_id=experiment_id)
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
