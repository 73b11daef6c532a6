"""Audit trials in one real small sweep (local Ray, MLflow sqlite, Optuna, ASHA): the trials the
spec's seed picks run to their end even below a rung's cut-off, their MLflow runs and Optuna
trials are marked, and the sweep's parent run has the rung fidelity (metrics, rung_fidelity.md
and .json)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from sweeper.fidelity import TAG_AUDIT, TAG_AUDIT_WOULD_STOP
from sweeper.run import run_sweep
from sweeper.search import audit_plan

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
SEED = 10     # with it Optuna draws lr 3e-3, 1e-7, 3e-3, 1e-7, 3e-3, 1e-7 and the audit trials are the first three

pytestmark = pytest.mark.slow


def audit_spec(tmp_path: Path) -> Path:
    """Six trials one after the other, 4 epochs each, rungs at epochs 1 and 2; three audit trials.
    A 1e-7 trial trails every 3e-3 trial at epoch 1: ASHA stops it there unless it is an audit trial."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="audit", experiment="audit", num_samples=6, max_concurrent=1,
                search={"algorithm": "optuna", "sampler": "tpe", "seed": SEED},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "audit": 3})
    spec["trial"].update(prior="standard", max_epochs=4, warmup=1, train_subset=1000, val_subset=100,
                         test_subset=50, test_samples=10, image_every=0)
    spec["parameters"] = {"lr": {"distribution": "choice", "values": [3.0e-3, 1.0e-7]}}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_audit_trials_run_to_their_end_and_the_sweep_measures_its_rungs(tmp_path, shared_datasets, monkeypatch):
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    lines: list[str] = []
    outcome = run_sweep(audit_spec(tmp_path), workdir=tmp_path, echo=lines.append)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    trials = sorted((r for r in client.search_runs([outcome.experiment_id], max_results=100)
                     if r.data.tags.get("sweeper.role") == "trial"), key=lambda r: r.info.start_time)
    assert len(trials) == 6
    # The audit trials are the ones the seed picks, by the order the trials started (one at a time).
    plan = audit_plan(6, 3, SEED)
    assert [r.data.tags.get(TAG_AUDIT) == "true" for r in trials] == [i in plan for i in range(6)]
    audit = [r for r in trials if r.data.tags.get(TAG_AUDIT) == "true"]
    others = [r for r in trials if TAG_AUDIT not in r.data.tags]
    # Every audit trial trained to its end, the one ASHA would have stopped included.
    for run in audit:
        assert run.data.tags["stop_reason"] == "completed" and run.data.metrics["epoch"] == 4, run.data.tags
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_elbo")] == [1, 2, 3, 4]
    would_stop = [r for r in audit if TAG_AUDIT_WOULD_STOP in r.data.tags]
    assert would_stop and all(r.data.tags[TAG_AUDIT_WOULD_STOP] == "1" for r in would_stop)
    assert all(float(r.data.params["lr"]) == 1.0e-7 for r in would_stop)
    # ... while ordinary trials like it were stopped at the first rung.
    stopped = [r for r in others if r.data.tags["stop_reason"] == "scheduler"]
    assert stopped and all(r.data.metrics["epoch"] < 4 for r in stopped)
    assert any(float(r.data.params["lr"]) == 1.0e-7 and r.data.metrics["epoch"] == 1 for r in stopped)

    # Optuna: the audit trials say so, and ended COMPLETE; the stopped ones PRUNED.
    study = optuna.load_study(study_name="audit", storage=f"sqlite:///{next((tmp_path / 'sweeps').glob('audit-*/optuna.db'))}")
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    for run in audit:
        t = by_tune[run.data.tags["sweeper.trial_id"]]
        assert t.user_attrs.get("audit") is True and t.state == optuna.trial.TrialState.COMPLETE
        if run in would_stop:
            assert t.user_attrs.get("audit_would_stop") == 1
    for run in stopped:
        t = by_tune[run.data.tags["sweeper.trial_id"]]
        assert "audit" not in t.user_attrs and t.state == optuna.trial.TrialState.PRUNED

    # The parent run: the rung fidelity of the sweep, from its three audit trials.
    m = parent.data.metrics
    assert m["audit_trials"] == 3 and m["audit_would_stop"] == len(would_stop)
    assert m["rung_fidelity_n_at_1"] == 3 and m["rung_fidelity_n_at_2"] == 3
    assert -1.0 <= m["rung_fidelity_val_at_1"] <= 1.0 and -1.0 <= m["rung_fidelity_test_at_1"] <= 1.0
    assert m["stopped_compared_with_winner"] == len(stopped)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"rung_fidelity.md", "rung_fidelity.json"} <= artifacts
    saved = json.loads(Path(client.download_artifacts(parent.info.run_id, "rung_fidelity.json", str(tmp_path))).read_text())
    assert saved["audit"] == 3 and [r["epoch"] for r in saved["rungs"]] == [1, 2]
    best = client.get_run(parent.data.tags["best_run_id"])
    assert saved["winner"] == f"{parent.data.tags['best_trial']} (trial_{best.data.tags['sweeper.trial_id']})"
    console = "\n".join(lines)
    assert "rung fidelity (3 audit trial(s)" in console and "  epoch 1: " in console
