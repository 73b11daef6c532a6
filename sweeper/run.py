"""`sweeper run`: one sweep = one Ray Tune experiment + one MLflow parent run.

The driver resolves every path and URI to an absolute one (Ray runs each trial in its own
folder, maybe on another node), validates the spec against the cluster before anything starts,
creates the MLflow experiment and the parent run, and hands Tune a trainable whose trials log to
nested child runs. `--resume` continues the newest sweep of the spec's name: the same parent
run, the same child runs, the searcher's study and ASHA's rungs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray import tune

from sweeper import tracking
from sweeper.errors import SweeperError
from sweeper.spec import SweepSpec, load_spec
from trainables.vae.catalog import STOP_ERROR

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
    errors: list[str] = field(default_factory=list)


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
        candidates = sorted((p for p in local_root.glob(f"{spec.name}-*") if (p / STATE_FILE).is_file()),
                            key=lambda p: p.name)
        if not candidates:
            raise SweeperError(f"--resume: no earlier sweep named {spec.name!r} under {local_root} "
                               f"(looked for {spec.name}-*/{STATE_FILE}); run it without --resume first")
        state = json.loads((candidates[-1] / STATE_FILE).read_text())
        if tracking_uri is None:
            uri = state["tracking_uri"]
        return SweepPlan(candidates[-1].name, state["storage"], candidates[-1], uri)
    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return SweepPlan(sweep_id, storage, local_root / sweep_id, uri)


def _datasets_of(spec: SweepSpec) -> set[str]:
    names = {spec.base_config()["dataset"]}
    for p in spec.parameters:
        if p.name == "dataset" and p.values:
            names.update(p.values)
    return names


def _init_ray(address: str | None) -> dict[str, float]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except Exception as exc:
            raise SweeperError(f"--address {address}: cannot connect to the Ray cluster: {exc}. "
                               "Check the address (ray status on the head prints it) and, with token "
                               "authentication, RAY_AUTH_MODE=token and the token") from exc
    else:
        ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True)
    return dict(ray.cluster_resources())


class TrialRunsCallback(tune.Callback):
    """Driver-side bookkeeping that a dying trial cannot do itself: close an errored trial's run."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.args = (tracking_uri, experiment_id, parent_run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run = tracking.find_child(*self.args, trial_id=trial.trial_id)
        if run is not None and run.info.status == "RUNNING":
            handle = tracking.RunHandle(self.args[0], run.info.run_id)
            detail = str(getattr(trial, "error_file", "") or "see the Ray trial log")
            handle.set_tags({tracking.TAG_STOP: STOP_ERROR, "stop_detail": detail})
            handle.terminate("FAILED")


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


def run_sweep(spec_path: str | Path, overrides: Sequence[str] = (), *, num_samples: int | None = None,
              max_concurrent: int | None = None, address: str | None = None,
              tracking_uri: str | None = None, storage_path: str | None = None, resume: bool = False,
              workdir: str | Path | None = None, echo: Callable[[str], None] = print) -> SweepOutcome:
    """Validate the spec, start (or resume) the sweep, wait for it, return its summary."""
    workdir = Path(workdir or os.getcwd()).resolve()
    spec_path = Path(spec_path).expanduser().resolve()
    spec = load_spec(spec_path, overrides, num_samples=num_samples, max_concurrent=max_concurrent)
    plan = plan_sweep(spec, storage_path=storage_path, tracking_uri=tracking_uri, resume=resume, workdir=workdir)

    cluster = _init_ray(address)
    try:
        # Now that the cluster is known: can a trial ever get its resources?
        spec = load_spec(spec_path, overrides, num_samples=num_samples, max_concurrent=max_concurrent,
                         cluster_resources=cluster)
        if not address:  # one download in the driver instead of one per trial process
            from trainables.vae.data import fetch

            for name in sorted(_datasets_of(spec)):
                fetch(name, spec.trial.get("data_root"))
        return _run(spec, spec_path, overrides, plan, resume, echo)
    finally:
        ray.shutdown()


