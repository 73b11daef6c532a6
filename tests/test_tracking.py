"""trainables/tracking.py: the trial-side MLflow bookkeeping, against a real sqlite store."""

from __future__ import annotations

import json
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from trainables import tracking


def test_trials_that_log_one_dataset_at_once_all_record_it(tmp_path):
    """MLflow's log_inputs reads, then inserts the experiment's dataset row: trials starting
    together race for it (a CI run lost a trial's setup to 'UNIQUE constraint failed')."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiments = [client.create_experiment(f"race-{i}") for i in range(4)]
    handles = [tracking.RunHandle(uri, client.create_run(e).info.run_id) for e in experiments for _ in range(6)]
    errors: list[BaseException] = []

    def log(handle, barrier):
        barrier.wait()
        try:
            handle.log_dataset("static_mnist", "0" * 32, source={"files": ["a"]}, profile={"train": 1},
                               tags={"train_subset": 10})
        except BaseException as exc:   # collected: a thread's exception would not fail the test
            errors.append(exc)

    for e in range(4):
        batch = handles[6 * e: 6 * e + 6]
        barrier = threading.Barrier(len(batch))
        threads = [threading.Thread(target=log, args=(h, barrier)) for h in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    for h in handles:
        inputs = client.get_run(h.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("static_mnist", "0" * 32)]


def test_only_the_named_transient_errors_are_retried():
    calls = []

    def fails_once(message):
        calls.append(message)
        if len(calls) == 1:
            raise MlflowException(message)
        return "ok"

    race = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"
    assert tracking._with_retry(fails_once, race, transient=tracking.DATASET_RACE) == "ok" and len(calls) == 2
    calls.clear()
    with pytest.raises(MlflowException):        # elsewhere a unique-key error is a bug, not a race
        tracking._with_retry(fails_once, race)
    calls.clear()
    with pytest.raises(MlflowException):
        tracking._with_retry(fails_once, "Changing param values is not allowed", transient=tracking.DATASET_RACE)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# Transient answers are retried, with backoff; permanent ones are not

# What MLflow 3.17's client raises for each (the messages as a real server and store give them).
TRANSIENT_ANSWERS = {
    # log_batch needs two pooled connections: 15+ requests in one worker exhaust SQLAlchemy's 5 + 10.
    "QueuePool 400": lambda: RestException({"error_code": "BAD_REQUEST", "message": (
        "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00 "
        "(Background on this error at: https://sqlalche.me/e/21/3o7r)")}),
    "sqlite locked": lambda: MlflowException("(sqlite3.OperationalError) database is locked",
                                             error_code=TEMPORARILY_UNAVAILABLE),
    "503 after MLflow's retries": lambda: RestException({"error_code": "TEMPORARILY_UNAVAILABLE",
                                                         "message": "(psycopg.OperationalError) server closed"}),
    "connection refused": lambda: MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: "
        "/api/2.0/mlflow/runs/log-batch (Caused by NewConnectionError('Failed to establish a new connection: "
        "[Errno 111] Connection refused'))"),
    "timeout": lambda: MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with timeout exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Read timed out. (read timeout=120)."),
    "502 without a body": lambda: MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 502 != 200. "
        "Response body: 'Bad Gateway'"),
    "PostgreSQL full": lambda: RestException({"error_code": "BAD_REQUEST", "message": (
        "(psycopg.OperationalError) connection failed: FATAL:  sorry, too many clients already")}),
}
PERMANENT_ANSWERS = {
    "no such run": lambda: RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run 'x' not found"}),
    "bad value": lambda: RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                        "message": "Changing param values is not allowed"}),
    "wrong password": lambda: MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 401 != 200. "
        "Response body: 'You are not authenticated.'"),
}


def failing(times: int, make):
    calls = []

    def fn():
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise make()
        return "ok"

    return fn, calls


@pytest.mark.parametrize("name", TRANSIENT_ANSWERS)
def test_a_transient_answer_is_retried_with_growing_waits(name):
    fn, calls = failing(4, TRANSIENT_ANSWERS[name])
    assert tracking._with_retry(fn, retry_s=30) == "ok" and len(calls) == 5
    waits = [b - a for a, b in zip(calls, calls[1:])]
    # Jittered exponential backoff: each wait is half to all of 0.05 * 2**i seconds.
    assert all(0.5 * 0.05 * 2**i - 0.01 <= w <= 0.05 * 2**i + 0.2 for i, w in enumerate(waits)), waits


@pytest.mark.parametrize("name", PERMANENT_ANSWERS)
def test_a_permanent_answer_is_raised_at_once(name):
    fn, calls = failing(1, PERMANENT_ANSWERS[name])
    with pytest.raises(MlflowException):
        tracking._with_retry(fn, retry_s=30)
    assert len(calls) == 1


def test_retries_stop_after_retry_s():
    fn, calls = failing(10**6, TRANSIENT_ANSWERS["QueuePool 400"])
    start = time.monotonic()
    with pytest.raises(MlflowException, match="QueuePool"):
        tracking._with_retry(fn, retry_s=1.0)
    assert 1.0 <= time.monotonic() - start < 3.0 and len(calls) > 3


# --------------------------------------------------------------------------------------------
# The outbox: logging leaves the caller's path; nothing lost, nothing stored twice


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, mlflow.MlflowClient, str, Path]:
    """One sqlite store for the outbox tests (creating one costs seconds); each test has its run."""
    root = tmp_path_factory.mktemp("outbox")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    return uri, client, client.create_experiment("outbox", artifact_location=str(root / "artifacts")), root


def new_run(store) -> tuple[str, str, mlflow.MlflowClient]:
    uri, client, experiment, _ = store
    return uri, client.create_run(experiment).info.run_id, client


def grid(step: int) -> np.ndarray:
    return np.full((56, 56), step % 256, dtype=np.uint8)


def assert_stored_once(client, run_id: str, epochs: int, image_steps: set[int]) -> None:
    for key in ("epoch", "val_elbo"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)
    files = sorted(f.path for f in client.list_artifacts(run_id, "images"))
    assert len(files) == 2 * len(image_steps), files          # a PNG and its WEBP thumbnail per step
    assert tracking.RunHandle(client.tracking_uri, run_id).stored_images() == {("pseudo_inputs", s) for s in image_steps}
    assert client.get_run(run_id).data.tags[tracking.TAG_LOGGED_IMAGES] == "True"


def test_queued_writes_go_out_in_order_and_each_is_stored_once(store):
    uri, run_id, client = new_run(store)
    run = tracking.RunHandle(uri, run_id)
    for epoch in range(1, 41):
        if epoch % 10 == 0:
            run.log_image(grid(epoch), "pseudo_inputs", epoch, wait=False)
        run.log_metrics({"epoch": epoch, "val_elbo": -100.0 + epoch, "stop_reason": None}, step=epoch, wait=False)
    run.log_image(grid(40), "pseudo_inputs", 40, wait=False)       # the same step again: not a second copy
    run.terminate()                                                # flushes first
    assert_stored_once(client, run_id, 40, {10, 20, 30, 40})
    assert client.get_run(run_id).info.status == "FINISHED"
    assert tracking.RunHandle(uri, run_id).unacknowledged() == []


TRIAL = """
import pickle, sys, time
import numpy as np
from trainables import tracking
uri, run_id, checkpoint = sys.argv[1:4]
run = tracking.RunHandle(uri, run_id, retry_s=300)
for epoch in range(1, 13):
    if epoch % 5 == 0:
        run.log_image(np.full((56, 56), epoch, dtype=np.uint8), "pseudo_inputs", epoch, wait=False)
    run.log_metrics({"epoch": epoch, "val_elbo": -100.0 + epoch}, step=epoch, wait=False)
    if epoch == 10:   # the trainable's save_checkpoint: the writes not acknowledged yet
        with open(checkpoint, "wb") as f:
            pickle.dump(run.unacknowledged(), f)
