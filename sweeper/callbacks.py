"""The driver's Tune callbacks: bookkeeping a trial cannot do itself, the time left, the pools.

They hold plain data only: Tune pickles callbacks with the experiment (and `Tuner.restore`
unpickles its own copies).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from sweeper import tracking
from trainables.vae.catalog import STOP_ERROR, STOP_SCHEDULER


def trial_name(trial) -> str:
    """`trial_<id>`: short, unique, and a valid folder name (Ray's default repeats the config)."""
    return f"trial_{trial.trial_id}"


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


def _run_for_failed_setup(args, trial, sweep_name: str) -> str:
    """A run for a trial that failed before opening its own (an error in its setup)."""
    tracking_uri, experiment_id, parent_run_id = args
    params = {k: v for k, v in trial.config.items() if not isinstance(v, dict)}
    run = tracking.open_trial_run(tracking_uri, experiment_id, parent_run_id, trial_id=trial.trial_id,
                                  trial_name=tracking.trial_run_name(trial.config, trial.trial_id),
                                  params=params, sweep_name=sweep_name)
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
    rungs = [grace]
    while rungs[-1] * eta < max_t:
        rungs.append(rungs[-1] * eta)
    rungs.append(max_t)
    return rungs[0] + sum((b - a) * eta ** -(i + 1) for i, (a, b) in enumerate(zip(rungs, rungs[1:])))


class TimeLeftCallback(tune.Callback):
    """Prints, once the first epochs are in and then every `every_s`, how long the sweep has left.

    How: the mean seconds per epoch of the trials' latest epochs, times the epochs still to train
    (running trials up to their budget, trials not started yet a whole budget), divided by the
    trials that run at once. The budget is max_epochs ("at most": no trial stops early) and, under
    ASHA, the epochs a trial trains on average if each rung keeps 1/reduction_factor of the trials
    ("expected"). Test evaluations are not included. Plain data only: Tune pickles callbacks."""

    def __init__(self, total_trials: int, max_epochs: int, expected_epochs: float | None, at_once: int,
                 every_s: float = 300.0):
        self.total, self.max_epochs, self.expected, self.at_once = total_trials, max_epochs, expected_epochs, at_once
        self.every_s = every_s
        self.seconds: dict[str, float] = {}      # trial id -> seconds of its latest epoch
        self.last_print = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("epoch_seconds") is not None:
            self.seconds[trial.trial_id] = float(result["epoch_seconds"])
        now = time.monotonic()
        if len(self.seconds) >= min(2, self.total) and now - self.last_print >= self.every_s:
            self.last_print = now
            print(self.estimate(trials), flush=True)

    def estimate(self, trials) -> str:
        """From Tune's trials as they are now (a resumed sweep's finished ones included)."""
        per_epoch = sum(self.seconds.values()) / len(self.seconds)
        done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        epochs = {t.trial_id: int((t.last_result or {}).get("training_iteration", 0)) for t in trials}

        def hours(budget: float) -> float:
            running = sum(max(0.0, budget - e) for t, e in epochs.items() if t not in done)
            waiting = max(0, self.total - len(epochs)) * budget
            return (running + waiting) * per_epoch / max(1, self.at_once) / 3600

        left = self.total - len(done)
        at_most = _duration(hours(self.max_epochs))
        text = f"time left: at most ~{at_most} (every trial to {self.max_epochs} epochs)"
        if self.expected is not None:
            text = (f"time left: ~{_duration(hours(self.expected))} expected with ASHA "
                    f"(~{self.expected:.0f} epochs per trial), at most ~{at_most}")
        return (f"{text}: {left} trial(s) to go, {per_epoch:.1f} s per epoch per trial, {self.at_once} at once; "
                "early stopping can end trials sooner, test evaluations come on top")


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


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