def _run(spec: SweepSpec, spec_path: Path, overrides: Sequence[str], plan: SweepPlan, resume: bool,
         echo: Callable[[str], None]) -> SweepOutcome:
    from sweeper.search import SchedulerStateCallback, make_scheduler, make_search_alg, param_space
    from trainables.pool import remove_pools
    from trainables.vae_trainable import SWEEP_KEY, VAETrainable

    experiment_id = tracking.ensure_experiment(plan.tracking_uri, spec.experiment)
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    state_file = plan.state_dir / STATE_FILE
    if resume:
        parent_id = json.loads(state_file.read_text())["parent_run_id"]
        parent = tracking.RunHandle(plan.tracking_uri, parent_id)
        closed = tracking.close_stale_children(plan.tracking_uri, experiment_id, parent_id)
        if closed:
            echo(f"closed {len(closed)} run(s) left RUNNING by the interrupted sweep as KILLED")
        parent.reopen()
        echo(f"resuming sweep {plan.sweep_id} (MLflow parent run {parent_id})")
    else:
        parent = tracking.RunHandle(plan.tracking_uri, tracking.client(plan.tracking_uri).create_run(
            experiment_id, run_name=plan.sweep_id,
            tags={tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: plan.sweep_id,
                  "mlflow.note.content": spec.description or f"sweep {spec.name}"}).info.run_id)
        parent.log_params({"spec_file": spec_path.name, **tracking.flatten("", spec.to_dict())})
        if spec.search.algorithm == "optuna":
            from sweeper.search import study_storage_url

            parent.set_tags({tracking.TAG_STUDY_STORAGE: study_storage_url(plan.state_dir),
                             tracking.TAG_STUDY_NAME: spec.name})
        parent.log_artifact(spec_path, "spec")
        if overrides:
            parent.log_text("\n".join(overrides) + "\n", "spec/overrides.txt")
        state_file.write_text(json.dumps({
            "sweep_id": plan.sweep_id, "parent_run_id": parent.run_id, "experiment_id": experiment_id,
            "tracking_uri": plan.tracking_uri, "storage": plan.storage, "spec": str(spec_path),
        }, indent=2))
        echo(f"sweep {plan.sweep_id}: {spec.total_trials} trial(s), MLflow experiment {spec.experiment!r} "
             f"at {plan.tracking_uri}, parent run {parent.run_id}")

    sweep_cfg = {"tracking_uri": plan.tracking_uri, "experiment_id": experiment_id,
                 "parent_run_id": parent.run_id, "sweep_name": plan.sweep_id,
                 "cpus_per_trial": max(1, int(spec.resources.cpu)), "scheduler": spec.scheduler.type}
    pooled = spec.resources.pooled
    if pooled:
        sweep_cfg["pool"] = {"sweep_id": plan.sweep_id}
        if resume and remove_pools(plan.sweep_id):
            echo("removed the interrupted sweep's trial pools; their trials rejoin from their checkpoints")
        echo("trials that share a device train together as one batched model (resources.batched)")
    trainable = tune.with_resources(VAETrainable, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    outcome = SweepOutcome(plan.sweep_id, parent.run_id, experiment_id, plan.tracking_uri, plan.experiment_path)
    # Tune saves the experiment's state (which trials exist) every >= 10 s by default; a trial that
    # started since then is unknown to a resumed sweep (mark_lost_trials). Every 2 s narrows that.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    status = "FAILED"
    try:
        if resume:
            tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            scheduler = make_scheduler(spec)
            tuner = tune.Tuner(
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
                    # was. At the end too, so an ASHA-stopped trial has its last epoch's checkpoint.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_at_end=True,
                                                            checkpoint_frequency=spec.checkpoint_frequency),
                    callbacks=[SchedulerStateCallback(scheduler),
                               TrialRunsCallback(plan.tracking_uri, experiment_id, parent.run_id),
                               *([PoolLeaveCallback(plan.sweep_id)] if pooled else [])],
                    progress_reporter=_reporter(spec), verbose=1),
            )
        results = tuner.fit()
        if pooled:
            remove_pools(plan.sweep_id)    # frees the devices before the stopped trials are evaluated
        mark_lost_trials(results, plan, spec, experiment_id, parent.run_id, echo)
        outcome.errors = [str(r.error) for r in results if r.error is not None]
        evaluate_stopped_trials(results, plan.tracking_uri, experiment_id, parent.run_id, spec, echo)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if pooled and ray.is_initialized():
            remove_pools(plan.sweep_id)
        outcome.summary = summarize(spec, plan.tracking_uri, experiment_id, parent, echo)
        parent.terminate(status)
    return outcome


def mark_lost_trials(results, plan: SweepPlan, spec: SweepSpec, experiment_id: str, parent_run_id: str,
                     echo: Callable[[str], None]) -> None:
    """Runs and study trials of trials that Tune lost: tag them, and end them as failed.

    Tune saves the experiment's state every few seconds; a trial that started (opened its MLflow
    run, took an Optuna suggestion) after the last save and before the driver died is unknown
    to the resumed sweep, which starts another trial in its place. Its run is tagged
    `sweeper.orphaned` (and left out of the summary and the report); its Optuna trial, still
    RUNNING in the study, becomes FAIL so the sampler does not wait for it.
    """
    known = set()
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id is None and result.path:
            trial_id = Path(result.path).name.removeprefix("trial_")
        if trial_id:
            known.add(str(trial_id))
    orphans = tracking.tag_orphans(plan.tracking_uri, experiment_id, parent_run_id, known)
    if orphans:
        echo(f"{len(orphans)} run(s) of trials the interrupted sweep lost are tagged {tracking.TAG_ORPHANED}")
    if spec.search.algorithm == "optuna":
        from sweeper.search import fail_running_study_trials

        fail_running_study_trials(plan.state_dir, spec.name)


