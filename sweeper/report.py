"""`sweeper report`: the VampPrior study's table and figures from the runs of one MLflow experiment.

`make_report` reads the experiment once (`search_runs`, paged, and each trial's metric histories),
then writes into one folder:

- `table.csv` and a markdown table in `report.md`: test log-likelihood per (dataset, model, prior),
  mean +/- std over seeds with the typical per-run standard error (a single run: +/- its SE),
  beside the validation metric that chose the configuration, each row's training budget, the
  published number (sweeper/published.py), the difference, and a verdict against the best sourced
  reference that takes both standard errors into account (`published.compare`; a flag where ours
  is below it by more than 2 combined SEs), with a word where the reference's test images differ;
- `trials.csv` and a table in `report.md`: every trial's stop reason, epochs, best (tested) epoch,
  the validation metric there, test LL +/- SE, the other choice of epoch it tested (its epoch and
  test LL +/- SE), and its own time (training; test evaluation apart);
- `ll_vs_K.png`: test LL against the number of pseudo-inputs K, comparing like with like;
- `val_vs_K.png`: the same trials' validation metric (the one every choice is made on) against K:
  what the sweep saw when it chose, beside what the test says of the choice;
- `ll_histograms.png`: per-image test LL of the trial shown per prior, one panel per dataset;
- `best_<dataset>_<model>_<prior>.png`: that trial's pseudo-inputs, reconstructions of real
  test images, and samples, at a legible size;
- `learning_curves.png`: validation ELBO per epoch of every trial, coloured by K or lr, scheduler
  stops and tested epochs marked;
- `optuna_<sweep>.png`: for sweeps searched by Optuna, the parameter importances (PED-ANOVA, when
  the study has enough completed trials per parameter level: `importance_gaps`) and a
  parallel-coordinates plot of the searched parameters against the metric, from the sweep's study;
- `report.html`: report.md with its figures inline, for MLflow's artifact view (its markdown
  preview shows an image stored beside the file as link text, not as the image);

and logs them to the newest sweep (parent) run of the experiment under `report/`. The figures
are drawn by sweeper/figures.py from plain frames.

Which runs count: a run tagged `sweeper.role=sweep` is a sweep; any other run with `dataset` and
`prior` params is a trial. Trials without a finite `test_ll` (still running, killed, diverged,
failed) are left out of the table and of the test-LL figures with a note in `report.md`; their
learning curves are still drawn.

Choose on validation, report on test: every choice the report makes (the configuration per
prior, the best setting per K, the trial whose images and histogram are shown, the standard
prior's line) is made on the sweep spec's metric (`Selection`: e.g. val_elbo, max) at each
trial's tested epoch (the restored best epoch, `best_epoch`), never on the test log-likelihood,
which is reported beside it.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
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
from sweeper.figures import (CURVES_LOW_PERCENTILE, best_trial_figure, curve_colouring, curves_clip, drawn,
                             finite, histograms_figure, k_points_frame, learning_curves_figure, ll_vs_k_figure,
                             optuna_figure)
from sweeper.published import COMPARISON_RULE, best_reference, compare, published_ll
from trainables.vae.catalog import (CHOICE_WORDS, DATASET_ORDER, ENDED_BY_ITSELF, EPOCH_METRICS, K_PRIORS,
                                    METRIC_BEST_EPOCH, METRIC_BEST_VAL_ELBO, METRIC_EPOCH, METRIC_EPOCH_SECONDS,
                                    METRIC_TEST_BPD, METRIC_TEST_LL, METRIC_TEST_LL_SE, METRIC_VAL_ELBO,
                                    MODEL_ORDER, PRIOR_ORDER, STOP_COMPLETED, STOP_EARLY, STOP_ERROR, STOP_NAN,
                                    STOP_SCHEDULER, bits_per_dim, bits_per_dim_dim, other_choice_metrics, short,
                                    standard_error, stop_reason)

# Trial params that never make two trials different configurations: the seed (averaged over) and
# where/how a trial ran, which does not change its result.
NOT_CONFIG = frozenset({"seed", "data_root", "device", "image_every", "cuda_graphs", "checkpoint_every"})
# Params a prior ignores: trials differing only in these are one configuration of that prior.
IGNORED_BY_PRIOR = {"standard": frozenset({"K", "fixed_pseudo_inputs"}),
                    "vamp": frozenset({"fixed_pseudo_inputs"}),
                    "mog": frozenset({"fixed_pseudo_inputs"})}
# The trial's own time, logged by the final evaluation: seconds of the test log-likelihood.
METRIC_TEST_LL_SECONDS = "test_ll_seconds"
# Optuna importances are shown only when every searched parameter has enough COMPLETE trials:
# PED-ANOVA compares the best 10% of the trials with all of them, so a numeric parameter needs at
# least 10 trials where it was set (else its "top 10%" is one trial), and each choice of a
# categorical one at least 5 (else its importance measures a few trials' luck).
IMPORTANCE_MIN_TRIALS = 10
IMPORTANCE_MIN_PER_CHOICE = 5

# Why a trial stopped, as a budget reads.
STOP_WORDS = {STOP_EARLY: "early stopping", STOP_COMPLETED: "completed (max_epochs)",
              STOP_SCHEDULER: "stopped by the scheduler"}


@dataclass(frozen=True)
class Selection:
    """What every choice of the report is made on: the sweep spec's metric (`name`, `mode`) taken
    at each trial's tested epoch (the restored best epoch). `score` orients it: higher is better."""

    metric: str = METRIC_VAL_ELBO
    mode: str = "max"

    def score(self, values: Any) -> Any:
        return values if self.mode == "max" else -values

    @property
    def column(self) -> str:
        """The trials' column that holds the metric at the tested epoch."""
        return METRIC_BEST_VAL_ELBO if self.metric == METRIC_VAL_ELBO else f"{self.metric}_at_best_epoch"

    @property
    def text(self) -> str:
        best = "highest" if self.mode == "max" else "lowest"
        return f"the {best} `{self.metric}` at the tested epoch"


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
    shown: pd.DataFrame = field(default_factory=pd.DataFrame)     # the trial shown per table row (best_trials)
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)  # the K figure's standard-prior lines
    studies: dict[str, Any] = field(default_factory=dict)         # sweep -> its Optuna study
    selection: Selection = field(default_factory=Selection)       # what every choice is made on
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
                 "dataset", "model", "prior", "K", "lr", "seed", "config_params", "epochs", "best_epoch",
                 "test_ll", "test_ll_se", "test_ll_se_from", "other_choice", "other_best_epoch", "other_test_ll",
                 "other_test_ll_se", "val_elbo", "best_val_elbo", "test_bits_per_dim", "test_ll_seconds", "metrics"]
