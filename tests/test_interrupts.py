"""Interrupts and failures with a real local Ray, MLflow (sqlite) and Optuna.

A `sweeper run` process gets Ctrl-C (SIGINT to its process group, as a terminal sends it) or
SIGKILL mid-sweep; after `--resume` to the end, MLflow, Optuna and Tune must agree trial by trial.
The driver's Ctrl-C handler (`sweeper.run.Interrupts`) is also tested on its own, at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner

import sweep_checks
from sweeper.cli import main
from sweeper.errors import SweepFailed
from sweeper.run import Interrupts, run_sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
EXPERIMENT = "interrupts"
# One Ctrl-C must end the sweep within this many seconds (the bound), trials mid-epoch
# or mid test-evaluation included.
CTRL_C_BOUND_S = 15.0


def interrupt_spec(tmp_path: Path) -> Path:
    """8 trials of prior x K x lr on small subsets, ASHA; S=5000 on 100 test images makes a
    trial's final evaluation last several seconds, so interrupts also land inside it."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="interrupts", experiment=EXPERIMENT, num_samples=8, max_concurrent=2,
                scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2})
    spec["trial"].update(max_epochs=8, warmup=2, train_subset=600, val_subset=200, test_subset=100,
                         test_samples=5000, image_every=0)
    path = tmp_path / "interrupts.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def records(tmp_path: Path):
    return sweep_checks.records(tmp_path, EXPERIMENT)


def study(tmp_path: Path) -> optuna.Study:
    return sweep_checks.study(tmp_path, "interrupts")


def start(tmp_path: Path, spec: Path, *extra: str, log: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "sweeper.cli", "run", str(spec), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = open(tmp_path / log, "w")
    # Its own process group: the signal reaches the driver and the Ray it started, as from a terminal.
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_epochs(proc: subprocess.Popen, tmp_path: Path, log: str, *, total: int, timeout: float = 300) -> None:
    """Until the sweep's trials have logged `total` epochs more than when it started."""
    def logged() -> int:
        try:
            _, _, trials = records(tmp_path)
        except Exception:
            return 0
        return sum(int(r.data.metrics.get("epoch", 0)) for r in trials)

    before = logged()
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / log).read_text()[-3000:]
        if logged() >= before + total:
            return
        time.sleep(1)
    pytest.fail(f"the sweep did not log {total} epochs within {timeout} s")


def ctrl_c(proc: subprocess.Popen, tmp_path: Path, log: str, *, twice: bool = False) -> float:
    """SIGINT to the process group (twice: a second one 0.5 s later); seconds until it exited."""
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    if twice:
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the sweep did not stop within 120 s of Ctrl-C:\n" + (tmp_path / log).read_text()[-3000:])
    return time.time() - t0


def check_interrupted(proc: subprocess.Popen, seconds: float, tmp_path: Path, log: str, spec: Path) -> None:
    output = (tmp_path / log).read_text()
    assert proc.returncode == 130, output[-3000:]
    assert seconds < CTRL_C_BOUND_S, f"Ctrl-C took {seconds:.1f} s"
    assert f"sweeper run {spec} --set trial.max_epochs=8 --resume" in output     # our command, with its --set
    assert "Tuner.restore" not in output and "Checkpoint successfully created" not in output
    assert "evaluating" not in output.split("Interrupted")[-1]     # no test LL after the interrupt
    _, parents, trials = records(tmp_path)
    assert parents[0].info.status == "KILLED"
    for run in trials:
        assert run.info.status != "RUNNING"                           # closed at once
        if "test_ll" not in run.data.metrics:
            continue
        # Only trials that ended (by themselves or by the scheduler) have a test LL.
        assert run.data.tags.get("stop_reason") in ("completed", "early_stopping", "scheduler"), run.data.tags
    # No study trial was told an outcome that has not happened: unfinished ones stay RUNNING.
    tags = {r.data.tags["sweeper.trial_id"]: r for r in trials}
    for t in study(tmp_path).trials:
        run = tags.get(t.user_attrs.get("tune_trial_id"))
        if t.state != optuna.trial.TrialState.RUNNING:
            assert run is not None and run.data.tags.get("stop_reason"), (t.number, t.state)


def check_agreement(tmp_path: Path) -> None:
    table = sweep_checks.check_agreement(tmp_path, name="interrupts", experiment=EXPERIMENT, trials=8)
    print("\nagreement:", table)


