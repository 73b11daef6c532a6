"""`sweeper evaluate RUN_ID`: re-score a finished trial's test log-likelihood from MLflow alone.

The trial's run holds everything needed: its LoggedModel (best-validation weights and the trial's
configuration, `torch.load(weights_only=True)`) and its dataset input. On any machine with the
data, the weights are loaded into the model the configuration builds, and the test LL is
estimated with S importance samples and logged to the run as `test_ll_S<S>` (never `test_ll`), with
its standard error (the per-image LL's std / sqrt(N)) as `test_ll_S<S>_se`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sweeper import tracking
from sweeper.errors import SweeperError
from trainables.vae.catalog import (METRIC_TEST_IMAGES, METRIC_TEST_LL, METRIC_TEST_LL_SE, METRIC_TEST_SAMPLES,
                                    rescored_metric, se_metric, standard_error)


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables set for the duration of a block, then as they were."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class Rescored:
    run_id: str
    metric: str          # test_ll_S<S>
    test_ll: float       # nats, mean over the test images
    se: float            # its standard error: the per-image LL's std (ddof=1) / sqrt(images)
    samples: int
    images: int
    seconds: float
    logged_test_ll: float | None   # the run's own test_ll (S as it was trained with), for comparison
    raised: bool = False           # it also became the run's test_ll (that was missing or an estimate)


def rescore_run(run_id: str, samples: int = 20_000, tracking_uri: str | None = None, device: str = "auto",
                data_root: str | None = None, echo=print) -> Rescored:
    """Re-estimate run `run_id`'s test log-likelihood with `samples` importance samples and log it."""
    if samples < 1:
        raise SweeperError(f"--samples must be >= 1, got {samples}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.require_database(uri, "evaluate")   # never an empty ./mlflow.db where the command was typed

    import torch

    from trainables.vae.config import TrainConfig
    from trainables.vae.evaluate import log_likelihood
    from trainables.vae.train import DeviceData, build_trial_model, resolve_device

    client = tracking.client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise SweeperError(f"no MLflow run {run_id!r} at {uri}: {exc}") from None
    tags = run.data.tags
    if tags.get(tracking.TAG_ROLE) == tracking.ROLE_SWEEP:
        best = (f"; the best by validation is {tags['best_trial']}: sweeper evaluate {tags['best_run_id']}"
                if tags.get("best_run_id") else "")
        raise SweeperError(f"run {run_id} is the sweep {run.info.run_name}'s own run, not a trial: evaluate one of "
                           f"its trials (the runs nested under it in the UI){best}")
    model_id = tags.get(tracking.TAG_MODEL_ID)
    if model_id is None:
        raise SweeperError(f"run {run_id} ({run.info.run_name}) has no saved weights (tag {tracking.TAG_MODEL_ID}): "
                           "only trials that ended and were evaluated by this version keep them")
    with tempfile.TemporaryDirectory(prefix="sweeper-evaluate-") as folder:
        import mlflow.artifacts

        location = client.get_logged_model(model_id).artifact_location
        # One small file: MLflow's download progress bars (it drew two) say nothing here.
        with _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/{tracking.WEIGHTS_FILE}", dst_path=folder, tracking_uri=uri)
        saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    values = {**saved["config"], "device": device, "data_root": data_root}
    config = TrainConfig.from_dict({k: v for k, v in values.items() if v is not None}, where="saved config")
    dev = resolve_device(config.device)
    data = DeviceData.load(config, None, dev)
    model = build_trial_model(config, data.info, data.train).to(dev)
    model.load_state_dict(saved["state_dict"])
    echo(f"run {run_id} ({run.info.run_name}): {config.dataset} / {config.model} / {config.prior}, "
         f"{data.test.shape[0]} test images x S={samples} on {dev} ...")
    t0 = time.perf_counter()
    ll = log_likelihood(model, data.test, samples, compile=dev.type == "cuda")
    seconds = time.perf_counter() - t0
    value = float(ll.mean())
    if not math.isfinite(value):
        raise SweeperError(f"the re-scored test LL of run {run_id} is {value}; nothing was logged")
    se = standard_error(ll.double().cpu().tolist())
    metric = rescored_metric(samples)
    handle = tracking.RunHandle(uri, run_id)
    images = int(data.test.shape[0])
    metrics = {metric: value, se_metric(metric): se, f"{metric}_seconds": seconds}
    raised = raises_test_ll(run.data.metrics, samples, images, config.test_samples)
    if raised:
        # A stopped trial tested with a declared estimate, or not at all: this is its test LL now.
        metrics.update({METRIC_TEST_LL: round(value, 2), METRIC_TEST_LL_SE: round(se, 2), METRIC_TEST_SAMPLES: samples,
                        METRIC_TEST_IMAGES: images})
    handle.log_metrics(metrics, step=int(run.data.metrics.get("epoch", 0)))
    return Rescored(run_id, metric, value, se, samples, images, seconds, run.data.metrics.get(METRIC_TEST_LL), raised)


def raises_test_ll(metrics, samples: int, images: int, trial_samples: int) -> bool:
    """Whether a re-score on all `images` test images with `samples` becomes the run's test_ll:
    when it is a full test (at least the trial's own `trial_samples`) and the run has no test LL or
    only a declared estimate (fewer images or importance samples than its trial's full test).
    Otherwise it stays beside as test_ll_S<S>: the sweep's test LLs keep one precision."""
    if samples < trial_samples:
        return False
    if METRIC_TEST_LL not in metrics:
        return True
    return (metrics.get(METRIC_TEST_IMAGES, images) < images
            or metrics.get(METRIC_TEST_SAMPLES, trial_samples) < trial_samples)
