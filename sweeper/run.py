"""`sweeper run`: one sweep = one Ray Tune experiment + one MLflow parent run.

The driver resolves every path and URI to an absolute one (Ray runs each trial in its own
folder, maybe on another node), validates the spec against the cluster before anything starts,
creates the MLflow experiment and the parent run, and hands Tune a trainable whose trials log to
nested child runs. `--resume` continues the newest sweep of the spec's name: the same parent
run, the same child runs, the searcher's study and ASHA's rungs; a resumed sweep runs the spec it
started with, so a changed spec or `--set` is refused with what changed.

Every choice the driver makes (the summary's order, "the best trial", the parent run's best_*
values) is made on the spec's metric at the epoch whose weights each trial tested; the test
log-likelihood is shown beside it and never used to choose.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import ray
from ray import tune

from sweeper import tracking
from sweeper.errors import SweepFailed, SweepInterrupted, SweeperError
from sweeper.evaluations import TrialEnds, evaluate_stopped_trials
from sweeper.callbacks import (PoolLeaveCallback, SweepReporter, TimeLeftCallback, TrialRunsCallback,
                               asha_expected_epochs, asha_stopped_share, duration, trial_id_of, trial_name)
from sweeper.spec import SweepSpec, load_spec
from trainables.vae.catalog import (METRIC_BEST_EPOCH, METRIC_BEST_VAL_ELBO, METRIC_TEST_IMAGES, METRIC_TEST_LL,
                                    METRIC_TEST_LL_SE, METRIC_TEST_SAMPLES, METRIC_VAL_ELBO, STOP_SCHEDULER, short,
                                    stop_reason)

STATE_FILE = "sweep.json"
# What the trials need from the driver's environment: MLflow credentials and the data location.
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                 "SWEEPER_DATA_DIR", "SWEEPER_DATA_MIRROR")
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20   # VAE trials pass nothing big through the object store


@dataclass(frozen=True)
class SweepPlan:
    """Where a sweep lives; everything absolute."""

    sweep_id: str                 # <spec name>-<timestamp>: the Tune experiment and parent run name
    storage: str                  # Tune storage_path: local folder or URI (s3://...)
    state_dir: Path               # driver-side state: sweep.json, the Optuna study
    tracking_uri: str

    @property
    def experiment_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.sweep_id}"


@dataclass
class SweepOutcome:
    sweep_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    experiment_path: str
    summary: Any = None           # pandas.DataFrame of the trials, best first
    errors: list[str] = field(default_factory=list)   # one line per trial that ended with an error
    unaccounted: list[str] = field(default_factory=list)   # where Tune, MLflow and Optuna disagree on the trials


def _is_uri(path: str) -> bool:
    return "://" in path


def plan_sweep(spec: SweepSpec, *, storage_path: str | None, tracking_uri: str | None,
               resume: bool, workdir: Path) -> SweepPlan:
    storage = storage_path or str(workdir / "sweeps")
    if not _is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    local_root = Path(storage) if not _is_uri(storage) else workdir / "sweeps"
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    if resume:
        # Exactly <name>-YYYYMMDD-HHMMSS: spec `quick` must not continue a sweep of spec `quick-gpu`.
        own = sweep_id_pattern(spec.name)
        candidates = sorted((p for p in local_root.glob(f"{glob.escape(spec.name)}-*")
                             if own.fullmatch(p.name) and (p / STATE_FILE).is_file()), key=lambda p: p.name)
        if not candidates:
            raise SweeperError(f"--resume: no earlier sweep of spec {spec.name!r} under {local_root} "
                               f"(looked for {spec.name}-YYYYMMDD-HHMMSS/{STATE_FILE}); run it without --resume first")
        state = json.loads((candidates[-1] / STATE_FILE).read_text())
        if tracking_uri is not None and uri != state["tracking_uri"]:
            # Its parent run, trial runs and their histories are in the store it started with.
            raise SweeperError(
                f"--resume: sweep {candidates[-1].name} logs to MLflow at {state['tracking_uri']}, not at "
                f"--tracking-uri {tracking_uri} ({uri}); leave --tracking-uri out (the sweep's own store is "
                f"used) or give {state['tracking_uri']}")
        return SweepPlan(candidates[-1].name, state["storage"], candidates[-1], state["tracking_uri"])
    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return SweepPlan(sweep_id, storage, local_root / sweep_id, uri)


def sweep_id_pattern(spec_name: str) -> re.Pattern[str]:
    """The names of a spec's sweeps: `<spec name>-YYYYMMDD-HHMMSS` (see plan_sweep)."""
    return re.compile(re.escape(spec_name) + r"-\d{8}-\d{6}")


def resolved_spec(spec: SweepSpec) -> dict[str, Any]:
    """The spec as it runs (defaults filled in, overrides applied), as JSON gives it back."""
    return json.loads(json.dumps(spec.to_dict()))