@pytest.mark.slow
def test_ctrl_c_twice_and_a_sigkill_then_resume_keeps_mlflow_optuna_and_tune_in_agreement(tmp_path, shared_datasets,
                                                                                         monkeypatch):
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    spec = interrupt_spec(tmp_path)
    first = start(tmp_path, spec, "--set", "trial.max_epochs=8", log="1.log")
    wait_for_epochs(first, tmp_path, "1.log", total=6)
    seconds = ctrl_c(first, tmp_path, "1.log")
    check_interrupted(first, seconds, tmp_path, "1.log", spec)
    print(f"\nfirst Ctrl-C: exit after {seconds:.1f} s")

    # Resume, then a double Ctrl-C: exits at once and still leaves a resumable sweep.
    second = start(tmp_path, spec, "--set", "trial.max_epochs=8", "--resume", log="2.log")
    wait_for_epochs(second, tmp_path, "2.log", total=8)
    seconds = ctrl_c(second, tmp_path, "2.log", twice=True)
    check_interrupted(second, seconds, tmp_path, "2.log", spec)
    print(f"double Ctrl-C: exit after {seconds:.1f} s")

    # Resume, then SIGKILL of the driver and its Ray (a crash).
    third = start(tmp_path, spec, "--set", "trial.max_epochs=8", "--resume", log="3.log")
    wait_for_epochs(third, tmp_path, "3.log", total=6)
    os.killpg(third.pid, signal.SIGKILL)
    third.wait()
    client, parents, before = records(tmp_path)
    assert any(r.info.status == "RUNNING" for r in before)      # the crash left them open
    # A trial that started after Tune's last save of the experiment state: its run and its study
    # trial exist, but the resumed sweep does not know it (Tune saves every few seconds). Made
    # here so that every run has one; test_chaos meets it when a kill happens to land there.
    lost = client.create_run(parents[0].info.experiment_id, run_name="trial_lost0000", tags={
        "mlflow.parentRunId": parents[0].info.run_id, "sweeper.role": "trial", "sweeper.trial_id": "lost0000"})
    client.log_param(lost.info.run_id, "dataset", "static_mnist")
    study(tmp_path).ask()

    last = subprocess.run([sys.executable, "-m", "sweeper.cli", "run", str(spec), "--set", "trial.max_epochs=8",
                           "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "Checkpoint successfully created" not in last.stdout + last.stderr
    assert "| Trial name" in last.stdout and "val_elbo" in last.stdout   # the same table as a fresh run
    assert "left RUNNING by the interrupted sweep as KILLED" in last.stdout
    assert "1 run(s) of trials the interrupted sweep lost are tagged sweeper.orphaned" in last.stdout, last.stdout[-3000:]
    check_agreement(tmp_path)
    client, parents, runs = records(tmp_path)
    orphans = [r for r in runs if "sweeper.orphaned" in r.data.tags]
    assert lost.info.run_id in [r.info.run_id for r in orphans]
    summary = Path(client.download_artifacts(parents[0].info.run_id, "summary.csv", str(tmp_path))).read_text()
    assert "trial_lost0000" not in summary and len(summary.strip().splitlines()) == 1 + 8


# --------------------------------------------------------------------------------------------
# Failures surface; what can be known is validated before anything starts


def test_a_bad_device_string_is_refused_by_validate_run_and_train_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in (["validate", str(QUICKSTART)], ["run", str(QUICKSTART)]):
        result = runner.invoke(main, args + ["--set", "trial.device=gpu0"])
        assert result.exit_code == 2, result.output
        assert "trial.device: 'gpu0' is not a device; use auto, cpu, cuda, cuda:N" in result.output
    result = runner.invoke(main, ["train", "--dataset", "frey_faces", "--device", "gpu0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'gpu0' is not a device" in result.output
    assert sorted(os.listdir(tmp_path)) == []        # no mlflow.db, no sweeps/: nothing was launched


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_request_on_a_machine_without_one_is_refused_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "run"):
        result = CliRunner().invoke(main, [command, str(QUICKSTART), "--set", "resources.gpu=1"])
        assert result.exit_code == 2, result.output
        assert "resources.gpu" in result.output and "no GPU" in result.output
    assert sorted(os.listdir(tmp_path)) == []


def test_missing_and_corrupt_datasets_are_caught_before_ray_starts(tmp_path, monkeypatch, shared_datasets):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(data))
    monkeypatch.setenv("SWEEPER_DATA_MIRROR", "http://127.0.0.1:9")   # nothing listens: offline
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runner = CliRunner()
    # Missing: validate names it and how it will be fetched; run tries to fetch it, before Ray.
    result = runner.invoke(main, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert "dataset static_mnist is not in" in result.output and "sweeper data fetch static_mnist" in result.output
    result = runner.invoke(main, ["run", str(QUICKSTART)])
    assert result.exit_code == 1 and "127.0.0.1:9" in result.output, result.output
    assert sorted(os.listdir(work)) == []
    assert not any(data.rglob("*.part")) and not any(p.is_file() for p in data.rglob("*"))
    # Corrupt: both refuse, with the file and the fix.
    folder = data / "MNIST_static"
    folder.mkdir(exist_ok=True)
    for name in os.listdir(shared_datasets / "MNIST_static"):
        shutil.copy(shared_datasets / "MNIST_static" / name, folder / name)
    broken = folder / "binarized_mnist_valid.amat.gz"
    broken.write_bytes(broken.read_bytes()[:1000])
    for command in ("validate", "run"):
        result = runner.invoke(main, [command, str(QUICKSTART)])
        assert result.exit_code != 0 and "binarized_mnist_valid" in result.output, result.output
        assert "delete it" in result.output or "corrupt" in result.output
    assert sorted(os.listdir(work)) == []


def test_sweeper_ui_on_a_busy_port_says_so_and_suggests_another(tmp_path, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 1
    assert f"port {port}" in result.output and f"--port {port + 1}" in result.output


@pytest.mark.slow
def test_errored_trials_are_listed_tagged_and_give_exit_1_while_the_others_finish(tmp_path, shared_datasets,
                                                                                  monkeypatch):
    """Frey Faces' file turns corrupt once the sweep has started: its trials error in setup (after
    their retries), the Caltech trials finish; the sweep lists each error and exits 1."""
    data = tmp_path / "data"
    for folder in ("Freyfaces", "Caltech101Silhouettes"):
        shutil.copytree(shared_datasets / folder, data / folder)
        for f in (data / folder).iterdir():
            f.chmod(0o644)
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(data))
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="failing", experiment="failing", num_samples=1, max_concurrent=2, max_failures=1,
                search={"algorithm": "random", "seed": 0}, scheduler={"type": "fifo"})
    spec["trial"].update(prior="standard", max_epochs=2, warmup=1, train_subset=300, val_subset=100,
                         test_subset=50, test_samples=20)
    spec["trial"].pop("dataset")
    spec["parameters"] = {"dataset": {"distribution": "grid", "values": ["frey_faces", "caltech101"]}}
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(spec))
    frey = data / "Freyfaces" / "frey_rawface.mat"

    def echo(line: str) -> None:
        if line.startswith("sweep failing-"):       # validated and started: now the file breaks
            frey.write_bytes(frey.read_bytes()[:5000])

    with pytest.raises(SweepFailed) as failed:
        run_sweep(path, workdir=tmp_path, echo=echo)
    message = str(failed.value)
    assert failed.value.exit_code == 1
    assert "1 trial(s) of sweep failing-" in message and "ended with an error" in message
    assert "DataError" in message and "frey_rawface.mat" in message and "error.txt" in message
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("failing")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweeper.role") == "sweep")
    assert parent.info.status == "FAILED" and "1 trial(s) ended with an error" in parent.data.tags["sweeper.errors"]
    trials = {r.data.params["dataset"]: r for r in runs if r.data.tags.get("sweeper.role") == "trial"}
    assert set(trials) == {"frey_faces", "caltech101"}           # the errored trial has its run too
    assert trials["frey_faces"].info.status == "FAILED" and trials["frey_faces"].data.tags["stop_reason"] == "error"
    assert "sweeper.orphaned" not in trials["frey_faces"].data.tags     # Tune knows it: not lost
    assert "DataError" in trials["frey_faces"].data.tags["stop_detail"]
    assert trials["caltech101"].info.status == "FINISHED" and "test_ll" in trials["caltech101"].data.metrics
    # The report lists the errored trial in its notes.
    from sweeper.report import make_report

    notes = "\n".join(make_report("failing", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "r").notes)
    assert "ended with an error" in notes and "DataError" in notes


# --- the driver's Ctrl-C handler on its own (fast) ---

def test_ctrl_c_before_tune_listens_raises_instead_of_killing_the_driver(monkeypatch) -> None:
    sent = []
    monkeypatch.setattr("os.kill", lambda pid, sig: sent.append(sig))
    lines: list[str] = []
    with Interrupts(lines.append) as interrupts:
        interrupts.in_fit = True
        monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)    # Tune's run not set up yet
        with pytest.raises(KeyboardInterrupt):
            interrupts._handle(signal.SIGINT, None)
        assert sent == []
    monkeypatch.setattr(signal, "getsignal", lambda sig: (lambda *a: None))      # Tune listens now
    with Interrupts(lines.append) as interrupts:
        interrupts.in_fit = True
        interrupts._handle(signal.SIGINT, None)                                  # the first: Tune stops
        assert sent == [signal.SIGUSR1] and "Ctrl-C again" in lines[-1]
        with pytest.raises(KeyboardInterrupt):
            interrupts._handle(signal.SIGINT, None)                              # the second: at once


