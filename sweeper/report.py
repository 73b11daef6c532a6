"""`sweeper report`: the VampPrior study's table and figures from the runs of one MLflow experiment.

`make_report` reads the experiment once (`search_runs`, paged), then writes into one folder:

- `table.csv` and a markdown table in `report.md`: test log-likelihood per (dataset, model, prior),
  mean +/- std over seeds, beside the published number (sweeper/published.py), the difference, and a flag
  where ours is more than `FLAG_NATS` below the best sourced reference;
- `trials.csv` and a table in `report.md`: every trial's stop reason, epochs, wall time, test LL;
- `ll_vs_K.png`: test LL against the number of pseudo-inputs K, comparing like with like;
- `ll_histograms.png`: per-image test LL of the best trial of each prior, one panel per dataset;
- `best_<dataset>_<model>_<prior>.png`: the best trial's pseudo-inputs, reconstructions of real
  test images, and samples, at a legible size;
- `learning_curves.png`: validation ELBO per epoch of every trial, coloured by K or lr, scheduler
  stops marked;
- `optuna_<sweep>.png`: for sweeps searched by Optuna, the parameter importances (PED-ANOVA) and a
  parallel-coordinates plot of the searched parameters against the metric, from the sweep's study;

and logs them to the newest sweep (parent) run of the experiment under `report/`. The figures
are drawn by sweeper/figures.py from plain frames.

Which runs count: a run tagged `sweeper.role=sweep` is a sweep; any other run with `dataset` and
`prior` params is a trial. Trials without a finite `test_ll` (still running, killed, diverged,
failed) are left out of the table and of the test-LL figures with a note in `report.md`; their
learning curves are still drawn. "Best trial" always means the highest `test_ll` (as the sweep's
own `best_run_id` tag). The table picks its configuration by validation ELBO (see `results_table`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sweeper import tracking
from sweeper.errors import SweeperError
from sweeper.figures import (CURVES_LOW_PERCENTILE, best_trial_figure, curve_colouring, curves_clip, finite,
                             histograms_figure, k_points_frame, learning_curves_figure, ll_vs_k_figure,
                             optuna_figure)
from sweeper.published import best_reference, published_ll
from trainables.vae.catalog import (DATASET_ORDER, ENDED_BY_ITSELF, K_PRIORS, METRIC_TEST_BPD, METRIC_TEST_LL,
                                    METRIC_VAL_ELBO, MODEL_ORDER, PRIOR_ORDER, STOP_ERROR, STOP_NAN,
                                    STOP_SCHEDULER, bits_per_dim, bits_per_dim_dim, short,
                                    stop_reason)

# Trial params that never make two trials different configurations: the seed (averaged over) and
# where/how a trial ran, which does not change its result.
NOT_CONFIG = frozenset({"seed", "data_root", "device", "image_every", "cuda_graphs", "checkpoint_every"})
# Params a prior ignores: trials differing only in these are one configuration of that prior.
IGNORED_BY_PRIOR = {"standard": frozenset({"K", "fixed_pseudo_inputs"}),
                    "vamp": frozenset({"fixed_pseudo_inputs"}),
                    "mog": frozenset({"fixed_pseudo_inputs"})}
SELECTION_METRIC = METRIC_VAL_ELBO
# A result this many nats below the best sourced reference for its (dataset, model, prior) is flagged.
FLAG_NATS = 1.0

REPORT_FILES = ("table.csv", "trials.csv", "ll_vs_K.png", "ll_histograms.png", "learning_curves.png",
                "report.md")


# --------------------------------------------------------------------------------------------
# The result


@dataclass
class ReportResult:
    experiment: str
    experiment_id: str
    tracking_uri: str
    out: Path
    files: list[Path] = field(default_factory=list)      # everything written, report.md last
    notes: list[str] = field(default_factory=list)       # what was left out and why
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)    # one row per trial run
    table: pd.DataFrame = field(default_factory=pd.DataFrame)     # table.csv
    k_points: pd.DataFrame = field(default_factory=pd.DataFrame)  # the points of ll_vs_K.png
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)    # run_id, epoch, val_elbo
    studies: dict[str, Any] = field(default_factory=dict)         # sweep -> its Optuna study
    logged_to: str | None = None                         # the parent run that got report/


# --------------------------------------------------------------------------------------------
# Reading the experiment


def _open_experiment(experiment: str, tracking_uri: str):
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        # MlflowClient would silently create an empty database there.
        raise SweeperError(f"no MLflow database at {tracking_uri[len('sqlite:///'):]}: run `sweeper report` "
                           "where the sweep ran, or pass --tracking-uri")
    client = tracking.client(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        names = [] if exp is not None else sorted(e.name for e in client.search_experiments())
    except Exception as exc:  # connection refused, bad credentials, unreadable database
        raise SweeperError(f"cannot read the MLflow tracking store {tracking_uri!r}: {exc}") from exc
    if exp is None:
        known = ", ".join(repr(n) for n in names) if names else "none"
        raise SweeperError(f"no MLflow experiment named {experiment!r} at {tracking_uri}; "
                           f"experiments there: {known}")
    if exp.lifecycle_stage == "deleted":
        raise SweeperError(f"MLflow experiment {experiment!r} is deleted; restore it in the UI first")
    return client, exp


def _all_runs(client, experiment_id: str) -> list:
    """Every active run of the experiment: one search, paged."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _value_text(value: Any) -> Any:
    """A param value as people read it (0.0023382678 -> 2.34e-3), for labels."""
    number = _number(value)
    return short(number) if finite(number) else value


