"""What a sweep's end must look like after interrupts, kills and resumes: MLflow, Optuna and
Tune agree trial by trial, nothing lost and nothing doubled (used by the interrupt, start-up and
chaos tests)."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import optuna
import pytest
from ray.tune import ExperimentAnalysis


def records(root: Path, experiment: str):
    """(client, parent runs, trial runs) of `experiment` in the sqlite store under `root`."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"]
    return client, parents, trials


def study(root: Path, name: str) -> optuna.Study:
    db = next((root / "sweeps").glob(f"{name}-*/optuna.db"))
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def check_agreement(root: Path, *, name: str, experiment: str, trials: int) -> list[tuple[str, str, str]]:
    """After the sweep's end: one FINISHED parent; exactly `trials` trial runs that are not
    orphans, each FINISHED with a test LL and every epoch once; the same trials in Tune's state;
    each trial's Optuna trial told how it ended (COMPLETE with its value, or PRUNED with one value
    per epoch); orphans' study trials FAIL; every study trial finished. Returns (trial, stop
    reason, study state) per trial."""
    client, parents, runs_all = records(root, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    runs = [r for r in runs_all if "sweeper.orphaned" not in r.data.tags]
    ids = [r.data.tags["sweeper.trial_id"] for r in runs]
    assert len(ids) == trials and len(set(ids)) == trials, ids      # one run per Tune trial
    # The trials of Tune's saved experiment state. A trial that started after Tune's last save
    # before a SIGKILL is one Tune no longer knows of: its run (if it opened one) is an orphan,
    # closed as KILLED. (Its folder may or may not exist: Tune creates it when it first writes
    # there, and a SIGKILL right after the trial's first epoch left none.)
    experiment_dir = next((root / "sweeps").glob(f"{name}-*[0-9]"))
    tune_ids = {t.trial_id for t in ExperimentAnalysis(str(experiment_dir)).trials}
    assert set(ids) == tune_ids
    orphans = [r for r in runs_all if "sweeper.orphaned" in r.data.tags]
    assert not {r.data.tags["sweeper.trial_id"] for r in orphans} & tune_ids
    assert all(r.info.status == "KILLED" for r in orphans), [r.info.status for r in orphans]
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study(root, name).trials}
    table = []
    for run in runs:
        reason = run.data.tags["stop_reason"]
        t = by_tune[run.data.tags["sweeper.trial_id"]]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "val_elbo")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, int(run.data.metrics["epoch"]) + 1))   # every epoch once
        assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["test_ll"])
        if reason in ("completed", "early_stopping"):
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.value == pytest.approx(run.data.metrics["val_elbo"])
        else:
            assert reason == "scheduler" and t.state == optuna.trial.TrialState.PRUNED
            # One intermediate value per epoch trained, those after a resume included.
            assert sorted(t.intermediate_values) == steps
            values = {m.step: m.value for m in history}
            assert all(v == pytest.approx(values[s]) for s, v in t.intermediate_values.items())
        table.append((run.data.tags["sweeper.trial_id"], reason, t.state.name))
    linked = {r.data.tags["sweeper.trial_id"] for r in runs}
    for t in study(root, name).trials:
        assert t.state.is_finished(), (t.number, t.state)
        if t.state != optuna.trial.TrialState.FAIL:      # Optuna = MLflow: no finished trial without its run
            assert t.user_attrs.get("tune_trial_id") in linked, (t.number, t.state, t.user_attrs)
    return table