# Where a trial's test_ll_se comes from: its own metric, its per_image_ll.csv (older runs), or unknown ("").
SE_LOGGED = "logged"
SE_FROM_CSV = "per_image_ll.csv"


def _other_choice(m: dict[str, float]) -> dict[str, Any]:
    """The other choice of epoch a run tested (`catalog.other_choice_metrics`), as trial columns."""
    for choice in CHOICE_WORDS:
        names = other_choice_metrics(choice)
        if finite(m.get(names[METRIC_TEST_LL])):
            return {"other_choice": choice, "other_best_epoch": int(m[names[METRIC_BEST_EPOCH]])
                    if finite(m.get(names[METRIC_BEST_EPOCH])) else None,
                    "other_test_ll": m[names[METRIC_TEST_LL]],
                    "other_test_ll_se": m.get(names[METRIC_TEST_LL_SE], float("nan"))}
    return {"other_choice": "", "other_best_epoch": None, "other_test_ll": float("nan"),
            "other_test_ll_se": float("nan")}


def trials_frame(runs: Iterable) -> pd.DataFrame:
    """One row per trial run: identity, status, stop reason, the config key and its final metrics
    (`val_elbo`: the last epoch's; `best_val_elbo`: the tested epoch's where the run logged it).
    `with_histories` adds what needs the per-epoch records: the selection metric at the tested
    epoch and the trial's own time."""
    rows = []
    for run in runs:
        p, m, t = tracking.run_config(run), run.data.metrics, run.data.tags
        if (t.get(tracking.TAG_ROLE) == tracking.ROLE_SWEEP or tracking.TAG_ORPHANED in t
                or "dataset" not in p or "prior" not in p):
            continue
        prior = p["prior"]
        ignored = NOT_CONFIG | IGNORED_BY_PRIOR.get(prior, frozenset())
        config = {k: v for k, v in p.items() if k not in ignored}   # as logged: labels round, keys do not
        rows.append({
            "run_id": run.info.run_id, "trial": run.info.run_name or run.info.run_id,
            "status": run.info.status, "stop_reason": stop_reason(t.get(tracking.TAG_STOP)),
            "stop_detail": t.get("stop_detail", ""), "parent_run_id": t.get(tracking.TAG_PARENT, ""),
            "start_time": run.info.start_time or 0,
            "dataset": p["dataset"], "model": p.get("model", "vae"), "prior": prior,
            "K": int(_number(p["K"])) if prior in K_PRIORS and finite(_number(p.get("K"))) else None,
            "lr": _number(p.get("lr")),
            "seed": p.get("seed", ""), "config_params": config,
            "epochs": int(m[METRIC_EPOCH]) if finite(m.get(METRIC_EPOCH)) else 0,
            "best_epoch": int(m[METRIC_BEST_EPOCH]) if finite(m.get(METRIC_BEST_EPOCH)) else None,
            **{k: m.get(k, float("nan")) for k in (METRIC_TEST_LL, METRIC_TEST_LL_SE, METRIC_VAL_ELBO,
                                                   METRIC_BEST_VAL_ELBO, METRIC_TEST_BPD, METRIC_TEST_LL_SECONDS)},
            "test_ll_se_from": SE_LOGGED if finite(m.get(METRIC_TEST_LL_SE)) else "",
            **_other_choice(m),
            "metrics": dict(m),
        })
    frame = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    frame["has_ll"] = [finite(v) for v in frame["test_ll"]]
    frame["ended"] = frame["stop_reason"].isin(ENDED_BY_ITSELF)   # trained to its own end
    return _sorted(frame)


# A metric's per-epoch records of one run: step (epoch) -> (value, timestamp in ms).
History = dict[int, tuple[float, int]]


def with_histories(trials: pd.DataFrame, histories: dict[str, dict[str, History]],
                   selection: Selection) -> pd.DataFrame:
    """The trials with what their per-epoch records give (`histories`: run id -> metric -> records):

    - `best_val_elbo`: the validation ELBO of the tested weights; runs older than that metric take
      the `val_elbo` record at step `best_epoch`;
    - `selection.column` (the spec's metric at the tested epoch, when it is not val_elbo) and
      `select` / `score` (the same value, and oriented so that higher is better): what every
      choice is made on. A trial without a best epoch yet (running, killed, failed) falls back to
      its latest value, `select_at` = "latest" (else "best epoch"; "" when it has none);
    - `train_seconds`: the sum of its epochs' `epoch_seconds` (training and validation);
    - `wall_seconds`: from its run's start to its last epoch's record: its own training time with
      start-up and logging, not the wait for a later test evaluation nor that evaluation
      (`test_ll_seconds`, logged apart). A trial interrupted and resumed counts the pause too.
    """
    out = trials.copy()
    best_val, select, select_at, train, wall = [], [], [], [], []
    for r in out.itertuples(index=False):
        runs = histories.get(r.run_id, {})
        at_best = _at_step(runs.get(METRIC_VAL_ELBO, {}), r.best_epoch)
        best_val.append(r.best_val_elbo if finite(r.best_val_elbo) else at_best)
        if selection.metric == METRIC_VAL_ELBO:
            value = best_val[-1]
        else:
            value = _at_step(runs.get(selection.metric, {}), r.best_epoch)
        where = "best epoch" if finite(value) else ""
        if not finite(value):   # no tested epoch yet: its latest value, marked as such
            records = runs.get(selection.metric, {})
            value = records[max(records)][0] if records else r.metrics.get(selection.metric, float("nan"))
            where = "latest" if finite(value) else ""
        select.append(value)
        select_at.append(where)
        seconds = [v for v, _ in runs.get(METRIC_EPOCH_SECONDS, {}).values() if finite(v)]
        train.append(float(sum(seconds)) if seconds else float("nan"))
        stamps = [ts for key in (METRIC_VAL_ELBO, METRIC_EPOCH_SECONDS) for _, ts in runs.get(key, {}).values()]
        last = max(stamps, default=0)
        wall.append((last - r.start_time) / 1000.0 if r.start_time and last > r.start_time else float("nan"))
    out["best_val_elbo"] = pd.Series(best_val, index=out.index, dtype=float)
    out["select"] = pd.Series(select, index=out.index, dtype=float)
    if selection.column != METRIC_BEST_VAL_ELBO:
        out[selection.column] = out["select"]
    out["score"] = selection.score(out["select"])
    out["select_at"] = select_at
    out["train_seconds"] = pd.Series(train, index=out.index, dtype=float)
    out["wall_seconds"] = pd.Series(wall, index=out.index, dtype=float)
    return out


