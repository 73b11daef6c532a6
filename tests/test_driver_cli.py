"""The driver before and around a sweep, without running one: --resume finds exactly its own
sweeps and refuses a changed spec, a dead tracking server fails in seconds before Ray starts,
`sweeper evaluate` and `sweeper ui` leave no empty database behind, the time left counts what a
sweep really spends, and the console's table shows what a user reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from sweeper import tracking
from sweeper.callbacks import SweepReporter, TimeLeftCallback
from sweeper.cli import main
from sweeper.errors import SweeperError
from sweeper.run import STATE_FILE, plan_sweep, resolved_spec, resume_command
from sweeper.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_continues_only_sweeps_of_exactly_this_spec(tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    spec = parse_spec({**data, "name": "quick"})
    sweeps = tmp_path / "sweeps"
    # Another spec's sweep (`quick-gpu`), newer by name, and a folder that only looks like one.
    for name in ("quick-20240101-000000", "quick-gpu-20250101-000000", "quick-x"):
        (sweeps / name).mkdir(parents=True)
        (sweeps / name / STATE_FILE).write_text(json.dumps({"tracking_uri": "sqlite:////x.db",
                                                            "storage": str(sweeps)}))
    plan = plan_sweep(spec, storage_path=None, tracking_uri=None, resume=True, workdir=tmp_path)
    assert plan.sweep_id == "quick-20240101-000000"
    with pytest.raises(Exception, match="no earlier sweep of spec 'quick-gpu2'"):
        plan_sweep(parse_spec({**data, "name": "quick-gpu2"}), storage_path=None, tracking_uri=None, resume=True,
                   workdir=tmp_path)


def test_resume_with_another_tracking_uri_is_refused_naming_both_stores(tmp_path):
    """The sweep's parent run, trial runs and their histories are in the store it started with."""
    spec = parse_spec({**yaml.safe_load(QUICKSTART.read_text()), "name": "quick"})
    sweep = tmp_path / "sweeps" / "quick-20240101-000000"
    sweep.mkdir(parents=True)
    (sweep / STATE_FILE).write_text(json.dumps({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                "storage": str(tmp_path / "sweeps")}))
    with pytest.raises(SweeperError, match=r"logs to MLflow at sqlite:///.*mlflow\.db, not at --tracking-uri "
                                           r"http://127\.0\.0\.1:5000.*leave --tracking-uri out"):
        plan_sweep(spec, storage_path=None, tracking_uri="http://127.0.0.1:5000", resume=True, workdir=tmp_path)
    for same in ("sqlite:///mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}", None):   # relative: the same file
        plan = plan_sweep(spec, storage_path=None, tracking_uri=same, resume=True, workdir=tmp_path)
        assert plan.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_resume_with_a_changed_spec_or_set_is_refused_with_what_changed_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(QUICKSTART, ["trial.max_epochs=8"])
    folder = tmp_path / "sweeps" / "quickstart-20240101-000000"
    folder.mkdir(parents=True)
    command = resume_command(str(QUICKSTART), ["trial.max_epochs=8"], {})
    (folder / STATE_FILE).write_text(json.dumps({
        "sweep_id": folder.name, "parent_run_id": "x", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "storage": str(tmp_path / "sweeps"), "resume_command": command, "spec_resolved": resolved_spec(spec)}))
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), "--set", "trial.max_epochs=10",
                                       "--set", "resources.batched=true", "--resume"])
    assert result.exit_code == 1, result.output
    assert "trial.max_epochs: 8 when the sweep started, 10 now" in result.output
    assert 'resources.batched: "auto" when the sweep started, true now' in result.output
    assert command in result.output and "Traceback" not in result.output
    import ray

    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


def test_a_tracking_server_that_is_not_running_fails_in_seconds_before_ray_starts(tmp_path, monkeypatch,
                                                                                  shared_datasets):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
    uri = f"http://127.0.0.1:{free_port()}"       # nothing listens there
    t0 = time.monotonic()
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), "--tracking-uri", uri])
    seconds = time.monotonic() - t0
    assert result.exit_code == 1, result.output
    assert f"cannot reach the MLflow tracking server {uri}" in result.output and "Traceback" not in result.output
    assert seconds < 30, f"{seconds:.0f} s"       # MLflow's own retries take minutes
    import ray

    assert not ray.is_initialized() and sorted(os.listdir(tmp_path)) == []


