"""trainables/vae_trainable.py: what a trial's process does to the outside world, and when."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import ray

from trainables import tracking
from trainables.vae.catalog import RESULT_RUN_ID
from trainables.vae_trainable import SWEEP_KEY, VAETrainable


def _config(uri: str, experiment_id: str, parent_run_id: str) -> dict:
    return {"dataset": "static_mnist", "prior": "vamp", "K": 4, "max_epochs": 3, "train_subset": 200,
            "val_subset": 100, "test_subset": 100, "test_samples": 10, "image_every": 1, "device": "cpu",
            SWEEP_KEY: {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                        "sweep_name": "t", "name_keys": ["prior", "K"]}}


def steps_of(artifacts: list[str], key: str) -> set[int]:
    """The steps of a step-indexed image key among a run's image artifacts."""
    prefix = tracking.image_artifact_prefix(key, 0).split("+step+")[0] + "+step+"
    return {int(a[len(prefix):].split("+")[0]) for a in artifacts if a.startswith(prefix)}


@pytest.fixture
def store(tmp_path, shared_datasets, monkeypatch):
    """(tracking URI, client, experiment id, a sweep's parent run id) of a fresh sqlite store."""
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("trainable")
    ray_was_up = ray.is_initialized()
    yield uri, client, experiment_id, client.create_run(experiment_id).info.run_id
    if not ray_was_up and ray.is_initialized():
        ray.shutdown()   # the trainable's Ray calls start one here: later tests start their own


def test_a_trials_setup_leaves_no_trace_its_first_step_opens_its_run(store):
    """Tune may set up a fresh actor for a retried trial, run the trial on a cached actor instead
    and discard the fresh one after its setup, by then maybe after the trial ended: a CI run saw
    such a setup reopen the finished run (left RUNNING). Setup must not touch MLflow."""
    uri, client, experiment_id, parent = store

    # A trial that has ended (outside Tune a trainable's trial id is "default").
    ended = tracking.open_trial_run(uri, experiment_id, parent, trial_id="default", trial_name="vamp K=4",
                                    params={"K": 4}, sweep_name="t")
    ended.set_tags({tracking.TAG_STOP: "completed"})
    ended.terminate("FINISHED")
    stale = VAETrainable(_config(uri, experiment_id, parent))       # setup only, then discarded
    stale.stop()
    runs = client.search_runs([experiment_id])
    assert len(runs) == 2
    assert client.get_run(ended.run_id).info.status == "FINISHED"

    # A new trial: no run after setup; its first step creates it, with step 0 of the pseudo-inputs.
    other_parent = client.create_run(experiment_id).info.run_id
    trainable = VAETrainable(_config(uri, experiment_id, other_parent))
    assert tracking.find_child(uri, experiment_id, other_parent, "default") is None
    result = trainable.train()
    run = tracking.find_child(uri, experiment_id, other_parent, "default")
    assert run is not None and result[RESULT_RUN_ID] == run.info.run_id
    assert run.info.status == "RUNNING" and run.info.run_name == "vamp K=4"
    tracking.RunHandle(uri, run.info.run_id).flush()   # a step's logging is queued, not waited for
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
    assert steps == [1]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert steps_of(images, tracking.IMAGE_PSEUDO_INPUTS) == {0, 1}
    trainable.stop()


def test_a_retry_completes_what_its_first_attempt_did_not_log(store):
    """A first attempt that created its run and died before recording its dataset (as when it
    lost MLflow's dataset race): the retry, which finds the run, records the dataset and step 0."""
    uri, client, experiment_id, parent = store
    first = tracking.open_trial_run(uri, experiment_id, parent, trial_id="default", trial_name="vamp K=4",
                                    params={"K": 4}, sweep_name="t")   # ... and then it died
    retry = VAETrainable(_config(uri, experiment_id, parent))
    retry.train()
    retry.stop()
    run = client.get_run(first.run_id)
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["static_mnist"]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert steps_of(images, tracking.IMAGE_PSEUDO_INPUTS) == {0, 1}
    assert len(client.search_runs([experiment_id])) == 2           # the parent and the one trial run


def test_a_pooled_trial_evicted_while_alive_rejoins_from_its_last_checkpoint_and_goes_on(store, tmp_path):
    """A live trial that was slow to ask (a busy Tune driver) can be evicted from its pool; with
    the state of the epoch it last reported (its checkpoint) it joins again and trains on exactly;
    without it, its next step fails and Tune retries it from its checkpoint."""
    from trainables.pool import NotAMember, remove_pools, sweep_pools
    from trainables.vae.config import TrainConfig
    from trainables.vae.data import load_dataset
    from trainables.vae.train import Trainer

    uri, client, experiment_id, parent = store
    config = _config(uri, experiment_id, parent)
    config[SWEEP_KEY]["pool"] = {"sweep_id": "evicted"}
    trainable = VAETrainable(config)
    first = trainable.train()
    trainable.save(str(tmp_path / "checkpoint"))                  # Tune's checkpoint after the epoch
    (pool,) = sweep_pools("evicted")
    ray.get(pool.leave.remote("default"))                          # as the eviction timer does
    second = trainable.train()
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != SWEEP_KEY})
    alone = Trainer(cfg, load_dataset("static_mnist"), "cpu")
    expected = [alone.step() for _ in range(2)]
    assert (first["epoch"], second["epoch"]) == (1, 2)
    assert second["val_elbo"] == pytest.approx(expected[1]["val_elbo"], rel=1e-5)
    ray.get(pool.leave.remote("default"))                          # evicted again, no checkpoint since
    with pytest.raises(NotAMember):
        trainable.train()
    trainable.stop()
    remove_pools("evicted")


