"""sweeper/evaluations.py: a stopped trial's test evaluation as a real Ray task. One that fails
closes its run as FAILED with the traceback and is listed; the next pass (the end of the sweep,
or `--resume`) evaluates it again once the cause is gone."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import ray
import yaml
from ray import tune

from sweeper import tracking
from sweeper.evaluations import EVALUATION_ERROR_FILE, TAG_EVALUATION_FAILED, Evaluations, evaluate_stopped_trials
from sweeper.spec import parse_spec
from trainables.vae_trainable import SWEEP_KEY, VAETrainable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_ray(shared_datasets, monkeypatch):
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))    # the tasks' processes inherit it
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def test_a_failed_evaluation_is_closed_and_listed_then_done_by_the_next_pass(tmp_path, local_ray):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_store(uri)
    experiment_id = tracking.ensure_experiment(uri, "evaluations")
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(experiment_id, tags={"sweeper.role": "sweep"}).info.run_id
    config = {"dataset": "static_mnist", "prior": "standard", "max_epochs": 3, "train_subset": 200, "val_subset": 100,
              "test_subset": 40, "test_samples": 10, "image_every": 0, "device": "cpu",
              SWEEP_KEY: {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
                          "sweep_name": "s", "name_keys": ["prior"], "scheduler": "asha"}}
    trial = VAETrainable(config)           # outside Tune its trial id is "default"
    trial.train()
    good = tmp_path / "checkpoint_000000"
    good.mkdir()
    trial.save_checkpoint(str(good))
    trial.stop()
    run = tracking.find_child(uri, experiment_id, parent, "default")
    tracking.RunHandle(uri, run.info.run_id).set_tags({tracking.TAG_STOP: "scheduler"})   # as the driver does
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trainer.pt").write_bytes(b"not a checkpoint")

    spec = parse_spec({**yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text()),
                       "stopped_trials": {"test_ll": "estimate", "samples": 5, "images": 30}})
    evaluations = Evaluations.of("s", uri, spec)
    evaluations.launch(tracking.find_child(uri, experiment_id, parent, "default"), config,
                       tune.Checkpoint.from_directory(str(broken)), "default")
    evaluations.collect(wait=True)
    (line,) = evaluations.failed
    assert "trial_default" in line and "its test evaluation failed" in line and EVALUATION_ERROR_FILE in line
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags[TAG_EVALUATION_FAILED] == "1"
    assert run.data.tags[tracking.TAG_STOP] == "error" and "test_ll" not in run.data.metrics
    assert EVALUATION_ERROR_FILE in {a.path for a in client.list_artifacts(run.info.run_id)}
    Evaluations.forget("s")

    # The next pass finds it (failed before) and evaluates it from a checkpoint that loads.
    result = SimpleNamespace(metrics={"trial_id": "default"}, error=None, config=config,
                             path=str(tmp_path / "trial_default"),     # as a tune.Result's: its folder names it
                             checkpoint=tune.Checkpoint.from_directory(str(good)))
    lines: list[str] = []
    assert evaluate_stopped_trials([result], "s", uri, experiment_id, parent, spec, lines.append) == []
    assert lines[0] == "evaluating 1 trial(s) stopped by the scheduler on the test set ..."
    assert len(lines) == 2 and lines[1].startswith("1 test evaluation(s) of stopped trials ended, ")     # with its wall time
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and TAG_EVALUATION_FAILED not in run.data.tags
    assert run.data.tags[tracking.TAG_STOP] == "scheduler"
    assert (run.data.metrics["test_images"], run.data.metrics["test_samples"]) == (30, 5)
    # Idempotent: a third pass has nothing to do.
    assert evaluate_stopped_trials([result], "s", uri, experiment_id, parent, spec, lines.append) == []
    assert len(lines) == 2


def test_evaluations_beyond_the_limit_wait_in_a_queue_and_all_are_done(tmp_path, local_ray):
    """A CPU sweep's evaluations reserve no CPU (a stopped trial's CPU goes to the next trial at
    once), so as many run at once as the sweep's trials, the others queued; all are done."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_store(uri)
    experiment_id = tracking.ensure_experiment(uri, "queue")
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(experiment_id, tags={"sweeper.role": "sweep"}).info.run_id
    config = {"dataset": "static_mnist", "prior": "standard", "max_epochs": 3, "train_subset": 200, "val_subset": 100,
              "test_subset": 40, "test_samples": 5, "image_every": 0, "device": "cpu",
              SWEEP_KEY: {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
                          "sweep_name": "q", "name_keys": ["prior"], "scheduler": "asha"}}
    trial = VAETrainable(config)
    trial.train()
    checkpoints = []
    for i in range(3):
        folder = tmp_path / f"trial_{i}" / "checkpoint_000000"
        folder.mkdir(parents=True)
        trial.save_checkpoint(str(folder))
        checkpoints.append(tune.Checkpoint.from_directory(str(folder)))
    trial.stop()
    tracking.RunHandle(uri, tracking.find_child(uri, experiment_id, parent, "default").info.run_id).set_tags(
        {tracking.TAG_STOP: "scheduler"})
    spec = parse_spec(yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text()))
    evaluations = Evaluations.of("q", uri, spec, limit=1)
    run = tracking.find_child(uri, experiment_id, parent, "default")
    for i, checkpoint in enumerate(checkpoints):      # three stopped trials (one run stands for them)
        evaluations.launch(run, config, checkpoint, f"t{i}")
    assert (len(evaluations.in_flight), len(evaluations.queued)) == (1, 2)
    assert Evaluations.pending("q") == 3
    evaluations.collect(wait=True)
    assert not evaluations.in_flight and not evaluations.queued and not evaluations.failed
    # the console's table gets each one's test LL (the quickstart tests stopped trials in full: no "~")
    tested = Evaluations.tested_so_far("q")
    assert sorted(tested) == ["t0", "t1", "t2"] and all(float(v) < 0 for v in tested.values()), tested
    # each one's checkpoints are gone once it is tested
    assert not any((tmp_path / f"trial_{i}" / "checkpoint_000000").exists() for i in range(3))
    Evaluations.forget("q")


@ray.remote(num_cpus=1)
class _Trial:
    """Holds a CPU, as a running trial's actor does."""

    def ready(self) -> bool:
        return True


@ray.remote(num_cpus=0)
def _pid() -> int:
    return os.getpid()


@pytest.mark.parametrize("kept", [True, False], ids=["sweep-limit", "ray-default"])
def test_an_ended_evaluations_process_is_kept_for_the_next_one(kept):
    """A local sweep's Ray keeps idle workers for its trials and their evaluations
    (`local_workers`): while every CPU holds a trial, the process an ended evaluation (a 0-CPU
    task) ran in is the one the next evaluation runs in, after longer idle than Ray's 1 s. With
    Ray's default limit (the CPU count, trial actors counted) that process is killed and the next
    evaluation starts a new one, with Python's, torch's and MLflow's imports again."""
    from sweeper.run import _init_ray, local_resources, local_workers

    spec = parse_spec(yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text()))
    local = local_resources()
    cluster = _init_ray(None, local_workers(spec, local) if kept else 0)
    try:
        trials = [_Trial.remote() for _ in range(int(cluster["CPU"]))]
        assert ray.get([t.ready.remote() for t in trials])
        first = ray.get(_pid.remote())
        # Ray's idle killer runs every 200 ms and takes workers idle for over 1 s: wait well past it.
        time.sleep(3)
        second = ray.get(_pid.remote())
        assert (second == first) is kept, (first, second)
    finally:
        ray.shutdown()