def test_evaluate_outside_a_sweeps_folder_refuses_and_creates_no_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", "0123456789abcdef"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no MLflow database at {tmp_path / 'mlflow.db'}" in result.output and "--tracking-uri" in result.output
    assert sorted(os.listdir(tmp_path)) == []


def trial(tid: str, status: str, epoch: int = 0, **result):
    return SimpleNamespace(trial_id=tid, status=status, config={"prior": "vamp", "K": 13, "lr": 2.3e-3},
                           last_result={"training_iteration": epoch, **result} if epoch else {})


def test_the_time_left_counts_trial_start_up_and_the_test_evaluations(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("sweeper.callbacks.time.monotonic", lambda: clock[0])
    callback = TimeLeftCallback(total_trials=4, max_epochs=10, expected_epochs=None, at_once=2, every_s=1e9,
                                sweep_id="t")
    trials = [trial("a", "RUNNING"), trial("b", "RUNNING")]

    def result(t, at: float, **extra) -> None:
        clock[0] = at
        callback.on_trial_result(0, trials, t, {"epoch_seconds": 1.0, **extra})

    for t in trials:
        callback.on_trial_start(0, trials, t)
    result(trials[0], 21.0)                   # 20 s to start, then a 1 s epoch
    result(trials[0], 23.0)                   # epochs are 2 s apart (logging, checkpoints)
    result(trials[1], 21.0)
    result(trials[1], 23.0)
    result(trials[1], 34.0, stop_reason="completed")   # its last step: a 1 s epoch + 10 s of test LL etc.
    trials = [trial("a", "RUNNING", 2), trial("b", "TERMINATED", 3, stop_reason="completed"),
              trial("c", "TERMINATED", 1)]     # c: stopped by the scheduler, tested at the end
    expected, at_most = callback.seconds_left(trials)
    assert expected is None
    # a: 8 epochs x 2 s + 10 s; d (not started): 20 s + 10 x 2 s + 10 s; c's evaluation, a task
    # guessed as a trial's cold start (20 s) and its test (10 s); all over 2 at once.
    assert at_most == pytest.approx((8 * 2 + 10 + 20 + 10 * 2 + 10 + 20 + 10) / 2)
    text = callback.estimate(trials)
    assert "~20 s to start a trial, ~10 s to test one" in text and "2.0 s per epoch" in text


def test_at_most_is_never_below_the_expected_time_under_asha(monkeypatch):
    # Small budgets: ASHA's expectation carries the stopped trials' test evaluations (a process
    # start each), which "every trial to max_epochs" has none of (the quickstart printed "~14 s
    # expected, at most ~12 s").
    clock = [0.0]
    monkeypatch.setattr("sweeper.callbacks.time.monotonic", lambda: clock[0])
    callback = TimeLeftCallback(total_trials=4, max_epochs=3, expected_epochs=2.9, at_once=2, every_s=1e9)
    trials = [trial("a", "RUNNING"), trial("b", "RUNNING")]
    for t in trials:
        callback.on_trial_start(0, trials, t)
    clock[0] = 20.0
    for t in trials:
        callback.on_trial_result(0, trials, t, {"epoch_seconds": 1.0})
    expected, at_most = callback.seconds_left([trial("a", "RUNNING", 1), trial("b", "RUNNING", 1)])
    assert expected > 20.0 and at_most >= expected


def test_the_end_of_a_sweep_says_how_the_first_estimate_compared(monkeypatch):
    callback = TimeLeftCallback(total_trials=2, max_epochs=3, expected_epochs=2.0, at_once=2, every_s=0,
                                sweep_id="cmp")
    trials = [trial("a", "RUNNING"), trial("b", "RUNNING")]
    for t in trials:
        callback.on_trial_start(0, trials, t)
        callback.on_trial_result(0, trials, t, {"epoch_seconds": 1.0})
    first_at = TimeLeftCallback._FIRST["cmp"][0]
    line = TimeLeftCallback.compare("cmp", now=first_at + 100)
    assert line.startswith("time: 1 min 40 s from the first estimate to the end of the sweep (it said ~")
    assert "expected, at most ~" in line
    assert TimeLeftCallback.compare("cmp") is None                      # said once


def test_the_console_table_shows_what_a_user_reads():
    reporter = SweepReporter(["prior", "K", "lr"], "val_elbo", "max")
    reporter.setup(start_time=time.time(), total_samples=4)
    trials = [trial("a", "TERMINATED", 6, stop_reason="completed", val_elbo=-150.0, test_ll=-140.123,
                    epoch_seconds=0.371),
              trial("b", "TERMINATED", 2, val_elbo=-190.0),
              trial("c", "RUNNING", 3, val_elbo=-170.0, epoch_seconds=1.2),
              trial("d", "PENDING")]
    text = reporter.render(trials, done=False)
    lines = text.splitlines()
    assert lines[0].startswith("== 4/4 trials (1 completed, 1 scheduler, 1 running, 1 pending), 00:00:")
    assert "| Trial name" in text and "loc" not in text and "Result logdir" not in text
    rows = [line for line in lines if line.startswith("| trial_")]
    assert [r.split()[1] for r in rows] == ["trial_c", "trial_d", "trial_a", "trial_b"]   # running first, then best
    assert "| completed " in rows[2] and "2.3e-3" in rows[2] and "-140.12" in rows[2] and "0.37" in rows[2]
    assert "| scheduler " in rows[3]


def test_the_console_table_shows_stopped_trials_test_ll_as_their_tests_end(monkeypatch):
    """A stopped trial is tested beside the sweep, not by its trial: Tune's result lacks its test
    LL; the table shows it once its test ended (marked when it is the spec's cheaper estimate)
    and is printed again then."""
    from sweeper.evaluations import Evaluations

    clock = [1000.0]
    monkeypatch.setattr("sweeper.callbacks.time.time", lambda: clock[0])
    reporter = SweepReporter(["prior", "K", "lr"], "val_elbo", "max", every_s=30.0, sweep_id="table")
    reporter.setup(start_time=time.time(), total_samples=2)
    trials = [trial("a", "RUNNING", 3, val_elbo=-170.0), trial("b", "TERMINATED", 2, val_elbo=-190.0)]
    evaluations = Evaluations.of("table", "sqlite:///unused.db", spec=None)
    try:
        assert reporter.should_report(trials)
        clock[0] += 60
        assert not reporter.should_report(trials)      # nothing changed: not before 5 minutes
        assert "~" not in reporter.render(trials, done=False)
        evaluations.tested["b"] = "~-137.44"
        assert reporter.should_report(trials)          # its test ended: printed again
        text = reporter.render(trials, done=False)
        row = next(line for line in text.splitlines() if line.startswith("| trial_b"))
        assert row.rstrip(" |").endswith("~-137.44"), row
        assert "~: a stopped trial's test LL estimate" in text
    finally:
        Evaluations.forget("table")


@pytest.mark.slow
def test_sweeper_ui_says_it_is_starting_and_prints_its_link_once_the_server_answers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "ui-check")
    tracking.client(uri).create_run(experiment_id, tags={"sweeper.role": "sweep"})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "sweeper ui ended:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("MLflow UI on"):
                # The link is printed when the server answers, not before.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert response.status == 200
                break
        else:
            pytest.fail("no link within 240 s:\n" + "".join(lines))
        lines.append(proc.stdout.readline())
        assert f"ui-check: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs" in lines[-1]
    finally:
        os.killpg(proc.pid, signal.SIGINT)             # Ctrl-C in its terminal
        rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert lines[0].startswith("starting the MLflow UI") and proc.returncode == 0, output
    for noise in ("StarletteDeprecationWarning", " INFO ", "INFO:", "Registry store URI", "Traceback"):
        assert noise not in output, output
    assert sorted(os.listdir(tmp_path)) == ["mlartifacts", "mlflow.db"] or sorted(os.listdir(tmp_path)) == ["mlflow.db"]