def evaluate_stopped_trials(results, tracking_uri: str, experiment_id: str, parent_run_id: str,
                            spec: SweepSpec, echo: Callable[[str], None]) -> None:
    """Test-evaluate, from their last checkpoints, the trials the scheduler stopped (Ray tasks).

    Idempotent: a trial whose run already has its test_ll is skipped, so a resumed sweep
    finishes what an interrupted one left.
    """
    from trainables.vae_trainable import evaluate_stopped_trial

    task = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(evaluate_stopped_trial)
    pending = []
    for result in results:
        metrics = result.metrics or {}
        if result.error is not None or metrics.get("stop_reason") or result.checkpoint is None:
            continue   # errored, or it finished by itself and was evaluated in its last step
        trial_id = metrics["trial_id"]
        run = tracking.find_child(tracking_uri, experiment_id, parent_run_id, trial_id)
        if run is not None and "test_ll" in run.data.metrics:
            continue
        name = run.info.run_name if run is not None else f"trial_{trial_id}"
        pending.append(task.remote(result.config, result.checkpoint, trial_id, name))
    if pending:
        echo(f"evaluating {len(pending)} trial(s) stopped by the scheduler on the test set ...")
        ray.get(pending)


def trial_name(trial) -> str:
    """`trial_<id>`: short, unique, and a valid folder name (Ray's default repeats the config)."""
    return f"trial_{trial.trial_id}"


def _reporter(spec: SweepSpec):
    from ray.tune import CLIReporter

    # The legacy reporter lets us choose the table's columns; the new one ignores reporters.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Checkpointing every epoch is deliberate (exact resume); Ray warns about it every few seconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    metrics = {"training_iteration": "epoch", spec.metric.name: spec.metric.name, "test_ll": "test_ll"}
    return CLIReporter(metric_columns=metrics, parameter_columns=[p.name for p in spec.parameters],
                       max_report_frequency=30, sort_by_metric=True, max_progress_rows=20)


def summarize(spec: SweepSpec, tracking_uri: str, experiment_id: str, parent: tracking.RunHandle,
              echo: Callable[[str], None]):
    """The trials' child runs as a table (best test LL first), printed and logged to the parent."""
    import pandas as pd

    rows = []
    for run in tracking.child_runs(tracking_uri, experiment_id, parent.run_id):
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        if tracking.TAG_ORPHANED in t:
            continue      # not a trial of the sweep (see mark_lost_trials)
        row = {"trial": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
               "stop_reason": t.get(tracking.TAG_STOP, ""), "epochs": int(m.get("epoch", 0))}
        # A conditional parameter that did not apply shows blank, not the config's default.
        row.update({q.name: p.get(q.name) if q.applies(p) else None for q in spec.parameters})
        for key in ("val_elbo", "test_ll", "test_elbo", "active_units", "test_bits_per_dim"):
            if key in m:
                row[key] = m[key]
        rows.append(row)
    if not rows:
        echo("no trial runs were recorded")
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    sort_key = "test_ll" if "test_ll" in table else spec.metric.name
    if sort_key in table:
        table = table.sort_values(sort_key, ascending=False, na_position="last")
    shown = [c for c in ("trial", "stop_reason", "epochs", *[q.name for q in spec.parameters], "val_elbo",
                         "test_ll", "test_bits_per_dim", "active_units") if c in table]
    echo(f"\n{len(table)} trial(s); best first:\n" + table[shown].head(10).to_string(index=False))
    parent.log_text(table.to_csv(index=False), "summary.csv")
    parent.log_text(table[shown].to_markdown(index=False) if _has_tabulate() else table[shown].to_string(index=False),
                    "summary.md")
    best = table.iloc[0]
    if "test_ll" in table and pd.notna(best.get("test_ll")):
        parent.log_metrics({"best_test_ll": best["test_ll"], "trials": len(table),
                            **({"best_val_elbo": best["val_elbo"]} if pd.notna(best.get("val_elbo")) else {})})
        parent.set_tags({"best_run_id": best["run_id"], "best_trial": best["trial"]})
    return table


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def validate(spec_path: str | Path, overrides: Sequence[str] = (), **kw) -> SweepSpec:
    """`sweeper validate`: the spec checks only, nothing started."""
    return load_spec(spec_path, overrides, **kw)