def test_a_finished_trials_page_opens_on_its_pseudo_inputs_and_its_test_ll(store):
    """What the MLflow UI can be told: the pseudo-inputs are a section of their own
    (the first on the page), with a card of the tested weights that opens at the best epoch; the
    description starts with the test LL and a strip of pseudo-inputs; final figures are rounded."""
    uri, client, experiment_id, parent = store
    trainable = VAETrainable(_config(uri, experiment_id, parent))
    while not (result := trainable.train()).get("done"):
        pass
    trainable.stop()
    run = client.get_run(result[RESULT_RUN_ID])
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert steps_of(images, tracking.IMAGE_PSEUDO_INPUTS) == {0, 1, 2, 3}
    best = int(run.data.metrics["best_epoch"])
    assert steps_of(images, tracking.IMAGE_BEST_PSEUDO_INPUTS) == {best}       # one step: opens there
    assert all(k.count("/") == 1 and k.startswith("pseudo_inputs/")
               for k in (tracking.IMAGE_PSEUDO_INPUTS, tracking.IMAGE_BEST_PSEUDO_INPUTS))
    note = run.data.tags[tracking.TAG_NOTE]
    first, strip = note.split("\n")[:2]
    m = run.data.metrics
    assert first.startswith(f"**test LL {m['test_ll']:.2f} ± {m['test_ll_se']:.2f} nats**") and f"epoch {best} of 3" in first
    assert f"get-artifact?path=strip.png&run_uuid={run.info.run_id}" in strip
    assert "Images:" in note.split("\n\n", 1)[1]                                   # the creation note follows
    assert "strip.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    for key in ("test_ll", "test_ll_se", "test_elbo"):
        assert run.data.metrics[key] == round(run.data.metrics[key], 2)
    assert result["test_ll"] != round(result["test_ll"], 2)                       # Tune keeps every digit
    # What trials are chosen on is stored exactly: a near-tie is decided by value.
    assert run.data.metrics["best_val_elbo"] == result["best_val_elbo"] != round(result["best_val_elbo"], 2)


def test_a_restore_whose_checkpoint_retention_deleted_goes_on_from_the_newest_that_exists(store, tmp_path):
    """Tune's saved experiment state names a trial's latest checkpoint as of its last save; with
    `num_to_keep=2`, retention may delete it before the next save. After a driver crash, the
    restore that names it continues from the newest checkpoint that exists (its epoch read from
    the file), trains the next epoch exactly as the uninterrupted trial did, and logs no epoch
    twice. Without the fallback Tune fails the trial ("does not exist on storage anymore")."""
    from ray.train._internal.checkpoint_manager import _TrainingResult

    uri, client, experiment_id, parent = store
    config = _config(uri, experiment_id, parent) | {"max_epochs": 6, "image_every": 0}
    trial_dir = tmp_path / "trial_x"
    first = VAETrainable(config)
    for i in range(3):      # an epoch, then Tune's checkpoint of it: checkpoint_00000i holds epoch i + 1
        first.train()
        (trial_dir / f"checkpoint_{i:06d}").mkdir(parents=True)
        first.save_checkpoint(str(trial_dir / f"checkpoint_{i:06d}"))
    # The index says nothing about the epoch after an earlier restore: a stale low-epoch folder
    # with a high index must not win.
    (trial_dir / "checkpoint_000009").mkdir()
    (trial_dir / "checkpoint_000009" / "junk.txt").write_text("a half-written checkpoint")
    expected = first.train()                                      # epoch 4, uninterrupted
    first.stop()
    tracking.RunHandle(uri, expected[RESULT_RUN_ID]).flush()
    shutil.rmtree(trial_dir / "checkpoint_000000")                 # retention, after Tune's last save

    restored = VAETrainable(config)
    restored.restore(_TrainingResult(checkpoint=ray.tune.Checkpoint(str(trial_dir / "checkpoint_000000")),
                                     metrics={"training_iteration": 1}))
    assert restored.iteration == 3
    again = restored.train()
    assert (again["epoch"], again["training_iteration"]) == (4, 4)
    assert again["val_elbo"] == expected["val_elbo"]
    restored.stop()
    steps = sorted(m.step for m in client.get_metric_history(expected[RESULT_RUN_ID], "val_elbo"))
    assert steps == [1, 2, 3, 4]