def test_a_ctrl_c_while_the_driver_closes_never_interrupts_the_cleanup() -> None:
    """Real SIGINTs to this process: the one that interrupts raises; later ones (the user pressing
    Ctrl-C again while runs are closed and Ray shuts down) only say so, and the cleanup runs whole.
    A KeyboardInterrupt inside ray.shutdown() made the driver exit 1 instead of 130."""
    lines: list[str] = []
    cleaned: list[str] = []
    before = signal.getsignal(signal.SIGINT)     # SIG_IGN under nohup (CI), else Python's default
    with Interrupts(lines.append) as interrupts:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)          # not in Tune's run: raises at once
        assert interrupts.closing
        try:
            for step in ("close runs", "ray.shutdown"):
                signal.raise_signal(signal.SIGINT)      # again, and again: ignored while closing
                cleaned.append(step)
        except KeyboardInterrupt:
            pytest.fail("a Ctrl-C interrupted the cleanup")
    assert cleaned == ["close runs", "ray.shutdown"] and interrupts.count == 3
    assert sum("still closing" in line for line in lines) == 2
    assert signal.getsignal(signal.SIGINT) is before                          # restored on exit


def test_after_tunes_graceful_stop_the_driver_closes_and_ignores_more_ctrl_c(monkeypatch) -> None:
    monkeypatch.setattr("os.kill", lambda pid, sig: None)
    monkeypatch.setattr(signal, "getsignal", lambda sig: (lambda *a: None))      # Tune listens
    with Interrupts(lambda line: None) as interrupts:
        interrupts.in_fit = True
        interrupts._handle(signal.SIGINT, None)          # the first: Tune stops gracefully
        assert not interrupts.closing
        interrupts.in_fit = False
        interrupts.close()                                # what _run does once Tune's run returned
        interrupts._handle(signal.SIGINT, None)          # the second lands in the cleanup: no raise
    assert interrupts.count == 2