TRIAL_COLUMNS = ["run_id", "trial", "status", "stop_reason", "stop_detail", "parent_run_id", "start_time",
                 "wall_seconds", "dataset", "model", "prior", "K", "lr", "seed", "config_params", "epochs",
                 "best_epoch", "test_ll", "val_elbo", "test_bits_per_dim"]


def trials_frame(runs: Iterable) -> pd.DataFrame:
    """One row per trial run: identity, status, stop reason, the config key and the metrics used."""
    rows = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        if (t.get(tracking.TAG_ROLE) == tracking.ROLE_SWEEP or tracking.TAG_ORPHANED in t
                or "dataset" not in p or "prior" not in p):
            continue
        prior = p["prior"]
        ignored = NOT_CONFIG | IGNORED_BY_PRIOR.get(prior, frozenset())
        config = {k: v for k, v in p.items() if k not in ignored}   # as logged: labels round, keys do not
        start, end = run.info.start_time or 0, run.info.end_time
        rows.append({
            "run_id": run.info.run_id, "trial": run.info.run_name or run.info.run_id,
            "status": run.info.status, "stop_reason": stop_reason(t.get(tracking.TAG_STOP)),
            "stop_detail": t.get("stop_detail", ""), "parent_run_id": t.get(tracking.TAG_PARENT, ""),
            "start_time": start,
            "wall_seconds": (end - start) / 1000.0 if end and start and run.info.status != "RUNNING" else float("nan"),
            "dataset": p["dataset"], "model": p.get("model", "vae"), "prior": prior,
            "K": int(_number(p["K"])) if prior in K_PRIORS and finite(_number(p.get("K"))) else None,
            "lr": _number(p.get("lr")),
            "seed": p.get("seed", ""), "config_params": config,
            "epochs": int(m["epoch"]) if finite(m.get("epoch")) else 0,
            "best_epoch": int(m["best_epoch"]) if finite(m.get("best_epoch")) else None,
            **{k: m.get(k, float("nan")) for k in (METRIC_TEST_LL, METRIC_VAL_ELBO, METRIC_TEST_BPD)},
        })
    frame = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    frame["has_ll"] = [finite(v) for v in frame["test_ll"]]
    frame["ended"] = frame["stop_reason"].isin(ENDED_BY_ITSELF)   # trained to its own end
    return _sorted(frame)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order of datasets, models and priors (unknown names after, by name)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    orders = {"dataset": DATASET_ORDER, "model": MODEL_ORDER, "prior": PRIOR_ORDER}

    def rank(column: pd.Series) -> pd.Series:
        first = {v: i for i, v in enumerate(orders[column.name])}
        return column.map(lambda v: f"{first.get(v, len(first)):03d}{v}")

    return frame.sort_values(list(orders), key=rank, kind="stable").reset_index(drop=True)


