"""From a `SweepSpec` to Ray Tune objects: what to try next (search) and when to stop (scheduler).

- `make_search_alg`: Optuna (TPE or random sampler) behind a `ConcurrencyLimiter`, its study kept
  in `<study_dir>/optuna.db` (sqlite, fixed study name = the spec's name) so `optuna-dashboard`
  can open it and a resumed sweep continues it; or Ray's `BasicVariantGenerator` for grids.
- `PruningAwareOptunaSearch`: tells Optuna that a trial the scheduler (ASHA) stopped was PRUNED,
  not COMPLETE with its last low-epoch value (which misleads TPE).
- `make_scheduler`: ASHA on epochs (`ResumableASHAScheduler`, whose rungs survive a resume through
  `SchedulerStateCallback`, with the spec's audit trials exempt from its stops) or FIFO.
- `param_space`: the fixed trial keys, plus Ray Tune domains for the `random` algorithm.

Metric and mode belong in `TuneConfig(metric=spec.metric.name, mode=spec.metric.mode)`, never on
the scheduler (Ray raises if both set them). The Optuna searcher gets them too: with a
define-by-run space Ray does not pass TuneConfig's metric on to it.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.air.constants import TRAINING_ITERATION
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain, Sampler
from ray.tune.search.variant_generator import RecursiveDependencyError

from sweeper.errors import SweeperError
from sweeper.spec import Parameter, SweepSpec, condition_holds
from trainables.vae.catalog import ENDED_BY_ITSELF, FAILED, RESULT_RUN_ID

logger = logging.getLogger(__name__)

STUDY_FILE = "optuna.db"
# Optuna trial user attributes that link a study trial to its Tune trial and its MLflow run.
USER_ATTR_TUNE_TRIAL = "tune_trial_id"
USER_ATTR_MLFLOW_RUN = "mlflow_run_id"



# --------------------------------------------------------------------------------------------
# Optuna


def study_storage_url(study_dir: str | Path) -> str:
    """`sqlite:////abs/path/optuna.db`: absolute, because Ray moves working directories."""
    return f"sqlite:///{Path(study_dir).expanduser().resolve() / STUDY_FILE}"


def _storage(url: str) -> optuna.storages.RDBStorage:
    # A generous sqlite timeout: optuna-dashboard may read the file while the driver writes.
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})


def fail_running_study_trials(study_dir: str | Path, study_name: str) -> int:
    """After the sweep: study trials still RUNNING belong to no Tune trial (lost in a crash); FAIL them."""
    if not (Path(study_dir) / STUDY_FILE).is_file():
        return 0
    study = optuna.load_study(study_name=study_name, storage=_storage(study_storage_url(study_dir)))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(running)


def finished_study_trials(study_dir: str | Path, study_name: str) -> list[tuple[int, str | None, str]]:
    """(number, Tune trial id, state) of the study's trials that ended as COMPLETE or PRUNED."""
    if not (Path(study_dir) / STUDY_FILE).is_file():
        return []
    study = optuna.load_study(study_name=study_name, storage=_storage(study_storage_url(study_dir)))
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    return [(t.number, t.user_attrs.get(USER_ATTR_TUNE_TRIAL), t.state.name) for t in done]


def _suggest(trial: optuna.Trial, p: Parameter) -> Any:
    if p.distribution == "uniform":
        return trial.suggest_float(p.name, p.min, p.max)
    if p.distribution == "log_uniform":
        return trial.suggest_float(p.name, p.min, p.max, log=True)
    if p.distribution == "int_uniform":
        return trial.suggest_int(p.name, int(p.min), int(p.max))
    if p.distribution == "int_log_uniform":
        return trial.suggest_int(p.name, int(p.min), int(p.max), log=True)
    if p.distribution == "choice":
        return trial.suggest_categorical(p.name, list(p.values))
    raise ValueError(f"parameters.{p.name}: Optuna cannot sample distribution {p.distribution!r}")


class DefineByRunSpace:
    """The spec's parameters as an Optuna define-by-run function: a parameter whose `when`
    condition fails is never suggested, so it is absent from the trial (its default applies,
    also to the conditions that test it: `condition_holds`) and from the study. A class, not a
    closure, so the searcher pickles for `Tuner.restore`."""

    def __init__(self, parameters: Sequence[Parameter], base: Mapping[str, Any]):
        self.parameters = tuple(parameters)
        self.base = dict(base)  # every trial key's effective value, for the conditions

    def __call__(self, trial: optuna.Trial) -> None:
        config: dict[str, Any] = {}   # what was suggested; the rest has its value from `base`
        for p in self.parameters:
            if p.applies(config, self.base):
                config[p.name] = _suggest(trial, p)
        return None  # Ray collects the suggest_* values itself


