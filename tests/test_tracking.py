"""trainables/tracking.py: the trial-side MLflow bookkeeping, against a real sqlite store."""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
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


# --------------------------------------------------------------------------------------------
# Bounds: a step never waits on the outbox as long as the pool waits before evicting it, and a
# checkpoint carries a bounded number of unsent images


def write_steps(writes) -> list[tuple[str, int]]:
    """(kind, step) of queued writes: what a checkpoint would carry, in order."""
    return [(w["kind"], w["step"] if w["kind"] == "image" else w["metrics"][0][3]) for w in writes]


@contextlib.contextmanager
def outage(store):
    """Every write to the store finds it locked (the sender retries) until the block ends."""
    lock = sqlite3.connect(store[3] / "mlflow.db", timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        lock.rollback()
        lock.close()


def test_a_step_waits_on_its_outbox_far_less_than_its_pool_waits_before_evicting_it():
    """A pooled trial that has not called its pool for the pool's wait is evicted. A step queues at
    most two images (a trial's first step adds its step-0 image to its epoch's) and metrics never
    wait, so a step waits at most 2 x PUT_WAIT_S on the outbox: that must leave at least half the
    pool's wait to the step's own work (the round, the checkpoint)."""
    from trainables import pool

    evict_s = inspect.signature(pool.get_pool).parameters["wait_s"].default
    assert inspect.signature(pool.PoolActor).parameters["wait_s"].default == evict_s
    assert 2 * tracking.PUT_WAIT_S <= evict_s / 2, (tracking.PUT_WAIT_S, evict_s)


def test_during_an_outage_an_image_waits_put_wait_s_for_room_then_is_dropped_and_metrics_never_wait(
        store, monkeypatch, caplog):
    """The store is locked (a tracking outage) while a trial logs three epochs into an outbox with
    room for one image: the trial is never blocked for longer than PUT_WAIT_S, once; what it
    queued is stored when the outage ends, and the dropped images are not."""
    uri, run_id, client = new_run(store)
    image_bytes = tracking._write_bytes({"kind": "image", "image": grid(1)})
    monkeypatch.setattr(tracking, "QUEUE_BYTES", image_bytes + 1000)     # room for one image and its metrics
    monkeypatch.setattr(tracking, "PUT_WAIT_S", 3.0, raising=False)
    caplog.set_level(logging.WARNING, logger=tracking.__name__)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"setup": 1.0}, step=0)         # the store's tables exist before the outage
    returned: list[float] = []
    errors: list[BaseException] = []

    def steps():       # three epochs of a trial, each with its image
        try:
            for epoch in (1, 2, 3):
                run.log_image(grid(epoch), "pseudo_inputs", epoch, wait=False)
                run.log_metrics({"epoch": epoch, "val_elbo": -100.0 + epoch}, step=epoch, wait=False)
            returned.append(time.monotonic())
        except BaseException as exc:   # collected: a thread's exception would not fail the test
            errors.append(exc)

    trial = threading.Thread(target=steps, daemon=True)
    with outage(store):
        start = time.monotonic()
        trial.start()
        trial.join(timeout=30)
        assert not trial.is_alive(), "the trial's logging blocked on a full outbox during the outage"
        assert errors == []
        # Image 2 waited PUT_WAIT_S for room and was dropped; image 3 found the outbox still full
        # and was dropped without waiting again.
        assert 3.0 <= returned[0] - start < 6.0, returned[0] - start
        assert write_steps(run.unacknowledged()) == [("image", 1), ("metrics", 1), ("metrics", 2), ("metrics", 3)]
    assert "2 image(s) dropped" in caplog.text
    run.terminate()
    assert_stored_once(client, run_id, 3, {1})


