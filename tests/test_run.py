"""Sweeps end to end: real Ray (local, 2 CPUs, capped object store), real MLflow sqlite, real Optuna."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from matplotlib.image import imread

from sweeper.cli import main
from sweeper.run import run_sweep
from trainables import tracking

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"

pytestmark = pytest.mark.slow

# The official files' sha256 (shared/datasets/SOURCES.md) in path order: test, train, valid.
STATIC_MNIST_DIGEST = __import__("hashlib").sha256(",".join([
    "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"]).encode()).hexdigest()[:32]


@pytest.fixture
def data_env(shared_datasets, monkeypatch):
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    return shared_datasets


def children(uri: str, experiment: str) -> tuple[list, list]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]


def test_quickstart_sweep_end_to_end(tmp_path, data_env):
    lines: list[str] = []
    outcome = run_sweep(QUICKSTART, ["trial.max_epochs=4", "num_samples=5"], workdir=tmp_path, echo=lines.append)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert outcome.tracking_uri == uri
    client = mlflow.MlflowClient(uri)
    # The UI opens the experiment on its runs table; the sweep ends by printing where to look.
    experiment = client.get_experiment_by_name("vampprior-quickstart")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    best = outcome.summary.iloc[0]["run_id"]
    urls = "\n".join(lines)
    for run_id in (outcome.parent_run_id, best):
        assert (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run_id}"
                "?workflowType=machine_learning") in urls
    # ... and the runs table, in the saved view the sweep stored: sorted on validation, never on test.
    assert (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
            "?workflowType=machine_learning&viewStateShareKey=sweeper") in urls
    view = json.loads(experiment.tags["mlflow.sharedViewState.sweeper"])
    state = json.loads(view["state"])
    assert view["name"] == "Sweep results" and state["orderByKey"] == "metrics.`best_val_elbo`"
    assert state["orderByAsc"] is False and state["runsExpanded"] == {outcome.parent_run_id: True}
    assert {"metrics.`test_ll`", "params.`K`", "params.`lr`"} <= set(state["selectedColumns"])
    parents, runs = children(uri, "vampprior-quickstart")
    assert len(parents) == 1 and parents[0].info.run_id == outcome.parent_run_id
    assert parents[0].info.status == "FINISHED"
    assert "best_test_ll" in parents[0].data.metrics
    # An ended, tested trial's checkpoints are gone (its weights are in MLflow): a finished sweep
    # leaves its store and Tune's records, not a checkpoint per trial.
    assert not list((tmp_path / "sweeps").rglob("checkpoint_*"))
    # The best trial is chosen on validation at each trial's tested epoch, not on test LL.
    tested = outcome.summary[outcome.summary["best_epoch"].notna()]
    assert list(tested["val_elbo"]) == sorted(tested["val_elbo"], reverse=True)
    assert parents[0].data.metrics["best_val_elbo"] == max(tested["val_elbo"])
    assert parents[0].data.tags["best_run_id"] == best
    assert {a.path for a in client.list_artifacts(outcome.parent_run_id)} >= {"spec", "summary.csv", "summary.md"}
    assert len(runs) == 5
    reasons = []
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["dataset"] == "static_mnist" and "lr" in run.data.params
        epochs = int(run.data.metrics["epoch"])
        history = client.get_metric_history(run.info.run_id, "val_elbo")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        assert math.isfinite(run.data.metrics["test_ll"]) and run.data.metrics["test_ll"] < 0
        assert run.data.metrics["test_ll"] >= run.data.metrics["test_elbo"] - 1.0   # IS >= ELBO (noise)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"reconstructions.png", "samples.png", "test_ll_histogram.png", "per_image_ll.csv"} <= artifacts
        # The run's name says what the trial is; the Tune trial id stays a tag.
        p = run.data.params
        K = f" K={int(p['K'])}" if p["prior"] == "vamp" else ""
        assert run.info.run_name.startswith(f"{p['prior']}{K} lr=") and run.data.tags["sweeper.trial_id"]
        assert "lr=0.00" not in run.info.run_name                    # rounded: lr=2.3e-3
        # Its dataset: name, our digest of the official file, split sizes, binarisation, subsets.
        (data_input,) = run.inputs.dataset_inputs
        assert data_input.dataset.name == "static_mnist" and data_input.dataset.digest == STATIC_MNIST_DIGEST
        profile = json.loads(data_input.dataset.profile)
        assert (profile["train"], profile["binarization"]) == (50000, "static")
        assert {t.key: t.value for t in data_input.tags}["train_subset"] == "2000"
        # Its best-validation weights, loadable with weights_only=True.
        model = client.get_logged_model(run.data.tags["sweeper.model_id"])
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/weights.pt",
                                                   dst_path=str(tmp_path / run.info.run_id))
        saved = torch.load(path, weights_only=True)
        assert saved["config"]["prior"] == p["prior"] and "q_z_net.0.linear.weight" in saved["state_dict"]
        if p["prior"] == "vamp":
            steps = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
            # pseudo-inputs at initialisation (step 0), every epoch (image_every: 1) to the last
            assert {int(s.split("+step+")[1].split("+")[0]) for s in steps} == set(range(0, epochs + 1))
            image = imread(next(Path(client.download_artifacts(run.info.run_id, s, str(tmp_path)))
                                for s in steps if "+step+0+" in s and s.endswith(".png")))
            assert image.shape[1] >= 500                              # enlarged to be read
        reasons.append(run.data.tags["stop_reason"])
    assert "scheduler" in reasons and set(reasons) <= {"scheduler", "completed"}
    # ASHA-stopped trials are PRUNED in the Optuna study kept in the sweep's folder.
    study_db = next((tmp_path / "sweeps").glob("quickstart-*/optuna.db"))
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{study_db}")
    states = [t.state for t in study.trials]
    assert len(states) == 5
    assert states.count(optuna.trial.TrialState.PRUNED) == reasons.count("scheduler")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.intermediate_values for t in pruned)
    # optuna-dashboard: the metric's name, and each study trial linked to its Tune trial and run.
    assert study.metric_names == ["val_elbo"]
    by_run = {r.info.run_id: r for r in runs}
    for t in study.trials:
        run = by_run[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["sweeper.trial_id"] == t.user_attrs["tune_trial_id"]

    # `sweeper evaluate` re-scores a trial from MLflow alone, under its own metric name.
    result = CliRunner().invoke(main, ["evaluate", best, "--samples", "300", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    rescored = client.get_run(best).data.metrics
    assert rescored["test_ll"] == pytest.approx(outcome.summary.iloc[0]["test_ll"])   # untouched
    assert abs(rescored["test_ll_S300"] - rescored["test_ll"]) < 3.0 and "test_ll_S300" in result.output
    # with its standard error, the per-image spread over sqrt(test images): the trial's own is close
    assert rescored["test_ll_S300_se"] == pytest.approx(rescored["test_ll_se"], rel=0.2)
    assert f"± {rescored['test_ll_S300_se']:.3f} (SE)" in result.output
    assert "Downloading artifacts" not in result.output          # MLflow's progress bars, for one file
    # The sweep's own run (the link `run` prints as "the sweep") is not a trial: which one to pick.
    result = CliRunner().invoke(main, ["evaluate", outcome.parent_run_id, "--tracking-uri", uri])
    assert result.exit_code == 1
    assert (f"is the sweep {outcome.sweep_id}'s own run, not a trial" in result.output
            and f"sweeper evaluate {best}" in result.output), result.output


def test_a_batched_sweep_pools_the_trials_and_each_stays_a_whole_trial(tmp_path, data_env):
    """resources.batched: the trials train as slots of one pool, yet each has its own run, ASHA
    decision, Optuna trial, checkpoints and test LL (of its last epoch, also when ASHA stopped it)."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="pooled", experiment="pooled", num_samples=5, max_concurrent=4,
                resources={"cpu": 0.5, "gpu": 0, "batched": True})
    spec["trial"].update(prior="vamp", max_epochs=4)
    spec["parameters"] = {"K": {"distribution": "int_log_uniform", "min": 5, "max": 50},
                          "lr": {"distribution": "log_uniform", "min": 3.0e-4, "max": 3.0e-3}}
    path = tmp_path / "pooled.yaml"
    path.write_text(yaml.safe_dump(spec))
    lines: list[str] = []
    outcome = run_sweep(path, workdir=tmp_path, echo=lines.append)
    assert any("batched model" in line for line in lines)
    client = mlflow.MlflowClient(outcome.tracking_uri)
    _, runs = children(outcome.tracking_uri, "pooled")
    assert len(runs) == 5
    pool_sizes, reasons = [], []
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("stop_detail")
        epochs = int(run.data.metrics["epoch"])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_elbo"))
        assert steps == list(range(1, epochs + 1))
        # The test LL is that of the trial's own last epoch, also for ASHA-stopped trials
        # (checkpointed at their end, then evaluated by the driver).
        (test_ll,) = client.get_metric_history(run.info.run_id, "test_ll")
        assert test_ll.step == epochs and math.isfinite(test_ll.value)
        pool_sizes += [m.value for m in client.get_metric_history(run.info.run_id, "pool_size")]
        assert any(a.path.startswith(tracking.image_artifact_prefix(tracking.IMAGE_PSEUDO_INPUTS, 1))
                   for a in client.list_artifacts(run.info.run_id, "images"))
        reasons.append(run.data.tags["stop_reason"])
    assert max(pool_sizes) >= 2          # trials really shared batched rounds
    assert "scheduler" in reasons and set(reasons) <= {"scheduler", "completed"}
    study_db = next((tmp_path / "sweeps").glob("pooled-*/optuna.db"))
    study = optuna.load_study(study_name="pooled", storage=f"sqlite:///{study_db}")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.PRUNED) == reasons.count("scheduler")