class _Finalized:
    """An object whose finalizer runs when a Ctrl-C lands (as SQLAlchemy's weakref callbacks do)."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_swallowed_by_a_finalizer_before_tunes_run_still_interrupts(monkeypatch) -> None:
    """A KeyboardInterrupt raised inside a finalizer is lost ("Exception ignored"): the chaos test
    caught a Ctrl-C in the start-up that the driver printed nothing for and ran the sweep to its end."""
    from types import SimpleNamespace

    from sweeper.run import SweepDriver

    fitted = []
    hooked = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: hooked.append(u.exc_type))
    with Interrupts(lambda line: None) as interrupts:
        _Finalized()                                   # freed at once: the signal lands in __del__
        assert interrupts.missed and interrupts.closing
        with pytest.raises(KeyboardInterrupt):         # before Tune's run: raised again, nothing runs
            SweepDriver.fit(SimpleNamespace(interrupts=interrupts), SimpleNamespace(fit=lambda: fitted.append(1)))
    assert fitted == [] and hooked == []               # our own, handled: no "Exception ignored" traceback
    assert sys.unraisablehook is not None and sys.unraisablehook.__name__ == "<lambda>"   # restored


def test_a_ctrl_c_swallowed_inside_tunes_start_up_stops_the_sweep_at_its_first_step(monkeypatch) -> None:
    from sweeper.run import MissedInterrupt

    sent = []
    monkeypatch.setattr("os.kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)    # Tune's run not set up yet
    lines: list[str] = []
    with Interrupts(lines.append) as interrupts:
        interrupts.in_fit = True
        _Finalized()                                   # raised in a finalizer, lost
        assert interrupts.missed and sent == []
        monkeypatch.setattr(signal, "getsignal", lambda sig: (lambda *a: None))   # Tune listens now
        MissedInterrupt().on_step_begin(0, [])          # Tune's loop: its graceful stop, as a first Ctrl-C
        assert sent == [signal.SIGUSR1] and "Ctrl-C again" in lines[-1]
        assert not interrupts.closing and interrupts.interrupted
        MissedInterrupt().on_step_begin(1, [])          # once only
        assert sent == [signal.SIGUSR1]
        with pytest.raises(KeyboardInterrupt):
            interrupts._handle(signal.SIGINT, None)     # a second Ctrl-C exits at once
