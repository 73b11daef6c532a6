"""trainables/tracking.py: the trial-side MLflow bookkeeping, against a real sqlite store."""

from __future__ import annotations

import threading

import mlflow
import pytest
from mlflow.exceptions import MlflowException

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