def define_by_run_space(spec: SweepSpec) -> DefineByRunSpace:
    return DefineByRunSpace(spec.parameters, spec.base_config())


def trial_end_state(result: Mapping[str, Any] | None, error: bool, metric: str,
                    max_t: int | None = None) -> TrialState:
    """How a finished Ray trial should count in the Optuna study.

    Ray marks the last result `done: True` on every STOP decision, the scheduler's included, so
    `done` cannot tell them apart. The trainable's `stop_reason` can: it is set (completed,
    early_stopping, nan) only when the trial ends by itself, and stays empty in a result that
    ASHA then stopped on.
    - errored (retries exhausted), stop_reason nan/error, or a non-finite metric: FAIL
    - stop_reason completed/early_stopping, or its epoch budget reached (max_epochs, or the
      scheduler's max_t): COMPLETE
    - anything else (stopped by the scheduler; removed before it ever reported): PRUNED
    """
    if error:
        return TrialState.FAIL
    if not result:
        return TrialState.PRUNED
    reason = result.get("stop_reason")
    if reason in FAILED:
        return TrialState.FAIL
    finished = reason in ENDED_BY_ITSELF
    budgets = [b for b in (result.get("config/max_epochs"), max_t) if b is not None]
    if not finished and budgets and result.get(TRAINING_ITERATION, 0) >= min(budgets):
        finished = True  # ASHA's max_t stop: the trial survived every rung, it ran its budget
    if not finished:
        return TrialState.PRUNED
    value = result.get(metric)
    if value is None or not math.isfinite(float(value)):
        return TrialState.FAIL
    return TrialState.COMPLETE


class PruningAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` that keeps the study honest about how trials ended (see `trial_end_state`):
    a trial stopped by the scheduler is PRUNED with its per-epoch values (including the one the
    scheduler judged), so TPE ranks it by how far it got instead of as a finished run.

    The study lives in an RDB storage given by URL; `save`/`restore` keep the sampler and the
    Ray trial -> Optuna trial map, and reload the trials from the database on restore.
    """

    def __init__(self, space: DefineByRunSpace, *, metric: str, mode: str, storage_url: str,
                 study_name: str, sampler: optuna.samplers.BaseSampler | None = None,
                 max_t: int | None = None):
        self._storage_url = storage_url
        self._max_t = max_t  # the scheduler's epoch budget: reaching it is not being pruned
        self._last_step: dict[str, int] = {}  # last epoch reported per Ray trial
        self._linked_runs: set[str] = set()   # Ray trials whose MLflow run id the study has
        super().__init__(space, metric=metric, mode=mode, sampler=sampler,
                         study_name=study_name, storage=_storage(storage_url))

    def _setup_study(self, mode):
        super()._setup_study(mode)
        # optuna-dashboard then labels the objective by its name instead of "Objective 0".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names([self._metric])

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is not None and ot_trial is not None:
            # Links the study to Tune and MLflow (optuna-dashboard shows user attributes).
            ot_trial.set_user_attr(USER_ATTR_TUNE_TRIAL, trial_id)
        if isinstance(config, dict):
            # A parameter whose condition failed is None ("does not apply": the trial uses its
            # default), so every trial has every column (Ray's progress table looks them all up).
            for p in self._space.parameters:
                config.setdefault(p.name, None)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        self._link(trial_id, ot_trial, result)
        self._report(trial_id, ot_trial, result)

    def _link(self, trial_id: str, ot_trial: optuna.Trial, result: Mapping[str, Any] | None) -> None:
        """The study trial's MLflow run id, from the first result that carries it."""
        run_id = (result or {}).get(RESULT_RUN_ID)
        if run_id and trial_id not in self._linked_runs:
            try:
                ot_trial.set_user_attr(USER_ATTR_MLFLOW_RUN, run_id)
                self._linked_runs.add(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass

    def _report(self, trial_id: str, ot_trial: optuna.Trial, result: Mapping[str, Any]) -> None:
        value, step = result.get(self.metric), result.get(TRAINING_ITERATION)
        if value is None or step is None or not math.isfinite(float(value)):
            return  # a NaN epoch ends the trial as FAIL; keep it out of the curves
        if step <= self._last_step.get(trial_id, -1):
            return  # a restored trial replays epochs already in the study
        try:
            ot_trial.report(float(value), int(step))
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # finished in the study before the driver died; its state stands
        self._last_step[trial_id] = int(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        state = trial_end_state(result, error, self.metric, self._max_t)
        self._link(trial_id, ot_trial, result)   # a trial stopped at its first epoch had no other result
        if result and state is not TrialState.FAIL:
            # The result the scheduler stopped on never reached on_trial_result: record it.
            self._report(trial_id, ot_trial, result)
        value = float(result[self.metric]) if state is TrialState.COMPLETE else None
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told before the driver died (resume)
        self._completed_trials.add(trial_id)

    def save(self, checkpoint_path: str) -> None:
        state = self.__dict__.copy()
        # The study and its trials live in the database; keep only how to find them.
        state.pop("_ot_study", None)
        state.pop("_storage", None)
        state["_ot_trials"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        trial_ids: dict[str, int] = state.pop("_ot_trials")
        self.__dict__.update(state)
        self.__dict__.setdefault("_linked_runs", set())
        self._storage = _storage(self._storage_url)
        # NopPruner as in OptunaSearch: the scheduler prunes, Optuna's pruner is never asked.
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                           sampler=self._sampler or optuna.samplers.TPESampler(),
                                           pruner=optuna.pruners.NopPruner())
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, oid)
                           for tid, oid in trial_ids.items()}
        # The database is the truth: the checkpoint may predate the last reports and tells.
        frozen = {t._trial_id: t for t in self._ot_study.get_trials(deepcopy=False)}
        for tid, oid in trial_ids.items():
            trial = frozen.get(oid)
            if trial is None:
                continue
            if trial.intermediate_values:
                self._last_step[tid] = max(trial.intermediate_values)
            if trial.state.is_finished():
                self._completed_trials.add(tid)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    seed = spec.search.seed
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Every option the sweep's behaviour rests on, explicit (the constraints file pins Optuna):
    # multivariate TPE with a constant liar suits parallel trials; 10 random startup trials.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=False, constant_liar=True,
                                      n_startup_trials=10, n_ei_candidates=24)


def make_search_alg(spec: SweepSpec, study_dir: str | Path) -> Searcher | SearchAlgorithm:
    """The search algorithm for `TuneConfig(search_alg=...)`, limited to `spec.max_concurrent`
    trials at once (so do not also pass `max_concurrent_trials`)."""
    if spec.search.algorithm == "random":
        return BasicVariantGenerator(max_concurrent=spec.max_concurrent,
                                     random_state=spec.search.seed)
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    searcher = PruningAwareOptunaSearch(
        define_by_run_space(spec), metric=spec.metric.name, mode=spec.metric.mode,
        storage_url=study_storage_url(study_dir), study_name=spec.name, sampler=make_sampler(spec),
        max_t=spec.scheduler.max_t,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)


# --------------------------------------------------------------------------------------------
# Ray Tune search space (algorithm `random`)


class _ConditionalSampler(Sampler):
    def sample(self, domain: "ConditionalDomain", config: Any = None, size: int = 1,
               random_state: Any = None) -> Any:
        # `config` is Ray's guarded view of the experiment spec: {"config": {...}}.
        trial = dict.get(config, "config", config) if isinstance(config, dict) else {}
        values = {}
        for key in domain.when:
            value = dict.get(trial, key)
            if isinstance(value, Domain):
                raise RecursiveDependencyError(f"{key} is not resolved yet")  # Ray retries later
            values[key] = value
        # A tested key that does not apply (None) has its default, as under Optuna.
        if condition_holds(domain.when, values, domain.base):
            return domain.inner.sample(config, size=size, random_state=random_state)
        return domain.default


class ConditionalDomain(Domain):
    """A Ray Tune domain sampled from `inner` when the condition holds (`condition_holds`, with
    `base` for the keys that are absent or do not apply), else `default`. Like
    `tune.sample_from`, it sees the other resolved keys; unlike it, it samples with Ray's seeded
    random state, so `search.seed` reproduces the sweep."""

    default_sampler_cls = _ConditionalSampler

    def __init__(self, inner: Domain, when: Mapping[str, Sequence[Any]], default: Any,
                 base: Mapping[str, Any]):
        self.inner = inner
        self.when = {k: tuple(v) for k, v in when.items()}
        self.default = default
        self.base = dict(base)

    def is_function(self) -> bool:
        return True  # resolved after the plain domains, with access to their values

    def is_valid(self, value: Any) -> bool:
        return value == self.default or self.inner.is_valid(value)

    @property
    def domain_str(self) -> str:
        cond = " and ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return f"{self.inner.domain_str} if {cond} else {self.default!r}"


def _tune_domain(p: Parameter) -> Any:
    # Ray's integer uppers are exclusive; the spec's are inclusive.
    if p.distribution == "uniform":
        return tune.uniform(p.min, p.max)
    if p.distribution == "log_uniform":
        return tune.loguniform(p.min, p.max)
    if p.distribution == "int_uniform":
        return tune.randint(int(p.min), int(p.max) + 1)
    if p.distribution == "int_log_uniform":
        return tune.lograndint(int(p.min), int(p.max) + 1)  # not qlograndint: see PITFALLS
    if p.distribution == "choice":
        return tune.choice(list(p.values))
    if p.distribution == "grid":
        return tune.grid_search(list(p.values))
    raise ValueError(f"parameters.{p.name}: unknown distribution {p.distribution!r}")


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """`Tuner(param_space=...)`: the fixed trial keys; for `random` also the searched ones as
    Ray Tune domains (a conditional one yields None, "does not apply", when its condition fails)."""
    space: dict[str, Any] = dict(spec.trial)
    if spec.search.algorithm != "random":
        return space  # Optuna suggests the rest; Ray merges them into the trial's config
    base = spec.base_config()
    for p in spec.parameters:
        domain = _tune_domain(p)
        if p.when:
            domain = ConditionalDomain(domain, p.when, None, base)   # None: does not apply
        space[p.name] = domain
    return space


# --------------------------------------------------------------------------------------------
# Schedulers


def audit_plan(total_trials: int, count: int, seed: int) -> tuple[int, ...]:
    """Which trials are audit trials, by the order Tune adds them (0 = the first): `count` of the
    `total_trials` drawn at random, from a stream of their own seeded by the spec's search seed
    (the same spec gives the same plan; the sampler's own draws are untouched)."""
    rng = random.Random(f"sweeper.audit:{seed}")   # a str seed hashes the same in every process
    return tuple(sorted(rng.sample(range(total_trials), min(count, total_trials))))


class ResumableASHAScheduler(AsyncHyperBandScheduler):
    """ASHA whose rung state (the recorded metric of every trial at every milestone) can be saved
    and restored: `Tuner.restore` restores the searcher but starts the scheduler empty, which
    would let a resumed sweep promote trials the original run would have stopped.

    Audit trials (`audit`: the positions, in the order Tune adds trials, of those that are; see
    `audit_plan`) are exempt from the rungs' stops, so that how well each rung ranked the trials
    can be measured against how they end (sweeper/fidelity.py). An audit trial is recorded at each
    rung exactly as long as ASHA would have let it run: at the rung where it would have been
    stopped it is recorded (every trial that reaches a rung is, the stopped ones included) and
    goes on; from then on it is recorded at no rung. So the cut-offs the other trials meet are
    those of plain ASHA over the same random population: an audit trial counts where it would
    have counted and nowhere else. Recording it at later rungs too would put trials ASHA had
    dropped (mostly weak ones) into the later cut-offs, lower them, and promote trials that plain
    ASHA would have stopped: the sweep being measured would no longer be the one measured. The
    epoch where each audit trial would have been stopped is kept (`would_have_stopped`). The
    budget's end (max_t) stops audit trials as any other.

    Persisted: the rungs, and the audit plan with the position of every trial seen and the
    would-be stops (a resumed sweep keeps its audit trials); not metric/mode (TuneConfig sets
    those on each run).
    """

    STATE_FORMAT = 2   # 1: rungs only (sweeps from before audit trials, which had none)

    def __init__(self, *args: Any, audit: Sequence[int] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._audit_planned: frozenset[int] = frozenset(audit)
        self._position: dict[str, int] = {}       # trial id -> its place in the order Tune added trials
        self._would_stop: dict[str, int] = {}     # audit trial id -> the epoch ASHA would have stopped it at

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # A retried or restored trial is added again: it keeps its place (and so its audit status).
        self._position.setdefault(trial.trial_id, len(self._position))

    def is_audit(self, trial_id: str) -> bool:
        return self._position.get(trial_id) in self._audit_planned

    def audit_trials(self) -> list[str]:
        """The ids of the audit trials Tune has added so far."""
        return [t for t, i in self._position.items() if i in self._audit_planned]

    def would_have_stopped(self, trial_id: str) -> int | None:
        """The epoch (time_attr) at which ASHA would have stopped this audit trial, if it would."""
        return self._would_stop.get(trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        trial_id = trial.trial_id
        if not self.is_audit(trial_id) or self._time_attr not in result or self._metric not in result:
            return super().on_trial_result(tune_controller, trial, result)
        at_end = result[self._time_attr] >= self._max_t and self._stop_last_trials
        if trial_id in self._would_stop:      # past where ASHA would have stopped it: recorded nowhere
            if at_end:
                self._num_stopped += 1
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)   # recorded as any trial
        if action == TrialScheduler.STOP and not at_end:
            self._would_stop[trial_id] = int(result[self._time_attr])
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self._would_stop:   # its end is recorded at no rung either
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)

    def _layout(self) -> dict[str, Any]:
        return {"time_attr": self._time_attr, "max_t": self._max_t,
                "reduction_factor": self._reduction_factor,
                "milestones": [[m for m, _ in b._rungs] for b in self._brackets]}

    def state_dict(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "layout": self._layout(),
                "rungs": [[(m, dict(recorded)) for m, recorded in b._rungs] for b in self._brackets],
                "num_stopped": self._num_stopped,
                "audit": {"planned": sorted(self._audit_planned), "position": dict(self._position),
                          "would_stop": dict(self._would_stop)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The saved rungs, and the saved audit plan: it, not the one this scheduler was built
        with, says which trials are audit trials (a resumed sweep keeps them)."""
        if state.get("format") not in (1, self.STATE_FORMAT):
            raise SweeperError(f"ASHA state format {state.get('format')!r} is not "
                               f"{self.STATE_FORMAT}; start the sweep afresh")
        if state["layout"] != self._layout():
            raise SweeperError(
                f"the saved ASHA rungs {state['layout']} do not match this scheduler "
                f"{self._layout()}: the spec's scheduler or max_epochs changed since the sweep "
                "started; resume with the original spec")
        # Bracket objects stay (trials map to them); only their recorded values are replaced.
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            bracket._rungs = [(m, dict(recorded)) for m, recorded in rungs]
        self._num_stopped = state["num_stopped"]
        audit = state.get("audit") or {}    # format 1: a sweep started before audit trials had none
        self._audit_planned = frozenset(audit.get("planned", ()))
        self._position = dict(audit.get("position", {}))
        self._would_stop = dict(audit.get("would_stop", {}))

    def save(self, checkpoint_path: str) -> None:
        """Write the rung state to `checkpoint_path` atomically (a crash leaves the old file)."""
        path = Path(checkpoint_path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(self.state_dict(), f)
        os.replace(tmp, path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.load_state_dict(pickle.load(f))


class SchedulerStateCallback(tune.Callback):
    """Checkpoints the scheduler's rungs with the experiment state and restores them on
    `Tuner.restore`: Ray saves callback state at the same moment as the trial states and
    the searcher, so the three stay consistent. Pass it in `RunConfig(callbacks=[...])`."""

    def __init__(self, scheduler: TrialScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        if isinstance(self.scheduler, ResumableASHAScheduler):
            return {"scheduler": self.scheduler.state_dict()}
        return None

    def set_state(self, state: dict) -> None:
        if isinstance(self.scheduler, ResumableASHAScheduler) and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])


def make_scheduler(spec: SweepSpec) -> TrialScheduler:
    """ASHA on epochs (`training_iteration`) or FIFO. No metric/mode here: see TuneConfig."""
    s = spec.scheduler
    if s.type == "asha":
        return ResumableASHAScheduler(time_attr=TRAINING_ITERATION, max_t=s.max_t,
                                      grace_period=s.grace_period,
                                      reduction_factor=s.reduction_factor,
                                      audit=audit_plan(spec.total_trials, spec.audit_trials, spec.search.seed))
    return FIFOScheduler()