def test_a_trial_process_silences_only_the_exit_that_lands_in_a_finalizer(capfd):
    """Ray's SIGTERM handler raises SystemExit when Tune ends a stopped trial's actor; inside a
    finalizer Python printed it as an "Exception ignored" traceback on the driver's console."""
    import gc
    import sys

    from trainables.vae_trainable import quiet_exit_in_finalizers

    class Ends:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    before = sys.unraisablehook
    sys.unraisablehook = quiet_exit_in_finalizers
    try:
        Ends(SystemExit(1))
        gc.collect()
        assert capfd.readouterr().err == ""
        Ends(RuntimeError("a real problem"))
        gc.collect()
        assert "RuntimeError: a real problem" in capfd.readouterr().err
    finally:
        sys.unraisablehook = before


def test_a_finished_trial_logs_both_choices_of_epoch_with_their_standard_errors(store, monkeypatch, tmp_path):
    """Scripted validation ELBOs: REF's rule restores epoch 2 (inside the 3-epoch warm-up), the
    best at full KL weight is epoch 4. One run tests both and logs each with its epoch and SE;
    its description shows both; the SE is the per-image LL's std / sqrt(N)."""
    import numpy as np
    import pandas as pd

    from trainables.vae.train import Trainer

    uri, client, experiment_id, parent = store
    script = iter([100.0, 30.0, 60.0, 50.0, 55.0])
    real = Trainer.evaluate_elbo

    def scripted(self, x, noise=None):
        if x is not self.x_val:
            return real(self, x, noise)
        loss = next(script)
        return {"loss": loss, "elbo": -loss, "rec": 0.0, "kl": 0.0}

    monkeypatch.setattr(Trainer, "evaluate_elbo", scripted)
    trainable = VAETrainable(_config(uri, experiment_id, parent) | {"max_epochs": 5, "warmup": 3, "image_every": 0})
    while not (result := trainable.train()).get("done"):
        pass
    trainable.stop()
    m = client.get_run(result[RESULT_RUN_ID]).data.metrics
    assert (m["best_epoch"], m["best_epoch_after_warmup"]) == (2, 4)
    assert (m["best_val_elbo"], m["best_val_elbo_after_warmup"]) == (-30.0, -50.0)
    for key in ("test_ll", "test_ll_se", "test_ll_after_warmup", "test_ll_after_warmup_se"):
        assert m[key] == round(result[key], 2), key                    # stored as test_ll is
    assert result["test_ll"] != result["test_ll_after_warmup"]
    assert "best_val_ll" in m and "best_val_ll_after_warmup" in m
    csv = Path(client.download_artifacts(result[RESULT_RUN_ID], "per_image_ll.csv", str(tmp_path)))
    per_image = pd.read_csv(csv)["log_likelihood"].to_numpy()
    assert result["test_ll_se"] == pytest.approx(np.std(per_image, ddof=1) / np.sqrt(per_image.size), rel=1e-5)
    first = client.get_run(result[RESULT_RUN_ID]).data.tags[tracking.TAG_NOTE].split("\n")[0]
    assert f"{m['test_ll']:.2f} ± {m['test_ll_se']:.2f} nats" in first and "epoch 2 of 5" in first
    assert (f"best at full KL weight: epoch 4, test LL "
            f"{m['test_ll_after_warmup']:.2f} ± {m['test_ll_after_warmup_se']:.2f}") in first


def test_a_trial_run_shows_only_what_sets_it_apart_and_keeps_its_whole_config_exact(store):
    """Every image card on a trial's page listed ~25 params above its picture (a sliver of image
    was left at 1440x900), and a standard-prior trial showed K=500, a default it does not use."""
    import json

    uri, client, experiment_id, parent = store
    config = _config(uri, experiment_id, parent) | {"prior": "standard", "lr": 0.0023382678, "max_epochs": 1}
    config[SWEEP_KEY]["name_keys"] = ["prior", "K", "lr"]
    trainable = VAETrainable(config)
    result = trainable.train()
    trainable.stop()
    run = client.get_run(result[RESULT_RUN_ID])
    assert run.data.params == {"dataset": "static_mnist", "model": "vae", "prior": "standard", "lr": "2.34e-3"}
    whole = json.loads(run.data.tags[tracking.TAG_CONFIG])
    assert whole["lr"] == 0.0023382678 and whole["K"] == 4 and whole["test_samples"] == 10   # exact, all of it
    from sweeper.tracking import run_config

    assert run_config(run)["lr"] == "0.0023382678" and run_config(run)["prior"] == "standard"
    vamp = tracking.trial_params({"dataset": "caltech101", "prior": "vamp", "K": 48, "lr": 1e-3, "seed": 2},
                                 ["prior", "K", "lr"])
    assert vamp == {"dataset": "caltech101", "prior": "vamp", "K": "48", "lr": "1e-3"}