print("checkpointed", flush=True)
time.sleep(600)
"""


def test_a_killed_trial_loses_nothing_its_checkpoint_held_and_a_resume_stores_nothing_twice(store, tmp_path):
    """A trial process logs 12 epochs while the store is locked (nothing can be acknowledged),
    checkpoints after epoch 10 and is SIGKILLed. Restored from that checkpoint, its run gets epochs
    1..10 and the image of epoch 5 and 10 exactly once, however often the checkpoint is re-sent;
    epochs 11 and 12 are the ones the trainable replays, and the image of an epoch it replays is
    not logged twice."""
    uri, run_id, client = new_run(store)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"setup": 1.0}, step=0)         # the store's tables exist before the lock
    checkpoint = tmp_path / "checkpoint.pkl"
    lock = sqlite3.connect(store[3] / "mlflow.db", timeout=30)
    lock.execute("BEGIN EXCLUSIVE")                 # every write of the trial now finds it locked
    trial = subprocess.Popen([sys.executable, "-c", TRIAL, uri, run_id, str(checkpoint)], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert trial.stdout.readline().strip() == "checkpointed"
    finally:
        trial.send_signal(signal.SIGKILL)
        trial.wait()
        lock.rollback()
        lock.close()
    with open(checkpoint, "rb") as f:
        unacknowledged = pickle.load(f)
    assert [w["kind"] for w in unacknowledged].count("metrics") == 10   # all of 1..10: nothing got through
    assert [m.step for m in client.get_metric_history(run_id, "val_elbo")] == []

    restored = tracking.RunHandle(uri, run_id)
    assert restored.resume(unacknowledged, "epoch") == 10
    assert tracking.RunHandle(uri, run_id).resume(unacknowledged, "epoch") == 10    # restored twice
    for epoch in (10, 11, 12):       # what a trainable replaying from epoch 10 would log
        if epoch % 5 == 0:
            restored.log_image(grid(epoch), "pseudo_inputs", epoch, wait=False)
    for epoch in (11, 12):
        restored.log_metrics({"epoch": epoch, "val_elbo": -100.0 + epoch}, step=epoch, wait=False)
    restored.terminate()
    assert_stored_once(client, run_id, 12, {5, 10})


def test_a_write_that_fails_for_good_fails_the_trials_next_call(store):
    uri, run_id, client = new_run(store)
    client.delete_run(run_id)         # logging to a deleted run is refused: a permanent answer
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"epoch": 1}, step=1, wait=False)
    with pytest.raises(tracking.TrackingError, match="could not be logged"):
        run.flush()
    with pytest.raises(tracking.TrackingError):
        run.log_metrics({"epoch": 2}, step=2, wait=False)
    assert len(run.unacknowledged()) == 1       # still there for the checkpoint


def test_a_failing_run_still_closes_and_its_failed_writes_go_out_when_the_trial_resumes(store):
    uri, run_id, client = new_run(store)
    client.delete_run(run_id)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"epoch": 1}, step=1, wait=False)
    with pytest.raises(tracking.TrackingError):
        run.flush()
    checkpoint = run.unacknowledged()
    with pytest.raises(tracking.TrackingError):
        run.terminate("FINISHED")             # not FINISHED without its writes
    client.restore_run(run_id)
    run.terminate("FAILED")                   # a failing trial's run is closed all the same
    assert client.get_run(run_id).info.status == "FAILED"
    restored = tracking.RunHandle(uri, run_id)
    assert restored.resume(checkpoint, "epoch") == 1      # its checkpoint's writes are sent again


def test_the_saved_view_sorts_on_the_choosing_metric_at_the_tested_epoch_never_on_test(tmp_path):
    from sweeper import tracking as sweeper_tracking

    view = sweeper_tracking.sweep_view("val_elbo", "max", ["prior", "K"], "parent1")
    assert view["orderByKey"] == "metrics.`best_val_elbo`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:4] == ["metrics.`best_val_elbo`", "metrics.`test_ll`", "metrics.`test_ll_se`",
                                           "metrics.`best_epoch`"]
    assert view["selectedColumns"][-2:] == ["params.`prior`", "params.`K`"]
    other = sweeper_tracking.sweep_view("train_loss", "min", [])
    assert other["orderByKey"] == "metrics.`train_loss`" and other["orderByAsc"] is True
    assert "metrics.`best_val_elbo`" in other["selectedColumns"] and other["runsExpanded"] == {}
    # Stored as MLflow's shared view: an envelope whose state is a JSON string; a newer sweep replaces it.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = sweeper_tracking.ensure_experiment(uri, "view")
    sweeper_tracking.save_sweep_view(uri, experiment_id, other)
    sweeper_tracking.save_sweep_view(uri, experiment_id, view)
    experiment = mlflow.MlflowClient(uri).get_experiment(experiment_id)
    assert sweeper_tracking.has_sweep_view(experiment)
    envelope = json.loads(experiment.tags["mlflow.sharedViewState.sweeper"])
    assert json.loads(envelope["state"]) == view and isinstance(envelope["createdAt"], int)
    assert tracking.ui_url("http://h:1", experiment_id, view=True).endswith(
        "/runs?workflowType=machine_learning&viewStateShareKey=sweeper")