def test_a_new_sqlite_store_is_created_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow commits each of its ~60 schema migrations on its own: a driver killed among them
    (seen in a chaos run) left a database every later command refused. The store is built aside
    and linked into place once complete; a failure leaves nothing, and a later sweep starts clean."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = SqlAlchemyStore.__init__

    def dies_midway(self, db_uri, artifact_root):
        real(self, db_uri, artifact_root)          # the schema is there ...
        raise KeyboardInterrupt                    # ... and the process is stopped before the end

    monkeypatch.setattr(SqlAlchemyStore, "__init__", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        tracking.create_store(uri)
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.setattr(SqlAlchemyStore, "__init__", real)
    tracking.create_store(uri)
    assert sorted(os.listdir(tmp_path)) == ["mlflow.db"]
    experiment = tracking.ensure_experiment(uri, "after")
    assert tracking.client(uri).get_experiment(experiment).name == "after"


def test_the_console_table_is_printed_again_when_a_trial_starts_or_ends_else_every_five_minutes(monkeypatch):
    """A long sweep printed its table every 30 s (the README's taste: 402 lines in 12 minutes)."""
    clock = [1000.0]
    monkeypatch.setattr("sweeper.callbacks.time.time", lambda: clock[0])
    reporter = SweepReporter(["prior", "K", "lr"], "val_elbo", "max", every_s=30.0)
    running = [trial("a", "RUNNING", 3), trial("b", "RUNNING", 3)]
    printed = []
    for t in range(0, 1200, 10):           # 20 minutes, asked every 10 s as Tune does
        clock[0] = 1000.0 + t
        trials = running if t < 600 else [trial("a", "RUNNING", 9), trial("b", "TERMINATED", 9)]
        if reporter.should_report(trials):
            printed.append(t)
    # The first view, every 5 minutes while nothing starts or ends, at once (30 s apart at most)
    # when b ends at minute 10, then every 5 minutes again.
    assert printed == [0, 300, 600, 900]
    assert reporter.should_report(trials, done=True)


def test_tunes_warning_on_trials_that_never_started_is_dropped_and_others_are_kept():
    """After a Ctrl-C, Tune's results warn "Failed to fetch metrics" for the pending trials (no
    result file yet): dropped. A trial whose results could not be read for another reason stays."""
    import logging

    from sweeper.run import _DropUnstartedTrials

    def record(*failures: str) -> logging.LogRecord:     # as ray/tune/analysis/experiment_analysis.py words it
        fail_str = "\n".join(f"- {f}" for f in failures)
        return logging.LogRecord(_DropUnstartedTrials.LOGGER, logging.WARNING, __file__, 1,
                                 f"Failed to fetch metrics for {len(failures)} trial(s):\n{fail_str}", None, None)

    pending = ("trial_e9a2e_00002: FileNotFoundError('Could not fetch metrics for trial_e9a2e_00002: both "
               "result.json and progress.csv were not found at /x/sweeps/s/trial_e9a2e_00002')")
    broken = "trial_e9a2e_00001: ParserError('Error tokenizing data. C error: EOF inside string')"
    keep = _DropUnstartedTrials().filter
    assert not keep(record(pending))
    assert not keep(record(pending, pending.replace("00002", "00003")))
    assert keep(record(pending, broken)) and keep(record(broken))
    assert keep(logging.LogRecord("x", logging.WARNING, __file__, 1, "Something else", None, None))


def test_the_guess_of_a_trials_end_counts_its_test_and_its_validation_ll():
    """Until a trial's end is measured it is guessed from the forward passes of its test LL and
    of the validation LL of its tested weights; on the quickstart the latter is most of it."""
    from sweeper.run import finish_guess_epochs

    quickstart = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    spec = parse_spec(quickstart)
    # 200 test images x S=100 + 500 validation images x val_ll_samples=100, over 3 x 2000 + 500
    assert finish_guess_epochs(spec) == pytest.approx(0.5 * (200 * 100 + 500 * 100) / 6500)
    more = parse_spec({**quickstart, "trial": {**quickstart["trial"], "val_ll_samples": 400}})
    assert finish_guess_epochs(more) == pytest.approx(0.5 * (200 * 100 + 500 * 400) / 6500)