def test_a_checkpoint_carries_every_unsent_metric_but_unsent_images_only_up_to_its_budget(
        store, monkeypatch, caplog):
    uri, run_id, client = new_run(store)
    image_bytes = tracking._write_bytes({"kind": "image", "image": grid(1)})
    monkeypatch.setattr(tracking, "CHECKPOINT_IMAGE_BYTES", 2 * image_bytes, raising=False)
    caplog.set_level(logging.WARNING, logger=tracking.__name__)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"setup": 1.0}, step=0)
    with outage(store):
        for epoch in range(1, 5):
            run.log_image(grid(epoch), "pseudo_inputs", epoch, wait=False)
            run.log_metrics({"epoch": epoch, "val_elbo": -100.0 + epoch}, step=epoch, wait=False)
        checkpoint = run.unacknowledged()
        # The oldest images while they fit the budget, in queue order; every metric.
        assert write_steps(checkpoint) == [("image", 1), ("metrics", 1), ("image", 2), ("metrics", 2),
                                           ("metrics", 3), ("metrics", 4)]
        assert "2 unsent image(s)" in caplog.text
    run.terminate()             # the live queue kept (and now sends) every image
    assert_stored_once(client, run_id, 4, {1, 2, 3, 4})


# --------------------------------------------------------------------------------------------
# The outbox's lifecycle: order, close, release, exit


def test_the_outbox_stores_writes_in_the_order_they_were_queued(store, monkeypatch):
    """The trainable queues an epoch's image before its metrics, so that a stored epoch has its
    image (resume relies on it): a sender that sent metrics ahead of an image queued earlier would
    break that. The sender's calls are held at a gate until everything is queued."""
    uri, run_id, _ = new_run(store)
    sender = tracking.client(uri)          # the client the outbox's thread sends with
    gate = threading.Event()
    sent: list[tuple[str, list[int]]] = []

    def recorded(method, describe):
        real = getattr(sender, method)

        def call(*args):
            if args[0] != run_id:       # another test's run
                return real(*args)
            assert gate.wait(60), "the test never opened the gate"
            what = describe(*args)
            result = real(*args)
            sent.append(what)           # acknowledged, in the order the store got them
            return result

        monkeypatch.setattr(sender, method, call)

    recorded("log_batch", lambda _run, metrics: ("metrics", sorted({m.step for m in metrics})))
    recorded("log_artifacts", lambda _run, folder, _path: (
        "image", sorted({int(tracking._IMAGE_NAME.match(p.name)["step"]) for p in Path(folder).glob("*.png")})))
    run = tracking.RunHandle(uri, run_id)
    run.log_image(grid(1), "pseudo_inputs", 1, wait=False)      # the sender holds it at the gate
    for epoch in (1, 2):
        run.log_metrics({"epoch": epoch}, step=epoch, wait=False)
    run.log_image(grid(2), "pseudo_inputs", 2, wait=False)
    run.log_metrics({"epoch": 3}, step=3, wait=False)
    run.log_image(grid(3), "pseudo_inputs", 3, wait=False)
    run.log_image(grid(4), "pseudo_inputs", 4, wait=False)
    run.log_metrics({"epoch": 4}, step=4, wait=False)
    gate.set()
    run.terminate()
    assert sent == [("image", [1]), ("metrics", [1, 2]), ("image", [2]), ("metrics", [3]), ("image", [3]),
                    ("image", [4]), ("metrics", [4])]


def outboxes_of(run_id: str) -> list:
    """The outboxes of `run_id` still alive in this process (whatever holds them), once its sender
    threads have ended (a closed outbox's thread ends; one that does not fails the test here)."""
    senders = [t for t in threading.enumerate() if t.name == f"mlflow-outbox-{run_id[:8]}"]
    for t in senders:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in senders), "a closed run's sender thread did not end"
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is tracking._Outbox and o.run_id == run_id]


def test_a_closed_runs_outbox_is_released_once_what_it_held_is_stored(store):
    """A reused actor closes one trial's run after another: a run closed with writes still queued
    sends them, then its outbox (and its queue, and its thread) is gone from the process."""
    uri, run_id, client = new_run(store)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"setup": 1.0}, step=0)
    with outage(store):
        run.log_image(grid(1), "pseudo_inputs", 1, wait=False)
        run.log_metrics({"epoch": 1, "val_elbo": -99.0}, step=1, wait=False)
        assert run.close(timeout_s=0) is False          # left queued: still sent after the outage
    assert run.flush(timeout_s=60)
    assert_stored_once(client, run_id, 1, {1})
    del run
    assert outboxes_of(run_id) == []