def spec_changes(started: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Every value that differs between two resolved specs, as 'path: before -> now'."""
    before, after = tracking.flatten("", started), tracking.flatten("", now)
    missing = "(not set)"
    return [f"{key}: {json.dumps(before.get(key, missing))} when the sweep started, {json.dumps(after.get(key, missing))} now"
            for key in sorted(set(before) | set(after)) if before.get(key, missing) != after.get(key, missing)]


def refuse_changed_spec(plan: SweepPlan, spec: SweepSpec) -> None:
    """--resume runs the spec the sweep started with, or nothing: Tune restores the search space,
    the searcher, the scheduler and the trials' settings from its own state, so a new value
    would apply in part (new resources and `batched` would, a new space would not)."""
    state = json.loads((plan.state_dir / STATE_FILE).read_text())
    if "spec_resolved" not in state:      # a sweep started by an older version: nothing to compare
        return
    changes = spec_changes(state["spec_resolved"], resolved_spec(spec))
    if changes:
        how = f"\nContinue it as it started:\n  {state['resume_command']}" if state.get("resume_command") else ""
        raise SweeperError(
            f"--resume: sweep {plan.sweep_id} started with other settings than the spec and options given now "
            f"({len(changes)} change(s)):\n  - " + "\n  - ".join(changes) + "\nA resumed sweep runs what it started "
            "with (Tune restores its search space, scheduler and trial settings), so changes are refused, not "
            f"applied in part.{how}\nOr start a new sweep with the new settings (without --resume).")


def _datasets_of(spec: SweepSpec) -> set[str]:
    """The datasets the sweep's trials will load: the searched ones, else the fixed one."""
    searched = {v for p in spec.parameters if p.name == "dataset" and p.values for v in p.values}
    return searched or {spec.base_config()["dataset"]}


# Ray's token-authentication notice for a local Ray: it is on by default there (which is what a
# sweep wants), and the notice only says how to turn it off.
RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _init_ray(address: str | None, workers: int = 0) -> dict[str, float]:
    """Connect to the cluster at `address`, or start a local Ray that keeps up to `workers` idle
    worker processes (see `local_workers`)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    # Ray's and Tune's INFO lines ("Started a local Ray instance", "Wrote the latest version of
    # all result files ...", "Total run time") are not for the user: the driver prints its own.
    quiet = {"logging_level": logging.WARNING, "runtime_env": runtime_env, "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:
            raise SweeperError(f"--address {address}: cannot connect to the Ray cluster: {exc}. "
                               "Check the address (ray status on the head prints it) and, with token "
                               "authentication, RAY_AUTH_MODE=token and the token") from exc
    else:
        notice = logging.getLogger(RAY_TOKEN_NOTICE_LOGGER)
        level = notice.level
        notice.setLevel(logging.ERROR)
        try:
            ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                     _system_config={"num_workers_soft_limit": workers} if workers else None, **quiet)
        finally:
            notice.setLevel(level)
    return dict(ray.cluster_resources())


def quiet_libraries() -> None:
    """Library messages a user of `sweeper run` does not need, turned off where they come from:
    MLflow's "Creating initial MLflow database tables" and Optuna's "A new study created"."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def no_reset_code_at_exit() -> None:
    """Ray's CLI logger calls colorama.init() when imported, whose exit handler writes an ANSI
    reset code to a terminal after the command's last line: unregister that handler."""
    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None and hasattr(initialise, "reset_all"):
        atexit.unregister(initialise.reset_all)


def local_workers(spec: SweepSpec, local: dict[str, float]) -> int:
    """The worker processes a local Ray keeps alive when idle: one per trial at once and one per
    evaluation at once (as many), at least Ray's own default (the CPU count). Ray's limit counts
    every worker, trial actors too, and kills idle task workers beyond it after a second, so with
    its default each stopped trial's evaluation started a fresh process (Python, Ray, torch and
    MLflow imports: ~10 s before its test began on a busy 2-core machine)."""
    return max(int(local.get("CPU", 1)), 2 * trials_at_once(spec, local))


def local_resources() -> dict[str, float]:
    """What a local Ray would find on this machine: its CPUs and its CUDA GPUs."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_local_data(spec: SweepSpec, *, download: bool) -> list[str]:
    """The spec's datasets on this machine, before anything starts: a corrupt file is an error
    (as in `sweeper data verify`); a missing one is downloaded (`download`) or named in the
    returned notes."""
    from trainables.vae.data import dataset_state, fetch, resolve_root

    root = spec.trial.get("data_root")
    notes = []
    for name in sorted(_datasets_of(spec)):
        if download:
            fetch(name, root)   # DataError: corrupt (delete it), or offline (where to put the file)
            continue
        state = dataset_state(name, root)
        if state == "corrupt":
            fetch(name, root)   # raises the corrupt-file message; never overwrites the file
        elif state == "missing":
            notes.append(f"dataset {name} is not in {resolve_root(root)} yet: `sweeper run` downloads it "
                         f"(or `sweeper data fetch {name}` now)")
    return notes


class Interrupts:
    """Ctrl-C during a sweep, in the driver's main thread.

    The first Ctrl-C while Tune runs asks Tune to stop (SIGUSR1, Tune's own graceful stop: it
    finishes its loop step, saves the experiment state and stops the trials within seconds); at
    any other moment it raises `KeyboardInterrupt` at once. A second Ctrl-C raises at once too.
    Tune's SIGINT handler is off (TUNE_DISABLE_SIGINT_HANDLER), so these are the only ones.

    Once the driver is closing (an interrupt has been raised, or Tune has stopped after the first
    Ctrl-C, or Ray is shutting down), a further Ctrl-C only says so: closing the runs and
    `ray.shutdown()` take seconds, and a `KeyboardInterrupt` inside them leaves Ray half shut down
    (the driver then exited with status 1 instead of 130: 1 double Ctrl-C in 14 here).

    A raised `KeyboardInterrupt` can be lost: when the signal lands while a finalizer runs (a
    weakref callback of SQLAlchemy's, say), Python prints "Exception ignored" and goes on. The
    driver then notices it itself (`missed`): before Tune's run it raises again, and inside it
    (`deliver_missed`, from a Tune callback once Tune listens) it asks Tune to stop as a first
    Ctrl-C would. Without that, a Ctrl-C in Tune's start-up was lost and the sweep ran to its end.
    """

    # The driver process's handler while a sweep runs: Tune's callbacks are pickled, so they find
    # it here rather than holding it.
    _CURRENT: ClassVar["Interrupts | None"] = None

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.count = 0
        self.in_fit = False
        self.closing = False
        self.message: str | None = None     # set once the sweep has something to resume
        self.raised = 0                     # KeyboardInterrupts raised by the handler
        self._previous: Any = None
        self._previous_hook: Any = sys.unraisablehook

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    def __enter__(self) -> "Interrupts":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:      # not the main thread (an embedding program): leave signals alone
            self._previous = None
        Interrupts._CURRENT = self
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        if Interrupts._CURRENT is self:
            Interrupts._CURRENT = None
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _unraisable(self, unraisable) -> None:
        """A KeyboardInterrupt of ours that a finalizer could not raise is handled (`missed`): no
        "Exception ignored" traceback for it on the console; anything else is printed as usual."""
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.raised:
            return
        self._previous_hook(unraisable)

    @property
    def missed(self) -> bool:
        """A KeyboardInterrupt was raised and the driver is still running as if none had been: a
        finalizer swallowed it (call this where the raise would have ended up, not in its way)."""
        return self.raised > 0

    @classmethod
    def deliver_missed(cls) -> None:
        """Inside Tune's run (its loop's thread, Tune's SIGUSR1 handler in place): a Ctrl-C whose
        KeyboardInterrupt was lost stops the sweep as a first Ctrl-C does; a next one exits at once."""
        self = cls._CURRENT
        if self is None or not self.missed or not self.in_fit:
            return
        self.raised, self.closing, self.count = 0, False, 1
        self.echo("\nInterrupted: stopping the sweep (a few seconds; Ctrl-C again to exit at once) ...")
        os.kill(os.getpid(), signal.SIGUSR1)      # Tune's graceful stop (ray/tune/tune.py)

    def close(self) -> None:
        """From here on the driver only cleans up: Ctrl-C no longer interrupts it."""
        self.closing = True

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.closing:
            self.echo("\nstill closing the sweep's runs and Ray (a few seconds) ...")
            return
        # Tune installs its SIGUSR1 handler only once its run has set up (ray/tune/tune.py); before
        # that the signal's default action would kill the driver, so this Ctrl-C raises instead.
        tune_listens = hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        if self.count == 1 and self.in_fit and tune_listens:
            self.echo("\nInterrupted: stopping the sweep (a few seconds; Ctrl-C again to exit at once) ...")
            os.kill(os.getpid(), signal.SIGUSR1)   # Tune's graceful stop (ray/tune/tune.py)
            return
        self.close()
        self.raised += 1
        raise KeyboardInterrupt


class MissedInterrupt(tune.Callback):
    """Each step of Tune's loop: a Ctrl-C whose KeyboardInterrupt a finalizer swallowed during
    Tune's start-up stops the sweep now (`Interrupts.deliver_missed`). Holds nothing: Tune pickles it."""

    def on_step_begin(self, iteration, trials, **info):
        Interrupts.deliver_missed()


class _DropRayHints(logging.Filter):
    """Tune's own hints on an interrupted run name its Python API (`Tuner.restore(...)`); the
    driver prints the `sweeper run ... --resume` command instead."""

    DROPPED = ("Experiment has been interrupted", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(str(record.msg).startswith(d) for d in self.DROPPED)


class _DropUnstartedTrials(logging.Filter):
    """Tune's results warn "Failed to fetch metrics" for each trial without a result file: after a
    Ctrl-C, the pending trials that never started. Nothing is missing there (the driver accounts
    for every trial itself, and a resume starts them), so that warning is dropped when it names
    only such trials; a trial whose results could not be read for another reason is still shown."""

    LOGGER = "ray.tune.analysis.experiment_analysis"
    HEAD, NO_FILES = "Failed to fetch metrics", "both result.json and progress.csv were not found"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.HEAD):
            return True
        return not all(self.NO_FILES in line for line in message.splitlines()[1:])


def resume_command(spec_arg: str, overrides: Sequence[str], options: dict[str, Any]) -> str:
    """The command that continues this sweep: the same spec, --set values and options."""
    args = ["sweeper", "run", spec_arg]
    for text in overrides:
        args += ["--set", text]
    for name in ("num_samples", "max_concurrent", "address", "tracking_uri", "storage_path"):
        if options.get(name) is not None:
            args += [f"--{name.replace('_', '-')}", str(options[name])]
    return shlex.join(args + ["--resume"])


def run_sweep(spec_path: str | Path, overrides: Sequence[str] = (), *, num_samples: int | None = None,
              max_concurrent: int | None = None, address: str | None = None,
              tracking_uri: str | None = None, storage_path: str | None = None, resume: bool = False,
              workdir: str | Path | None = None, echo: Callable[[str], None] = print) -> SweepOutcome:
    """Validate the spec, start (or resume) the sweep, wait for it, return its summary.

    Raises `SweepInterrupted` (exit 130) on Ctrl-C, with the command that resumes the sweep, and
    `SweepFailed` (exit 1) when the sweep ended but some trials errored (listed)."""
    workdir = Path(workdir or os.getcwd()).resolve()
    spec_arg = str(spec_path)
    spec_path = Path(spec_path).expanduser().resolve()
    options = {"num_samples": num_samples, "max_concurrent": max_concurrent, "address": address,
               "tracking_uri": tracking_uri, "storage_path": storage_path}
    started = time.time()
    try:
        quiet_libraries()
        # Everything that can be known before Ray starts: the spec, this machine's GPUs, the tracking
        # store (a dead server or refused credentials fail here, in seconds), the data.
        local = None if address else local_resources()
        spec = load_spec(spec_path, overrides, num_samples=num_samples, max_concurrent=max_concurrent,
                         cluster_resources=local)
        plan = plan_sweep(spec, storage_path=storage_path, tracking_uri=tracking_uri, resume=resume, workdir=workdir)
        if resume:
            refuse_changed_spec(plan, spec)
        tracking.check_store(plan.tracking_uri)
        if not address:  # one download in the driver instead of one per trial process
            check_local_data(spec, download=True)
        tracking.create_store(plan.tracking_uri)    # last: a sweep refused above leaves no database
    except KeyboardInterrupt:      # Ctrl-C before the driver's own handler is in place
        what = "the sweep resumed: it is as it was" if resume else "the sweep started: nothing was launched"
        raise SweepInterrupted(f"interrupted before {what}") from None
    command = resume_command(spec_arg, overrides, options)

    with Interrupts(echo) as interrupts:
        try:
            cluster = _init_ray(address, 0 if address else local_workers(spec, local))
            try:
                # Now that the cluster is known: can a trial ever get its resources?
                spec = load_spec(spec_path, overrides, num_samples=num_samples, max_concurrent=max_concurrent,
                                 cluster_resources=cluster)
                at_once = trials_at_once(spec, cluster)
                _warn_concurrency(spec, cluster, at_once, echo)
                outcome = SweepDriver(spec, spec_path, overrides, plan, resume, echo, interrupts, command,
                                      at_once).run()
            finally:
                interrupts.close()
                ray.shutdown()
            echo(f"done in {duration(time.time() - started)}")
            return outcome
        except KeyboardInterrupt:
            # A second Ctrl-C while the first one's stop was under way, or one before the sweep began.
            raise SweepInterrupted(interrupts.message or "interrupted before the sweep started; nothing "
                                   "was launched") from None
        finally:
            no_reset_code_at_exit()


def run_name_keys(spec: SweepSpec) -> list[str]:
    """The trial values a run's name shows: the prior, and every searched parameter."""
    searched = [p.name for p in spec.parameters]
    first = [k for k in ("dataset", "model", "prior") if k in searched or k == "prior"]
    return first + [k for k in searched if k not in first]


def trials_at_once(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """How many trials run at once: max_concurrent, or fewer if the cluster has room for fewer."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    fits = [cluster.get("CPU", 0) / cpu] if cpu else []
    if gpu:
        fits.append(cluster.get("GPU", 0) / gpu)
    return max(1, min([spec.max_concurrent] + [int(f) for f in fits]))


def _warn_concurrency(spec: SweepSpec, cluster: dict[str, float], at_once: int,
                      echo: Callable[[str], None]) -> None:
    """Say when max_concurrent asks for more trials at once (`at_once`) than the cluster can run."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    if spec.max_concurrent > at_once:
        echo(f"note: max_concurrent is {spec.max_concurrent} but the cluster has room for {at_once} trial(s) "
             f"at once ({short(cluster.get('CPU', 0))} CPU, {short(cluster.get('GPU', 0))} GPU; each trial "
             f"reserves {short(cpu)} CPU, {short(gpu)} GPU): the others wait")


class SweepDriver:
    """One run of the driver over a sweep, as named steps:

    1. `open_parent`: the sweep's MLflow parent run, new or reopened (`--resume`), and sweep.json;
    2. `make_tuner`: a new Tune experiment, Tune's restored one, or, when Tune never saved the
       experiment's state (the driver died in its start-up), the same sweep launched again:
       same parent run, same Optuna study, the lost launch's runs and study trials closed;
    3. `fit`: Tune runs the trials;
    4. `finish`: lost trials tagged, errors listed, every trial the spec asks for accounted for
       in Tune, MLflow and Optuna, stopped trials evaluated;
    5. `close`: the summary and the parent's end; an interrupt or a failure ends it as KILLED or
       FAILED instead, and a new sweep that launched nothing is no longer resumable.
    """

    def __init__(self, spec: SweepSpec, spec_path: Path, overrides: Sequence[str], plan: SweepPlan, resume: bool,
                 echo: Callable[[str], None], interrupts: Interrupts, command: str, at_once: int = 1):
        self.spec, self.spec_path, self.overrides, self.plan = spec, spec_path, overrides, plan
        self.resume, self.echo, self.interrupts, self.command, self.at_once = resume, echo, interrupts, command, at_once
        self.state_file = plan.state_dir / STATE_FILE
        self.pooled = spec.resources.pooled
        self.experiment_id = ""
        self.parent: tracking.RunHandle | None = None
        self.outcome: SweepOutcome | None = None
        self.failed_evaluations: list[str] = []
        self.status = "FAILED"
        self.parent_closed = False     # ended before `close` (an interrupt, an abandoned start)

    def run(self) -> SweepOutcome:
        ray_hints, unstarted = _DropRayHints(), _DropUnstartedTrials()
        logging.getLogger("ray.tune.tune").addFilter(ray_hints)
        logging.getLogger(unstarted.LOGGER).addFilter(unstarted)
        try:
            self.experiment_id = tracking.ensure_experiment(self.plan.tracking_uri, self.spec.experiment)
            self.open_parent()
            results = self.fit(self.make_tuner())
            self.finish(results)
            self.status = "FINISHED" if not (self.outcome.errors or self.outcome.unaccounted) else "FAILED"
        except KeyboardInterrupt:
            self.status = "KILLED"
            self.interrupted()          # raises SweepInterrupted
        except BaseException as exc:
            self.abandon_if_nothing_launched(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            logging.getLogger("ray.tune.tune").removeFilter(ray_hints)
            logging.getLogger(unstarted.LOGGER).removeFilter(unstarted)
            self.close()
        return self.result()

    # -- 1. the parent run -----------------------------------------------------------------------
    def open_parent(self) -> None:
        plan, spec = self.plan, self.spec
        plan.state_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            parent_id = json.loads(self.state_file.read_text())["parent_run_id"]
            self.parent = tracking.RunHandle(plan.tracking_uri, parent_id)
            closed = tracking.close_stale_children(plan.tracking_uri, self.experiment_id, parent_id)
            if closed:
                self.echo(f"closed {len(closed)} run(s) left RUNNING by the interrupted sweep as KILLED")
            self.parent.reopen()
            if not self.parent.client.get_run(parent_id).data.params:
                self.describe_parent()       # the first launch died before it had
            self.echo(f"resuming sweep {plan.sweep_id} (MLflow parent run {parent_id})")
        else:
            self.parent = tracking.RunHandle(plan.tracking_uri, tracking.client(plan.tracking_uri).create_run(
                self.experiment_id, run_name=plan.sweep_id,
                tags={tracking.TAG_ROLE: tracking.ROLE_SWEEP, tracking.TAG_SWEEP: plan.sweep_id,
                      tracking.TAG_NOTE: spec.description or f"sweep {spec.name}"}).info.run_id)
            # At once: from here on the parent run is found again by --resume (and closed by it).
            self.state_file.write_text(json.dumps({
                "sweep_id": plan.sweep_id, "parent_run_id": self.parent.run_id, "experiment_id": self.experiment_id,
                "tracking_uri": plan.tracking_uri, "storage": plan.storage, "spec": str(self.spec_path),
                "resume_command": self.command, "spec_resolved": resolved_spec(spec),   # what --resume must match
            }, indent=2))
            self.describe_parent()
            self.echo(f"sweep {plan.sweep_id}: {spec.total_trials} trial(s), MLflow experiment {spec.experiment!r} "
                      f"at {plan.tracking_uri}, parent run {self.parent.run_id}")
        # The runs table opens on this sweep's columns, best by validation first (`sweeper ui`'s links).
        tracking.save_sweep_view(plan.tracking_uri, self.experiment_id, tracking.sweep_view(
            spec.metric.name, spec.metric.mode, [q.name for q in spec.parameters], self.parent.run_id))
        # From here on an interrupt leaves a sweep to resume (sweep.json and the parent run exist).
        self.interrupts.message = f"sweep {plan.sweep_id} interrupted; continue it with:\n  {self.command}"
        self.outcome = SweepOutcome(plan.sweep_id, self.parent.run_id, self.experiment_id, plan.tracking_uri,
                                    plan.experiment_path)

    def describe_parent(self) -> None:
        """The spec on the sweep's run: its values as params, the file and the --set lines."""
        spec = self.spec
        self.parent.log_params({"spec_file": self.spec_path.name, **tracking.flatten("", spec.to_dict())})
        if spec.search.algorithm == "optuna":
            from sweeper.search import study_storage_url

            self.parent.set_tags({tracking.TAG_STUDY_STORAGE: study_storage_url(self.plan.state_dir),
                                  tracking.TAG_STUDY_NAME: spec.name})
        self.parent.log_artifact(self.spec_path, "spec")
        if self.overrides:
            self.parent.log_text("\n".join(self.overrides) + "\n", "spec/overrides.txt")

    # -- 2. Tune's experiment ----------------------------------------------------------------------
    def make_tuner(self) -> tune.Tuner:
        from trainables.pool import remove_pools
        from trainables.vae_trainable import VAETrainable

        spec, plan = self.spec, self.plan
        if self.pooled:
            if self.resume and remove_pools(plan.sweep_id):
                self.echo("removed the interrupted sweep's trial pools; their trials rejoin from their checkpoints")
            self.echo("trials that share a device train together as one batched model (resources.batched)")
        trainable = tune.with_resources(VAETrainable, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
        # Tune saves the experiment's state (which trials exist) every >= 10 s by default; a trial that
        # started since then is unknown to a resumed sweep (mark_lost_trials). Every 2 s narrows that.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
        _reporter(spec, plan.sweep_id)   # (a resumed sweep gets the same one, saved with its experiment)
        if self.resume:
            saved = tune_state_saved(plan)
            if saved is None:
                raise SweeperError(f"--resume: cannot read Tune's state of sweep {plan.sweep_id} at "
                                   f"{plan.experiment_path}; check that the storage is reachable, then resume again")
            if saved:
                return tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                                          resume_errored=True)
            self.forget_lost_launch()
        return self.new_tuner(trainable)

    def forget_lost_launch(self) -> None:
        """The driver died before Tune first saved the experiment's state: nothing of the launch
        can be continued, so the sweep is launched again. Runs and study trials the lost launch
        opened belong to no trial now: tagged as orphans and closed, or failed in the study."""
        self.echo(f"sweep {self.plan.sweep_id} was interrupted before Tune saved its state: launching it again "
                  "(the same MLflow parent run and Optuna study; nothing of the first launch is counted)")
        orphans = tracking.tag_orphans(self.plan.tracking_uri, self.experiment_id, self.parent.run_id, set())
        if orphans:
            self.echo(f"{len(orphans)} run(s) of the lost launch are tagged {tracking.TAG_ORPHANED}")
        if self.spec.search.algorithm == "optuna":
            from sweeper.search import fail_running_study_trials

            fail_running_study_trials(self.plan.state_dir, self.spec.name)

    def new_tuner(self, trainable) -> tune.Tuner:
        from sweeper.search import SchedulerStateCallback, make_scheduler, make_search_alg, param_space
        from trainables.vae_trainable import SWEEP_KEY

        spec, plan = self.spec, self.plan
        sweep_cfg = {"tracking_uri": plan.tracking_uri, "experiment_id": self.experiment_id,
                     "parent_run_id": self.parent.run_id, "sweep_name": plan.sweep_id,
                     "name_keys": run_name_keys(spec),
                     "cpus_per_trial": max(1, int(spec.resources.cpu)), "scheduler": spec.scheduler.type}
        if self.pooled:
            sweep_cfg["pool"] = {"sweep_id": plan.sweep_id}
        scheduler = make_scheduler(spec)
        audit = []
        if spec.audit_trials:   # marks them in MLflow (and the study) for the rung fidelity at the end
            from sweeper.callbacks import AuditTrialsCallback
            from sweeper.search import study_storage_url

            study = (study_storage_url(plan.state_dir), spec.name) if spec.search.algorithm == "optuna" else None
            audit.append(AuditTrialsCallback(scheduler, plan.tracking_uri, self.experiment_id, self.parent.run_id, study))
        return tune.Tuner(
            trainable,
            param_space={**param_space(spec), SWEEP_KEY: sweep_cfg},
            tune_config=tune.TuneConfig(
                metric=spec.metric.name, mode=spec.metric.mode, num_samples=spec.num_samples,
                search_alg=make_search_alg(spec, plan.state_dir), scheduler=scheduler,
                reuse_actors=True,    # warm processes: a fresh torch+mlflow import costs ~10 s
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=plan.sweep_id, storage_path=plan.storage,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # Every epoch by default: a retried or resumed trial continues exactly where it
                # was. At the end too, so a scheduler-stopped trial has its last epoch's checkpoint.
                # One kept: Tune deletes the older only once the newer is complete, so one always
                # exists; retention may delete the one Tune's last saved state names, and a restore
                # then goes on from the trial's newest (VAETrainable.restore). An ended, tested
                # trial's checkpoints go too (TrialEnds).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_at_end=True,
                                                        checkpoint_frequency=spec.checkpoint_frequency),
                callbacks=[SchedulerStateCallback(scheduler), _time_left(spec, self.at_once, plan.sweep_id),
                           TrialRunsCallback(plan.tracking_uri, self.experiment_id, self.parent.run_id,
                                             spec.scheduler.type, plan.sweep_id),
                           # After TrialRunsCallback, which tags a stopped trial's run: tested as it stops.
                           TrialEnds(plan.sweep_id, plan.tracking_uri, self.experiment_id, self.parent.run_id, spec,
                                     self.at_once),
                           *([PoolLeaveCallback(plan.sweep_id)] if self.pooled else []), *audit,
                           MissedInterrupt()],
                progress_reporter=_reporter(spec, plan.sweep_id), verbose=1),
        )

    # -- 3. Tune runs the trials ------------------------------------------------------------------
    def fit(self, tuner: tune.Tuner):
        if self.interrupts.missed:        # a Ctrl-C in the start-up whose raise was swallowed
            raise KeyboardInterrupt
        self.interrupts.in_fit = True
        try:
            results = tuner.fit()
        finally:
            self.interrupts.in_fit = False
        if self.interrupts.interrupted:
            self.interrupts.close()
            raise KeyboardInterrupt
        return results

    # -- 4. every trial accounted for, the stopped ones evaluated ------------------------------------
    def finish(self, results) -> None:
        from trainables.pool import remove_pools

        plan, spec = self.plan, self.spec
        if self.pooled:
            remove_pools(plan.sweep_id)    # frees the devices before the stopped trials are evaluated
        mark_lost_trials(results, plan, spec, self.experiment_id, self.parent.run_id, self.echo,
                         seen=TrialRunsCallback.seen_in(self.parent.run_id))
        self.outcome.errors = [f"{trial_name_of(r)}: {error_line(r)} (traceback: {Path(r.path) / 'error.txt'})"
                               for r in results if r.error is not None]
        self.failed_evaluations = evaluate_stopped_trials(results, plan.sweep_id, plan.tracking_uri,
                                                          self.experiment_id, self.parent.run_id, spec, self.echo,
                                                          self.at_once)
        self.outcome.errors += self.failed_evaluations
        self.outcome.unaccounted = unaccounted_trials(results, spec, plan, self.experiment_id, self.parent.run_id)

    # -- 5. the end ------------------------------------------------------------------------------------
    def interrupted(self) -> None:
        """Ctrl-C: the runs still RUNNING are closed as KILLED, and the sweep stays resumable from
        whatever it had reached (Tune's state, or only its start-up: `make_tuner` launches it again)."""
        if self.parent is None:
            raise KeyboardInterrupt    # nothing was created yet: run_sweep says so
        running = [r for r in tracking.child_runs(self.plan.tracking_uri, self.experiment_id, self.parent.run_id)
                   if r.info.status == "RUNNING"]
        testing = sum(stop_reason(r.data.tags.get(tracking.TAG_STOP)) == STOP_SCHEDULER for r in running)
        tracking.close_stale_children(self.plan.tracking_uri, self.experiment_id, self.parent.run_id)
        self.parent.terminate("KILLED")
        self.parent_closed = True
        if not self.state_file.exists():     # before sweep.json: there is no sweep to continue
            raise SweepInterrupted(f"interrupted before sweep {self.plan.sweep_id} started: nothing was launched "
                                   f"(its MLflow run {self.parent.run_id} is closed as KILLED)") from None
        closed = [f"{len(running) - testing} training trial(s)"] if len(running) > testing else []
        if testing:
            closed.append(f"{testing} stopped trial(s) whose test evaluation was cut short (--resume tests them)")
        what = f"the runs of {' and '.join(closed)} are closed as KILLED" if closed else "no trial was running"
        raise SweepInterrupted(
            f"sweep {self.plan.sweep_id} interrupted; {what}; finished trials are kept. Continue it with:\n"
            f"  {self.command}") from None

    def abandon_if_nothing_launched(self, why: str) -> bool:
        """A new sweep that failed before Tune saved its state and before any trial opened a run
        has nothing to continue: its parent run ends as FAILED and sweep.json goes, so `--resume`
        continues the sweep before it, not this one. True if so. (A sweep killed or interrupted
        in its start-up stays resumable: `make_tuner` launches it again.)"""
        if self.resume or self.parent is None:
            return False
        try:
            if tune_state_saved(self.plan) is not False or tracking.child_runs(
                    self.plan.tracking_uri, self.experiment_id, self.parent.run_id):
                return False
            self.state_file.unlink(missing_ok=True)
            self.parent.set_tags({"stop_detail": why[:5000]})
            self.parent.terminate("FAILED")
        except Exception:      # the store itself failed (the cause being raised): leave what is there
            return not self.state_file.exists()
        self.parent_closed = True
        return True

    def close(self) -> None:
        from trainables.pool import remove_pools

        if self.pooled and ray.is_initialized():
            remove_pools(self.plan.sweep_id)
        if self.parent is None or self.parent_closed:
            return
        if self.outcome is not None:
            self.outcome.summary = summarize(self.spec, self.plan.tracking_uri, self.experiment_id, self.parent,
                                             self.echo, errors=self.outcome.errors)
            self.rung_fidelity()
        self.parent.terminate(self.status)
        timing = TimeLeftCallback.compare(self.plan.sweep_id)
        if timing:
            self.echo(timing)
        if self.outcome is not None:
            echo_urls(self.outcome, self.echo)

    def rung_fidelity(self) -> None:
        """After the summary: how well ASHA's rungs ranked the trials (sweeper/fidelity.py), printed
        and logged to the parent run. A failure here is reported and does not end the sweep badly."""
        from sweeper.fidelity import log_rung_fidelity

        best = best_trial(self.outcome.summary)
        try:
            log_rung_fidelity(self.spec, self.plan.tracking_uri, self.experiment_id, self.parent, self.echo,
                              winner=best["run_id"] if best is not None else None)
        except Exception as exc:
            self.echo(f"rung fidelity could not be measured: {type(exc).__name__}: {exc}")

    def result(self) -> SweepOutcome:
        outcome = self.outcome
        if outcome.unaccounted:
            self.parent.set_tags({tracking.TAG_ERRORS: "trials unaccounted for: " + "; ".join(outcome.unaccounted)[:4000]})
            raise SweepFailed(f"sweep {self.plan.sweep_id} ended with trials unaccounted for:\n  - "
                              + "\n  - ".join(outcome.unaccounted + outcome.errors)
                              + f"\nContinue it with:\n  {self.command}")
        if outcome.errors:
            self.parent.set_tags({tracking.TAG_ERRORS: f"{len(outcome.errors)} trial(s) ended with an error: "
                                                       + "; ".join(outcome.errors)[:4000]})
            again = (f"\nAfter fixing the cause, `{self.command}` evaluates the trial(s) whose test evaluation "
                     "failed again." if self.failed_evaluations else "")
            raise SweepFailed(f"{len(outcome.errors)} trial(s) of sweep {self.plan.sweep_id} ended with an error "
                              "(the other trials finished):\n  - " + "\n  - ".join(outcome.errors) + again)
        return outcome


def tune_state_saved(plan: SweepPlan) -> bool | None:
    """Whether Tune saved the experiment's state (its trials, searcher and scheduler), which is
    what `Tuner.restore` continues; None if the storage cannot be read now. Its `tuner.pkl` alone,
    written first, is not enough: a restore from it alone starts an empty experiment that ends
    with whatever few trials the restored searcher still allows."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    if not _is_uri(plan.storage) and not Path(plan.experiment_path).is_dir():
        return False
    try:
        return _find_newest_experiment_checkpoint(plan.experiment_path) is not None
    except FileNotFoundError:
        return False
    except Exception:
        return None


def unaccounted_trials(results, spec: SweepSpec, plan: SweepPlan, experiment_id: str,
                       parent_run_id: str) -> list[str]:
    """After a sweep that ran to its end: every trial the spec asks for ran in Tune, each trial
    that did not error has exactly one MLflow run, and (Optuna) the study's finished trials are
    exactly the sweep's. One line per problem; none when Tune, MLflow and Optuna agree."""
    problems = []
    tune_ids: dict[str, Any] = {}
    for result in results:
        tune_ids[str(trial_id_of(result))] = result
    if len(tune_ids) < spec.total_trials:
        problems.append(f"the sweep ended with {len(tune_ids)} of the {spec.total_trials} trial(s) its spec asks "
                        "for: Tune's saved state had lost some (resume it again; the missing ones then run)")
    runs = [r for r in tracking.child_runs(plan.tracking_uri, experiment_id, parent_run_id)
            if tracking.TAG_ORPHANED not in r.data.tags]
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags.get(tracking.TAG_TRIAL, ""), []).append(run)
    for trial_id, result in tune_ids.items():
        if result.error is None and len(by_trial.get(trial_id, [])) != 1:
            problems.append(f"trial_{trial_id} has {len(by_trial.get(trial_id, []))} MLflow run(s), not one")
    for trial_id in sorted(set(by_trial) - set(tune_ids)):
        problems.append(f"MLflow run(s) {[r.info.run_id for r in by_trial[trial_id]]} belong to no trial Tune knows")
    if spec.search.algorithm == "optuna":
        from sweeper.search import finished_study_trials

        for number, tune_id, state in finished_study_trials(plan.state_dir, spec.name):
            if tune_id not in tune_ids:
                problems.append(f"Optuna trial #{number} is {state} but belongs to no trial of the sweep")
    return problems


def echo_urls(outcome: SweepOutcome, echo: Callable[[str], None]) -> None:
    """Where to look: the sweep's run and its best trial's (by validation), as `sweeper ui` (or the server) serves them."""
    base = tracking.ui_base(outcome.tracking_uri)
    how = "" if outcome.tracking_uri.startswith("http") else " (start the UI with `sweeper ui`)"
    echo(f"\nMLflow{how}:\n  all trials:     {tracking.ui_url(base, outcome.experiment_id, view=True)}")
    echo(f"  the sweep:      {tracking.ui_url(base, outcome.experiment_id, outcome.parent_run_id)}")
    best = best_trial(outcome.summary)
    if best is not None:
        echo(f"  the best trial: {tracking.ui_url(base, outcome.experiment_id, best['run_id'])} ({best['trial']})")


def _time_left(spec: SweepSpec, at_once: int, sweep_id: str) -> TimeLeftCallback:
    max_epochs = int(spec.base_config()["max_epochs"])
    s = spec.scheduler
    expected = (asha_expected_epochs(s.grace_period, s.reduction_factor, s.max_t or max_epochs)
                if s.type == "asha" else None)
    share = asha_stopped_share(s.grace_period, s.reduction_factor, s.max_t or max_epochs) if s.type == "asha" else 0.0
    if expected is not None and spec.audit_trials:   # audit trials run their whole budget
        expected += spec.audit_trials * ((s.max_t or max_epochs) - expected) / spec.total_trials
        share *= 1 - spec.audit_trials / spec.total_trials
    return TimeLeftCallback(spec.total_trials, max_epochs, expected, at_once, sweep_id=sweep_id,
                            finish_guess_epochs=finish_guess_epochs(spec),
                            stopped_test_fraction=stopped_test_fraction(spec), stopped_share=share)


def stopped_test_fraction(spec: SweepSpec) -> float:
    """What the test of a trial the scheduler stopped costs, as a fraction of a full one: the
    estimate's images x samples over the full test's (none: the weights and images only)."""
    from trainables.vae.data import get_spec

    policy = spec.stopped_trials
    if policy.test_ll == "full":
        return 1.0
    if not policy.tests:
        return 0.05
    cfg = spec.base_config()
    fractions = []
    for name in _datasets_of(spec):
        test = min(get_spec(name).info.split_sizes[2], cfg["test_subset"] or 10**9)
        fractions.append(min(1.0, min(policy.images, test) * policy.samples / (test * int(cfg["test_samples"]))))
    return max(fractions, default=1.0)


def finish_guess_epochs(spec: SweepSpec) -> float:
    """A trial's own end (test LL with S importance samples, the validation LL of the tested
    weights with val_ll_samples, images, weights) in epochs, until one is measured: half of those
    forward passes (test images x S + validation images x val_ll_samples) over an epoch's 3 x
    training (forward and backward) + validation passes. Static MNIST with S=5000 on 2 CPU cores:
    ~70-180 measured (~158 guessed); the quickstart, where the validation LL is most of it: ~3.5
    measured in one process (~5.4 guessed; tests beside training trials took 5-6 s, ~10 epochs)."""
    from trainables.vae.data import get_spec

    cfg = spec.base_config()
    guesses = []
    for name in _datasets_of(spec):
        train, val, test = get_spec(name).info.split_sizes
        train, val, test = (min(n, cfg[k] or n) for n, k in ((train, "train_subset"), (val, "val_subset"),
                                                              (test, "test_subset")))
        passes = test * int(cfg["test_samples"]) + val * int(cfg["val_ll_samples"])
        guesses.append(0.5 * passes / (3 * train + val))
    return max(guesses, default=0.0)


def trial_name_of(result) -> str:
    return Path(result.path).name if result.path else "trial"


def error_line(result) -> str:
    """The last line of a trial's error ('ConfigError: ...'): Ray wraps it in its own exception."""
    lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(result.error).__name__)[:300]


def mark_lost_trials(results, plan: SweepPlan, spec: SweepSpec, experiment_id: str, parent_run_id: str,
                     echo: Callable[[str], None], seen: set[str] = frozenset()) -> None:
    """Runs and study trials of trials that Tune lost: tag them, and end them as failed.

    Tune saves the experiment's state every few seconds; a trial that started (opened its MLflow
    run, took an Optuna suggestion) after the last save and before the driver died is unknown
    to the resumed sweep, which starts another trial in its place. Its run is tagged
    `sweeper.orphaned` (and left out of the summary and the report); its Optuna trial, still
    RUNNING in the study, becomes FAIL so the sampler does not wait for it. Only after a sweep
    that ran to its end: after an interrupt, RUNNING study trials belong to trials that continue.
    """
    known = set(seen)   # trials without any result (errored in their setup) are known too
    for result in results:
        trial_id = trial_id_of(result)
        if trial_id:
            known.add(trial_id)
    orphans = tracking.tag_orphans(plan.tracking_uri, experiment_id, parent_run_id, known)
    if orphans:
        echo(f"{len(orphans)} run(s) of trials the interrupted sweep lost are tagged {tracking.TAG_ORPHANED}")
    if spec.search.algorithm == "optuna":
        from sweeper.search import fail_running_study_trials

        fail_running_study_trials(plan.state_dir, spec.name)


def _reporter(spec: SweepSpec, sweep_id: str) -> SweepReporter:
    # The legacy output engine, whose reporters Tune calls; the new one ignores reporters.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Checkpointing every epoch is deliberate (exact resume); Ray warns about it every few seconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return SweepReporter([p.name for p in spec.parameters], spec.metric.name, spec.metric.mode, sweep_id=sweep_id)


# --------------------------------------------------------------------------------------------
# The summary: every choice on the spec's metric at each trial's tested epoch


def typed_params(params: Mapping[str, str]) -> dict[str, Any]:
    """A run's MLflow params (strings) as the trial's values: '13' -> 13, 'True' -> True,
    'None' -> None, by the type of each `TrainConfig` field (other keys stay strings)."""
    from trainables.vae.config import TrainConfig

    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, text in params.items():
        kind = types.get(key, "str").replace(" | None", "")
        try:
            if text == "None" and key in types:
                out[key] = None
            elif kind == "bool":
                out[key] = {"True": True, "False": False}[text]
            elif kind == "int":
                out[key] = int(float(text)) if float(text).is_integer() else float(text)
            elif kind == "float":
                out[key] = float(text)
            else:
                out[key] = text
        except (KeyError, ValueError):
            out[key] = text
    return out


def metric_at_tested_epoch(client, run, metric: str) -> tuple[float | None, int | None]:
    """(the run's `metric` at the epoch whose weights it tested, that epoch), or (its latest value,
    None) for a trial without a tested epoch (running, killed, failed).

    val_elbo: the trial's `best_val_elbo`; for runs made before it existed, and for other
    metrics, the metric's history at step `best_epoch` (the trainable logs epochs as steps)."""
    m = run.data.metrics
    latest = m.get(metric)
    if METRIC_BEST_EPOCH not in m:
        return latest, None
    epoch = int(m[METRIC_BEST_EPOCH])
    value = m.get(METRIC_BEST_VAL_ELBO)
    if metric == METRIC_VAL_ELBO and value is not None and math.isfinite(value):
        return value, epoch
    at = [h.value for h in client.get_metric_history(run.info.run_id, metric) if h.step == epoch]
    return (at[-1], epoch) if at else (latest, None)


def best_trial(table) -> Any:
    """The summary's best trial (its first row), or None when no trial has a tested epoch."""
    if table is None or not len(table) or METRIC_BEST_EPOCH not in table:
        return None
    first = table.iloc[0]
    return first if first.notna()[METRIC_BEST_EPOCH] else None


def summarize(spec: SweepSpec, tracking_uri: str, experiment_id: str, parent: tracking.RunHandle,
              echo: Callable[[str], None], errors: Sequence[str] = ()):
    """The trials' child runs as a table, printed and logged to the parent (summary.csv, .md).

    Best first by the spec's metric at each trial's tested epoch; trials without one (running,
    killed, failed) after them, by their latest value, marked `latest`. The parent run's
    best_run_id / best_trial tags and best_* metrics are the first row's: test LL is shown
    beside, never used to choose."""
    import pandas as pd

    client = tracking.client(tracking_uri)
    metric, defaults = spec.metric.name, spec.base_config()
    at_column = f"{metric}_at"
    rows = []
    for run in tracking.child_runs(tracking_uri, experiment_id, parent.run_id):
        m, t = run.data.metrics, run.data.tags
        if tracking.TAG_ORPHANED in t:
            continue      # not a trial of the sweep (see mark_lost_trials)
        params = typed_params(tracking.run_config(run))
        value, tested = metric_at_tested_epoch(client, run, metric)
        row = {"trial": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
               "stop_reason": stop_reason(t.get(tracking.TAG_STOP)), "epochs": int(m.get("epoch", 0)),
               METRIC_BEST_EPOCH: tested, metric: value, at_column: METRIC_BEST_EPOCH if tested else "latest"}
        # A conditional parameter that did not apply shows blank, not the config's default.
        row.update({q.name: params.get(q.name) if q.applies(params, defaults) else None for q in spec.parameters})
        if metric != METRIC_VAL_ELBO and tested is not None:
            row[METRIC_BEST_VAL_ELBO] = metric_at_tested_epoch(client, run, METRIC_VAL_ELBO)[0]
        for key in (METRIC_TEST_LL, METRIC_TEST_LL_SE, "test_elbo", "active_units", "test_bits_per_dim",
                    METRIC_TEST_SAMPLES, METRIC_TEST_IMAGES):
            if key in m:
                row[key] = m[key]
        rows.append(row)
    if not rows:
        echo("no trial opened an MLflow run" + (" (every trial failed in its setup; see below)" if errors else ""))
        return pd.DataFrame()
    table = pd.DataFrame(rows, dtype=object)    # K stays 48, not 48.0, beside blanks
    sign = 1.0 if spec.metric.mode == "max" else -1.0
    table = (table.assign(_tested=table[METRIC_BEST_EPOCH].notna(), _key=sign * pd.to_numeric(table[metric]))
             .sort_values(["_tested", "_key"], ascending=[False, False], na_position="last")
             .drop(columns=["_tested", "_key"]).reset_index(drop=True))
    shown = [c for c in ("trial", "stop_reason", "epochs", METRIC_BEST_EPOCH, *[q.name for q in spec.parameters],
                         metric, METRIC_TEST_LL, METRIC_TEST_LL_SE, "test_bits_per_dim", "active_units") if c in table]
    readable = _readable(table[shown], marks=table[at_column], metric=metric)
    legend = (f"Best first by {metric} ({spec.metric.mode}) at the epoch whose weights each trial tested "
              f"({METRIC_BEST_EPOCH}); {METRIC_TEST_LL} is shown beside and never used to choose; "
              f"{METRIC_TEST_LL_SE} is its standard error (per-image std / sqrt(test images)).")
    estimates = estimated_test_lls(table)
    if estimates.any():
        readable.loc[estimates, METRIC_TEST_LL] = readable.loc[estimates, METRIC_TEST_LL] + " (estimate)"
        legend += (" '(estimate)': a test LL made with fewer test images or importance samples than the sweep's "
                   "others (the spec's stopped_trials; the run holds test_images and test_samples): not comparable "
                   "with them; `sweeper evaluate RUN_ID` tests it in full.")
    if (table[at_column] == "latest").any():
        legend += (" '(latest)': a trial without a tested epoch (running, killed or failed), with its latest "
                   "value, after the others.")
    echo(f"\n{len(table)} trial(s); best first:\n" + readable.head(10).to_string(index=False) + f"\n{legend}")
    parent.log_text(table.to_csv(index=False), "summary.csv")
    parent.log_text(f"# Sweep {parent_name(parent)}: {len(table)} trial(s)\n\n{legend}\n\n{markdown_table(readable)}\n",
                    "summary.md")
    best = best_trial(table)
    metrics: dict[str, Any] = {"trials": len(table)}
    if best is not None:
        metrics.update({f"best_{metric}": best[metric], METRIC_BEST_EPOCH: best[METRIC_BEST_EPOCH]})
        best_elbo = best[metric] if metric == METRIC_VAL_ELBO else best.get(METRIC_BEST_VAL_ELBO)
        if best_elbo is not None and pd.notna(best_elbo):
            metrics[METRIC_BEST_VAL_ELBO] = best_elbo
        if pd.notna(best.get(METRIC_TEST_LL)):
            metrics["best_test_ll"] = best[METRIC_TEST_LL]    # the test LL of the trial chosen on validation
        parent.set_tags({"best_run_id": best["run_id"], "best_trial": best["trial"],
                         "best_chosen_by": f"{metric} ({spec.metric.mode}) at each trial's tested epoch; "
                                           "test LL not used"})
    parent.log_metrics(metrics)
    return table


def estimated_test_lls(table):
    """Rows whose test LL has fewer test images or importance samples than the most precise one
    of the table (a stopped trial's declared estimate)."""
    import pandas as pd

    if METRIC_TEST_LL not in table:
        return pd.Series(False, index=table.index)
    tested = table[METRIC_TEST_LL].notna()
    out = pd.Series(False, index=table.index)
    for key in (METRIC_TEST_IMAGES, METRIC_TEST_SAMPLES):
        if key in table:
            values = pd.to_numeric(table[key], errors="coerce")
            out |= tested & values.notna() & (values < values[tested].max())
    return out


def markdown_table(readable) -> str:
    """A table of strings (`_readable`) as a markdown (pipe) table, the text as it is (no number
    parsing: '2.34e-3' stays); columns of numbers right-aligned."""
    from tabulate import tabulate

    def numeric(column) -> bool:
        values = [v for v in readable[column] if v != ""]
        try:
            [float(str(v).split(" ")[0]) for v in values]
        except ValueError:
            return False
        return bool(values)

    align = ["right" if numeric(c) else "left" for c in readable.columns]
    return tabulate(readable.values.tolist(), headers=list(readable.columns), tablefmt="pipe",
                    disable_numparse=True, colalign=align)


def parent_name(parent: tracking.RunHandle) -> str:
    try:
        return parent.client.get_run(parent.run_id).info.run_name
    except Exception:
        return parent.run_id


def _readable(table, marks=None, metric: str | None = None):
    """Numbers as people read them: parameters to 3 significant digits, metrics to 2 decimals,
    blank (not NaN/None) where a value does not apply; `metric` values whose `marks` entry is
    'latest' say so."""
    out = table.copy().astype(object)
    for column in out:
        values = []
        for i, v in enumerate(out[column]):
            if v is None or (isinstance(v, float) and v != v):
                values.append("")
            elif column in (METRIC_VAL_ELBO, METRIC_TEST_LL, METRIC_TEST_LL_SE, "test_elbo", metric):
                latest = marks is not None and column == metric and marks.iloc[i] == "latest"
                values.append(f"{float(v):.2f}" + (" (latest)" if latest else ""))
            elif column == "test_bits_per_dim":
                values.append(f"{float(v):.4f}")
            elif column in ("active_units", "epochs", METRIC_BEST_EPOCH):
                values.append(str(int(float(v))))
            elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
                try:
                    values.append(short(float(v)))    # MLflow params are strings: '0.00233826...'
                except ValueError:
                    values.append(v)
            else:
                values.append(v)
        out[column] = values
    return out


def validate(spec_path: str | Path, overrides: Sequence[str] = (), *, address: str | None = None,
             echo: Callable[[str], None] = print, **kw) -> SweepSpec:
    """`sweeper validate`: the spec checks only, nothing started. Without an `address`, also
    against this machine (its GPUs; its datasets: corrupt is an error, missing a note)."""
    spec = load_spec(spec_path, overrides, cluster_resources=None if address else local_resources(), **kw)
    if not address:
        for note in check_local_data(spec, download=False):
            echo(f"note: {note}")
    return spec