def _config_labels(group: pd.DataFrame) -> pd.Series:
    """Per trial, its configuration as the params that vary within the group ('K=16, lr=1e-3')."""
    configs = list(group["config_params"])
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({c.get(k) for c in configs}) > 1]
    # Two configurations whose rounded labels coincide (lr 2.341e-3 and 2.344e-3) stay two.
    labels = [", ".join(f"{k}={_value_text(c.get(k))}" for k in varying) for c in configs]
    if len(set(labels)) < len({tuple(c.get(k) for k in varying) for c in configs}):
        labels = [", ".join(f"{k}={c.get(k)}" for k in varying) for c in configs]
    return pd.Series(labels, index=group.index)



# --------------------------------------------------------------------------------------------
# 1. The table


def _mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for a single value)."""
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


TABLE_COLUMNS = ["dataset", "model", "prior", "test_ll_mean", "test_ll_std", "n_seeds", "n_trials", "n_configs",
                 "config", "published_ll", "published_source", "diff_ll", "best_reference_ll",
                 "best_reference_source", "below_best_reference", "flag", "bits_per_dim_mean",
                 "bits_per_dim_std", "published_bits_per_dim", "run_ids"]


def results_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Test log-likelihood per (dataset, model, prior), mean +/- std over seeds.

    A group may hold several configurations: trials whose params differ beyond the seed, the
    bookkeeping keys (`NOT_CONFIG`) and the keys the prior ignores (K for `standard`). Only trials
    with a finite test LL count. The configuration with the best mean validation ELBO is reported
    (chosen on validation data, so the test set plays no part in the choice): its trials are
    averaged per seed (repeats of a seed count once), then mean and sample std (ddof=1; blank for
    one seed) over the seeds. `n_seeds`, `n_trials`: what the numbers rest on; `n_configs`: how many
    configurations the group had; `run_ids`: the chosen configuration's runs. `published_*`: the
    paper's number where it has one (`published_ll`); `best_reference_*`: the highest sourced
    number; `flag` is True when the mean is more than FLAG_NATS below it.
    Groups without any finite test LL are left out.
    """
    rows = []
    done = trials[trials["has_ll"]] if not trials.empty else trials
    for (dataset, model, prior), group in done.groupby(["dataset", "model", "prior"], sort=False):
        group = group.assign(config=_config_labels(group))
        per_config = group.groupby("config", sort=False).agg(
            select=(SELECTION_METRIC, "mean"), ll_mean=("test_ll", "mean"))
        # A config without any validation ELBO falls back to its test LL (never happens in a sweep).
        score = per_config["select"].where(per_config["select"].notna(), per_config["ll_mean"])
        chosen = group[group["config"] == score.idxmax()]
        dim = bits_per_dim_dim(dataset)
        if dim is not None:
            # The run's own metric where it was logged, else from its test LL.
            bpd = chosen["test_bits_per_dim"].astype(float)
            chosen = chosen.assign(bpd=bpd.where(bpd.notna(), bits_per_dim(chosen["test_ll"], dim)))
        per_seed = chosen.groupby("seed", sort=False)[["test_ll"] + (["bpd"] if dim else [])].mean()
        ll_mean, ll_std = _mean_std(per_seed["test_ll"])
        pub = published_ll(dataset, model, prior)
        ref = best_reference(dataset, model, prior)
        below = ref.ll - ll_mean if ref else float("nan")
        row = {
            "dataset": dataset, "model": model, "prior": prior, "test_ll_mean": ll_mean, "test_ll_std": ll_std,
            "n_seeds": len(per_seed), "n_trials": len(chosen), "n_configs": len(per_config),
            "config": score.idxmax(),
            "published_ll": pub.ll if pub else float("nan"), "published_source": pub.source if pub else "",
            "diff_ll": ll_mean - pub.ll if pub else float("nan"),
            "best_reference_ll": ref.ll if ref else float("nan"),
            "best_reference_source": ref.source if ref else "",
            "below_best_reference": below, "flag": bool(ref) and below > FLAG_NATS,
        }
        if dim is not None:
            bpd_mean, bpd_std = _mean_std(per_seed["bpd"])
            row.update(bits_per_dim_mean=bpd_mean, bits_per_dim_std=bpd_std,
                       published_bits_per_dim=bits_per_dim(pub.ll, dim) if pub else float("nan"))
        row["run_ids"] = ";".join(chosen["run_id"])
        rows.append(row)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if table["bits_per_dim_mean"].isna().all():
        table = table.drop(columns=["bits_per_dim_mean", "bits_per_dim_std", "published_bits_per_dim"])
    return table


