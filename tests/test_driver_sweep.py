"""The driver around one real small sweep (local Ray, MLflow sqlite, ASHA): a Ctrl-C before the
launch leaves no RUNNING parent (and a resumable sweep), a stopped trial whose test evaluation fails is closed and listed
in the sweep's errors (and evaluated again by --resume), and the console carries what a user
reads and not Ray's or MLflow's housekeeping."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from sweeper.errors import SweepFailed, SweepInterrupted
from sweeper.run import STATE_FILE, run_sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"

pytestmark = pytest.mark.slow


def two_trial_spec(tmp_path: Path) -> Path:
    """Two trials one after the other: lr 3e-3 reaches ASHA's rung at epoch 1 first and goes on
    to its end; lr 1e-6 is then below the rung's cut-off and is stopped by ASHA after epoch 1."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="evalfail", experiment="evalfail", num_samples=1, max_concurrent=1,
                search={"algorithm": "random", "seed": 0},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    spec["trial"].update(prior="standard", max_epochs=2, warmup=1, train_subset=1000, val_subset=100,
                         test_subset=50, test_samples=20, image_every=0)
    spec["parameters"] = {"lr": {"distribution": "grid", "values": [3.0e-3, 1.0e-6]}}
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


def test_a_failed_evaluation_and_an_early_ctrl_c_leave_nothing_running(tmp_path, shared_datasets, monkeypatch,
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

    # The stopped trial's checkpoints break just before its test evaluation.
    saved = tmp_path / "saved"
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("evaluating 1 trial(s) stopped by the scheduler"):
            for f in (tmp_path / "sweeps").rglob("trainer.pt"):
                relative = f.relative_to(tmp_path / "sweeps")
                (saved / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, saved / relative)
                f.write_bytes(b"not a checkpoint")

    capfd.readouterr()
    with pytest.raises(SweepFailed) as failed:
        run_sweep(path, workdir=tmp_path, echo=echo)
    message = str(failed.value)
    console = "\n".join(lines) + "".join(capfd.readouterr())
    assert "its test evaluation failed" in message and "evaluation_error.txt" in message
    assert "--resume` evaluates the trial(s) whose test evaluation failed again" in message
    client, parents, trials = runs(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED", "FAILED"]
    assert "its test evaluation failed" in parents[1].data.tags["sweeper.errors"]
    good, stopped = trials[3.0e-3], trials[1.0e-6]
    assert good.info.status == "FINISHED" and "test_ll" in good.data.metrics
    assert stopped.info.status == "FAILED" and stopped.data.tags["stop_reason"] == "error"
    assert "stopped by the scheduler after epoch 1; its test evaluation failed" in stopped.data.tags["stop_detail"]
    assert "evaluation_error.txt" in {a.path for a in client.list_artifacts(stopped.info.run_id)}
    assert all(r.info.status != "RUNNING" for r in [*parents, *trials.values()])

    # What the console shows, and what it no longer shows.
    assert "| Trial name" in console and "| scheduler " in console and "time left:" in console
    assert "time: " in console and "from the first estimate to the end of the sweep" in console
    for noise in ("Token authentication is enabled", "Creating initial MLflow database tables",
                  "Started a local Ray instance", "Result logdir", "| loc ", "192.0.2", "Total run time",
                  "Wrote the latest version", "Current best trial", "\x1b[0m\n"):
        assert noise not in console, noise
    assert not ray.is_initialized()

    # Fixed (the checkpoints are back): --resume evaluates the stopped trial again, and the sweep ends well.
    for f in saved.rglob("trainer.pt"):
        shutil.copy(f, tmp_path / "sweeps" / f.relative_to(saved))
    outcome = run_sweep(path, workdir=tmp_path, resume=True, echo=lambda line: None)
    _, parents, trials = runs(tmp_path)
    stopped = trials[1.0e-6]
    assert stopped.info.status == "FINISHED" and stopped.data.tags["stop_reason"] == "scheduler"
    assert "sweeper.evaluation_failed" not in stopped.data.tags and "test_ll" in stopped.data.metrics
    assert parents[1].info.status == "FINISHED" and len(outcome.summary) == 2
