"""The sweep's summary chooses on validation at each trial's tested epoch, with typed
conditions: a real MLflow store (sqlite) written as the trials write it, no Ray."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from sweeper import tracking
from sweeper.run import SweepOutcome, echo_urls, summarize, typed_params
from sweeper.spec import parse_spec
from trainables.vae.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def conditional_spec():
    """K conditional on the prior (a word), lr on K (an int), seed on cuda_graphs (a bool)."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["parameters"] = {
        "prior": {"distribution": "choice", "values": ["standard", "vamp"]},
        "K": {"distribution": "choice", "values": [13, 48], "when": {"prior": ["vamp"]}},
        "lr": {"distribution": "log_uniform", "min": 3.0e-4, "max": 3.0e-3, "when": {"K": [13]}},
        "cuda_graphs": {"distribution": "choice", "values": [True, False]},
        "seed": {"distribution": "choice", "values": [1, 2], "when": {"cuda_graphs": [False]}},
    }
    return parse_spec(data, "conditional.yaml")


def add_trial(uri: str, experiment_id: str, parent_id: str, name: str, values: dict, val_elbo: list[float], *,
              best_epoch: int | None, best_val_elbo: float | None, test_ll: float | None, status: str) -> str:
    """A trial's run as the trainable leaves it: its config as params, val_elbo per epoch (step =
    epoch), and at its end best_epoch, best_val_elbo (runs made before it existed have none), test_ll."""
    handle = tracking.open_trial_run(uri, experiment_id, parent_id, trial_id=name.replace(" ", "_"), trial_name=name,
                                     params=TrainConfig.from_dict(values).to_dict(), sweep_name="s")
    for epoch, value in enumerate(val_elbo, start=1):
        handle.log_metrics({"val_elbo": value, "epoch": epoch}, step=epoch)
    last = len(val_elbo)
    final = {"best_epoch": best_epoch, "best_val_elbo": best_val_elbo, "test_ll": test_ll}
    handle.log_metrics({k: v for k, v in final.items() if v is not None}, step=last)
    if status != "RUNNING":
        handle.set_tags({"stop_reason": "completed"})
        handle.terminate(status)
    return handle.run_id


