"""A sweep killed, interrupted or failing in its start-up (after its parent run and sweep.json
exist, before Tune saved the experiment's state): `--resume` launches it again and finishes
every trial of the spec once, with MLflow, Optuna and Tune in agreement; a new sweep that failed
launching nothing is not what `--resume` continues. Real local Ray, MLflow (sqlite) and Optuna."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray import tune

import sweep_checks
from sweeper.errors import SweepInterrupted
from sweeper.run import STATE_FILE, run_sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
TRIALS = 4

pytestmark = pytest.mark.slow


def startup_spec(tmp_path: Path) -> Path:
    """4 short Optuna + ASHA trials, two at a time."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="startup", experiment="startup", num_samples=TRIALS, max_concurrent=2,
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    spec["trial"].update(max_epochs=2, warmup=1, train_subset=300, val_subset=100, test_subset=50,
                         test_samples=20, image_every=0)
    path = tmp_path / "startup.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# The driver as a process that dies at a point of its start-up with no handler or `finally`
# running, as under SIGKILL: before Tune wrote tuner.pkl, or after it and before Tune's run began.
DIE_IN_STARTUP = """
import os, sys
from ray import tune

def die(*args, **kwargs):
    os._exit(137)

if sys.argv[1] == "before_tuner_pkl":
    tune.Tuner.__init__ = die
else:
    tune.Tuner.fit = die
from sweeper.cli import main
sys.argv = ["sweeper", *sys.argv[2:]]
main()
"""


def test_a_sweep_killed_in_its_start_up_is_launched_again_by_resume(tmp_path, shared_datasets):
    """Killed before Tune wrote tuner.pkl; its `--resume` killed after tuner.pkl, before Tune's run
    began (a launch again that dies again); the next `--resume` finishes the sweep."""
    spec = startup_spec(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWEEPER_DATA_DIR": str(shared_datasets)}
    for moment, resume in (("before_tuner_pkl", []), ("after_tuner_pkl", ["--resume"])):
        launch = subprocess.Popen([sys.executable, "-c", DIE_IN_STARTUP, moment, "run", str(spec), *resume],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        output = launch.communicate(timeout=300)[0]
        try:
            os.killpg(launch.pid, signal.SIGKILL)     # the Ray it started dies with it, as in a crash
        except ProcessLookupError:
            pass
        assert launch.returncode == 137, output
        (sweep,) = (tmp_path / "sweeps").glob("startup-*[0-9]")
        assert (sweep / STATE_FILE).is_file()
        assert (sweep / "tuner.pkl").is_file() == (moment == "after_tuner_pkl")
        _, parents, _ = sweep_checks.records(tmp_path, "startup")
        assert [p.info.status for p in parents] == ["RUNNING"]

    last = subprocess.run([sys.executable, "-m", "sweeper.cli", "run", str(spec), "--resume"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "interrupted before Tune saved its state: launching it again" in last.stdout
    assert "Traceback" not in last.stdout + last.stderr
    sweep_checks.check_agreement(tmp_path, name="startup", experiment="startup", trials=TRIALS)


def test_a_ctrl_c_in_start_up_stays_resumable_and_a_failed_new_sweep_is_not_resumed(tmp_path, shared_datasets,
                                                                                     monkeypatch):
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    spec = startup_spec(tmp_path)
    fit = tune.Tuner.fit

    def ctrl_c(self):        # Ctrl-C after tuner.pkl, before Tune's run listens for it
        raise KeyboardInterrupt

    monkeypatch.setattr(tune.Tuner, "fit", ctrl_c)
    with pytest.raises(SweepInterrupted, match="--resume"):
        run_sweep(spec, workdir=tmp_path, echo=lambda line: None)
    (interrupted,) = (tmp_path / "sweeps").glob("startup-*[0-9]")

    def broken(self):        # a new sweep of the same spec that fails in its start-up
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(tune.Tuner, "fit", broken)
    with pytest.raises(RuntimeError, match="the cluster went away"):
        run_sweep(spec, workdir=tmp_path, echo=lambda line: None)
    failed = [p for p in (tmp_path / "sweeps").glob("startup-*[0-9]") if p != interrupted]
    assert len(failed) == 1 and not (failed[0] / STATE_FILE).exists()     # --resume will not pick it
    _, parents, _ = sweep_checks.records(tmp_path, "startup")
    status = {p.data.tags["sweeper.sweep"]: p.info.status for p in parents}
    assert status == {interrupted.name: "KILLED", failed[0].name: "FAILED"}
    failed[0].rename(tmp_path / "failed-sweep")      # out of the agreement check's way; it launched nothing

    monkeypatch.setattr(tune.Tuner, "fit", fit)
    lines: list[str] = []
    outcome = run_sweep(spec, workdir=tmp_path, resume=True, echo=lines.append)
    assert outcome.sweep_id == interrupted.name and len(outcome.summary) == TRIALS
    assert any("launching it again" in line for line in lines)
    client, parents, _ = sweep_checks.records(tmp_path, "startup")
    client.delete_run([p for p in parents if p.info.status == "FAILED"][0].info.run_id)
    sweep_checks.check_agreement(tmp_path, name="startup", experiment="startup", trials=TRIALS)
    assert json.loads((interrupted / STATE_FILE).read_text())["parent_run_id"] == outcome.parent_run_id