def test_a_nan_trial_ends_with_its_reason_and_the_sweep_finishes(tmp_path, data_env):
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="nan_check", experiment="nan-check", num_samples=1, max_concurrent=2,
                search={"algorithm": "random", "seed": 0}, scheduler={"type": "fifo"})
    spec["trial"].update(max_epochs=2, prior="standard")
    spec["parameters"] = {"lr": {"distribution": "grid", "values": [1.0e8, 1.0e-3]}}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(spec))
    outcome = run_sweep(path, workdir=tmp_path, echo=lambda s: None)
    _, runs = children(outcome.tracking_uri, "nan-check")
    by_lr = {float(r.data.params["lr"]): r for r in runs}
    assert set(by_lr) == {1.0e8, 1.0e-3}
    bad, good = by_lr[1.0e8], by_lr[1.0e-3]
    assert bad.data.tags["stop_reason"] == "nan" and bad.info.status == "FAILED"
    assert "learning rate" in bad.data.tags["stop_detail"]
    assert good.data.tags["stop_reason"] == "completed" and math.isfinite(good.data.metrics["test_ll"])
    assert outcome.summary is not None and len(outcome.summary) == 2


BAD_SPECS = {
    "unknown key": ({"trail": {}}, "trail: unknown key"),
    "wrong type": ({"num_samples": "many"}, "num_samples"),
    "min >= max": ({"parameters": {"lr": {"distribution": "log_uniform", "min": 1.0e-2, "max": 1.0e-3}}},
                   "parameters.lr"),
    "unknown dataset": ({"trial": {"dataset": "mnits"}}, "mnist"),
    "unknown prior": ({"parameters": {"prior": {"distribution": "choice", "values": ["vamp", "gauss"]}}},
                      "gauss"),
    "unknown model": ({"trial": {"model": "vae3"}}, "vae3"),
    "bad distribution": ({"parameters": {"lr": {"distribution": "lognormal", "min": 1, "max": 2}}},
                         "lognormal"),
    "bad metric mode": ({"metric": {"name": "val_elbo", "mode": "up"}}, "metric.mode"),
    "bad scheduler": ({"scheduler": {"type": "asha", "grace_period": 50, "reduction_factor": 2}}, "grace_period"),
    "negative resources": ({"resources": {"cpu": -1, "gpu": 0}}, "resources.cpu"),
    "unknown parameter": ({"parameters": {"learning_rate": {"distribution": "log_uniform", "min": 1.0e-4,
                                                             "max": 1.0e-3}}}, "learning_rate"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_invalid_specs_are_rejected_with_their_path_and_nothing_is_launched(case, tmp_path, monkeypatch):
    change, expected = BAD_SPECS[case]
    spec = yaml.safe_load(QUICKSTART.read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "parameters":
            spec[key] = {**spec[key], **value}
        elif key == "parameters":
            spec["parameters"] = {**spec["parameters"], **value}
        else:
            spec[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and expected in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweeps").exists()
    import ray

    assert not ray.is_initialized()


def test_a_trial_that_can_never_get_its_gpu_is_rejected_before_any_trial_starts(tmp_path, data_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), "--set", "resources.gpu=1"])
    assert result.exit_code == 2, result.output
    assert "resources.gpu" in result.output and "--set resources.gpu=0" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweeps").exists()


def test_validate_command(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0 and "ok" in result.output


def test_validate_takes_runs_spec_options_so_a_run_command_line_validates_as_it_is():
    result = CliRunner().invoke(main, ["validate", str(QUICKSTART), "--num-samples", "3", "--max-concurrent", "1"])
    assert result.exit_code == 0 and "(3 trial(s)" in result.output, result.output
    result = CliRunner().invoke(main, ["validate", str(QUICKSTART), "--num-samples", "0"])
    assert result.exit_code == 2 and "num_samples: 0" in result.output and "--num-samples 0" in result.output, result.output
