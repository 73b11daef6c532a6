"""The driver's Tune callbacks: bookkeeping a trial cannot do itself, the time left, the pools,
and the console's table of trials.

They hold plain data only: Tune pickles callbacks with the experiment (and `Tuner.restore`
unpickles its own copies).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Callable

from ray import tune
from ray.tune import CLIReporter

from sweeper import tracking
from sweeper.evaluations import ESTIMATE_MARK, Evaluations
from trainables.vae.catalog import (METRIC_EPOCH_SECONDS, METRIC_TEST_LL, RESULT_RUN_ID, STOP_EARLY, STOP_ERROR,
                                    STOP_SCHEDULER, short)

logger = logging.getLogger(__name__)


def trial_name(trial) -> str:
    """`trial_<id>`: short, unique, and a valid folder name (Ray's default repeats the config)."""
    return f"trial_{trial.trial_id}"


def trial_id_of(result) -> str | None:
    """The Tune trial id of a `tune.Result`, from its folder (named by `trial_name`): always the
    trial's own. Its `metrics["trial_id"]` is not: for a trial that errored before its first
    report, Tune fills the metrics from the actor it was given, and a reused actor answers with the
    id of the trial it ran before (seen: a retry whose `reset` failed in the other trial's actor
    carried that trial's id, and the sweep counted 1 of its 2 trials)."""
    if result.path:
        name = PurePosixPath(str(result.path)).name      # a folder or a URI (s3://...)
        if name.startswith("trial_"):
            return name.removeprefix("trial_")
    trial_id = (result.metrics or {}).get("trial_id")
    return None if trial_id is None else str(trial_id)


class TrialRunsCallback(tune.Callback):
    """Driver-side bookkeeping that a trial cannot do itself.

    - A trial that errored: its run is closed as FAILED with the first line of the error and
      where the traceback is (a trial that failed before opening its run gets one, so every
      trial has a run).
    - A trial the scheduler stopped: its run is tagged at once (`stop_reason: scheduler`). That
      tag, not Tune's trial state, is what the driver evaluates on the test set later, so a trial
      merely interrupted by Ctrl-C (which Tune also ends as TERMINATED) is never evaluated, and a
      resumed sweep finishes any evaluation the interrupt cut short.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, scheduler: str,
                 sweep_name: str):
        self.args = (tracking_uri, experiment_id, parent_run_id)
        self.scheduler = scheduler
        self.sweep_name = sweep_name

    # Trials Tune ran in this driver process (some never report a result), per parent run. Kept
    # on the class: `Tuner.restore` unpickles its own copy of the callback.
    _SEEN: dict[str, set[str]] = {}

    @classmethod
    def seen_in(cls, parent_run_id: str) -> set[str]:
        return cls._SEEN.setdefault(parent_run_id, set())

    @property
    def seen(self) -> set[str]:
        return self.seen_in(self.args[2])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.seen.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.seen.add(trial.trial_id)
        run = tracking.find_child(*self.args, trial_id=trial.trial_id)
        first, where = error_summary(trial)
        if run is None:
            handle = tracking.RunHandle(self.args[0], _run_for_failed_setup(self.args, trial, self.sweep_name))
        elif run.info.status == "RUNNING" or run.data.tags.get(tracking.TAG_STOP) != STOP_ERROR:
            handle = tracking.RunHandle(self.args[0], run.info.run_id)
        else:
            return
        handle.set_tags({tracking.TAG_STOP: STOP_ERROR, "stop_detail": f"{first} (traceback: {where})"})
        handle.terminate("FAILED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen.add(trial.trial_id)
        result = trial.last_result or {}
        if result.get("stop_reason"):
            return   # it ended by itself and was finalized in its last step
        run = tracking.find_child(*self.args, trial_id=trial.trial_id)
        # An "error" tag is stale here (the trial errored once, Tune retried it, then the scheduler stopped it).
        if run is not None and run.data.tags.get(tracking.TAG_STOP, "") in ("", STOP_ERROR):
            tracking.RunHandle(self.args[0], run.info.run_id).set_tags({
                tracking.TAG_STOP: STOP_SCHEDULER, tracking.TAG_SCHEDULER: self.scheduler,
                "stop_detail": f"stopped by the scheduler ({self.scheduler}) after epoch "
                               f"{result.get('training_iteration', '?')}"})


class AuditTrialsCallback(tune.Callback):
    """Marks the scheduler's audit trials (`ResumableASHAScheduler.is_audit`) where everything
    downstream can tell them: their MLflow run gets `TAG_AUDIT` at their first result, and
    `TAG_AUDIT_WOULD_STOP` (the epoch) once ASHA would have stopped them; their Optuna trial gets
    the same as user attributes while it runs (`study`: its storage URL and name; None without
    Optuna). At the experiment's end every audit trial's run is checked once more (a driver killed
    between a result and its tag). Tagging is idempotent. It holds the scheduler, as
    `SchedulerStateCallback` does (Tune pickles both with the experiment, the scheduler once)."""

    def __init__(self, scheduler, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 study: tuple[str, str] | None = None):
        self.scheduler = scheduler
        self.args = (tracking_uri, experiment_id, parent_run_id)
        self.study = study
        self.marked: set[tuple[str, str]] = set()     # (trial id, tag) done in this driver process

    def _audit(self, trial_id: str) -> bool:
        is_audit = getattr(self.scheduler, "is_audit", None)
        return bool(is_audit and is_audit(trial_id))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._audit(trial.trial_id):
            self.mark(trial.trial_id, result.get(RESULT_RUN_ID))

    def on_experiment_end(self, trials, **info):
        for trial_id in getattr(self.scheduler, "audit_trials", list)():
            self.mark(trial_id, None)

    def mark(self, trial_id: str, run_id: str | None) -> None:
        from sweeper.fidelity import TAG_AUDIT, TAG_AUDIT_WOULD_STOP

        tags = {TAG_AUDIT: "true"}
        would_stop = self.scheduler.would_have_stopped(trial_id)
        if would_stop is not None:
            tags[TAG_AUDIT_WOULD_STOP] = str(would_stop)
        todo = {k: v for k, v in tags.items() if (trial_id, k) not in self.marked}
        if not todo:
            return
        if run_id is None:
            run = tracking.find_child(*self.args, trial_id=trial_id)
            if run is None:
                return      # it never opened a run (it failed in its setup)
            run_id = run.info.run_id
        tracking.RunHandle(self.args[0], run_id).set_tags(todo)
        self._mark_study_trial(trial_id, todo)
        self.marked.update((trial_id, k) for k in todo)

    def _mark_study_trial(self, trial_id: str, tags: dict[str, str]) -> None:
        """The same on the trial's Optuna trial, while it runs (a finished one cannot change)."""
        if self.study is None:
            return
        import optuna

        from sweeper.fidelity import TAG_AUDIT_WOULD_STOP, USER_ATTR_AUDIT, USER_ATTR_AUDIT_WOULD_STOP
        from sweeper.search import USER_ATTR_TUNE_TRIAL, _storage

        storage_url, name = self.study
        try:
            study = optuna.load_study(study_name=name, storage=_storage(storage_url))
            for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if frozen.user_attrs.get(USER_ATTR_TUNE_TRIAL) == trial_id:
                    live = optuna.trial.Trial(study, frozen._trial_id)
                    live.set_user_attr(USER_ATTR_AUDIT, True)
                    if TAG_AUDIT_WOULD_STOP in tags:
                        live.set_user_attr(USER_ATTR_AUDIT_WOULD_STOP, int(tags[TAG_AUDIT_WOULD_STOP]))
                    return
        except optuna.exceptions.UpdateFinishedTrialError:
            pass    # it finished meanwhile; the MLflow tag stands
        except Exception as exc:   # the study is a courtesy copy of the mark: never stop the sweep for it
            logger.warning("could not mark audit trial %s in the Optuna study: %s", trial_id, exc)


def _run_for_failed_setup(args, trial, sweep_name: str) -> str:
    """A run for a trial that failed before opening its own (an error in its setup)."""
    tracking_uri, experiment_id, parent_run_id = args
    config = {k: v for k, v in trial.config.items() if not isinstance(v, dict)}
    keys = (trial.config.get(tracking.SWEEP_KEY) or {}).get("name_keys", ())
    run = tracking.open_trial_run(tracking_uri, experiment_id, parent_run_id, trial_id=trial.trial_id,
                                  trial_name=tracking.trial_run_name(trial.config, trial.trial_id),
                                  params=tracking.trial_params(config, keys), config=config, sweep_name=sweep_name)
    return run.run_id


def error_summary(trial) -> tuple[str, str]:
    """(the error's last line, e.g. 'ValueError: ...', and the file with its whole traceback)."""
    path = getattr(trial, "error_file", None) or ""
    first = "see the trial's log"
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            first = lines[-1][:300]
    except OSError:
        pass
    return first, str(path) or "the Ray trial folder"


def asha_expected_epochs(grace: int, eta: float, max_t: int) -> float:
    """Epochs a trial trains on average under ASHA if each rung promotes 1/eta of the trials:
    m_0 = grace, m_i = grace * eta^i < max_t, and a trial gets past m_i with probability eta^-(i+1)."""
    rungs = _asha_milestones(grace, eta, max_t) + [max_t]
    return rungs[0] + sum((b - a) * eta ** -(i + 1) for i, (a, b) in enumerate(zip(rungs, rungs[1:])))


def _asha_milestones(grace: int, eta: float, max_t: int) -> list[float]:
    """ASHA's rungs below max_t: grace, grace * eta, ... (grace itself even when >= max_t)."""
    rungs = [grace]
    while rungs[-1] * eta < max_t:
        rungs.append(rungs[-1] * eta)
    return rungs


def asha_stopped_share(grace: int, eta: float, max_t: int) -> float:
    """The share of trials ASHA stops before max_t if each rung promotes 1/eta of the trials."""
    return 1.0 - eta ** -len(_asha_milestones(grace, eta, max_t)) if grace < max_t else 0.0


class TimeLeftCallback(tune.Callback):
    """Prints, once the first epochs are in and then every `every_s`, how long the sweep has left;
    the driver says at the end how the first estimate compared (`compare`).

    What a trial costs, measured as the sweep goes: its start-up (from Tune starting it to its
    first epoch: a process, imports, data, its MLflow run), its epochs as the wall time between
    its results (logging and checkpoints included), and its own end (test LL, images, weights:
    the extra time of its last result). Until a trial has ended, the end is guessed as
    `finish_guess_epochs` epochs. The work left is: running trials up to their budget, trials
    not started yet a start-up and a whole budget, every unfinished trial its end, and the
    trials the scheduler stopped (and, under ASHA's expectation, the `stopped_share` of the
    unfinished ones it will stop) their test evaluation instead of that end, divided by the
    trials that run at once. An evaluation is a Ray task beside the trials: its wall time as
    measured (`Evaluations.seconds_each`), until one has ended a trial's first (cold) start-up
    and its test at the spec's precision. The budget is max_epochs ("at
    most": no trial stops early) and, under ASHA, the epochs a trial trains on average if each
    rung keeps 1/reduction_factor of the trials ("expected"). Without ASHA, once trials have
    ended by early stopping, the epochs they trained (on average, per dataset; every dataset's
    where a trial's has none yet) are the budget of the others ("expected"): early stopping
    usually ends a paper-settings trial at a fraction of max_epochs, and each dataset at its own
    (Caltech 101 at 100-245 of 1000, Frey Faces 500-875). Plain data only: Tune pickles
    callbacks."""

    # The first estimate of each sweep in this driver process: (time.time(), expected s, at most s).
    # On the class: `Tuner.restore` unpickles its own copy of the callback.
    _FIRST: dict[str, tuple[float, float | None, float]] = {}

    def __init__(self, total_trials: int, max_epochs: int, expected_epochs: float | None, at_once: int,
                 every_s: float = 300.0, *, sweep_id: str = "", finish_guess_epochs: float = 0.0,
                 stopped_test_fraction: float = 1.0, stopped_share: float = 0.0):
        self.sweep_id = sweep_id
        self.stopped_share = stopped_share       # of the trials not finished, those the scheduler will stop
        # A stopped trial's test costs this fraction of a full one (the spec's stopped_trials).
        self.stopped_test_fraction = stopped_test_fraction
        self.total, self.max_epochs, self.expected, self.at_once = total_trials, max_epochs, expected_epochs, at_once
        self.finish_guess_epochs = finish_guess_epochs
        self.every_s = every_s
        self.seconds: dict[str, float] = {}      # trial id -> wall seconds of its latest epoch
        self.startup_s: list[float] = []         # each trial start's seconds to its first epoch
        self.finish_s: list[float] = []          # each trial's own end (its last result's extra time)
        self._started: dict[str, float] = {}     # trial id -> when Tune started it (until its first result)
        self._last: dict[str, float] = {}        # trial id -> when its latest result came
        self.last_print: float | None = None

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.monotonic()
        self._last.pop(trial.trial_id, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now, tid = time.monotonic(), trial.trial_id
        epoch = result.get("epoch_seconds")
        epoch = float(epoch) if epoch is not None else None
        if tid in self._started:
            self.startup_s.append(max(0.0, now - self._started.pop(tid) - (epoch or 0.0)))
            if epoch is not None:
                self.seconds[tid] = epoch
        elif tid in self._last:
            wall = now - self._last[tid]
            if result.get("stop_reason"):      # its last step also ended it: test LL, images, weights
                self.finish_s.append(max(0.0, wall - (epoch or 0.0)))
            else:
                self.seconds[tid] = wall
        self._last[tid] = now
        due = self.last_print is None or now - self.last_print >= self.every_s
        if len(self.seconds) >= min(2, self.total) and due:
            self.last_print = now
            self._FIRST.setdefault(self.sweep_id, (time.time(), *self.seconds_left(trials)))
            print(self.estimate(trials), flush=True)

    def estimate(self, trials) -> str:
        """The line to print, from Tune's trials as they are now (a resumed sweep's finished ones included)."""
        expected_s, at_most_s = self.seconds_left(trials)
        per_epoch, startup, finish, measured = self._costs()
        left = self.total - sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        text = f"time left: at most ~{duration(at_most_s)} (every trial to {self.max_epochs} epochs)"
        if expected_s is not None and self.expected is not None:
            text = (f"time left: ~{duration(expected_s)} expected with ASHA (~{self.expected:.0f} epochs per "
                    f"trial), at most ~{duration(at_most_s)}")
        elif expected_s is not None:
            every = [e for ended in early_stop_epochs(trials).values() for e in ended]
            ended, mean = len(every), sum(every) / len(every)
            text = (f"time left: ~{duration(expected_s)} expected (the {ended} trial(s) that stopped early "
                    f"trained ~{mean:.0f} epochs), at most ~{duration(at_most_s)}")
        guess = "" if measured else ", a guess until a trial has ended"
        return (f"{text}: {left} trial(s) to go, {per_epoch:.1f} s per epoch per trial, {self.at_once} at once, "
                f"~{startup:.0f} s to start a trial, ~{finish:.0f} s to test one{guess}; early stopping can end "
                "trials sooner")

    def _costs(self) -> tuple[float, float, float, bool]:
        """(seconds per epoch, to start a trial, to end one; whether the end was measured)."""
        per_epoch = sum(self.seconds.values()) / len(self.seconds)
        # The latest start-up: later trials mostly reuse a warm process (reuse_actors).
        startup = self.startup_s[-1] if self.startup_s else 0.0
        measured = bool(self.finish_s)
        finish = (sum(self.finish_s) / len(self.finish_s)) if measured else self.finish_guess_epochs * per_epoch
        return per_epoch, startup, finish, measured

    def seconds_left(self, trials) -> tuple[float | None, float]:
        """(seconds left expected under ASHA, or None without it; seconds left at most)."""
        per_epoch, startup, finish, _ = self._costs()
        measured = Evaluations.seconds_each(self.sweep_id)
        # Until one has ended: a trial's first start-up (a task, too, starts as a trial's process
        # does: imports, data, its run; the quickstart's took 14 s each on 2 busy cores) and the test.
        cold = max(self.startup_s, default=0.0)
        evaluation = measured if measured is not None else cold + finish * self.stopped_test_fraction
        done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        # Stopped by the scheduler and not tested yet: the evaluations in flight (launched as trials
        # stop); without that record, every trial that ended without a reason of its own.
        stopped = Evaluations.pending(self.sweep_id)
        if stopped is None:
            stopped = sum(1 for t in trials
                          if t.status == "TERMINATED" and not (t.last_result or {}).get("stop_reason"))
        epochs = {t.trial_id: int((t.last_result or {}).get("training_iteration", 0)) for t in trials}
        datasets = {t.trial_id: _dataset(t) for t in trials}

        def seconds(budget: Callable[[str | None], float], stops_expected: bool) -> float:
            unfinished = ([(e, datasets[t]) for t, e in epochs.items() if t not in done]
                          + [(0, None)] * max(0, self.total - len(epochs)))
            # A trial's end: its own test, or (the share the scheduler stops) an evaluation task.
            share = self.stopped_share if stops_expected else 0.0
            end = (1 - share) * finish + share * evaluation
            work = sum(max(0.0, budget(d) - e) * per_epoch + end + (startup if e == 0 else 0.0)
                       for e, d in unfinished)
            work += stopped * evaluation
            return work / max(1, self.at_once)

        expected = None
        if self.expected is not None:
            expected = seconds(lambda _: self.expected, True)
        elif stopped_early := early_stop_epochs(trials):
            every = [e for ended in stopped_early.values() for e in ended]

            def budget(dataset: str | None) -> float:
                ended = stopped_early.get(dataset, every)
                return min(self.max_epochs, sum(ended) / len(ended))
            expected = seconds(budget, False)
        # The expectation adds the stopped trials' test evaluations, which "at most" (nobody stopped)
        # has none of: with small budgets it could exceed it, and "at most" would not be.
        return expected, max(seconds(lambda _: self.max_epochs, False), expected or 0.0)

    @classmethod
    def compare(cls, sweep_id: str, now: float | None = None) -> str | None:
        """Once the sweep has ended: how long it took since the first estimate, beside what that said."""
        first = cls._FIRST.pop(sweep_id, None)
        if first is None:
            return None
        at, expected_s, at_most_s = first
        said = (f"~{duration(expected_s)} expected, at most ~{duration(at_most_s)}" if expected_s is not None
                else f"at most ~{duration(at_most_s)}")
        took = (now or time.time()) - at
        return f"time: {duration(took)} from the first estimate to the end of the sweep (it said {said})"


def early_stop_epochs(trials) -> dict[str | None, list[int]]:
    """The epochs each trial that ended by early stopping trained, by its dataset."""
    out: dict[str | None, list[int]] = {}
    for t in trials:
        result = t.last_result or {}
        if t.status == "TERMINATED" and result.get("stop_reason") == STOP_EARLY:
            out.setdefault(_dataset(t), []).append(int(result.get("training_iteration", 0)))
    return out


def _dataset(trial) -> str | None:
    return (getattr(trial, "config", None) or {}).get("dataset")


def duration(seconds: float) -> str:
    """Seconds as a person reads a duration: '45 s', '2 min 5 s', '12 min', '3.4 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 10:
        return f"{int(minutes)} min {seconds - 60 * int(minutes):.0f} s"
    hours = minutes / 60
    return f"{minutes:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


class PoolLeaveCallback(tune.Callback):
    """Takes a stopped trial out of its pool at once.

    Tune does not call a trial's cleanup when it stops it and keeps the actor for the next trial
    (reuse_actors); until that trial starts, the stopped one would still be a pool member that
    the others wait for. Leaving is idempotent, so every pool of the sweep is told.
    """

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        from trainables.pool import sweep_pools

        for pool in sweep_pools(self.sweep_id):
            pool.leave.remote(trial.trial_id)   # fire and forget: the driver does not wait


class SweepReporter(CLIReporter):
    """The console's table of trials: what a user of the sweep reads, nothing else.

    Tune's own table adds the node address of every trial (`loc`), Tune's result folder in /tmp
    and the scheduler's internals (rung cut-offs) at each report, and a "current best trial"
    chosen on the latest epoch's value; this table has one row per trial with its parameters,
    why it ended (`completed`, `early_stopping`, `nan`, `scheduler`, `error`), its epochs, seconds
    per epoch, latest value of the sweep's metric and test LL. Running trials come first, then the
    ended ones by their latest metric (the sweep's choice of the best trial, on the metric at
    each trial's tested epoch, is printed at the end). It is printed when a trial started or
    ended (at most every `every_s`), else every 5 minutes, and at the end: a long sweep's console
    stays readable. Plain data only: Tune pickles it with the experiment."""

    ORDER = {"RUNNING": 0, "PENDING": 1, "PAUSED": 1, "TERMINATED": 2, "ERROR": 3}

    def __init__(self, parameters: list[str], metric: str, mode: str, every_s: float = 30.0, max_rows: int = 20,
                 sweep_id: str | None = None):
        # metric/mode are Tune's (TuneConfig): the base class refuses them twice.
        super().__init__(parameter_columns=list(parameters), max_report_frequency=every_s, max_progress_rows=max_rows)
        self.parameters, self.metric_name, self.metric_mode, self.max_rows = list(parameters), metric, mode, max_rows
        self.sweep_id = sweep_id     # whose stopped trials' tests (sweeper.evaluations) the table shows

    def stopped_tests(self) -> dict[str, str]:
        """The test LLs of stopped trials tested so far (they are tested beside the sweep, not by
        their trial, so Tune's results do not hold them); none for a reporter saved without a sweep."""
        sweep_id = getattr(self, "sweep_id", None)
        return Evaluations.tested_so_far(sweep_id) if sweep_id else {}

    # When the table is printed again: at most every `every_s` while something changes that a user
    # waits for (a trial starts or ends), else every `quiet_s` (long trials: the epochs move on).
    QUIET_S = 300.0

    def should_report(self, trials, done: bool = False) -> bool:
        if done:
            return True
        now = time.time()
        since = now - getattr(self, "_printed_at", 0.0)
        states = (tuple(sorted((t.trial_id, self.status(t)) for t in trials)), len(self.stopped_tests()))
        changed = states != getattr(self, "_printed_states", None)
        if since >= (self._max_report_freqency if changed else self.QUIET_S):
            self._printed_at, self._printed_states = now, states
            return True
        return False

    def report(self, trials, done: bool, *sys_info: str) -> None:
        print(self.render(trials, done), flush=True)

    @staticmethod
    def status(trial) -> str:
        """A trial's state as the table shows it: why an ended trial ended."""
        if trial.status != "TERMINATED":
            return trial.status.lower()
        return (trial.last_result or {}).get("stop_reason") or STOP_SCHEDULER

    def render(self, trials, done: bool) -> str:
        from tabulate import tabulate

        sign = -1.0 if self.metric_mode == "max" else 1.0

        def order(trial):
            value = (trial.last_result or {}).get(self.metric_name)
            rank = sign * float(value) if isinstance(value, (int, float)) and value == value else float("inf")
            return self.ORDER.get(trial.status, 1), rank

        rows = []
        stopped_tests = self.stopped_tests()
        shown = sorted(trials, key=order)
        for trial in shown if done else shown[:self.max_rows]:
            result = trial.last_result or {}
            config = trial.config or {}
            rows.append([trial_name(trial), self.status(trial),
                         *[short(config.get(p)) for p in self.parameters],
                         result.get("training_iteration", ""), _fixed(result.get(METRIC_EPOCH_SECONDS)),
                         _fixed(result.get(self.metric_name)),
                         _fixed(result.get(METRIC_TEST_LL)) or stopped_tests.get(trial.trial_id, "")])
        counts: dict[str, int] = {}
        for trial in trials:
            counts[self.status(trial)] = counts.get(self.status(trial), 0) + 1
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        planned = getattr(self, "_total_samples", 0)
        total = f"/{planned}" if planned and planned < sys.maxsize else ""
        elapsed = time.strftime("%H:%M:%S", time.gmtime(max(0.0, time.time() - (self._start_time or time.time()))))
        lines = [f"== {len(trials)}{total} trials ({states}), {elapsed} =="]
        headers = ["Trial name", "status", *self.parameters, "epoch", "s/epoch", self.metric_name, METRIC_TEST_LL]
        # Numbers right-aligned, words (a prior's name) left, as written (no number parsing: 2.34e-3 stays).
        words = [any(isinstance((t.config or {}).get(p), str) for t in trials) for p in self.parameters]
        align = ("left", "left", *["left" if w else "right" for w in words], "right", "right", "right", "right")
        lines.append(tabulate(rows, headers=headers, tablefmt="psql", disable_numparse=True, colalign=align))
        if len(rows) < len(trials):
            lines.append(f"... and {len(trials) - len(rows)} more")
        if any(text.startswith(ESTIMATE_MARK) for text in stopped_tests.values()):
            lines.append(f"{ESTIMATE_MARK}: a stopped trial's test LL estimate (the spec's stopped_trials: fewer "
                         "samples or images)")
        return "\n".join(lines)


def _fixed(value, digits: int = 2) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