def _at_step(records: History, step: Any) -> float:
    if step is None or pd.isna(step) or int(step) not in records:
        return float("nan")
    return float(records[int(step)][0])


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


TABLE_COLUMNS = ["dataset", "model", "prior", "test_ll_mean", "test_ll_std", "test_ll_se", "test_ll_mean_se",
                 "n_seeds", "n_trials", "n_configs",
                 "config", "selected_on", "select_mean", "budget", "budget_differs", "stop_reasons", "epochs_min",
                 "epochs_max", "best_epoch_min", "best_epoch_max", "published_ll", "published_source", "diff_ll",
                 "published_check", "best_reference_ll", "best_reference_source", "below_best_reference",
                 "combined_se", "verdict", "check", "reference_split", "flag", "bits_per_dim_mean",
                 "bits_per_dim_std", "published_bits_per_dim", "run_ids"]


def _row_se(per_run_se: float, std: float, n: int) -> float:
    """The standard error of a row's number (a mean over n seeds on one test set): the typical
    per-run SE (the test images' sampling error, common to every seed) combined with the seeds'
    spread (std / sqrt(n)); the per-run SE alone for one seed."""
    return math.sqrt(per_run_se ** 2 + (std ** 2 / n if n > 1 else 0.0))


def results_table(trials: pd.DataFrame, selection: Selection = Selection()) -> pd.DataFrame:
    """Test log-likelihood per (dataset, model, prior), mean +/- std over seeds.

    `trials` is `with_histories`' frame. A group may hold several configurations: trials whose
    params differ beyond the seed, the bookkeeping keys (`NOT_CONFIG`) and the keys the prior
    ignores (K for `standard`). Only trials with a finite test LL count. The configuration with the
    best mean `score` (the spec's metric at each trial's tested epoch) is reported: chosen on
    validation data, the test set plays no part in the choice. Its trials are averaged per seed
    (repeats of a seed count once), then mean and sample std (ddof=1; blank for one seed) over the
    seeds. `test_ll_se`: the typical per-run standard error (the mean of the seeds' `test_ll_se`,
    NaN when none is known); `test_ll_mean_se`: the standard error of `test_ll_mean` (`_row_se`).
    `select_mean`: that configuration's mean metric, `selected_on` its name; `n_seeds`,
    `n_trials`: what the numbers rest on; `n_configs`: how many configurations the group had;
    `run_ids`: the chosen configuration's runs. `budget`: how its trials stopped and after how
    many epochs; `budget_differs`: the rows of this dataset did not train under the same budget
    (`_budget_key`), so their numbers are not like with like. `published_*`: the paper's number
    where it has one (`published_ll`), `published_check` the verdict against it;
    `best_reference_*`: the highest sourced number, `verdict` / `check` / `combined_se` ours against
    it (`published.compare`, the reference's SE taken as our per-run SE), `reference_split` how its
    test images differ from ours; `flag` is True when ours is below it by more than 2 combined
    standard errors. Groups without any finite test LL are left out.
    """
    rows, keys = [], []
    done = trials[trials["has_ll"]] if not trials.empty else trials
    for (dataset, model, prior), group in done.groupby(["dataset", "model", "prior"], sort=False):
        group = group.assign(config=_config_labels(group))
        score = group.groupby("config", sort=False)["score"].mean()
        # No configuration has a validation value (never in a sweep): the first is shown, not the best on test.
        config = score.idxmax() if score.notna().any() else score.index[0]
        chosen = group[group["config"] == config]
        dim = bits_per_dim_dim(dataset)
        if dim is not None:
            # The run's own metric where it was logged, else from its test LL.
            bpd = chosen["test_bits_per_dim"].astype(float)
            chosen = chosen.assign(bpd=bpd.where(bpd.notna(), bits_per_dim(chosen["test_ll"], dim)))
        per_seed = chosen.groupby("seed", sort=False)[["test_ll", "test_ll_se"] + (["bpd"] if dim else [])].mean()
        ll_mean, ll_std = _mean_std(per_seed["test_ll"])
        run_se = float(per_seed["test_ll_se"].mean()) if per_seed["test_ll_se"].notna().any() else float("nan")
        mean_se = _row_se(run_se, ll_std, len(per_seed))
        pub = published_ll(dataset, model, prior)
        ref = best_reference(dataset, model, prior)
        versus = compare(ll_mean, mean_se, ref, run_se) if ref else None
        best_epochs = chosen["best_epoch"].dropna().astype(int)
        row = {
            "dataset": dataset, "model": model, "prior": prior, "test_ll_mean": ll_mean, "test_ll_std": ll_std,
            "test_ll_se": run_se, "test_ll_mean_se": mean_se,
            "n_seeds": len(per_seed), "n_trials": len(chosen), "n_configs": len(score), "config": config,
            "selected_on": f"{selection.metric} at the tested epoch ({selection.mode})",
            "select_mean": float(chosen["select"].mean()),
            "budget": _budget_text(chosen), "budget_differs": False,
            "stop_reasons": ";".join(f"{k}={v}" for k, v in _stop_counts(chosen).items()),
            "epochs_min": int(chosen["epochs"].min()), "epochs_max": int(chosen["epochs"].max()),
            "best_epoch_min": int(best_epochs.min()) if len(best_epochs) else None,
            "best_epoch_max": int(best_epochs.max()) if len(best_epochs) else None,
            "published_ll": pub.ll if pub else float("nan"), "published_source": pub.source if pub else "",
            "diff_ll": ll_mean - pub.ll if pub else float("nan"),
            "published_check": compare(ll_mean, mean_se, pub, run_se).verdict if pub else "",
            "best_reference_ll": ref.ll if ref else float("nan"),
            "best_reference_source": ref.source if ref else "",
            "below_best_reference": -versus.diff if versus else float("nan"),
            "combined_se": versus.se if versus else float("nan"),
            "verdict": versus.verdict if versus else "",
            "check": versus.text() if versus else "no reference",
            "reference_split": ref.split if ref else "",
            "flag": bool(versus and versus.flag),
        }
        if dim is not None:
            bpd_mean, bpd_std = _mean_std(per_seed["bpd"])
            row.update(bits_per_dim_mean=bpd_mean, bits_per_dim_std=bpd_std,
                       published_bits_per_dim=bits_per_dim(pub.ll, dim) if pub else float("nan"))
        row["run_ids"] = ";".join(chosen["run_id"])
        rows.append(row)
        keys.append(_budget_key(chosen))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    for dataset in table["dataset"].unique():
        here = [i for i, d in enumerate(table["dataset"]) if d == dataset]
        if len({keys[i] for i in here}) > 1:
            table.loc[here, "budget_differs"] = True
    if table["bits_per_dim_mean"].isna().all():
        table = table.drop(columns=["bits_per_dim_mean", "bits_per_dim_std", "published_bits_per_dim"])
    return table


