"""The driver around one real small sweep (local Ray, MLflow sqlite, ASHA): a Ctrl-C before the
launch leaves no RUNNING parent (and a resumable sweep); a trial the scheduler stops is tested as
it stops, while the sweep runs, with the precision the spec asks (stored with it, marked in the
summary, raised to a full test LL by `sweeper evaluate`); the console carries what a user reads
and not Ray's or MLflow's housekeeping. (A failed evaluation: tests/test_evaluations.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from sweeper.cli import main
from sweeper.errors import SweepInterrupted
from sweeper.run import STATE_FILE, run_sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"

pytestmark = pytest.mark.slow


def two_trial_spec(tmp_path: Path) -> Path:
    """Three trials one after the other: lr 3e-3 reaches ASHA's rung at epoch 1 first and goes on
    to its end; lr 1e-6 is then below the rung's cut-off and is stopped by ASHA after epoch 1, and
    tested (an estimate: 20 of the 50 test images, S=10) while lr 2e-3, the last, trains."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="evalfail", experiment="evalfail", num_samples=1, max_concurrent=1,
                search={"algorithm": "random", "seed": 0},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                stopped_trials={"test_ll": "estimate", "samples": 10, "images": 20})
    spec["trial"].update(prior="standard", max_epochs=2, warmup=1, train_subset=1000, val_subset=100,
                         test_subset=50, test_samples=20, image_every=0)
    spec["parameters"] = {"lr": {"distribution": "grid", "values": [3.0e-3, 1.0e-6, 2.0e-3]}}
    path = tmp_path / "evalfail.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def runs(tmp_path: Path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evalfail")
    found = client.search_runs([exp.experiment_id], max_results=100)
    parents = sorted((r for r in found if r.data.tags.get("sweeper.role") == "sweep"), key=lambda r: r.info.start_time)
    return (client, parents,
            {float(r.data.params["lr"]): r for r in found if r.data.tags.get("sweeper.role") == "trial"})


def test_an_early_ctrl_c_and_stopped_trials_tested_as_they_stop(tmp_path, shared_datasets, monkeypatch,
                                                                        capfd):
    import ray

    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    path = two_trial_spec(tmp_path)

    # Ctrl-C after the parent run exists, before Tune launched anything: the parent is closed,
    # and the sweep stays resumable (--resume launches it again; tests/test_startup_faults.py).
    def ctrl_c_at_start(line: str) -> None:
        if line.startswith("sweep evalfail-"):
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted, match="Continue it with"):
        run_sweep(path, workdir=tmp_path, echo=ctrl_c_at_start)
    _, parents, _ = runs(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert len(list((tmp_path / "sweeps").glob(f"evalfail-*/{STATE_FILE}"))) == 1
    assert not ray.is_initialized()
    shutil.rmtree(tmp_path / "sweeps")     # the rest of this test starts sweeps anew and resumes the newest

    # A stopped trial is tested as it stops, while the sweep runs (an estimate, as the spec asks).
    lines: list[str] = []
    capfd.readouterr()
    outcome = run_sweep(path, workdir=tmp_path, echo=lines.append)
    console = "\n".join(lines) + "".join(capfd.readouterr())
    assert not any(line.startswith("evaluating ") for line in lines)     # nothing left for after Tune's run
    client, parents, trials = runs(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    good, stopped = trials[3.0e-3], trials[1.0e-6]
    assert stopped.data.tags["stop_reason"] == "scheduler" and stopped.info.status == "FINISHED"
    assert (stopped.data.metrics["test_images"], stopped.data.metrics["test_samples"]) == (20, 10)
    assert (good.data.metrics["test_images"], good.data.metrics["test_samples"]) == (50, 20)
    assert "an estimate on the first 20 test images" in stopped.data.tags["mlflow.note.content"]
    summary = outcome.summary.set_index("run_id")
    assert summary.loc[stopped.info.run_id, "test_images"] == 20
    assert " (estimate)" in console and "not comparable" in console
    assert all(r.info.status != "RUNNING" for r in [*parents, *trials.values()])

    # What the console shows, and what it no longer shows.
    assert "| Trial name" in console and "| scheduler " in console and "time left:" in console
    assert "time: " in console and "from the first estimate to the end of the sweep" in console
    for noise in ("Token authentication is enabled", "Creating initial MLflow database tables",
                  "Started a local Ray instance", "Result logdir", "| loc ", "192.0.2", "Total run time",
                  "Wrote the latest version", "Current best trial", "Trainable.setup took", "\x1b[0m\n"):
        assert noise not in console, noise
    assert not ray.is_initialized()

    # `sweeper evaluate` raises the estimate to a full test LL (all 50 images, S=20).
    result = CliRunner().invoke(main, ["evaluate", stopped.info.run_id, "--samples", "20", "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    assert "it is the run's test_ll now (it had an estimate)" in result.output
    metrics = client.get_run(stopped.info.run_id).data.metrics
    assert (metrics["test_images"], metrics["test_samples"]) == (50, 20)
    assert metrics["test_ll"] == round(metrics["test_ll_S20"], 2)