def _fmt(value: Any, digits: int = 2, sign: bool = False) -> str:
    if not finite(value):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(header: list[str], rows: Iterable[Iterable[str]]) -> str:
    """A markdown table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    return "\n".join([_md_row(header), "|" + "|".join("---" for _ in header) + "|", *map(_md_row, rows)])


def markdown_table(table: pd.DataFrame) -> str:
    """The results table for report.md."""
    bpd = "bits_per_dim_mean" in table
    header = ["dataset", "model", "prior", "test LL (nats)", "seeds", "published", "source", "diff"]
    header += ["bits/dim", "published bits/dim"] if bpd else []
    header += ["configuration", "check"]
    rows = []
    for r in table.itertuples(index=False):
        ll = _fmt(r.test_ll_mean) + (f" ± {_fmt(r.test_ll_std)}" if finite(r.test_ll_std) else "")
        n = str(r.n_seeds) + (f" ({r.n_trials} trials)" if r.n_trials != r.n_seeds else "")
        cells = [r.dataset, r.model, r.prior, ll, n, _fmt(r.published_ll), r.published_source or "–",
                 _fmt(r.diff_ll, sign=True)]
        if bpd:
            b = _fmt(r.bits_per_dim_mean, 4) + (f" ± {_fmt(r.bits_per_dim_std, 4)}"
                                                  if finite(r.bits_per_dim_std) else "")
            cells += [b if finite(r.bits_per_dim_mean) else "–", _fmt(r.published_bits_per_dim, 4)]
        config = r.config or "–"
        if r.n_configs > 1:
            config += f" (best of {r.n_configs} by val ELBO)"
        if r.flag:
            check = (f"⚠ {r.below_best_reference:.2f} nats below {r.best_reference_ll:.2f} "
                     f"({r.best_reference_source})")
        elif finite(r.best_reference_ll):
            check = f"within {FLAG_NATS:g} nat of the best reference ({r.best_reference_ll:.2f})" \
                if r.below_best_reference > 0 else f"above the best reference ({r.best_reference_ll:.2f})"
        else:
            check = "no reference"
        rows.append(cells + [config, check])
    return _md_table(header, rows)


def _minutes(seconds: float) -> str:
    return "–" if not finite(seconds) else f"{seconds / 60:.1f}"


def trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    """trials.csv: every trial's outcome, budget and cost."""
    cols = ["trial", "run_id", "dataset", "model", "prior", "K", "lr", "seed", "status", "stop_reason", "epochs",
            "best_epoch", "wall_seconds", "test_ll", "test_bits_per_dim", "val_elbo"]
    out = trials[cols].copy()
    out["K"] = out["K"].astype("Int64")
    out["best_epoch"] = out["best_epoch"].astype("Int64")
    return out


def markdown_trials(trials: pd.DataFrame) -> str:
    header = ["trial", "dataset", "model", "prior", "K", "lr", "seed", "stop reason", "epochs", "best epoch",
              "wall time (min)", "test LL (nats)"]
    rows = [[r.trial, r.dataset, r.model, r.prior, "" if r.K is None or pd.isna(r.K) else int(r.K), short(r.lr),
             r.seed, r.stop_reason or r.status.lower(), r.epochs,
             "" if r.best_epoch is None or pd.isna(r.best_epoch) else int(r.best_epoch),
             _minutes(r.wall_seconds), _fmt(r.test_ll)] for r in trials.itertuples(index=False)]
    return _md_table(header, rows)


# --------------------------------------------------------------------------------------------
# The sweep's Optuna study: parameter importances and parallel coordinates


def find_study(parent, tracking_uri: str):
    """The Optuna study of a sweep (parent run), or None when the sweep did not use Optuna or its
    study file is not on this machine. The driver tags the parent with the study's storage and
    name; older sweeps are looked for at <folder of the MLflow database>/sweeps/<sweep>/optuna.db."""
    import optuna

    tags = parent.data.tags
    storage, name = tags.get(tracking.TAG_STUDY_STORAGE), tags.get(tracking.TAG_STUDY_NAME)
    if storage is None and tracking_uri.startswith("sqlite:///"):
        candidate = Path(tracking_uri[len("sqlite:///"):]).parent / "sweeps" / (parent.info.run_name or "") / "optuna.db"
        if candidate.is_file():
            storage = f"sqlite:///{candidate}"
    if storage is None:
        return None
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return None
    try:
        names = optuna.get_all_study_names(storage)
        if name is None:
            if len(names) != 1:
                return None
            name = names[0]
        return optuna.load_study(study_name=name, storage=storage) if name in names else None
    except Exception:   # an unreadable or foreign file: the report goes on without it
        return None