def _stop_counts(trials: pd.DataFrame) -> dict[str, int]:
    reasons = trials["stop_reason"].where(trials["stop_reason"] != "", trials["status"].str.lower())
    return dict(reasons.value_counts())


def _range(values: pd.Series) -> str:
    values = values.dropna().astype(int)
    if values.empty:
        return "–"
    lo, hi = int(values.min()), int(values.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _budget_text(trials: pd.DataFrame) -> str:
    """How a row's trials stopped and after how many epochs: 'early stopping ×3, epochs 152–153 (best 102–103)'."""
    reasons = ", ".join(f"{STOP_WORDS.get(k, k)} ×{v}" for k, v in _stop_counts(trials).items())
    return f"{reasons}, epochs {_range(trials['epochs'])} (best {_range(trials['best_epoch'])})"


def _budget_key(trials: pd.DataFrame) -> tuple:
    """Rows with equal keys trained under the same budget: every trial ran to its own end (early
    stopping or max epochs) with the same max_epochs and early-stopping patience (epochs then differ
    by the rule, like the paper's); else the epochs at which the scheduler (or anything) cut them."""
    if trials["ended"].all():
        limits = {(c.get("max_epochs"), c.get("early_stopping")) for c in trials["config_params"]}
        return ("own end", frozenset(limits))
    return ("cut", tuple(sorted(zip(trials["stop_reason"], trials["epochs"]))))


def _fmt(value: Any, digits: int = 2, sign: bool = False) -> str:
    if not finite(value):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(header: list[str], rows: Iterable[Iterable[str]]) -> str:
    """A markdown table; cells escape their `|` (pandas' to_markdown would not)."""
    return "\n".join([_md_row(header), "|" + "|".join("---" for _ in header) + "|", *map(_md_row, rows)])


def ll_cell(mean: float, std: float, se: float, n: int) -> str:
    """A test LL as the tables show it: one run '-85.71 ± 0.25 (SE)'; several seeds
    '-125.41 ± 0.70 (std, n=3; SE/run 0.55)'; an SE that is not known says so."""
    se_text = _fmt(se) if finite(se) else "unknown"
    if n > 1:
        return f"{_fmt(mean)} ± {_fmt(std)} (std, n={n}; SE/run {se_text})"
    return f"{_fmt(mean)} ± {_fmt(se)} (SE)" if finite(se) else f"{_fmt(mean)} (SE unknown)"


def markdown_table(table: pd.DataFrame, selection: Selection = Selection()) -> str:
    """The results table for report.md."""
    bpd = "bits_per_dim_mean" in table
    header = ["dataset", "model", "prior", "test LL (nats)", f"{selection.metric} (chooses)", "seeds", "budget",
              "published", "source", "diff"]
    header += ["bits/dim", "published bits/dim"] if bpd else []
    header += ["configuration", "check (best reference)"]
    rows = []
    for r in table.itertuples(index=False):
        ll = ll_cell(r.test_ll_mean, r.test_ll_std, r.test_ll_se, r.n_seeds)
        n = str(r.n_seeds) + (f" ({r.n_trials} trials)" if r.n_trials != r.n_seeds else "")
        budget = ("⚠ " if r.budget_differs else "") + r.budget
        diff = _fmt(r.diff_ll, sign=True) + (f" ({r.published_check})" if r.published_check else "")
        cells = [r.dataset, r.model, r.prior, ll, _fmt(r.select_mean), n, budget, _fmt(r.published_ll),
                 r.published_source or "–", diff]
        if bpd:
            b = _fmt(r.bits_per_dim_mean, 4) + (f" ± {_fmt(r.bits_per_dim_std, 4)}"
                                                  if finite(r.bits_per_dim_std) else "")
            cells += [b if finite(r.bits_per_dim_mean) else "–", _fmt(r.published_bits_per_dim, 4)]
        config = r.config or "–"
        if r.n_configs > 1:
            config += f" (best of {r.n_configs} by {selection.metric})"
        rows.append(cells + [config, r.check])
    return _md_table(header, rows)


def _duration(seconds: float) -> str:
    """Seconds as people read them: '42 s', '8.5 min', '2.3 h'."""
    if not finite(seconds):
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def trials_table(trials: pd.DataFrame, selection: Selection = Selection()) -> pd.DataFrame:
    """trials.csv: every trial's outcome, budget and its own time (seconds)."""
    cols = ["trial", "run_id", "dataset", "model", "prior", "K", "lr", "seed", "status", "stop_reason", "epochs",
            "best_epoch", "best_val_elbo"]
    cols += [selection.column] if selection.column != "best_val_elbo" else []
    cols += ["select_at", "last_val_elbo", "test_ll", "test_ll_se", "test_ll_se_from", "test_bits_per_dim",
             "other_choice", "other_best_epoch", "other_test_ll", "other_test_ll_se", "train_seconds",
             "test_ll_seconds", "wall_seconds"]
    out = trials.rename(columns={"val_elbo": "last_val_elbo"})[cols].copy()
    out["K"] = out["K"].astype("Int64")
    out["best_epoch"] = out["best_epoch"].astype("Int64")
    out["other_best_epoch"] = out["other_best_epoch"].astype("Int64")
    return out.rename(columns={"select_at": "chosen_at"})


def markdown_trials(trials: pd.DataFrame, selection: Selection = Selection()) -> str:
    header = ["trial", "dataset", "model", "prior", "K", "lr", "seed", "stop reason", "epochs", "best epoch",
              f"{selection.metric} at best epoch", "test LL ± SE (nats)", "other choice: epoch, test LL ± SE",
              "training", "test LL evaluation"]
    rows = []
    for r in trials.itertuples(index=False):
        value = _fmt(r.select) + (" (latest: no tested epoch)" if r.select_at == "latest" else "")
        rows.append([r.trial, r.dataset, r.model, r.prior, "" if r.K is None or pd.isna(r.K) else int(r.K),
                     short(r.lr), r.seed, r.stop_reason or r.status.lower(), r.epochs,
                     "" if r.best_epoch is None or pd.isna(r.best_epoch) else int(r.best_epoch), value,
                     _ll_se(r.test_ll, r.test_ll_se) if finite(r.test_ll) else "–", _other_text(r),
                     _duration(r.wall_seconds), _duration(r.test_ll_seconds)])
    return _md_table(header, rows)


def _ll_se(ll: float, se: float) -> str:
    """'-85.71 ± 0.25'; '-85.71 (SE unknown)' for a run without one."""
    return f"{_fmt(ll)} ± {_fmt(se)}" if finite(se) else f"{_fmt(ll)} (SE unknown)"


def _other_text(r: Any) -> str:
    """A trial's other choice of epoch: 'after_warmup: epoch 100, -125.02 ± 0.55' ('–' without one)."""
    if not r.other_choice:
        return "–"
    epoch = "" if r.other_best_epoch is None or pd.isna(r.other_best_epoch) else int(r.other_best_epoch)
    same = epoch == ("" if r.best_epoch is None or pd.isna(r.best_epoch) else int(r.best_epoch))
    return f"{r.other_choice}: epoch {epoch}" + (" (the same)" if same else f", {_ll_se(r.other_test_ll, r.other_test_ll_se)}")


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


def importance_gaps(study) -> list[str]:
    """Why the study's parameter importances would not mean anything yet ([] when they would):
    every searched parameter needs IMPORTANCE_MIN_TRIALS COMPLETE trials where it was set (a
    numeric one) or IMPORTANCE_MIN_PER_CHOICE COMPLETE trials for each of its choices (a
    categorical one). COMPLETE: trained to its own end; trials the scheduler stopped are PRUNED."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    distributions: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        distributions.update(t.distributions)
    if not distributions:
        return ["the study has no searched parameters"]
    gaps = []
    for name, dist in sorted(distributions.items()):
        values = [t.params[name] for t in complete if name in t.params]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            short_of = [f"{choice}: {values.count(choice)}" for choice in dist.choices
                        if values.count(choice) < IMPORTANCE_MIN_PER_CHOICE]
            if short_of:
                gaps.append(f"{name} ({', '.join(short_of)} completed trial(s); each choice needs "
                            f"{IMPORTANCE_MIN_PER_CHOICE})")
        elif len(values) < IMPORTANCE_MIN_TRIALS:
            gaps.append(f"{name} ({len(values)} completed trial(s) where it was set; needs {IMPORTANCE_MIN_TRIALS})")
    return gaps


def study_importances(study) -> dict[str, float]:
    """PED-ANOVA importances of the searched parameters from the study's COMPLETE trials; {} when
    `importance_gaps` finds too few of them for any parameter. Fast, and robust to few trials."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    if importance_gaps(study):
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


def best_trials(trials: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The trial shown per row of the table (its images, its per-image histogram): of the
    configuration the row reports, the seed with the best `score` (the spec's metric at its tested
    epoch). Chosen on validation, like the table; never on test LL."""
    if trials.empty or table.empty:
        return trials.iloc[0:0]
    score = trials.set_index("run_id")["score"]
    picks = []
    for ids in table["run_ids"]:
        here = score[ids.split(";")]
        picks.append(here.idxmax() if here.notna().any() else here.index[0])
    return _sorted(trials[trials["run_id"].isin(picks)])


def standard_baselines(trials: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """The K figure's horizontal lines: per (dataset, model), the standard prior's configuration
    chosen on validation among its trials that trained to their own end (the K priors' filled
    points are such trials too), with its seed-mean test LL (columns dataset, model, test_ll, n_seeds)."""
    empty = pd.DataFrame(columns=["dataset", "model", "test_ll", "n_seeds"])
    if trials.empty:
        return empty
    keep = trials["has_ll"] & trials["ended"] & (trials["prior"] == "standard")
    if not keep.any():
        return empty
    table = results_table(trials[keep], selection)
    return table.rename(columns={"test_ll_mean": "test_ll"})[list(empty.columns)]


def _ordinal(n: float) -> str:
    """2 -> '2nd', 11 -> '11th', 2.5 -> '2.5th'."""
    if n != int(n):
        return f"{n:g}th"
    n = int(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _selection(rep: "_Report", parents: list) -> Selection:
    """The newest sweep's metric (its spec's `metric`, logged as the parent's params); val_elbo
    (max) for experiments without one. Sweeps that disagree get a note."""
    found = []
    for parent in parents:   # oldest first
        name = parent.data.params.get("metric.name")
        if name:
            found.append((name, parent.data.params.get("metric.mode") or EPOCH_METRICS.get(name, "max")))
    if not found:
        return Selection()
    name, mode = found[-1]
    if name not in EPOCH_METRICS or mode not in ("max", "min"):
        rep.note(f"the newest sweep optimised {name!r} ({mode}), not a per-epoch metric "
                 f"({', '.join(EPOCH_METRICS)}): the report chooses on val_elbo (max)")
        return Selection()
    if len(set(found)) > 1:
        metrics = ", ".join(sorted({f"{n} ({m})" for n, m in found}))
        rep.note(f"the sweeps of this experiment optimised different metrics ({metrics}): every choice here "
                 f"uses the newest sweep's, {name} ({mode})")
    return Selection(name, mode)


def _read_histories(rep: "_Report", client, trials: pd.DataFrame,
                    selection: Selection) -> dict[str, dict[str, History]]:
    """Each trial's per-epoch records of val_elbo (curves; the tested epoch's value in older runs),
    epoch_seconds (its time) and the selection metric."""
    keys = dict.fromkeys([METRIC_VAL_ELBO, METRIC_EPOCH_SECONDS, selection.metric])
    out: dict[str, dict[str, History]] = {}
    for r in trials.itertuples(index=False):
        records: dict[str, History] = {}
        for key in keys:
            try:
                history = client.get_metric_history(r.run_id, key)
            except Exception as exc:
                rep.note(f"trial {r.trial}: cannot read its {key} history ({exc})")
                continue
            records[key] = {m.step: (m.value, m.timestamp) for m in history}
        out[r.run_id] = records
    return out


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
    selection = result.selection = _selection(rep, parents)
    trials = trials_frame(runs)
    histories = _read_histories(rep, client, trials, selection)
    trials = result.trials = with_histories(trials, histories, selection)
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
        with tempfile.TemporaryDirectory(prefix="sweeper-report-") as tmp:
            _fill_standard_errors(rep, client, trials, Path(tmp))
        sections += _table_section(rep, trials)
        result.shown = best_trials(trials, result.table)
        sections += _k_section(rep, trials)
        with tempfile.TemporaryDirectory(prefix="sweeper-report-") as tmp:
            sections += _histogram_section(rep, client, trials, Path(tmp))
            sections += _best_trials_section(rep, client, trials, Path(tmp))
        sections += _curves_section(rep, trials, histories)
    sections += _optuna_section(rep, parents, uri)
    sections += _fidelity_section(rep, client, parents, runs)
    if not trials.empty:
        sections += _trials_section(rep, trials)

    text = _markdown(result, parents, trials, sections)
    md_path = out_dir / "report.md"
    md_path.write_text(text)
    html_path = out_dir / "report.html"
    html_path.write_text(report_html(text, out_dir, title=f"Report: {experiment}"))
    result.files += [html_path, md_path]

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
    selection = rep.result.selection
    table = results_table(trials, selection)
    rep.result.table = table
    if table.empty:
        return []
    rep.write(table, "table.csv")
    lines = ["## Test log-likelihood", "",
             "Test log-likelihood in nats (higher is better): for a row of several seeds, mean ± std (ddof=1) "
             "over the seeds (repeats of a seed are averaged first) with n and the typical per-run standard "
             "error (`SE/run`); for a single run, ± its standard error. A run's SE is the per-image test LL's "
             "std (ddof=1) / sqrt(N test images): how much its number would move on another test set of that "
             "size. Where a (dataset, model, prior) holds several configurations, "
             f"the one with {selection.text} (mean over its seeds) is shown: chosen on validation, the test "
             f"set plays no part in it. `{selection.metric} (chooses)`: that mean. `budget`: how the row's "
             "trials stopped, after how many epochs, and their best (tested) epochs. "
             "`published`: the paper's number where it has one, else the first sourced one; `diff` = ours − "
             "published, with the verdict of the rule below. `check`: ours against the best sourced "
             f"reference for that dataset, model and prior: {COMPARISON_RULE}. Also in [table.csv](table.csv).",
             "", markdown_table(table, selection), ""]
    splits = sorted({(r.dataset, r.reference_split) for r in table.itertuples(index=False) if r.reference_split})
    for dataset, split in splits:
        lines += [f"Other test images: on {dataset}, {split}. Its number and ours are means over different "
                  "images; the comparison above counts that through SE_ref.", ""]
    differ = sorted(set(table.loc[table["budget_differs"], "dataset"]))
    if differ:
        lines += [f"⚠ in `budget`: the rows of {', '.join(differ)} did not train under the same budget (some "
                  "were cut short by the scheduler, or ran under other epoch limits): their test LLs do not "
                  "compare like with like; a shorter budget usually means a lower LL.", ""]
    caveat = _comparability_note(trials)
    if caveat:
        lines += [f"Note: {caveat}.", ""]
    return lines


def _k_section(rep: _Report, trials: pd.DataFrame) -> list[str]:
    selection = rep.result.selection
    points = k_points_frame(trials)
    rep.result.k_points = points
    if points.empty:
        if trials["has_ll"].any():
            rep.note("no trial of a prior with pseudo-inputs/components (vamp, vamp_data, mog) has a test LL: "
                     "no K figure")
        return []
    baselines = standard_baselines(trials, selection)
    baselines = rep.result.baselines = baselines[baselines["dataset"].isin(points["dataset"])]
    fig = ll_vs_k_figure(points, baselines, chosen_on=selection.metric)
    rep.save(fig, "ll_vs_K.png")
    seen = drawn(fig)
    n_ended, n_stopped = seen["ended"], seen["stopped"]
    parts = [f"{n_ended + n_stopped} trial(s) of a prior with K:"]
    if n_ended:
        spread = "; error bars: the std of the seeds of one setting at one K" if seen["seed_spread"] else ""
        parts.append(f"{n_ended} trained to their own end (filled{spread})" + (";" if n_stopped else "."))
    if n_stopped:
        parts.append(f"{n_stopped} stopped early by the scheduler (hollow: a shorter budget, never joined "
                     "with the others).")
    if seen["best_ended"]:
        parts.append(f"The line joins, per K, the setting with {selection.text} (mean over its seeds) among "
                     "the trials that trained to their end, at that setting's seed-mean test LL.")
    elif n_ended:
        parts.append("No line: the trials that trained to their end cover a single K per prior.")
    parts.append("Marker area grows with the epochs trained; colour is the learning rate where it varies, "
                 "else the prior.")
    if seen["baseline"]:
        parts.append("The horizontal line is the standard prior (no K): its configuration with "
                     f"{selection.text} among its trials that trained to their end, at its seed-mean test LL.")
    else:
        standard = trials[(trials["prior"] == "standard") & trials["has_ll"]
                          & trials["dataset"].isin(points["dataset"])]
        if len(standard):
            parts.append(f"No standard-prior line: none of its {len(standard)} trial(s) with a test LL trained to "
                         f"its end (epochs {_range(standard['epochs'])}: "
                         + ", ".join(f"{STOP_WORDS.get(k, k)} ×{v}" for k, v in _stop_counts(standard).items())
                         + "), so a line would not compare like with like.")
    lines = ["## Test log-likelihood against K", "", " ".join(parts), "", "![LL against K](ll_vs_K.png)", ""]
    val_fig = ll_vs_k_figure(points, chosen_on=selection.metric, value="select")
    if drawn(val_fig)["ended"] + drawn(val_fig)["stopped"]:
        rep.save(val_fig, "val_vs_K.png")
        lines += ["## Validation against K", "",
                  f"The same trials' `{selection.metric}` at the tested epoch (what the sweep chose on), drawn "
                  "as above: filled trials trained to their end, hollow ones were stopped by the scheduler at "
                  "a shorter budget. Where the two figures rank settings differently, the choice made "
                  "on validation and the test disagree.", "", "![validation against K](val_vs_K.png)", ""]
    return lines


def _shown_label(r: Any, selection: Selection) -> str:
    """What the trial shown for a prior is: its budget and both numbers."""
    return (f"{r.epochs} epoch(s), {STOP_WORDS.get(r.stop_reason, r.stop_reason or r.status.lower())}; "
            f"{selection.metric} {_fmt(r.select)} at epoch {'' if pd.isna(r.best_epoch) else int(r.best_epoch)}, "
            f"test LL {_ll_se(r.test_ll, r.test_ll_se)}")


def _fill_standard_errors(rep: _Report, client, trials: pd.DataFrame, tmp: Path) -> None:
    """Runs older than `test_ll_se` get it from their per_image_ll.csv (in place); without that
    file it stays unknown (NaN). Notes say how many of each."""
    missing = trials.index[trials["has_ll"] & ~trials["test_ll_se"].map(finite)]
    computed, unknown = [], []
    for i in missing:
        row = trials.loc[i]
        path = _download(rep, client, row, "per_image_ll.csv", tmp)
        values = pd.read_csv(path)["log_likelihood"].to_numpy(dtype=float) if path is not None else np.array([])
        se = standard_error(values[np.isfinite(values)].tolist())
        if finite(se):
            trials.loc[i, ["test_ll_se", "test_ll_se_from"]] = [se, SE_FROM_CSV]
            computed.append(row.trial)
        else:
            unknown.append(row.trial)
    if computed:
        rep.note(f"{len(computed)} trial(s) logged no {METRIC_TEST_LL_SE} (older runs): computed from their "
                 f"per_image_ll.csv ({', '.join(map(str, computed))})")
    if unknown:
        rep.note(f"{len(unknown)} trial(s) logged no {METRIC_TEST_LL_SE} and have no per_image_ll.csv: their standard "
                 f"error is unknown, and a row resting on them alone gets no verdict ({', '.join(map(str, unknown))})")


def _histogram_section(rep: _Report, client, trials: pd.DataFrame, tmp: Path) -> list[str]:
    selection = rep.result.selection
    per_image, shown = [], []
    for r in rep.result.shown.itertuples(index=False):
        path = _download(rep, client, r, "per_image_ll.csv", tmp)
        if path is None:
            rep.note(f"trial {r.trial} has no per_image_ll.csv: left out of the histograms")
            continue
        values = pd.read_csv(path)["log_likelihood"].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            budget = f"{r.epochs} epoch(s), {STOP_WORDS.get(r.stop_reason, r.stop_reason)}"
            per_image.append((r.dataset, r.model, r.prior, values, budget))
            shown.append(r)
    if not per_image:
        return []
    rep.save(histograms_figure(per_image), "ll_histograms.png")
    lines = ["## Per-image test log-likelihood", "",
             "One trial per prior: of the configuration the table reports, the seed with "
             f"{selection.text} (never chosen on test LL): "
             + "; ".join(f"{r.dataset} / {r.model} / {r.prior}: trial {r.trial}" for r in shown)
             + ". The legend gives each trial's budget.", ""]
    frame = pd.DataFrame([r._asdict() for r in shown])
    mixed = [d for d, here in frame.groupby("dataset") if len({_budget_key(here[here["prior"] == p])
                                                               for p in here["prior"]}) > 1]
    if mixed:
        lines += [f"⚠ {', '.join(mixed)}: these trials had different budgets (see the legend): their "
                  "histograms do not compare like with like.", ""]
    return lines + ["![per-image LL histograms](ll_histograms.png)", ""]


def _best_trials_section(rep: _Report, client, trials: pd.DataFrame, tmp: Path) -> list[str]:
    from matplotlib.image import imread

    selection = rep.result.selection
    lines = []
    for r in rep.result.shown.itertuples(index=False):
        panels = []
        shown = f" (first 100 of {int(r.K)})" if pd.notna(r.K) and r.K > 100 else ""
        for artifact, caption in (("pseudo_inputs.png", f"learned pseudo-inputs{shown}"),
                                  ("reconstructions.png", "test images (odd rows) and\nreconstructions (even rows)"),
                                  ("samples.png", "samples")):
            path = _download(rep, client, r, artifact, tmp)
            if path is not None:
                panels.append((caption, imread(path)))
        if not panels:
            rep.note(f"trial {r.trial} has no images: no picture of the {r.dataset} / {r.prior} trial")
            continue
        k = f", K={int(r.K)}" if pd.notna(r.K) else ""
        title = f"{r.dataset} / {r.model} / {r.prior}{k}: trial {r.trial} ({_shown_label(r, selection)})"
        name = f"best_{_safe(r.dataset)}_{_safe(r.model)}_{_safe(r.prior)}.png"
        rep.save(best_trial_figure(title, panels), name)
        lines += [f"### {r.dataset} / {r.model} / {r.prior}", "", f"![{title}]({name})", ""]
    if not lines:
        return []
    return ["## The trial shown per prior", "",
            f"Of the configuration the table reports, the seed with {selection.text} (its weights are the "
            "tested ones). Pixel values are shown as black (0) to white (1) with the same mapping in every "
            "panel, enlarged with nearest-neighbour pixels.", ""] + lines


def _curves_section(rep: _Report, trials: pd.DataFrame, histories: dict[str, dict[str, History]]) -> list[str]:
    rows = [(run_id, step, value) for run_id, records in histories.items()
            for step, (value, _) in sorted(records.get(METRIC_VAL_ELBO, {}).items()) if finite(value)]
    curves = pd.DataFrame(rows, columns=["run_id", "epoch", "val_elbo"])
    rep.result.curves = curves
    if curves.empty:
        rep.note("no trial has logged a validation ELBO yet: no learning curves")
        return []
    fig = learning_curves_figure(curves, trials)
    rep.save(fig, "learning_curves.png")
    seen = drawn(fig)
    by = curve_colouring(trials[trials["run_id"].isin(curves["run_id"])])[0]
    cut = 0
    info = trials.set_index("run_id")
    for _, here in curves.groupby(curves["run_id"].map(info["dataset"])):
        values = here["val_elbo"].to_numpy(dtype=float)
        cut += int((values < curves_clip(values)).sum())
    colour = {'K': 'K (colour bar; the standard prior in gray)', 'lr': 'learning rate (colour bar)',
              'prior': 'prior'}[by]
    marks = [f"a dot marks each trial's tested (best) epoch ({seen['best_epoch']} trial(s))"]
    if seen["scheduler"]:
        marks.append(f"a cross where the scheduler stopped a trial ({seen['scheduler']})")
    if seen["nan"]:
        marks.append(f"a triangle the last finite epoch of a trial that diverged ({seen['nan']})")
    return ["## Learning curves", "",
            f"Validation ELBO per epoch of {curves['run_id'].nunique()} trial(s), coloured by {colour}; "
            + "; ".join(marks) + ". Each panel's y-axis starts at the "
            f"{_ordinal(CURVES_LOW_PERCENTILE)} percentile of its values, or 3 interquartile ranges below the lower "
            f"quartile where that is higher, so that a diverging trial cannot flatten the others ({cut} of "
            f"{len(curves)} points, mostly the first epochs, lie below it).", "",
            "![learning curves](learning_curves.png)", ""]


def _optuna_section(rep: _Report, parents: list, tracking_uri: str) -> list[str]:
    lines = []
    for parent in parents:
        study = find_study(parent, tracking_uri)
        if study is None:
            continue
        rep.result.studies[parent.info.run_name] = study
        gaps = importance_gaps(study)
        importances = study_importances(study) if not gaps else {}
        metric = (study.metric_names or [parent.data.params.get("metric.name", "value")])[0]
        name = f"optuna_{_safe(parent.info.run_name or parent.info.run_id)}.png"
        why = "left out: too few completed trials for " + "; ".join(gaps) if gaps else ""
        rep.save(optuna_figure(study, metric, importances, why), name)
        import optuna

        counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
        states = ", ".join(f"{n} {s}" for s, n in counts.items())
        if importances:
            ranked = ("Parameter importances from the completed trials (PED-ANOVA, normalised): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".")
        else:
            ranked = (f"Parameter importances are left out: too few completed trials for {'; '.join(gaps)}. "
                      f"They are shown when each numeric parameter has at least {IMPORTANCE_MIN_TRIALS} completed "
                      f"trials and each choice of a categorical one at least {IMPORTANCE_MIN_PER_CHOICE} "
                      "(PED-ANOVA compares the best 10% of the trials with all of them).")
        lines += [f"### Sweep `{parent.info.run_name}`", "",
                  f"Study `{study.study_name}` ({states}; optuna {optuna.__version__}). {ranked} Pruned "
                  "trials were stopped by the scheduler at lower budgets and have no final value; "
                  "`optuna-dashboard` shows them with their intermediate values.", "",
                  f"![Optuna study of {parent.info.run_name}]({name})", ""]
    return ["## Search: the Optuna study", ""] + lines if lines else []


def _fidelity_section(rep: _Report, client, parents: list, runs: list) -> list[str]:
    """Per sweep under ASHA: how well its rungs ranked the trials against their end, from its audit
    trials (sweeper/fidelity.py; the sweep's run also has it as rung_fidelity.json)."""
    from sweeper.fidelity import sweep_fidelity

    lines = []
    for parent in parents:
        name = parent.info.run_name or parent.info.run_id
        try:
            fidelity = sweep_fidelity(client, parent, runs)
        except Exception as exc:   # an unreadable history: the rest of the report stands
            rep.note(f"sweep {name}: rung fidelity could not be measured ({type(exc).__name__}: {exc})")
            continue
        if fidelity is None:
            continue
        lines += [fidelity.markdown(title=f"Sweep `{name}`", level=3), ""]
    if not lines:
        return []
    return ["## Rung fidelity", "", "Did ASHA's rungs rank the trials the way they ended? Measured on each sweep's "
            "audit trials (`scheduler.audit`: trials the scheduler recorded but never stopped); each sweep's "
            "MLflow run has it as rung_fidelity.json too.", ""] + lines


def _trials_section(rep: _Report, trials: pd.DataFrame) -> list[str]:
    selection = rep.result.selection
    rep.write(trials_table(trials, selection), "trials.csv")
    lines = ["## Trials", "",
             "Every trial: why it stopped, after how many epochs, its best (tested) epoch — the epoch its "
             "rule chose (REF's: the lowest validation loss), whose weights were restored and tested — the "
             f"`{selection.metric}` there (what the choices above use; `latest` where a trial has no tested epoch "
             "yet), its test LL ± its standard error, the other choice of epoch it tested from the same training "
             "(" + "; ".join(f"`{k}`: {v}" for k, v in CHOICE_WORDS.items()) + "; `the same` where both "
             "rules chose one epoch), and "
             "its own time: `training` from its start to its last epoch (start-up and logging included; a "
             "trial interrupted and resumed counts the pause), `test LL evaluation` apart. A trial stopped "
             "by the scheduler is evaluated later: the wait is in neither. Also in [trials.csv](trials.csv) "
             "(seconds; `train_seconds`: the sum of its epochs' own times).", ""]
    if len(trials) <= 200:
        lines += [markdown_trials(trials, selection), ""]
    return lines


def _markdown(result: ReportResult, parents: list, trials: pd.DataFrame, sections: list[str]) -> str:
    selection = result.selection
    lines = [f"# Report: MLflow experiment `{result.experiment}`", "",
             f"- tracking store: `{result.tracking_uri}` (experiment id {result.experiment_id})",
             f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if parents:
        lines.append("- sweeps: " + ", ".join(f"`{p.info.run_name}` ({p.info.run_id}, {p.info.status})"
                                               for p in parents))
    if not trials.empty:
        counts = _stop_counts(trials)
        lines.append(f"- trials: {len(trials)} ("
                     + ", ".join(f"{n} {reason}" for reason, n in counts.items())
                     + f"); {int(trials['has_ll'].sum())} with a test log-likelihood; their own time: "
                     f"{_duration(trials['wall_seconds'].sum(min_count=1))} training, "
                     f"{_duration(trials['test_ll_seconds'].sum(min_count=1))} test evaluation")
        lines.append(f"- choosing on validation: every choice in this report (the configuration per prior, "
                     f"the best setting per K, the trial shown per prior, the standard prior's line) is made "
                     f"on the sweep's metric, {selection.text} (the restored best epoch, whose weights were "
                     "tested); the test log-likelihood is reported beside it and never used to choose")
    lines.append("- figures: the PNG files beside this file; `report.html`: the same report with its figures "
                 "inline, for the MLflow UI (its markdown preview shows a figure stored beside the file as a link)")
    lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(lines + sections).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# report.html: report.md with its figures inline


_IMAGE_LINE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
_INLINE = re.compile(r"`(?P<code>[^`]+)`|\[(?P<text>[^\]]+)\]\((?P<href>[^)\s]+)\)")


def _inline_html(text: str) -> str:
    """Inline markdown as report.md writes it (`code`, [text](href)) to HTML, escaping the rest."""
    out, at = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[at:m.start()]))
        if m.group("code") is not None:
            out.append(f"<code>{html.escape(m.group('code'))}</code>")
        else:
            out.append(f'<a href="{html.escape(m.group("href"))}">{_inline_html(m.group("text"))}</a>')
        at = m.end()
    return "".join(out) + html.escape(text[at:])


def _cells(line: str) -> list[str]:
    """A markdown table row's cells (an escaped bar is a literal one)."""
    inner = line.strip()[1:-1]   # report.md's rows start and end with an unescaped bar
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def report_html(markdown: str, folder: Path, title: str) -> str:
    """report.md as one self-contained HTML page: each figure (a PNG in `folder`) inline as a data
    URI. MLflow 3.17's artifact view renders an .html artifact in a frame of its own, where a
    figure beside the file could not be found, and its markdown preview shows such a figure as
    link text; a data URI needs neither. Handles the markdown report.md is written in: headings,
    paragraphs, bullet lists, tables, image lines, inline code and links."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline_html(line[level:].strip())}</h{level}>")
            i += 1
        elif _IMAGE_LINE.match(line):
            m = _IMAGE_LINE.match(line)
            path = folder / m.group("src")
            src = (f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
                   if path.is_file() else html.escape(m.group("src")))
            body.append(f'<p><img src="{src}" alt="{html.escape(m.group("alt"))}"></p>')
            i += 1
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline_html(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= {"-", ":"} for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline_html(c)}</th>" for c in head)
                        + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "- ", "|")) \
                    and not _IMAGE_LINE.match(lines[i]):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{_inline_html(' '.join(para))}</p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;line-height:1.45;"
        "color:#222}table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
        "img{max-width:100%;height:auto}code{background:#f3f3f3;padding:0 3px;border-radius:3px}")