def test_the_best_trial_is_chosen_on_validation_at_the_tested_epoch_never_on_test_ll(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = conditional_spec()
    experiment_id = tracking.ensure_experiment(uri, "choices")
    parent = tracking.RunHandle(uri, tracking.client(uri).create_run(
        experiment_id, run_name="choices-20260101-000000", tags={"sweeper.role": "sweep"}).info.run_id)
    # A: the best validation ELBO at its tested epoch (3), though its last epoch is lower.
    a = add_trial(uri, experiment_id, parent.run_id, "vamp K=13", {"prior": "vamp", "K": 13, "lr": 2e-3,
                  "cuda_graphs": False, "seed": 2}, [-130, -110, -100, -104],
                  best_epoch=3, best_val_elbo=-100.0, test_ll=-95.0, status="FINISHED")
    # B: the best test LL and the best last epoch, but a worse validation ELBO at its tested epoch.
    b = add_trial(uri, experiment_id, parent.run_id, "vamp K=48", {"prior": "vamp", "K": 48, "cuda_graphs": True},
                  [-120, -102, -99], best_epoch=2, best_val_elbo=-102.0, test_ll=-90.0, status="FINISHED")
    # C: a run made before best_val_elbo existed: its val_elbo at step best_epoch counts (-101), not the last.
    c = add_trial(uri, experiment_id, parent.run_id, "standard", {"prior": "standard", "cuda_graphs": False,
                  "seed": 1}, [-120, -101, -130], best_epoch=2, best_val_elbo=None, test_ll=-97.0, status="FINISHED")
    # D: still running, no tested epoch: its latest value (the highest of all) is shown, marked, last.
    d = add_trial(uri, experiment_id, parent.run_id, "vamp K=13 lr=1e-3", {"prior": "vamp", "K": 13, "lr": 1e-3,
                  "cuda_graphs": True}, [-50], best_epoch=None, best_val_elbo=None, test_ll=None, status="RUNNING")

    lines: list[str] = []
    table = summarize(spec, uri, experiment_id, parent, lines.append)
    assert list(table["run_id"]) == [a, c, b, d]
    assert list(table["val_elbo"]) == [-100.0, -101.0, -102.0, -50.0]
    assert list(table["val_elbo_at"]) == ["best_epoch"] * 3 + ["latest"]
    printed = "\n".join(lines)
    assert "-50.00 (latest)" in printed and "never used to choose" in printed
    # The parent run's best_* are the chosen trial's: its validation ELBO, and its test LL beside.
    run = tracking.client(uri).get_run(parent.run_id)
    assert run.data.tags["best_run_id"] == a and run.data.tags["best_trial"] == "vamp K=13"
    assert run.data.metrics["best_val_elbo"] == -100.0 and run.data.metrics["best_test_ll"] == -95.0
    assert run.data.metrics["best_epoch"] == 3
    # The printed link is the chosen trial's.
    urls: list[str] = []
    echo_urls(SweepOutcome("s", parent.run_id, experiment_id, uri, str(tmp_path), summary=table), urls.append)
    assert f"/runs/{a}?" in urls[-1] and "(vamp K=13)" in urls[-1]

    # Conditions on an int (K: [13]) and a bool (cuda_graphs: [false]) match MLflow's string params.
    by_run = table.set_index("run_id")
    assert by_run.loc[a, "lr"] == pytest.approx(2e-3) and by_run.loc[a, "seed"] == 2
    assert by_run.loc[d, "lr"] == pytest.approx(1e-3)
    assert by_run.loc[b, "lr"] is None and by_run.loc[b, "seed"] is None          # K=48, cuda_graphs on
    assert by_run.loc[c, "K"] is None and by_run.loc[c, "seed"] == 1               # standard prior: no K

    # summary.md is a markdown table that keeps the values as printed.
    md = Path(tracking.client(uri).download_artifacts(parent.run_id, "summary.md", str(tmp_path))).read_text()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert md.startswith("# Sweep choices-20260101-000000: 4 trial(s)")
    assert rows[1].startswith("|:") and len(rows) == 2 + 4
    assert "| 2e-3 " in rows[2] and "-100.00" in rows[2] and "-50.00 (latest)" in rows[5]
    csv = Path(mlflow.MlflowClient(uri).download_artifacts(parent.run_id, "summary.csv", str(tmp_path))).read_text()
    assert csv.splitlines()[1].startswith(f"vamp K=13,{a},FINISHED,completed,4,3,-100.0,best_epoch,vamp,13,")


def test_typed_params_follow_the_trial_config_fields():
    params = {k: str(v) for k, v in TrainConfig(K=13, lr=2e-3, cuda_graphs=False).to_dict().items()}
    typed = typed_params({**params, "spec_file": "x.yaml"})
    assert typed["K"] == 13 and typed["lr"] == 2e-3 and typed["cuda_graphs"] is False
    assert typed["train_subset"] is None and typed["prior"] == "vamp" and typed["spec_file"] == "x.yaml"


def test_a_near_tie_is_chosen_on_the_exact_validation_elbo_not_on_the_order_mlflow_lists_runs(tmp_path):
    """Two trials 0.003 nats apart at their tested epochs, stored as the trainable stores its final
    figures: the better one is chosen whichever MLflow lists first (it lists the newest first)."""
    from trainables.vae_trainable import stored_finals

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = conditional_spec()
    experiment_id = tracking.ensure_experiment(uri, "ties")
    parent = tracking.RunHandle(uri, tracking.client(uri).create_run(
        experiment_id, run_name="ties-20260101-000000", tags={"sweeper.role": "sweep"}).info.run_id)
    stored = {v: stored_finals({"best_val_elbo": v})["best_val_elbo"] for v in (-100.001, -100.004)}
    better = add_trial(uri, experiment_id, parent.run_id, "vamp K=13", {"prior": "vamp", "K": 13, "lr": 2e-3},
                       [-120, -100.001], best_epoch=2, best_val_elbo=stored[-100.001], test_ll=-95.0,
                       status="FINISHED")
    worse = add_trial(uri, experiment_id, parent.run_id, "vamp K=48", {"prior": "vamp", "K": 48},
                      [-120, -100.004], best_epoch=2, best_val_elbo=stored[-100.004], test_ll=-90.0,
                      status="FINISHED")
    assert [r.info.run_id for r in tracking.child_runs(uri, experiment_id, parent.run_id)][0] == worse
    table = summarize(spec, uri, experiment_id, parent, lambda line: None)
    assert list(table["run_id"]) == [better, worse]
    assert tracking.client(uri).get_run(parent.run_id).data.tags["best_run_id"] == better


def test_a_sweep_is_not_done_until_every_trial_of_its_spec_is_accounted_for(tmp_path):
    """What the driver checks after Tune's run: as many trials as the spec asks for, one MLflow run
    per trial that did not error, no finished Optuna trial outside the sweep. Each kind of loss
    (the truncated resume seen in a chaos run: 1 of 12 trials, an Optuna trial MLflow never saw)
    is named; a sweep where all three agree has nothing to say."""
    from types import SimpleNamespace

    import optuna

    from sweeper.run import SweepPlan, unaccounted_trials
    from sweeper.search import USER_ATTR_TUNE_TRIAL, study_storage_url

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec({**yaml.safe_load(QUICKSTART.read_text()), "num_samples": 3})
    plan = SweepPlan("quickstart-20260101-000000", str(tmp_path / "sweeps"), tmp_path, uri)
    experiment_id = tracking.ensure_experiment(uri, "accounting")
    parent = tracking.client(uri).create_run(experiment_id, tags={"sweeper.role": "sweep"}).info.run_id
    study = optuna.create_study(study_name=spec.name, storage=study_storage_url(tmp_path), direction="maximize")

    def result(trial_id: str, error=None):
        return SimpleNamespace(metrics={"trial_id": trial_id}, error=error, path=f"/x/trial_{trial_id}")

    def add(trial_id: str) -> None:
        add_trial(uri, experiment_id, parent, trial_id, {"prior": "vamp"}, [-100.0], best_epoch=1,
                  best_val_elbo=-100.0, test_ll=-95.0, status="FINISHED")
        t = study.ask()
        t.set_user_attr(USER_ATTR_TUNE_TRIAL, trial_id)
        study.tell(t, -100.0)

    add("a")
    add("b")
    results = [result("a"), result("b")]
    problems = unaccounted_trials(results, spec, plan, experiment_id, parent)
    assert problems == ["the sweep ended with 2 of the 3 trial(s) its spec asks for: Tune's saved state had lost "
                        "some (resume it again; the missing ones then run)"]
    results.append(result("c"))                              # ran in Tune, no MLflow run
    assert unaccounted_trials(results, spec, plan, experiment_id, parent) == [
        "trial_c has 0 MLflow run(s), not one"]
    results[-1] = result("c", error=RuntimeError("died in setup"))    # an error is listed as an error, not here
    assert unaccounted_trials(results, spec, plan, experiment_id, parent) == []
    # An errored trial that never reported, retried in another trial's reused actor: Tune fills its
    # metrics from that actor, with the other trial's id (seen in CI). Its folder names it.
    results[-1] = SimpleNamespace(metrics={"trial_id": "a"}, error=RuntimeError("died in reset"), path="/x/trial_c")
    assert unaccounted_trials(results, spec, plan, experiment_id, parent) == []
    stray = study.ask()
    stray.set_user_attr(USER_ATTR_TUNE_TRIAL, "zz")
    study.tell(stray, -90.0)
    assert unaccounted_trials(results, spec, plan, experiment_id, parent) == [
        f"Optuna trial #{stray.number} is COMPLETE but belongs to no trial of the sweep"]


def test_a_ctrl_c_says_which_runs_it_closed_training_trials_and_stopped_ones_being_tested(tmp_path):
    """It said "9 running trial run(s) closed as KILLED" for trials that had finished training
    and were being tested."""
    import json

    from sweeper.errors import SweepInterrupted
    from sweeper.run import STATE_FILE, Interrupts, SweepDriver, SweepPlan

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec(yaml.safe_load(QUICKSTART.read_text()))
    plan = SweepPlan("quickstart-20260101-000000", str(tmp_path / "sweeps"), tmp_path, uri)
    experiment_id = tracking.ensure_experiment(uri, "ctrl-c")
    parent = tracking.RunHandle(uri, tracking.client(uri).create_run(experiment_id).info.run_id)
    (tmp_path / STATE_FILE).write_text(json.dumps({"parent_run_id": parent.run_id}))
    runs = {}
    for name, tags in (("training", {}), ("testing", {"stop_reason": "scheduler"}), ("done", {"stop_reason": "completed"})):
        runs[name] = tracking.open_trial_run(uri, experiment_id, parent.run_id, trial_id=name, trial_name=name,
                                             params={}, sweep_name="s")
        runs[name].set_tags(tags)
    runs["done"].terminate("FINISHED")
    driver = SweepDriver(spec, tmp_path / "quickstart.yaml", (), plan, False, print, Interrupts(print), "sweeper run X --resume")
    driver.experiment_id, driver.parent = experiment_id, parent
    with pytest.raises(SweepInterrupted) as interrupted:
        driver.interrupted()
    assert ("the runs of 1 training trial(s) and 1 stopped trial(s) whose test evaluation was cut short (--resume "
            "tests them) are closed as KILLED; finished trials are kept") in str(interrupted.value)
    client = tracking.client(uri)
    assert [client.get_run(runs[n].run_id).info.status for n in ("training", "testing", "done")] == [
        "KILLED", "KILLED", "FINISHED"]
    assert client.get_run(parent.run_id).info.status == "KILLED"


def test_a_results_trial_id_comes_from_its_folder_not_from_metrics_another_actor_filled():
    from types import SimpleNamespace

    from sweeper.callbacks import trial_id_of, trial_name

    trial = SimpleNamespace(trial_id="971f5_00000")
    for path in (f"/tmp/sweeps/s/{trial_name(trial)}", f"s3://bucket/sweeps/s/{trial_name(trial)}"):
        result = SimpleNamespace(path=path, metrics={"trial_id": "971f5_00001"})     # a reused actor's id
        assert trial_id_of(result) == "971f5_00000", path
    assert trial_id_of(SimpleNamespace(path=None, metrics={"trial_id": "x1"})) == "x1"   # no folder: the metrics
    assert trial_id_of(SimpleNamespace(path=None, metrics={})) is None