def test_a_closed_handle_refuses_writes_and_a_new_handle_of_the_run_logs_again(store):
    uri, run_id, client = new_run(store)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"epoch": 1}, step=1, wait=False)
    assert run.close() is True
    with pytest.raises(tracking.RunClosedError, match="this handle was closed"):
        run.log_metrics({"epoch": 2}, step=2, wait=False)
    with pytest.raises(tracking.RunClosedError, match="this handle was closed"):
        run.log_image(grid(2), "pseudo_inputs", 2, wait=False)
    with pytest.raises(tracking.RunClosedError, match="this handle was closed"):
        run.resume([{"kind": "metrics", "metrics": [("epoch", 2.0, 0, 2)]}])
    assert run.unacknowledged() == [] and run.flush()       # reads still answer
    assert run.close() is True                              # closing again: nothing to do
    again = tracking.RunHandle(uri, run_id)                  # a retried trial in a reused actor
    again.log_metrics({"epoch": 2}, step=2, wait=False)
    again.terminate()
    with pytest.raises(tracking.RunClosedError):
        again.log_metrics({"epoch": 3}, step=3, wait=False)
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2]
    del run, again
    assert outboxes_of(run_id) == []


def test_a_new_handle_of_a_run_still_sending_queues_behind_what_the_closed_handle_left(store):
    """One order per run and process: a retried trial in a reused actor writes after what its
    earlier incarnation left queued, not beside it."""
    uri, run_id, client = new_run(store)
    run = tracking.RunHandle(uri, run_id)
    run.log_metrics({"setup": 1.0}, step=0)
    with outage(store):
        run.log_image(grid(1), "pseudo_inputs", 1, wait=False)
        run.log_metrics({"epoch": 1, "val_elbo": -99.0}, step=1, wait=False)
        assert run.close(timeout_s=0) is False
        again = tracking.RunHandle(uri, run_id)
        again.log_metrics({"epoch": 2, "val_elbo": -98.0}, step=2, wait=False)
        assert write_steps(again.unacknowledged()) == [("image", 1), ("metrics", 1), ("metrics", 2)]
    again.terminate()
    assert_stored_once(client, run_id, 2, {1})
    del run, again
    assert outboxes_of(run_id) == []


EXITS_AT_ONCE = """
import atexit
import sys
import numpy as np
from trainables import tracking
assert "mlflow" not in sys.modules
uri, run_id = sys.argv[1:3]
run = tracking.RunHandle(uri, run_id)
run.log_image(np.full((56, 56), 9, dtype=np.uint8), "pseudo_inputs", 1, wait=False)
for epoch in (1, 2, 3):
    run.log_metrics({"epoch": epoch, "val_elbo": -100.0 + epoch}, step=epoch, wait=False)
atexit.register(print, "exiting", flush=True)     # registered last: the first hook to run at exit
print("queued", flush=True)
"""


def test_what_a_process_queued_is_stored_when_it_exits_before_sending_anything(store):
    """The script queues its writes and ends at once. The store stays locked until the script's
    interpreter is shutting down: its writes can only go out at exit, and nothing was sent (nor
    mlflow imported by the script) before."""
    uri, run_id, client = new_run(store)
    tracking.RunHandle(uri, run_id).log_metrics({"setup": 1.0}, step=0)    # the tables exist before the lock
    with outage(store):
        script = subprocess.Popen([sys.executable, "-c", EXITS_AT_ONCE, uri, run_id], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        try:
            said = [script.stdout.readline(), script.stdout.readline()]
        except BaseException:
            script.kill()
            raise
    _, err = script.communicate(timeout=120)
    assert script.returncode == 0 and said == ["queued\n", "exiting\n"], (said, err)
    try:
        assert_stored_once(client, run_id, 3, {1})
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe script's stderr:\n{err[-3000:]}") from None
