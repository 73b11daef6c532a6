"""Sweep specs: the YAML schema, its strict validation, and the frozen objects the driver uses.

A spec is data only. `load_spec` reads the file, applies `--set dotted.path=value` overrides and
validates everything before anything is launched: every problem is collected (not only the first)
as "path: message", with the path in the file, the bad value and the fix, and raised together as
one `SpecError` (exit code 2).

    name: pseudo_inputs
    metric: {name: val_elbo, mode: max}
    trial: {dataset: static_mnist, prior: vamp, max_epochs: 1000}
    parameters:
      K:  {distribution: int_log_uniform, min: 10, max: 1000, when: {prior: [vamp, mog]}}
      lr: {distribution: log_uniform, min: 1.0e-4, max: 3.0e-3}
    search: {algorithm: optuna, sampler: tpe, seed: 0}
    scheduler: {type: asha, grace_period: 10, reduction_factor: 3}

Ranges: floats are sampled in [min, max), integers in [min, max] (both ends included).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import yaml

from sweeper.errors import SpecError
from trainables.vae.catalog import EPOCH_METRICS

# What the trainable reports every epoch that a sweep may optimise, with the direction that
# means "better" (the catalog's, shared with the trainable and the report).
REPORTED_METRICS = EPOCH_METRICS
MODES = ("max", "min")

# distribution -> the keys that define it (besides `distribution` and `when`)
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "uniform": ("min", "max"),
    "log_uniform": ("min", "max"),
    "int_uniform": ("min", "max"),
    "int_log_uniform": ("min", "max"),
    "choice": ("values",),
    "grid": ("values",),
}
INT_DISTRIBUTIONS = ("int_uniform", "int_log_uniform")
LOG_DISTRIBUTIONS = ("log_uniform", "int_log_uniform")
DISCRETE_DISTRIBUTIONS = ("choice", "grid")

SEARCH_ALGORITHMS = ("optuna", "random")
OPTUNA_SAMPLERS = ("tpe", "random")
SCHEDULERS = ("asha", "fifo")
# Audit trials behind a rung's rank correlation: below 3 a Spearman correlation says nothing.
AUDIT_MIN = 3

TOP_LEVEL_KEYS = ("name", "experiment", "description", "metric", "trial", "parameters", "search",
                  "scheduler", "num_samples", "max_concurrent", "max_failures", "checkpoint_every",
                  "resources", "stopped_trials")

# Beyond this many combinations of choice/grid values (and numeric bounds) the trial configs are
# checked one parameter at a time instead of as a full cartesian product (keeps validation instant).
_MAX_COMBINATIONS = 4096
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQUIRED_HINTS = {
    "name": "name the sweep (its folder, Optuna study and default MLflow experiment)",
    "trial": "add the fixed trial settings, at least trial: {dataset: static_mnist}",
}


# --------------------------------------------------------------------------------------------
# The frozen spec


@dataclass(frozen=True)
class Metric:
    """The reported metric the search optimises and the scheduler compares."""

    name: str = "val_elbo"
    mode: str = "max"


def condition_holds(when: Mapping[str, Sequence[Any]], config: Mapping[str, Any],
                    defaults: Mapping[str, Any]) -> bool:
    """Whether every `key: allowed` of a `when` condition holds for a trial.

    A condition tests what the trial trains with: a key absent from `config`, or None there (a
    searched parameter whose own condition failed: "does not apply"), has its value from
    `defaults`, the trial config's defaults overlaid with the spec's fixed keys. Both searchers
    and the validation use this one rule, so chained conditions mean the same everywhere.
    """
    for key, allowed in when.items():
        value = config.get(key)
        if value is None:
            value = defaults.get(key)
        if value not in allowed:
            return False
    return True


@dataclass(frozen=True)
class Parameter:
    """One searched trial key. `when` maps other keys to their allowed values: if any does not
    hold, the key is not set and the trial config's default applies (also to the conditions of
    other parameters that test this key: see `condition_holds`)."""

    name: str
    distribution: str
    min: float | None = None  # uniform/log: [min, max); int: [min, max]
    max: float | None = None
    values: tuple[Any, ...] = ()  # choice / grid
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def is_discrete(self) -> bool:
        return self.distribution in DISCRETE_DISTRIBUTIONS

    @property
    def is_int(self) -> bool:
        return self.distribution in INT_DISTRIBUTIONS

    @property
    def is_log(self) -> bool:
        return self.distribution in LOG_DISTRIBUTIONS

    def applies(self, config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> bool:
        """Whether this parameter is set in a trial whose other keys are `config` (see
        `condition_holds`; `defaults`: the values of keys absent or None there)."""
        return condition_holds(self.when, config, defaults or {})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"distribution": self.distribution}
        if self.is_discrete:
            out["values"] = list(self.values)
        else:
            out["min"], out["max"] = self.min, self.max
        if self.when:
            out["when"] = {k: list(v) for k, v in self.when.items()}
        return out


@dataclass(frozen=True)
class SearchSpec:
    """What to try next: `optuna` (TPE or random sampler) or `random` (Ray's variant generator:
    grids expanded, the rest sampled)."""

    algorithm: str = "optuna"
    sampler: str | None = "tpe"  # optuna only
    seed: int = 0


@dataclass(frozen=True)
class SchedulerSpec:
    """When to stop: `asha` (early termination by rungs on training_iteration = epochs) or
    `fifo` (every trial runs until it stops by itself)."""

    type: str = "fifo"
    grace_period: int | None = None       # asha only
    reduction_factor: float | None = None  # asha only
    max_t: int | None = None               # asha only; defaults to trial.max_epochs
    audit: int | float | None = None       # asha only: audit trials, a count or a fraction (`audit_count`)

    def audit_count(self, total_trials: int) -> int:
        """How many of the sweep's trials are audit trials (exempt from ASHA's stops, see
        sweeper/fidelity.py): a count as written; a fraction of the trials, rounded, but at least
        AUDIT_MIN (the fewest a rank correlation needs) and at most all of them."""
        if not self.audit:
            return 0
        if isinstance(self.audit, int):
            return self.audit
        return min(total_trials, max(AUDIT_MIN, math.floor(self.audit * total_trials + 0.5)))


STOPPED_TRIAL_TESTS = ("full", "estimate", "none")


@dataclass(frozen=True)
class StoppedTrials:
    """How the trials a scheduler stops are tested (each as soon as it stops, while the sweep
    runs): `full` (the trial's test_samples on every test image, as a trial that ends by itself),
    `estimate` (`samples` importance samples on the first `images` test images: a declared
    cheaper estimate, stored with both numbers), or `none` (weights kept, no test LL; `sweeper
    evaluate` adds one later)."""

    test_ll: str = "full"
    samples: int | None = None     # estimate only
    images: int | None = None      # estimate only

    ESTIMATE_SAMPLES: ClassVar[int] = 500
    ESTIMATE_IMAGES: ClassVar[int] = 2000

    @property
    def tests(self) -> bool:
        return self.test_ll != "none"


@dataclass(frozen=True)
class Resources:
    """What one trial reserves on the cluster (fractional GPUs let trials share one).

    `batched`: trials that share a device train as slots of one batched model (trainables/pool.py)
    instead of time-slicing it as separate processes. `auto` does so exactly when a trial asks
    for a fraction of a GPU (0 < gpu < 1); `true` also on CPUs (one pool per node).
    """

    cpu: float = 1
    gpu: float = 0
    batched: bool | str = "auto"

    @property
    def pooled(self) -> bool:
        """Whether the sweep's 1-level VAE trials run in device pools."""
        if self.batched == "auto":
            return 0 < self.gpu < 1
        return bool(self.batched)


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. Build it with `load_spec` or `parse_spec`, never by hand."""

    name: str
    experiment: str
    metric: Metric
    trial: dict[str, Any]
    parameters: tuple[Parameter, ...]
    search: SearchSpec
    scheduler: SchedulerSpec
    num_samples: int = 1
    max_concurrent: int = 1
    max_failures: int = 1
    checkpoint_every: int | None = None   # epochs between checkpoints; None: 1, or 10 for pooled trials
    resources: Resources = Resources()
    stopped_trials: StoppedTrials = StoppedTrials()
    description: str = ""
    source: str = "<spec>"

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def grid_size(self) -> int:
        """Number of grid points (1 without grid parameters)."""
        return math.prod(len(p.values) for p in self.parameters if p.distribution == "grid")

    @property
    def total_trials(self) -> int:
        """Trials the sweep will run: Ray repeats the whole grid `num_samples` times."""
        return self.grid_size * self.num_samples

    @property
    def audit_trials(self) -> int:
        """How many of its trials ASHA records at its rungs but never stops (`scheduler.audit`)."""
        return self.scheduler.audit_count(self.total_trials)

    def base_config(self) -> dict[str, Any]:
        """Every trial key: the trial config's defaults overlaid with the fixed `trial` values."""
        from trainables.vae.config import TrainConfig

        return {**TrainConfig().to_dict(), **self.trial}

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML-ready data, defaults filled in (`parse_spec` of it gives it back)."""
        out: dict[str, Any] = {"name": self.name, "experiment": self.experiment}
        if self.description:
            out["description"] = self.description
        out["metric"] = dataclasses.asdict(self.metric)
        out["trial"] = dict(self.trial)
        out["parameters"] = {p.name: p.to_dict() for p in self.parameters}
        out["search"] = {k: v for k, v in dataclasses.asdict(self.search).items() if v is not None}
        out["scheduler"] = {k: v for k, v in dataclasses.asdict(self.scheduler).items() if v is not None}
        out.update(num_samples=self.num_samples, max_concurrent=self.max_concurrent,
                   max_failures=self.max_failures, resources=dataclasses.asdict(self.resources))
        if self.checkpoint_every is not None:
            out["checkpoint_every"] = self.checkpoint_every
        if self.stopped_trials != StoppedTrials():
            out["stopped_trials"] = {k: v for k, v in dataclasses.asdict(self.stopped_trials).items() if v is not None}
        return out

    @property
    def checkpoint_frequency(self) -> int:
        """Epochs between a trial's checkpoints: every epoch (exact retries and resumes), but every
        10 for pooled trials, whose state travels from the pool through Ray (they also checkpoint
        at their end, an ASHA stop included)."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return 10 if self.resources.pooled else 1


# --------------------------------------------------------------------------------------------
# Loading


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-4` as a number (YAML 1.2), not text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key == "<<":
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined on line {seen[key] + 1}); "
                    "keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            _SpecLoader.construct_mapping)
# PyYAML follows YAML 1.1, where a float needs a dot: without this, `min: 1e-4` is the string "1e-4".
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# The specs that come with the tool (a source checkout or an editable install has them).
SHIPPED_SPECS = Path(__file__).resolve().parents[1] / "search_spaces"


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    cluster_resources: Mapping[str, float] | None = None,
) -> SweepSpec:
    """Read, override (`"trial.max_epochs=3"`) and validate a spec file; raise `SpecError`
    listing every problem. `cluster_resources` ({"CPU": 2, "GPU": 0}) also checks that a trial
    fits on the cluster."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        hint = ""
        if not Path(path).exists():
            shipped = sorted(p.name for p in SHIPPED_SPECS.glob("*.yaml")) if SHIPPED_SPECS.is_dir() else []
            hint = (f"; the shipped specs are in {SHIPPED_SPECS} ({', '.join(shipped)})" if shipped else "")
        raise SpecError(source, [f"cannot read the spec: {exc.strerror or exc}{hint}"]) from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(source, [_yaml_problem(exc)]) from None
    return parse_spec(data, source, overrides, num_samples=num_samples,
                      max_concurrent=max_concurrent, cluster_resources=cluster_resources)


def parse_spec(
    data: Any,
    source: str = "<spec>",
    overrides: Sequence[str] = (),
    *,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    cluster_resources: Mapping[str, float] | None = None,
) -> SweepSpec:
    """Validate spec data (as loaded from YAML) and build the frozen `SweepSpec`."""
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(source, [f"(top level): expected a mapping with keys such as name, trial, "
                                 f"parameters; got {got}"])
    data = copy.deepcopy(dict(data))
    problems: list[str] = []
    origins: dict[str, str] = {}  # spec path -> the command-line option that set it
    for text in overrides:
        path = _apply_override(data, text, problems)
        if path:
            origins[path] = f"--set {text}"
    for key, value, option in (("num_samples", num_samples, "--num-samples"),
                               ("max_concurrent", max_concurrent, "--max-concurrent")):
        if value is not None:
            data[key] = value
            origins[key] = f"{option} {value}"

    checker = _Checker(cluster_resources)
    spec = checker.check(data, source)
    problems += [_with_origin(p, origins) for p in checker.problems]
    if problems:
        raise SpecError(source, problems)
    assert spec is not None
    return spec


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where the YAML went wrong. For an unclosed bracket or brace the parser notices it lines
    later, where the next key begins: the message names where the unclosed one starts too."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
    problem = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        what = context.removeprefix("while parsing ").removeprefix("a ")
        closing = "}" if "mapping" in what else "]" if "sequence" in what else ""
        fix = f": add its '{closing}'" if closing else ""
        return (f"line {start.line + 1}, column {start.column + 1}: invalid YAML: the {what} that starts here is not "
                f"closed{fix} (the parser gave up at {where}: {problem})")
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def _apply_override(data: dict, text: str, problems: list[str]) -> str | None:
    """Set `dotted.path=value` in `data` (missing mappings are created); return the path."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        problems.append(f"--set {text!r}: expected dotted.path=value, e.g. --set trial.max_epochs=3")
        return None
    keys = path.split(".")
    if any(not k for k in keys):
        problems.append(f"--set {text}: empty key in path {path!r}; write keys separated by "
                        "single dots, e.g. scheduler.grace_period")
        return None
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problems.append(f"--set {text}: value is not valid YAML: {getattr(exc, 'problem', exc)}")
        return None
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            problems.append(f"--set {text}: {where} is {child!r} (a {type(child).__name__}), not a "
                            f"mapping, so it has no key {keys[i + 1]!r}")
            return None
        node = child
    node[keys[-1]] = value
    return path


def _with_origin(problem: str, origins: Mapping[str, str]) -> str:
    """Say which command-line option set the value a problem is about."""
    path, _, message = problem.partition(": ")
    for set_path, option in origins.items():
        if path == set_path or path.startswith(set_path + ".") or path.startswith(set_path + "["):
            return f"{problem} (from {option})"
    for set_path, option in sorted(origins.items(), key=lambda item: -len(item[0])):
        if re.search(rf"(?<![\w.]){re.escape(set_path)}(?![\w])", message):
            return f"{problem} ({set_path} from {option})"
    return problem


# --------------------------------------------------------------------------------------------
# Validation


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    if not close and len(word) >= 3:  # abbreviations: grace -> grace_period
        close = [c for c in choices if c.startswith(word)]
    if close:
        return f"did you mean {close[0]!r}?"
    return f"expected one of {choices}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class _Checker:
    """Walks the raw data once, collecting every problem, and builds the spec if there are none."""

    def __init__(self, cluster_resources: Mapping[str, float] | None):
        self.cluster = cluster_resources
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    # -- generic helpers

    def mapping(self, value: Any, path: str, allowed: Sequence[str],
                required: Sequence[str] = ()) -> dict[str, Any]:
        """Check that `value` is a mapping with only `allowed` keys; return its known keys."""
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            example = ", ".join(f"{k}: ..." for k in allowed[:3])
            self.add(path, f"expected a mapping like {{{example}}}, got {_show(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.add(path or "(top level)", f"key {key!r} is not a string")
            elif key not in allowed:
                self.add(f"{path}.{key}" if path else key,
                         f"unknown key; {_did_you_mean(key, allowed)}")
            else:
                out[key] = item
        for key in required:
            if key not in value:
                hint = _REQUIRED_HINTS.get(key)
                self.add(f"{path}.{key}" if path else key,
                         "missing required key" + (f"; {hint}" if hint else ""))
        return out

    def integer(self, value: Any, path: str, *, minimum: int | None = None,
                hint: str = "") -> int | None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not _is_int(value):
            self.add(path, f"expected an integer, got {_show(value)}")
            return None
        if minimum is not None and value < minimum:
            self.add(path, f"{value} must be >= {minimum}{hint}")
            return None
        return value

    def number(self, value: Any, path: str) -> float | None:
        if not _is_number(value):
            self.add(path, f"expected a number, got {_show(value)}")
            return None
        if not math.isfinite(value):
            self.add(path, f"expected a finite number, got {value}")
            return None
        return value

    def string(self, value: Any, path: str, choices: Sequence[str] | None = None) -> str | None:
        if not isinstance(value, str):
            hint = f"; one of {list(choices)}" if choices else ""
            self.add(path, f"expected a string{hint}, got {_show(value)}")
            return None
        if choices is not None and value not in choices:
            self.add(path, f"unknown value {value!r}; {_did_you_mean(value, choices)}")
            return None
        return value

    # -- the spec

    def check(self, data: Mapping[str, Any], source: str) -> SweepSpec | None:
        from trainables.vae.config import TrainConfig

        self.field_types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
        self.defaults = TrainConfig().to_dict()

        top = self.mapping(data, "", TOP_LEVEL_KEYS, required=("name", "trial"))
        name = self.string(top["name"], "name") if "name" in top else None
        if name is not None and not _NAME_PATTERN.match(name):
            self.add("name", f"{name!r} is used as a folder name: use letters, digits, '.', '_' "
                             "and '-' only, starting with a letter or digit")
            name = None
        experiment = name
        if top.get("experiment") is not None:
            experiment = self.string(top["experiment"], "experiment")
        description = self.string(top.get("description", ""), "description") or ""

        metric = self.check_metric(top.get("metric"))
        trial = self.check_trial(top.get("trial")) if "trial" in top else {}
        search = self.check_search(top.get("search"))
        parameters = self.check_parameters(top.get("parameters"), trial, search)
        raw_trial, raw_params = top.get("trial", {}) or {}, top.get("parameters")
        if ("trial" in top and isinstance(raw_trial, Mapping) and "dataset" not in raw_trial
                and not (isinstance(raw_params, Mapping) and "dataset" in raw_params)):
            from trainables.vae.data import DATASETS

            self.add("trial.dataset", f"missing required key; set the dataset to train on, one of "
                                      f"{sorted(DATASETS)}")
        self.check_trial_configs(trial, parameters)
        scheduler = self.check_scheduler(top.get("scheduler"), trial, parameters)
        counts = {}
        for key, minimum, default in (("num_samples", 1, 1), ("max_concurrent", 1, 1),
                                      ("max_failures", -1, 1)):
            hint = " (-1 retries forever)" if key == "max_failures" else ""
            counts[key] = self.integer(top.get(key, default), key, minimum=minimum, hint=hint)
        if top.get("checkpoint_every") is not None:
            counts["checkpoint_every"] = self.integer(top["checkpoint_every"], "checkpoint_every", minimum=1,
                                                      hint=" (epochs between a trial's checkpoints)")
        resources = self.check_resources(top.get("resources"), trial, parameters)
        if scheduler.audit and counts["num_samples"] is not None:
            grid = math.prod(len(p.values) for p in parameters if p.distribution == "grid")
            self.check_audit(scheduler, grid * counts["num_samples"])
        stopped = self.check_stopped_trials(top.get("stopped_trials"), scheduler)

        if self.problems:
            return None
        return SweepSpec(
            name=name, experiment=experiment or name, metric=metric, trial=trial,
            parameters=tuple(parameters), search=search, scheduler=scheduler,
            resources=resources, stopped_trials=stopped, description=description, source=source, **counts,
        )

    def check_stopped_trials(self, value: Any, scheduler: SchedulerSpec) -> StoppedTrials:
        if value is None:
            return StoppedTrials()
        block = self.mapping(value, "stopped_trials", ("test_ll", "samples", "images"))
        test = self.string(block.get("test_ll", "full"), "stopped_trials.test_ll", STOPPED_TRIAL_TESTS) or "full"
        if scheduler.type == "fifo":
            self.add("stopped_trials", f"only used when a scheduler stops trials (scheduler.type: asha); "
                                       f"with {scheduler.type} every trial ends by itself and is tested in full: "
                                       "remove stopped_trials")
        if test != "estimate":
            for key in ("samples", "images"):
                if key in block:
                    self.add(f"stopped_trials.{key}", f"only used by test_ll: estimate (the full test uses the "
                                                      f"trial's test_samples on every image); set test_ll: "
                                                      f"estimate or remove {key}")
            return StoppedTrials(test)
        samples = self.integer(block.get("samples", StoppedTrials.ESTIMATE_SAMPLES), "stopped_trials.samples",
                               minimum=1, hint=" (importance samples per test image)")
        images = self.integer(block.get("images", StoppedTrials.ESTIMATE_IMAGES), "stopped_trials.images",
                              minimum=1, hint=" (the first N test images)")
        return StoppedTrials("estimate", samples, images)

    def check_metric(self, value: Any) -> Metric:
        block = self.mapping(value, "metric", ("name", "mode"))
        name = block.get("name", "val_elbo")
        if not isinstance(name, str) or name not in REPORTED_METRICS:
            self.add("metric.name", f"{_show(name)} is not reported by the trainable; "
                                    f"{_did_you_mean(str(name), REPORTED_METRICS)}")
            name = None
        mode = self.string(block.get("mode", REPORTED_METRICS.get(name or "", "max")),
                           "metric.mode", MODES)
        if name and mode and mode != REPORTED_METRICS[name]:
            self.add("metric.mode", f"{mode!r} optimises {name} the wrong way: "
                                    f"{'higher' if REPORTED_METRICS[name] == 'max' else 'lower'} "
                                    f"{name} is better; use mode: {REPORTED_METRICS[name]}")
        return Metric(name or "val_elbo", mode or "max")

    def coerce(self, key: str, value: Any, path: str) -> tuple[bool, Any]:
        """Coerce a trial value to the TrainConfig field's type (ints from 1.0, ...)."""
        from trainables.vae.config import coerce_value  # the very rule TrainConfig.from_dict applies

        try:
            return True, coerce_value(value, self.field_types[key])
        except (TypeError, ValueError) as exc:
            self.add(path, str(exc))
            return False, None

    def check_trial(self, value: Any) -> dict[str, Any]:
        block = self.mapping(value, "trial", tuple(self.field_types))
        trial: dict[str, Any] = {}
        for key, item in block.items():
            ok, coerced = self.coerce(key, item, f"trial.{key}")
            if ok:
                trial[key] = coerced
        return trial

    def check_search(self, value: Any) -> SearchSpec:
        block = self.mapping(value, "search", ("algorithm", "sampler", "seed"))
        algorithm = self.string(block.get("algorithm", "optuna"), "search.algorithm",
                                SEARCH_ALGORITHMS) or "optuna"
        sampler: str | None = None
        if algorithm == "optuna":
            sampler = self.string(block.get("sampler", "tpe"), "search.sampler", OPTUNA_SAMPLERS)
        elif "sampler" in block:
            self.add("search.sampler", f"only used by algorithm optuna; remove it (algorithm "
                                       f"{algorithm!r} samples with Ray's variant generator)")
        seed = self.integer(block.get("seed", 0), "search.seed", minimum=0)
        return SearchSpec(algorithm, sampler, seed if seed is not None else 0)

    # -- parameters

    def check_parameters(self, value: Any, trial: Mapping[str, Any],
                         search: SearchSpec) -> list[Parameter]:
        if value is None:
            return []
        if not isinstance(value, Mapping):
            self.add("parameters", f"expected a mapping of trial key -> {{distribution: ...}}, "
                                   f"got {_show(value)}")
            return []
        declared: dict[str, Parameter] = {}
        raw: dict[str, Mapping] = {}
        for name, spec in value.items():
            path = f"parameters.{name}"
            if not isinstance(name, str) or name not in self.field_types:
                self.add(path, f"not a trial key; {_did_you_mean(str(name), self.field_types)}")
                continue
            if name in trial:
                self.add(path, f"{name} is also fixed in trial (trial.{name}: {_show(trial[name])});"
                               f" remove it from one of them")
            param = self.check_parameter(name, spec, path, search)
            if param is not None:
                declared[name], raw[name] = param, spec
        # Conditions may test any choice/grid parameter, wherever it is declared.
        conditional = {name for name, spec in raw.items() if "when" in spec}
        for name, param in declared.items():
            when = self.check_when(param, raw[name], f"parameters.{name}", trial, declared, conditional)
            declared[name] = dataclasses.replace(param, when=when)
        return self.in_dependency_order(list(declared.values()))

    def in_dependency_order(self, parameters: list[Parameter]) -> list[Parameter]:
        """Order parameters so that each comes after those its condition tests (stable: the
        declaration order where it allows); a cycle is a problem."""
        names = {p.name for p in parameters}
        ordered: list[Parameter] = []
        placed: set[str] = set()
        pending = list(parameters)
        while pending:
            ready = next((p for p in pending if all(k in placed or k not in names for k in p.when)), None)
            if ready is None:
                cycle = " -> ".join(p.name for p in pending)
                for p in pending:
                    self.add(f"parameters.{p.name}.when", f"circular conditions among {cycle}; a "
                                                         f"parameter cannot depend on itself")
                return ordered
            ordered.append(ready)
            placed.add(ready.name)
            pending.remove(ready)
        return ordered

    def check_parameter(self, name: str, spec: Any, path: str,
                        search: SearchSpec) -> Parameter | None:
        if not isinstance(spec, Mapping):
            self.add(path, f"expected {{distribution: ..., ...}}, got {_show(spec)}; e.g. "
                           f"{{distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}}")
            return None
        dist = spec.get("distribution")
        if dist is None:
            self.add(f"{path}.distribution", f"missing required key; one of {list(DISTRIBUTIONS)}")
            return None
        dist = self.string(dist, f"{path}.distribution", tuple(DISTRIBUTIONS))
        if dist is None:
            return None
        allowed = ("distribution", *DISTRIBUTIONS[dist], "when")
        for key in spec:
            if key in allowed:
                continue
            other = [d for d, keys in DISTRIBUTIONS.items() if key in keys]
            if other:
                self.add(f"{path}.{key}", f"not used by distribution {dist}; it belongs to "
                                          f"{' / '.join(other)}")
            else:
                self.add(f"{path}.{key}", f"unknown key; {_did_you_mean(str(key), allowed)}")
        ftype = self.field_types[name].replace(" | None", "")
        if dist not in DISCRETE_DISTRIBUTIONS and ftype in ("str", "bool"):
            self.add(f"{path}.distribution", f"{name} is a {'string' if ftype == 'str' else 'boolean'}"
                                             f"; use choice or grid with values: [...]")
            return None
        if dist in ("uniform", "log_uniform") and ftype == "int":
            self.add(f"{path}.distribution", f"{name} is an integer; use int_uniform or "
                                             f"int_log_uniform (or choice)")
            return None
        if dist == "grid" and search.algorithm == "optuna":
            self.add(f"{path}.distribution", "grid needs search.algorithm: random (Optuna samples,"
                                             " it does not enumerate grids); use choice with Optuna")
        if dist in DISCRETE_DISTRIBUTIONS:
            return self.check_values(name, dist, spec, path)
        return self.check_bounds(name, dist, spec, path)

    def check_values(self, name: str, dist: str, spec: Mapping, path: str) -> Parameter | None:
        values = spec.get("values")
        if "values" not in spec:
            self.add(f"{path}.values", "missing required key; list the values, e.g. values: [a, b]")
            return None
        if not isinstance(values, list) or not values:
            self.add(f"{path}.values", f"expected a non-empty list of values, got {_show(values)}")
            return None
        out: list[Any] = []
        ok = True
        for i, item in enumerate(values):
            if isinstance(item, (list, dict)):
                self.add(f"{path}.values[{i}]", f"expected a single value, got {_show(item)}")
                ok = False
                continue
            good, coerced = self.coerce(name, item, f"{path}.values[{i}]")
            if not good:
                ok = False
            elif coerced in out:
                self.add(f"{path}.values[{i}]", f"duplicate value {_show(coerced)}; remove it")
                ok = False
            else:
                out.append(coerced)
        return Parameter(name, dist, values=tuple(out)) if ok else None

    def check_bounds(self, name: str, dist: str, spec: Mapping, path: str) -> Parameter | None:
        bounds: dict[str, Any] = {}
        for key in ("min", "max"):
            if key not in spec:
                self.add(f"{path}.{key}", "missing required key")
                continue
            value = self.number(spec[key], f"{path}.{key}")
            if value is None:
                continue
            if dist in INT_DISTRIBUTIONS:
                if isinstance(value, float) and not value.is_integer():
                    self.add(f"{path}.{key}", f"{value} is not an integer; {dist} needs integer "
                                              f"bounds (or use {dist.replace('int_', '')})")
                    continue
                value = int(value)
            else:
                value = float(value)
            if dist in LOG_DISTRIBUTIONS and value <= 0:
                self.add(f"{path}.{key}", f"{value} must be > 0 for {dist} (a log scale); use "
                                          f"{dist.replace('log_', '')} for ranges that include 0")
                continue
            bounds[key] = value
        if len(bounds) < 2:
            return None
        if bounds["min"] >= bounds["max"]:
            self.add(f"{path}.min", f"{bounds['min']} must be < max ({bounds['max']})")
            return None
        return Parameter(name, dist, min=bounds["min"], max=bounds["max"])

    def check_when(self, param: Parameter, spec: Mapping, path: str, trial: Mapping[str, Any],
                   declared: Mapping[str, Parameter],
                   conditional: set[str]) -> dict[str, tuple[Any, ...]]:
        if "when" not in spec:
            return {}
        path = f"{path}.when"
        when = spec["when"]
        if not isinstance(when, Mapping) or not when:
            self.add(path, f"expected a mapping of key -> allowed values, e.g. "
                           f"{{prior: [vamp, mog]}}; got {_show(when)}")
            return {}
        if param.distribution == "grid":
            self.add(path, "a grid parameter cannot be conditional (every grid point runs); use "
                           "choice, or split the sweep into two specs")
            return {}
        out: dict[str, tuple[Any, ...]] = {}
        for key, allowed in when.items():
            kpath = f"{path}.{key}"
            if key == param.name:
                self.add(kpath, "a parameter cannot depend on itself")
                continue
            if key not in declared and key not in trial:
                known = sorted({*declared, *trial} - {param.name})
                hint = _did_you_mean(str(key), known) if known else "there are none"
                self.add(kpath, f"unknown key; a condition tests a choice/grid parameter or a "
                                f"key fixed in trial: {hint}")
                continue
            source = declared.get(key)
            if source is not None and not source.is_discrete:
                self.add(kpath, f"{key} is sampled from {source.distribution}; conditions can only "
                                f"test choice/grid parameters or fixed trial keys")
                continue
            if not isinstance(allowed, list) or not allowed:
                self.add(kpath, f"expected a non-empty list of allowed values, e.g. [{_show(allowed)}]"
                                if not isinstance(allowed, list) else
                                "expected a non-empty list of allowed values")
                continue
            values: list[Any] = []
            for i, item in enumerate(allowed):
                ok, coerced = self.coerce(key, item, f"{kpath}[{i}]")
                if not ok:
                    continue
                # A conditional parameter that does not apply has its default (condition_holds).
                reachable = list(source.values) if source is not None else []
                if key in conditional and self.defaults[key] not in reachable:
                    reachable.append(self.defaults[key])
                if source is not None and coerced not in reachable:
                    default = (f" nor its default {_show(self.defaults[key])} (what a trial where "
                               f"it does not apply has)" if key in conditional else "")
                    self.add(f"{kpath}[{i}]", f"{_show(coerced)} is not one of parameters.{key}."
                                              f"values {list(source.values)}{default}; the condition "
                                              f"never matches it")
                    continue
                name_problem = self.value_problem(key, coerced)
                if name_problem:
                    self.add(f"{kpath}[{i}]", name_problem)
                    continue
                values.append(coerced)
            out[key] = tuple(values)
        return out

    def value_problem(self, key: str, value: Any) -> str | None:
        """TrainConfig's own problem with `key: value` alone (unknown prior names, ranges)."""
        from trainables.vae.config import TrainConfig

        for problem in TrainConfig(**{key: value}).problems():
            field_name, _, message = problem.partition(": ")
            if field_name == key:
                return message
        return None

    def check_trial_configs(self, trial: Mapping[str, Any], parameters: Sequence[Parameter]) -> None:
        """Validate the trial configs the sweep can produce with TrainConfig's own rules: every
        combination of choice/grid values and of numeric bounds (conditions applied)."""
        from trainables.vae.config import TrainConfig

        candidates = [list(p.values) if p.is_discrete else [p.min, p.max] for p in parameters]
        if math.prod(len(c) for c in candidates) <= _MAX_COMBINATIONS:
            combos: Iterable[tuple] = itertools.product(*candidates)
        else:  # vary one parameter at a time around the first candidate of each
            first = tuple(c[0] for c in candidates)
            combos = [first[:i] + (v,) + first[i + 1:] for i, c in enumerate(candidates) for v in c]
        combos = list(combos)
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (path, message) -> contexts
        for combo in combos:
            config = {**self.defaults, **trial}
            chosen: dict[str, tuple[Parameter, Any]] = {}
            for param, value in zip(parameters, combo):
                if param.applies(config):
                    config[param.name] = value
                    chosen[param.name] = (param, value)
            for problem in TrainConfig(**config).problems():
                field_name, _, message = problem.partition(": ")
                if field_name in chosen:
                    param, value = chosen[field_name]
                    if param.is_discrete:
                        path = f"parameters.{field_name}.values"
                    else:
                        path = f"parameters.{field_name}.{'min' if value == param.min else 'max'}"
                else:
                    path = f"trial.{field_name}"
                context = {k: v for k, (p, v) in chosen.items() if p.is_discrete and k != field_name}
                found.setdefault((path, message), []).append(context)
        for (path, message), contexts in found.items():  # one line per problem, not per combination
            if len(contexts) < len(combos) and contexts[0]:
                # Only some combinations break: name one so the user sees which.
                example = ", ".join(f"{k}={_show(v)}" for k, v in contexts[0].items())
                message += f" (e.g. with {example})"
            self.add(path, message)

    # -- scheduling and resources

    def check_scheduler(self, value: Any, trial: Mapping[str, Any],
                        parameters: Sequence[Parameter]) -> SchedulerSpec:
        block = self.mapping(value, "scheduler", ("type", "grace_period", "reduction_factor", "max_t", "audit"))
        kind = self.string(block.get("type", "fifo"), "scheduler.type", SCHEDULERS) or "fifo"
        if kind != "asha":
            for key in ("grace_period", "reduction_factor", "max_t"):
                if key in block:
                    self.add(f"scheduler.{key}", f"only used by type asha; set scheduler.type: asha "
                                                 f"or remove it ({kind} never stops trials early)")
            if "audit" in block:
                self.add("scheduler.audit", f"only used by type asha: audit trials are the ones exempt from "
                                            f"ASHA's early stops, and {kind} never stops a trial early (every "
                                            f"trial already trains to its own end); remove it, or set "
                                            f"scheduler.type: asha")
            return SchedulerSpec(kind)
        grace = self.integer(block.get("grace_period", 1), "scheduler.grace_period", minimum=1)
        rf = self.number(block.get("reduction_factor", 4), "scheduler.reduction_factor")
        if rf is not None and rf <= 1:
            self.add("scheduler.reduction_factor", f"{rf} must be > 1 (ASHA keeps the best "
                                                   f"1/reduction_factor at each rung; 3 or 4 is usual)")
            rf = None
        # Epoch budget of the longest trial: trial.max_epochs, or the top of its searched range.
        epochs_from = "trial.max_epochs"
        max_epochs: int | None = trial.get("max_epochs", self.defaults["max_epochs"])
        if "max_epochs" not in trial:
            epochs_from = "the trial default max_epochs"
        for p in parameters:
            if p.name == "max_epochs":
                max_epochs = int(max(p.values) if p.is_discrete else p.max)
                epochs_from = "parameters.max_epochs"
        max_t = max_epochs
        if "max_t" in block:
            max_t = self.integer(block["max_t"], "scheduler.max_t", minimum=1)
            if max_t is not None and max_epochs is not None and max_t > max_epochs:
                self.add("scheduler.max_t", f"{max_t} exceeds {epochs_from} ({max_epochs}): trials "
                                            f"never get that far; lower max_t or leave it out")
        elif max_t is not None:
            epochs_from = f"max_t from {epochs_from}"
        if grace is not None and max_t is not None and grace > max_t:
            source = "max_t" if "max_t" in block else epochs_from
            self.add("scheduler.grace_period", f"{grace} must be <= max_t ({max_t}, {source}); lower "
                                               f"grace_period or raise the epochs")
        audit = self.audit_value(block["audit"]) if "audit" in block else None
        return SchedulerSpec("asha", grace or 1, rf or 4, max_t, audit)

    def audit_value(self, value: Any) -> int | float | None:
        """`scheduler.audit` on its own: a count (an integer >= 0; 0 is off) or a fraction in (0, 1)."""
        path = "scheduler.audit"
        example = ("e.g. audit: 8 (trials) or audit: 0.125 (of the trials); each audit trial trains to its "
                   "own end so that rung fidelity can be measured")
        if not _is_number(value):
            self.add(path, f"expected a number of trials or a fraction of them, got {_show(value)}; {example}")
            return None
        if _is_int(value):
            if value < 0:
                self.add(path, f"{value} must be >= 0 (0 turns audit trials off); {example}")
                return None
            if 0 < value < AUDIT_MIN:
                self.add(path, f"{value} audit trial(s) cannot measure a rank correlation, which needs at least "
                               f"{AUDIT_MIN}; use {AUDIT_MIN} or more, or 0 to turn audit trials off")
                return None
            # 0 is as if unset: a sweep started without audit trials resumes with --set scheduler.audit=0.
            return value or None
        if not (math.isfinite(value) and 0 < value < 1):
            hint = (f"; for a count write an integer ({int(value)})" if math.isfinite(value) and value >= 1
                    and float(value).is_integer() else "")
            self.add(path, f"{value}: a fraction of the trials must be > 0 and < 1{hint}; {example}")
            return None
        return float(value)

    def check_audit(self, scheduler: SchedulerSpec, total: int) -> None:
        """`scheduler.audit` against the trials the sweep runs (num_samples x the grid)."""
        where = f"the {total} trial(s) the sweep runs (num_samples x grid points)"
        if isinstance(scheduler.audit, int) and scheduler.audit > total:
            self.add("scheduler.audit", f"{scheduler.audit} audit trials exceed {where}; lower it, or use a "
                                        f"fraction such as 0.25")
        elif isinstance(scheduler.audit, float) and total < AUDIT_MIN:
            self.add("scheduler.audit", f"{scheduler.audit} of {where} cannot measure a rank correlation, which "
                                        f"needs at least {AUDIT_MIN} audit trials; run more trials or remove it")

    def check_resources(self, value: Any, trial: Mapping[str, Any],
                        parameters: Sequence[Parameter]) -> Resources:
        block = self.mapping(value, "resources", ("cpu", "gpu", "batched"))
        batched = block.get("batched", "auto")
        if batched not in (True, False, "auto"):
            self.add("resources.batched", f"{_show(batched)} is not one of auto, true, false (auto: batch the "
                                          f"trials that share a GPU, i.e. when 0 < resources.gpu < 1)")
            batched = "auto"
        amounts: dict[str, float] = {}
        for key, default in (("cpu", 1), ("gpu", 0)):
            amount = self.number(block.get(key, default), f"resources.{key}")
            if amount is not None and amount < 0:
                self.add(f"resources.{key}", f"{amount} must be >= 0")
                amount = None
            if amount is not None:
                amounts[key] = amount
        cpu, gpu = amounts.get("cpu"), amounts.get("gpu")
        if gpu is not None and gpu > 1 and not float(gpu).is_integer():
            self.add("resources.gpu", f"{gpu}: a trial can share one GPU (a fraction <= 1) or use "
                                      f"whole GPUs (an integer); use {math.floor(gpu)} or "
                                      f"{math.ceil(gpu)}")
        if cpu == 0 and gpu == 0:
            self.add("resources", "cpu: 0 and gpu: 0 reserve nothing, so Ray would start every trial "
                                  "at once on any node; set resources.cpu: 1")
        resources = Resources(cpu if cpu is not None else 1, gpu if gpu is not None else 0, batched)
        # Devices are judged against a valid resources.gpu only (a bad one is its own problem).
        no_gpu_said = gpu is not None and self.check_devices(trial, parameters, resources)
        if self.cluster is not None:
            have_cpu = float(self.cluster.get("CPU", 0))
            have_gpu = float(self.cluster.get("GPU", 0))
            if cpu is not None and cpu > have_cpu:
                self.add("resources.cpu", f"a trial asks for {_num(cpu)} CPU but the cluster has "
                                          f"{_num(have_cpu)}: it could never start; lower "
                                          f"resources.cpu (e.g. --set resources.cpu={_num(have_cpu) or 1})")
            if gpu is not None and gpu > have_gpu and not no_gpu_said:
                if have_gpu == 0:
                    self.add("resources.gpu", f"a trial asks for {_num(gpu)} GPU but the cluster has "
                                              f"no GPU: it could never start; on this machine run with "
                                              f"--set resources.gpu=0 (resources.gpu > 0 is for GPU "
                                              f"machines)")
                else:
                    self.add("resources.gpu", f"a trial asks for {_num(gpu)} GPU but the cluster has "
                                              f"{_num(have_gpu)}: it could never start; lower "
                                              f"resources.gpu (e.g. --set resources.gpu={_num(have_gpu)})")
        return resources

    def check_devices(self, trial: Mapping[str, Any], parameters: Sequence[Parameter],
                      resources: Resources) -> bool:
        """Every device a trial may name (trial.device, or each value of parameters.device)
        against what the trial gets; True when a device was refused because the cluster has no
        GPU at all (that one message then also says what to do with resources.gpu)."""
        searched = next((p for p in parameters if p.name == "device"), None)
        if searched is not None:
            devices = [(f"parameters.device.values[{i}]", v) for i, v in enumerate(searched.values)]
        else:
            devices = [("trial.device", trial.get("device", self.defaults["device"]))]
        no_gpu_here = self.cluster is not None and float(self.cluster.get("GPU", 0)) == 0
        said = False
        for path, device in devices:
            problem = self.device_problem(str(device), resources, no_gpu_here)
            if problem:
                self.add(path, problem)
                said = said or (no_gpu_here and str(device).startswith("cuda"))
        return said

    def device_problem(self, device: str, resources: Resources, no_gpu_here: bool) -> str | None:
        """Why a trial cannot train on `device` with these resources, and what works instead.

        In its process Ray shows a trial only the GPUs it reserved, as cuda:0, cuda:1, ...; a
        pooled trial trains on its pool's device: the GPU Ray gives it (cuda:0 there), or the
        node's CPUs when it reserves no GPU. `auto` is always that device.
        """
        from trainables.vae.config import DEVICE_PATTERN

        if device == "auto" or not DEVICE_PATTERN.fullmatch(device):
            return None   # a malformed name is TrainConfig's problem (check_trial_configs)
        gpu = resources.gpu
        kind, _, index = device.partition(":")
        if kind == "cuda" and no_gpu_here:
            fix = "--set trial.device=auto" + (" --set resources.gpu=0" if gpu > 0 else "")
            return (f"{device!r} needs a GPU and the cluster has none (without --address: this "
                    f"machine); here trials train on the CPU: use device: auto (or cpu)"
                    + (" and resources.gpu: 0" if gpu > 0 else "") + f", e.g. {fix}")
        if kind == "cuda" and gpu == 0:
            return (f"{device!r} needs a GPU but resources.gpu is 0, so Ray gives the trial none; "
                    f"reserve one with resources.gpu (1, or a fraction such as 0.25 to share it), "
                    f"or use device: auto")
        if resources.pooled:
            why = ("resources.batched: true" if resources.batched is True
                   else f"resources.gpu: {_num(gpu)} with resources.batched: auto")
            if gpu > 0 and (device == "cuda" or device == "cuda:0"):
                return None
            if gpu == 0 and device == "cpu":
                return None
            where = ("the GPU Ray gives each trial (cuda:0 in its process)" if gpu > 0
                     else "the node's CPUs (no GPU reserved)")
            alone = dataclasses.replace(resources, batched=False)
            other = ("" if self.device_problem(device, alone, no_gpu_here) else
                     f", or resources.batched: false to train each trial in its own process on {device!r}")
            return (f"{device!r}: pooled trials ({why}) train on their pool's device, {where}; use "
                    f"device: auto{other}")
        if kind == "cuda" and index:
            visible = max(1, int(gpu))
            if int(index) >= visible:
                return (f"{device!r}: Ray shows a trial only the GPUs it reserves, as cuda:0"
                        f"{f'..cuda:{visible - 1}' if visible > 1 else ''} in its process "
                        f"(resources.gpu: {_num(gpu)}); use device: cuda (or auto)"
                        + (", or reserve more whole GPUs" if gpu >= 1 else ""))
        return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