def study_importances(study) -> dict[str, float]:
    """PED-ANOVA importances of the searched parameters from the study's COMPLETE trials ({} when
    fewer than two have a value). Fast, and robust to few trials."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or not any(t.params for t in complete):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # experimental-API and "too few trials" warnings
        return dict(optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator()))



# --------------------------------------------------------------------------------------------
# The report


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def default_out(experiment: str) -> Path:
    return Path.cwd() / f"report-{_safe(experiment)}"


def best_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trial with the highest test LL per (dataset, model, prior)."""
    done = trials[trials["has_ll"]] if not trials.empty else trials
    if done.empty:
        return done
    idx = done.groupby(["dataset", "model", "prior"], sort=False)["test_ll"].idxmax()
    return _sorted(done.loc[idx.values])


def _skipped_notes(trials: pd.DataFrame) -> list[str]:
    """A note for every trial without a test LL: running, killed, diverged, errored, other."""
    notes = []
    for r in trials[~trials["has_ll"]].itertuples(index=False):
        what = f"trial {r.trial} ({r.dataset} / {r.model} / {r.prior}, run {r.run_id})"
        if r.status == "RUNNING":
            notes.append(f"{what} is still running (epoch {r.epochs}) and has no test_ll yet: "
                         "left out of the table and the test-LL figures")
        elif r.stop_reason == STOP_NAN:
            notes.append(f"{what} diverged (NaN){': ' + r.stop_detail if r.stop_detail else ''}: no test_ll")
        elif r.stop_reason == STOP_ERROR:
            notes.append(f"{what} ended with an error{': ' + r.stop_detail[:300] if r.stop_detail else ''}")
        elif r.stop_reason == STOP_SCHEDULER:
            notes.append(f"{what} was stopped by the scheduler at epoch {r.epochs} and has no test_ll yet "
                         "(its evaluation was cut short): `sweeper run SPEC --resume` finishes it")
        elif r.status == "KILLED":
            notes.append(f"{what} was killed at epoch {r.epochs} (an interrupted sweep): no test_ll; "
                         "`sweeper run SPEC --resume` continues it")
        else:
            notes.append(f"{what} has status {r.status} and no test_ll: left out")
    return notes


def _comparability_note(trials: pd.DataFrame) -> str | None:
    """Published numbers come from full runs; say when these trials were not (subsets, few S)."""
    shortcuts = set()
    for params in trials.loc[trials["has_ll"], "config_params"]:
        for key in ("train_subset", "val_subset", "test_subset"):
            if params.get(key) not in (None, "None"):
                shortcuts.add(f"{key}={params[key]}")
        if _number(params.get("test_samples")) < 5000:
            shortcuts.add(f"test_samples={params['test_samples']}")
    if not shortcuts:
        return None
    return ("the published numbers come from full runs (whole splits, S=5000 importance samples, "
            f"1000-2000 epochs); these trials used {', '.join(sorted(shortcuts))}: compare with care")


class _Report:
    """Collects files and notes while the parts are drawn."""

    def __init__(self, result: ReportResult):
        self.result = result
        self.listed: dict[str, set[str]] = {}   # run id -> its top-level artifact paths

    def note(self, text: str) -> None:
        self.result.notes.append(text)

    def save(self, fig: Figure, name: str) -> Path:
        path = self.result.out / name
        fig.savefig(path)
        self.result.files.append(path)
        return path

    def write(self, frame: pd.DataFrame, name: str) -> Path:
        path = self.result.out / name
        frame.to_csv(path, index=False)
        self.result.files.append(path)
        return path


