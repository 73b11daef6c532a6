"""The test evaluation of trials the scheduler stopped: launched as each trial stops, while the
sweep runs, on the resources its trial gave back; what an interrupt or an error cut short is
finished after Tune's run (and by `--resume`).

A stopped trial is evaluated from its last checkpoint by `evaluate_stopped_trial`, a Ray task
(Tune kills a stopping actor after a timeout, so a long test LL cannot run in the trial itself),
as the spec's `stopped_trials` policy says: the full test LL, a declared estimate (fewer images
and importance samples, both stored with it), or none (the weights are kept for `sweeper
evaluate`). Which trials: those whose run the driver tagged `stop_reason: scheduler` and that
have no `test_ll` yet, and those whose evaluation failed before; so it is idempotent, and a
trial that Ctrl-C merely ended is never evaluated half-trained.

One owner: the driver's thread. Tune calls `StoppedTrialEvaluations` there as trials stop; the
driver collects what is in flight (`Evaluations.finish`) when Tune's run has returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, ClassVar

import ray
from ray import tune

from sweeper import tracking
from sweeper.spec import SweepSpec
from trainables.vae.catalog import METRIC_TEST_LL, STOP_ERROR, STOP_SCHEDULER, stop_reason

logger = logging.getLogger(__name__)

TAG_EVALUATION_FAILED = "sweeper.evaluation_failed"   # a stopped trial whose test evaluation failed
EVALUATION_ERROR_FILE = "evaluation_error.txt"          # ... its traceback, an artifact of its run


# How the console's table marks a stopped trial's test LL that is the spec's cheaper estimate.
ESTIMATE_MARK = "~"


@dataclass
class Evaluations:
    """The sweep's evaluations in flight and the lines of those that failed. Held per sweep by the driver process (`of`), not by the pickled callbacks."""

    tracking_uri: str
    spec: SweepSpec
    limit: int = 1                 # evaluations at once (the trials that run at once)
    in_flight: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)   # trial id -> (ref, run, checkpoint)
    queued: list[tuple[Any, dict[str, Any], Any, str]] = field(default_factory=list)   # launched when one ends
    failed: list[str] = field(default_factory=list)
    tested: dict[str, str] = field(default_factory=dict)   # trial id -> its test LL as the console shows it
    launched: dict[str, float] = field(default_factory=dict)  # trial id -> when its task was started (monotonic)
    seconds: list[float] = field(default_factory=list)     # each ended evaluation's wall time, launch to end

    _BY_SWEEP: ClassVar[dict[str, "Evaluations"]] = {}    # one per sweep in this driver process

    @classmethod
    def of(cls, sweep_id: str, tracking_uri: str, spec: SweepSpec, limit: int = 1) -> "Evaluations":
        if sweep_id not in cls._BY_SWEEP:
            cls._BY_SWEEP[sweep_id] = cls(tracking_uri, spec, max(1, limit))
        return cls._BY_SWEEP[sweep_id]

    @classmethod
    def pending(cls, sweep_id: str) -> int | None:
        """How many of the sweep's evaluations are in flight or queued; None if none was ever launched here."""
        evaluations = cls._BY_SWEEP.get(sweep_id)
        return len(evaluations.in_flight) + len(evaluations.queued) if evaluations is not None else None

    @classmethod
    def seconds_each(cls, sweep_id: str) -> float | None:
        """The mean wall time of the sweep's ended evaluations (a task's start, its test, its
        logging, beside the running trials); None before one has ended."""
        evaluations = cls._BY_SWEEP.get(sweep_id)
        return evaluations.mean_seconds if evaluations is not None else None

    @property
    def mean_seconds(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None

    @classmethod
    def tested_so_far(cls, sweep_id: str) -> dict[str, str]:
        """The stopped trials tested in this driver process so far, trial id -> test LL as text
        ("~" marks a declared estimate): a copy, for the console's table."""
        evaluations = cls._BY_SWEEP.get(sweep_id)
        return dict(evaluations.tested) if evaluations is not None else {}

    @classmethod
    def forget(cls, sweep_id: str) -> None:
        cls._BY_SWEEP.pop(sweep_id, None)

    def launch(self, run, config: dict[str, Any], checkpoint, trial_id: str) -> None:
        """Start the evaluation of one stopped trial, or queue it while `limit` run.

        Where it runs: a CPU sweep's evaluation reserves no CPU and starts at once beside the
        trials (Tune hands a stopped trial's CPU to the next trial at once: its actor is reused,
        so an evaluation that waited for a CPU waited for the sweep's end); `limit` keeps it to as
        many as trials run at once. A GPU sweep's evaluation reserves its trial's share of a GPU
        (its memory and compute are the GPU's), so it starts when a share is free."""
        from trainables.vae_trainable import evaluate_stopped_trial

        if trial_id in self.in_flight or any(q[3] == trial_id for q in self.queued):
            return
        if len(self.in_flight) >= self.limit:
            self.queued.append((run, config, checkpoint, trial_id))
            return
        if TAG_EVALUATION_FAILED in run.data.tags:     # tried before and failed: it is a stopped trial again
            handle = tracking.RunHandle(self.tracking_uri, run.info.run_id)
            handle.set_tags({tracking.TAG_STOP: STOP_SCHEDULER})
            handle.client.delete_tag(run.info.run_id, TAG_EVALUATION_FAILED)
        policy, resources = self.spec.stopped_trials, self.spec.resources
        task = ray.remote(num_cpus=resources.cpu if resources.gpu else 0, num_gpus=resources.gpu)(evaluate_stopped_trial)
        ref = task.remote(config, checkpoint, trial_id, test=policy.tests, samples=policy.samples,
                          images=policy.images)
        self.in_flight[trial_id] = (ref, run, checkpoint)
        self.launched[trial_id] = time.monotonic()

    def collect(self, wait: bool) -> None:
        """Record the evaluations that ended; with `wait`, until every one (queued too) has."""
        self._collect(block=False)
        while wait and self.in_flight:
            self._collect(block=True)

    def _collect(self, block: bool) -> None:
        """Record the ended evaluations (at least one, blocking) and launch queued ones in their place."""
        if self.in_flight:
            refs = {ref: trial_id for trial_id, (ref, _, _) in self.in_flight.items()}
            done, _ = ray.wait(list(refs), num_returns=1 if block else len(refs), timeout=None if block else 0)
            for ref in done:
                _, run, checkpoint = self.in_flight.pop(refs[ref])
                self.seconds.append(time.monotonic() - self.launched.pop(refs[ref]))
                try:
                    result = ray.get(ref)
                except Exception as exc:     # the task raised (RayTaskError) or its worker died
                    self.failed.append(_evaluation_failed(self.tracking_uri, run, exc))
                else:
                    drop_checkpoints(checkpoint)
                    if isinstance(result.get(METRIC_TEST_LL), (int, float)):
                        mark = ESTIMATE_MARK if self.spec.stopped_trials.test_ll == "estimate" else ""
                        self.tested[refs[ref]] = f"{mark}{result[METRIC_TEST_LL]:.2f}"
        while self.queued and len(self.in_flight) < self.limit:
            self.launch(*self.queued.pop(0))


class TrialEnds(tune.Callback):
    """When a trial ends: one the scheduler stopped is tested at once (its evaluation launched);
    one that ended by itself (tested in its last step) needs its checkpoints no more, nor does a
    stopped one once tested (`Evaluations.collect`): they are deleted. A resume never restores an
    ended trial and `sweeper evaluate` uses the weights in MLflow, so what a finished sweep leaves
    on disk is its MLflow store and Tune's small records, not a checkpoint per trial.

    After `TrialRunsCallback` in the callbacks' list: that one tags a stopped trial's run
    `stop_reason: scheduler`. Plain data only (Tune pickles callbacks); what is in flight lives
    in `Evaluations`."""

    def __init__(self, sweep_id: str, tracking_uri: str, experiment_id: str, parent_run_id: str, spec: SweepSpec,
                 at_once: int = 1):
        self.sweep_id, self.args, self.spec = sweep_id, (tracking_uri, experiment_id, parent_run_id), spec
        self.at_once = at_once

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.checkpoint is None:
            return
        if (trial.last_result or {}).get("stop_reason"):      # it ended by itself and was finalized
            drop_checkpoints(trial.checkpoint)
            return
        run = tracking.find_child(*self.args, trial_id=trial.trial_id)
        if run is None or stop_reason(run.data.tags.get(tracking.TAG_STOP)) != STOP_SCHEDULER:
            return
        Evaluations.of(self.sweep_id, self.args[0], self.spec, self.at_once).launch(run, trial.config, trial.checkpoint,
                                                                      trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        evaluations = Evaluations._BY_SWEEP.get(self.sweep_id)
        if evaluations is not None:
            evaluations.collect(wait=False)


def evaluate_stopped_trials(results, sweep_id: str, tracking_uri: str, experiment_id: str, parent_run_id: str,
                            spec: SweepSpec, echo: Callable[[str], None], at_once: int = 1) -> list[str]:
    """After Tune's run: wait for the evaluations launched while it ran, then evaluate, from their
    last checkpoints, the stopped trials still without a test LL (an interrupt or an error cut
    theirs short, or they stopped in an earlier run of the driver). Returns one line per
    evaluation that failed; that trial's run is closed as FAILED (stop reason `error`, what
    failed in `stop_detail`, the traceback as its artifact)."""
    evaluations = Evaluations.of(sweep_id, tracking_uri, spec, at_once)
    if evaluations.in_flight or evaluations.queued:
        echo(f"waiting for the test evaluation of {len(evaluations.in_flight) + len(evaluations.queued)} trial(s) "
             "stopped by the scheduler ...")
    evaluations.collect(wait=True)
    from sweeper.callbacks import trial_id_of     # (callbacks imports this module)

    by_id = {}
    for result in results:
        trial_id = trial_id_of(result)
        if trial_id and result.error is None and result.checkpoint is not None:
            by_id[trial_id] = result
    todo = []
    for run in tracking.child_runs(tracking_uri, experiment_id, parent_run_id):
        tags = run.data.tags
        retry = TAG_EVALUATION_FAILED in tags
        if ((stop_reason(tags.get(tracking.TAG_STOP)) != STOP_SCHEDULER and not retry)
                or evaluated(run, spec) or tracking.TAG_ORPHANED in tags):
            continue
        result = by_id.get(tags.get(tracking.TAG_TRIAL, ""))
        if result is not None:
            todo.append((run, result))
    if todo:
        echo(f"evaluating {len(todo)} trial(s) stopped by the scheduler on the test set ...")
        for run, result in todo:
            evaluations.launch(run, result.config, result.checkpoint, run.data.tags[tracking.TAG_TRIAL])
        evaluations.collect(wait=True)
    if evaluations.seconds:
        echo(f"{len(evaluations.seconds)} test evaluation(s) of stopped trials ended, "
             f"{evaluations.mean_seconds:.1f} s each (task start to its end, beside the trials)")
    failed = evaluations.failed
    Evaluations.forget(sweep_id)
    return failed


def evaluated(run, spec: SweepSpec) -> bool:
    """Whether a stopped trial's run holds what the policy asks: a test LL, or (policy none) its
    end (the run is closed with its weights)."""
    if not spec.stopped_trials.tests:
        return run.info.status != "RUNNING" and tracking.TAG_MODEL_ID in run.data.tags
    return METRIC_TEST_LL in run.data.metrics


def _evaluation_failed(tracking_uri: str, run, exc: BaseException) -> str:
    """Close a stopped trial's run whose test evaluation raised; the line for the sweep's errors."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = (lines[-1] if lines else type(exc).__name__)[:300]
    epoch = int(run.data.metrics.get("epoch", 0))
    handle = tracking.RunHandle(tracking_uri, run.info.run_id)
    where = f"the artifact {EVALUATION_ERROR_FILE} of MLflow run {run.info.run_id}"
    try:
        handle.log_text(text, EVALUATION_ERROR_FILE)
    except Exception:   # the traceback is a courtesy; the run's state is what matters
        where = "the driver's console above"
    handle.set_tags({tracking.TAG_STOP: STOP_ERROR, TAG_EVALUATION_FAILED: "1",
                     "stop_detail": f"stopped by the scheduler after epoch {epoch}; its test evaluation failed: "
                                    f"{last} (traceback: {where})"})
    handle.terminate("FAILED")
    return (f"trial_{run.data.tags.get(tracking.TAG_TRIAL, '?')} ({run.info.run_name}): stopped by the scheduler "
            f"after epoch {epoch}, its test evaluation failed: {last} (traceback: {where})")


def drop_checkpoints(checkpoint) -> None:
    """Delete every checkpoint of an ended (and tested) trial: the `checkpoint_*` folders beside
    its last one, on whatever storage holds them."""
    import pyarrow.fs

    fs, trial_dir = checkpoint.filesystem, str(PurePosixPath(checkpoint.path).parent)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
        for info in infos:
            if info.type == pyarrow.fs.FileType.Directory and PurePosixPath(info.path).name.startswith("checkpoint_"):
                fs.delete_dir(info.path)
    except OSError as exc:      # disk space, not correctness: say so and go on
        logger.warning("could not delete the checkpoints in %s: %s", trial_dir, exc)