def _download(rep: "_Report", client, run, artifact: str, tmp: Path) -> Path | None:
    """A top-level artifact of `run` (a best_trials row) into tmp; None, with a note if it could
    not be read, when the run has no such file."""
    if run.run_id not in rep.listed:   # one listing per run: no failed downloads of absent files
        try:
            rep.listed[run.run_id] = {a.path for a in client.list_artifacts(run.run_id)}
        except Exception as exc:
            rep.note(f"cannot list the artifacts of trial {run.trial}: {exc}")
            rep.listed[run.run_id] = set()
    if artifact not in rep.listed[run.run_id]:
        return None
    dst = tmp / run.run_id
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with _no_progress_bars():
            return Path(client.download_artifacts(run.run_id, artifact, str(dst)))
    except Exception as exc:  # an artifact store we cannot reach
        rep.note(f"cannot download {artifact} of trial {run.trial}: {exc}")
        return None


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per downloaded file: noise for a handful of small files."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def make_report(experiment: str, tracking_uri: str | None = None, out: str | Path | None = None, *,
                log_to_parent: bool = True) -> ReportResult:
    """Write the table and figures of one MLflow experiment into `out` (default
    ./report-<experiment>) and, with `log_to_parent`, log them to the experiment's newest sweep
    (parent) run under report/. Raises `SweeperError` for an unknown experiment or an unreadable
    store; an empty or partial experiment gives whatever parts can be drawn and notes on the rest
    (`ReportResult.notes`, also in report.md)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client, exp = _open_experiment(experiment, uri)
    out_dir = Path(out).expanduser().resolve() if out is not None else default_out(experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReportResult(experiment, exp.experiment_id, uri, out_dir)
    rep = _Report(result)

    runs = _all_runs(client, exp.experiment_id)
    parents = sorted((r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == tracking.ROLE_SWEEP),
                     key=lambda r: r.info.start_time or 0)
    trials = trials_frame(runs)
    result.trials = trials
    if not runs:
        rep.note(f"experiment {experiment!r} has no runs yet: nothing to report; run a sweep into it first")
    elif trials.empty:
        rep.note(f"experiment {experiment!r} has no trial runs yet")
    elif not trials["has_ll"].any():
        rep.note("no trial has a test log-likelihood yet (still running, diverged or failed): no table, "
                 "no test-LL figures")
    orphans = sum(tracking.TAG_ORPHANED in r.data.tags for r in runs)
    if orphans:
        rep.note(f"{orphans} run(s) of trials lost by an interrupted sweep (tag {tracking.TAG_ORPHANED}): ignored")
    ignored = len(runs) - len(parents) - len(trials) - orphans
    if ignored:
        rep.note(f"{ignored} run(s) are neither sweeps nor trials (no dataset/prior params): ignored")
    for p in parents:
        if p.data.tags.get(tracking.TAG_ERRORS):
            rep.note(f"sweep {p.info.run_name}: {p.data.tags[tracking.TAG_ERRORS]}")
    result.notes.extend(_skipped_notes(trials))
    if log_to_parent and runs and not parents:
        rep.note("the experiment has no sweep (parent) run: the report is not logged to MLflow")

    sections: list[str] = []
    if not trials.empty:
        sections += _table_section(rep, trials)
        sections += _k_section(rep, trials)
        with tempfile.TemporaryDirectory(prefix="sweeper-report-") as tmp:
            sections += _histogram_section(rep, client, trials, Path(tmp))
            sections += _best_trials_section(rep, client, trials, Path(tmp))
        sections += _curves_section(rep, client, trials)
    sections += _optuna_section(rep, parents, uri)
    if not trials.empty:
        sections += _trials_section(rep, trials)

    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(result, parents, trials, sections))
    result.files.append(md_path)

    if log_to_parent and parents:
        parent = parents[-1].info.run_id   # several sweeps in one experiment: the newest one
        try:
            for path in result.files:
                client.log_artifact(parent, str(path), "report")
            result.logged_to = parent
        except Exception as exc:   # a read-only server, an artifact store we cannot write to
            rep.note(f"could not log the report to the sweep run {parent}: {exc}")
    return result


def _table_section(rep: _Report, trials: pd.DataFrame) -> list[str]:
    table = results_table(trials)
    rep.result.table = table
    if table.empty:
        return []
    rep.write(table, "table.csv")
    lines = ["## Test log-likelihood", "",
             "Mean ± std (ddof=1) over seeds of the test log-likelihood in nats (higher is better; repeats "
             "of a seed are averaged first). Where a (dataset, model, prior) holds several configurations, "
             "the one with the best mean validation ELBO is shown (chosen without the test set). "
             "`published`: the paper's number where it has one, else the first sourced one; `diff` = ours − "
             f"published. `check`: ⚠ where ours is more than {FLAG_NATS:g} nat below the best sourced "
             "reference for that dataset, model and prior. Also in [table.csv](table.csv).", "",
             markdown_table(table), ""]
    caveat = _comparability_note(trials)
    if caveat:
        lines += [f"Note: {caveat}.", ""]
    return lines


def _k_section(rep: _Report, trials: pd.DataFrame) -> list[str]:
    points = k_points_frame(trials)
    rep.result.k_points = points
    if points.empty:
        if trials["has_ll"].any():
            rep.note("no trial of a prior with pseudo-inputs/components (vamp, vamp_data, mog) has a test LL: "
                     "no K figure")
        return []
    best = best_trials(trials[trials["ended"]])
    baselines = best[best["prior"] == "standard"][["dataset", "model", "test_ll"]] if not best.empty else None
    if baselines is not None:
        baselines = baselines[baselines["dataset"].isin(points["dataset"])]
    rep.save(ll_vs_k_figure(points, baselines), "ll_vs_K.png")
    n_ended = int(points["ended"].sum())
    return ["## Test log-likelihood against K", "",
            f"{len(points)} trial(s): {n_ended} trained to their own end (filled; seeds of one setting averaged "
            f"per K, error bars = their std; the line joins the best setting per K) and {len(points) - n_ended} "
            "stopped early by the scheduler (hollow; a shorter budget, so never joined with the others). Marker "
            "area grows with the epochs trained; colour is the learning rate where it varies. The standard "
            "prior's best trial that trained to its end is the horizontal line.", "",
            "![LL against K](ll_vs_K.png)", ""]


def _histogram_section(rep: _Report, client, trials: pd.DataFrame, tmp: Path) -> list[str]:
    per_image = []
    for r in best_trials(trials).itertuples(index=False):
        path = _download(rep, client, r, "per_image_ll.csv", tmp)
        if path is None:
            rep.note(f"trial {r.trial} has no per_image_ll.csv: left out of the histograms")
            continue
        values = pd.read_csv(path)["log_likelihood"].to_numpy(dtype=float)
        per_image.append((r.dataset, r.model, r.prior, values[np.isfinite(values)]))
    per_image = [x for x in per_image if x[3].size]
    if not per_image:
        return []
    rep.save(histograms_figure(per_image), "ll_histograms.png")
    return ["## Per-image test log-likelihood", "", "Best trial (highest test LL) per prior.", "",
            "![per-image LL histograms](ll_histograms.png)", ""]


def _best_trials_section(rep: _Report, client, trials: pd.DataFrame, tmp: Path) -> list[str]:
    from matplotlib.image import imread

    lines = []
    for r in best_trials(trials).itertuples(index=False):
        panels = []
        shown = f" (first 100 of {int(r.K)})" if pd.notna(r.K) and r.K > 100 else ""
        for artifact, caption in (("pseudo_inputs.png", f"learned pseudo-inputs{shown}"),
                                  ("reconstructions.png", "test images (odd rows) and\nreconstructions (even rows)"),
                                  ("samples.png", "samples")):
            path = _download(rep, client, r, artifact, tmp)
            if path is not None:
                panels.append((caption, imread(path)))
        if not panels:
            rep.note(f"trial {r.trial} has no images: no picture of the best {r.dataset} / {r.prior} trial")
            continue
        k = f", K={int(r.K)}" if pd.notna(r.K) else ""
        title = (f"{r.dataset} / {r.model} / {r.prior}{k}: best trial {r.trial} "
                 f"(test LL {r.test_ll:.2f} nats)")
        name = f"best_{_safe(r.dataset)}_{_safe(r.model)}_{_safe(r.prior)}.png"
        rep.save(best_trial_figure(title, panels), name)
        lines += [f"### {r.dataset} / {r.model} / {r.prior}", "", f"![{title}]({name})", ""]
    if not lines:
        return []
    return ["## Best trial per prior", "",
            "Pixel values are shown as black (0) to white (1) with the same mapping in every panel, "
            "enlarged with nearest-neighbour pixels.", ""] + lines


def _curves_section(rep: _Report, client, trials: pd.DataFrame) -> list[str]:
    rows = []
    for r in trials.itertuples(index=False):
        try:
            history = client.get_metric_history(r.run_id, METRIC_VAL_ELBO)
        except Exception as exc:
            rep.note(f"trial {r.trial}: cannot read its val_elbo history ({exc})")
            continue
        rows += [(r.run_id, m.step, m.value) for m in history if finite(m.value)]
    curves = pd.DataFrame(rows, columns=["run_id", "epoch", "val_elbo"])
    rep.result.curves = curves
    if curves.empty:
        rep.note("no trial has logged a validation ELBO yet: no learning curves")
        return []
    rep.save(learning_curves_figure(curves, trials), "learning_curves.png")
    n_stopped = int((trials["stop_reason"] == STOP_SCHEDULER).sum())
    by = curve_colouring(trials[trials["run_id"].isin(curves["run_id"])])[0]
    cut = 0
    info = trials.set_index("run_id")
    for _, here in curves.groupby(curves["run_id"].map(info["dataset"])):
        values = here["val_elbo"].to_numpy(dtype=float)
        cut += int((values < curves_clip(values)).sum())
    return ["## Learning curves", "",
            f"Validation ELBO per epoch of {curves['run_id'].nunique()} trial(s), coloured by "
            f"{ {'K': 'K (colour bar; the standard prior in gray)', 'lr': 'learning rate (colour bar)', 'prior': 'prior'}[by] }"
            f"; a cross marks where the scheduler stopped a trial ({n_stopped} trial(s)). Each panel's y-axis starts "
            f"at the {CURVES_LOW_PERCENTILE:g}th percentile of its values, or 3 interquartile ranges below the lower "
            f"quartile where that is higher, so that a diverging trial cannot flatten the others ({cut} of "
            f"{len(curves)} points, mostly the first epochs, lie below it).", "", "![learning curves](learning_curves.png)", ""]


def _optuna_section(rep: _Report, parents: list, tracking_uri: str) -> list[str]:
    lines = []
    for parent in parents:
        study = find_study(parent, tracking_uri)
        if study is None:
            continue
        rep.result.studies[parent.info.run_name] = study
        importances = study_importances(study)
        metric = (study.metric_names or [parent.data.params.get("metric.name", "value")])[0]
        name = f"optuna_{_safe(parent.info.run_name or parent.info.run_id)}.png"
        rep.save(optuna_figure(study, metric, importances), name)
        import optuna

        counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
        states = ", ".join(f"{n} {s}" for s, n in counts.items())
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) or "too few completed trials"
        lines += [f"### Sweep `{parent.info.run_name}`", "",
                  f"Study `{study.study_name}` ({states}; optuna {optuna.__version__}). Importances from the "
                  f"completed trials only (PED-ANOVA, normalised): {ranked}. Pruned trials stopped at lower "
                  "budgets and have no final value; `optuna-dashboard` shows them with their intermediate "
                  "values.", "", f"![Optuna study of {parent.info.run_name}]({name})", ""]
    return ["## Search: the Optuna study", ""] + lines if lines else []


def _trials_section(rep: _Report, trials: pd.DataFrame) -> list[str]:
    rep.write(trials_table(trials), "trials.csv")
    lines = ["## Trials", "",
             "Every trial: why it stopped, after how many epochs (the best validation epoch, whose weights were "
             "tested), its wall time (training and test evaluation), and its test LL. Also in "
             "[trials.csv](trials.csv).", ""]
    if len(trials) <= 200:
        lines += [markdown_trials(trials), ""]
    return lines


def _markdown(result: ReportResult, parents: list, trials: pd.DataFrame, sections: list[str]) -> str:
    lines = [f"# Report: MLflow experiment `{result.experiment}`", "",
             f"- tracking store: `{result.tracking_uri}` (experiment id {result.experiment_id})",
             f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if parents:
        lines.append("- sweeps: " + ", ".join(f"`{p.info.run_name}` ({p.info.run_id}, {p.info.status})"
                                               for p in parents))
    if not trials.empty:
        reasons = trials["stop_reason"].where(trials["stop_reason"] != "", trials["status"].str.lower())
        counts = reasons.value_counts()
        lines.append(f"- trials: {len(trials)} ("
                     + ", ".join(f"{n} {reason}" for reason, n in counts.items())
                     + f"); {int(trials['has_ll'].sum())} with a test log-likelihood")
    lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(lines + sections).rstrip() + "\n"
