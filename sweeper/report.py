"""`sweeper report`: the VampPrior study's table and figures from the runs of one MLflow experiment.

`make_report` reads the experiment once (`search_runs`, paged), then writes into one folder:

- `table.csv` and a markdown table in `report.md`: test log-likelihood per (dataset, model, prior),
  mean +/- std over seeds, beside the published number (`PUBLISHED`) and the difference;
- `ll_vs_K.png`: test LL against the number of pseudo-inputs K (the study's headline figure);
- `ll_histograms.png`: per-image test LL of the best trial of each prior, one panel per dataset;
- `best_<dataset>_<model>_<prior>.png`: the best trial's pseudo-inputs, reconstructions of real
  test images, and samples;
- `learning_curves.png`: validation ELBO per epoch of every trial, ASHA stops marked;

and logs them to the newest sweep (parent) run of the experiment under `report/`.

Which runs count: a run tagged `sweeper.role=sweep` is a sweep; any other run with `dataset` and
`prior` params is a trial. Trials without a finite `test_ll` (still running, diverged, failed)
are left out of the table and of the test-LL figures with a note in `report.md`; their learning
curves are still drawn. "Best trial" always means the highest `test_ll` (as the sweep's own
`best_run_id` tag). The table picks its configuration by validation ELBO (see `results_table`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from sweeper import tracking
from sweeper.errors import SweeperError

# Display order (the paper's); names not listed here follow alphabetically. Kept here rather than
# read from the registries so that `sweeper report` does not import torch.
DATASET_ORDER = ("static_mnist", "dynamic_mnist", "fashion_mnist", "omniglot", "caltech101", "frey_faces")
MODEL_ORDER = ("vae", "hvae")
PRIOR_ORDER = ("standard", "vamp", "vamp_data", "mog")
K_PRIORS = ("vamp", "vamp_data", "mog")     # priors whose K (components / pseudo-inputs) matters
PRIOR_COLORS = {"standard": "#555753", "vamp": "#3465a4", "vamp_data": "#4e9a06", "mog": "#cc0000"}
MODEL_STYLES = {"vae": ("-", "o"), "hvae": ("--", "s")}
# Dimensions of the datasets reported in bits/dim as well (discretized-logistic data).
BITS_PER_DIM_DATASETS = {"frey_faces": 560}

# Trial params that never make two trials different configurations: the seed (averaged over) and
# where/how a trial ran, which does not change its result.
NOT_CONFIG = frozenset({"seed", "data_root", "device", "image_every", "cuda_graphs"})
# Params a prior ignores: trials differing only in these are one configuration of that prior.
IGNORED_BY_PRIOR = {"standard": frozenset({"K", "fixed_pseudo_inputs"}),
                    "vamp": frozenset({"fixed_pseudo_inputs"}),
                    "mog": frozenset({"fixed_pseudo_inputs"})}
SELECTION_METRIC = "val_elbo"

REPORT_FILES = ("table.csv", "ll_vs_K.png", "ll_histograms.png", "learning_curves.png", "report.md")


# --------------------------------------------------------------------------------------------
# Published numbers (../shared/REFERENCE.md): test log-likelihood in nats, higher is better.


@dataclass(frozen=True)
class PublishedLL:
    dataset: str
    model: str
    prior: str
    ll: float          # nats
    source: str        # "paper", "REF re-run", "Exemplar VAE re-runs", "SEED", ...


PUBLISHED: tuple[PublishedLL, ...] = (
    # static MNIST: the paper, re-runs of its reference code (REF), pythae, the SEED study.
    PublishedLL("static_mnist", "vae", "standard", -88.56, "paper (unverified)"),
    PublishedLL("static_mnist", "vae", "standard", -88.48, "REF re-run"),
    PublishedLL("static_mnist", "vae", "standard", -93.08, "SEED (1000 epochs)"),
    PublishedLL("static_mnist", "vae", "vamp", -85.57, "paper"),
    PublishedLL("static_mnist", "vae", "vamp", -85.81, "REF re-run (K=500)"),
    PublishedLL("static_mnist", "vae", "vamp", -85.79, "pythae re-run"),
    PublishedLL("static_mnist", "vae", "vamp", -88.72, "SEED (1000 epochs)"),
    PublishedLL("static_mnist", "vae", "vamp_data", -90.85, "SEED (1000 epochs)"),
    PublishedLL("static_mnist", "hvae", "standard", -86.02, "REF re-run"),
    PublishedLL("static_mnist", "hvae", "vamp", -83.19, "paper (unverified)"),
    PublishedLL("static_mnist", "hvae", "vamp", -84.95, "REF re-run"),
    # dynamic MNIST, Fashion-MNIST, OMNIGLOT: re-runs published with the Exemplar VAE.
    PublishedLL("dynamic_mnist", "vae", "standard", -84.45, "Exemplar VAE re-runs"),
    PublishedLL("dynamic_mnist", "hvae", "standard", -82.39, "Exemplar VAE re-runs"),
    PublishedLL("dynamic_mnist", "vae", "vamp", -82.43, "Exemplar VAE re-runs"),
    PublishedLL("dynamic_mnist", "hvae", "vamp", -81.56, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "vae", "standard", -228.70, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "hvae", "standard", -227.37, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "vae", "vamp", -227.35, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "hvae", "vamp", -226.72, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "vae", "standard", -235.32, "SEED (1000 epochs)"),
    PublishedLL("fashion_mnist", "vae", "vamp", -231.94, "SEED (1000 epochs)"),
    PublishedLL("fashion_mnist", "vae", "vamp_data", -232.79, "SEED (1000 epochs)"),
    PublishedLL("omniglot", "vae", "standard", -108.34, "Exemplar VAE re-runs"),
    PublishedLL("omniglot", "hvae", "standard", -104.92, "Exemplar VAE re-runs"),
    PublishedLL("omniglot", "vae", "vamp", -106.78, "Exemplar VAE re-runs"),
    PublishedLL("omniglot", "hvae", "vamp", -103.30, "Exemplar VAE re-runs"),
    # Frey Faces and Caltech 101 Silhouettes: only the SEED study (1-level VAE, 1000 epochs).
    PublishedLL("frey_faces", "vae", "standard", -2281.16, "SEED (1000 epochs)"),
    PublishedLL("frey_faces", "vae", "vamp", -2257.76, "SEED (1000 epochs)"),
    PublishedLL("frey_faces", "vae", "vamp_data", -2286.52, "SEED (1000 epochs)"),
    PublishedLL("caltech101", "vae", "standard", -137.32, "SEED (1000 epochs)"),
    PublishedLL("caltech101", "vae", "vamp", -135.15, "SEED (1000 epochs)"),
    PublishedLL("caltech101", "vae", "vamp_data", -142.02, "SEED (1000 epochs)"),
)


def published_ll(dataset: str, model: str, prior: str) -> PublishedLL | None:
    """The number to compare with: the paper's where it has one, else the first listed; or None."""
    found = [p for p in PUBLISHED if (p.dataset, p.model, p.prior) == (dataset, model, prior)]
    papers = [p for p in found if p.source.startswith("paper")]
    return (papers or found or [None])[0]


def bits_per_dim(ll: float, dim: int) -> float:
    """Negative log-likelihood in nats -> bits per dimension."""
    return -ll / (dim * math.log(2.0))


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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def trials_frame(runs: Iterable) -> pd.DataFrame:
    """One row per trial run: identity, status, stop reason, the config key and the metrics used."""
    rows = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        if (t.get(tracking.TAG_ROLE) == "sweep" or tracking.TAG_ORPHANED in t
                or "dataset" not in p or "prior" not in p):
            continue
        prior = p["prior"]
        ignored = NOT_CONFIG | IGNORED_BY_PRIOR.get(prior, frozenset())
        config = {k: v for k, v in p.items() if k not in ignored}
        rows.append({
            "run_id": run.info.run_id, "trial": run.info.run_name or run.info.run_id,
            "status": run.info.status, "stop_reason": t.get(tracking.TAG_STOP, ""),
            "stop_detail": t.get("stop_detail", ""), "parent_run_id": t.get(tracking.TAG_PARENT, ""),
            "start_time": run.info.start_time or 0,
            "dataset": p["dataset"], "model": p.get("model", "vae"), "prior": prior,
            "K": int(_number(p["K"])) if prior in K_PRIORS and _finite(_number(p.get("K"))) else None,
            "seed": p.get("seed", ""), "config_params": config,
            "epochs": int(m["epoch"]) if _finite(m.get("epoch")) else 0,
            **{k: m.get(k, float("nan")) for k in ("test_ll", "val_elbo", "test_bits_per_dim")},
        })
    columns = ["run_id", "trial", "status", "stop_reason", "stop_detail", "parent_run_id", "start_time",
               "dataset", "model", "prior", "K", "seed", "config_params", "epochs", "test_ll", "val_elbo",
               "test_bits_per_dim"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["has_ll"] = [_finite(v) for v in frame["test_ll"]]
    return _sorted(frame)


def _order(values: Iterable[str], first: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in first if v in values] + sorted(values - set(first))


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
    """Per trial, its configuration as the params that vary within the group ('K=16, lr=0.001')."""
    configs = list(group["config_params"])
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({c.get(k) for c in configs}) > 1]
    return pd.Series([", ".join(f"{k}={c.get(k)}" for k in varying) for c in configs], index=group.index)


# --------------------------------------------------------------------------------------------
# 1. The table


def _mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for a single value)."""
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def results_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Test log-likelihood per (dataset, model, prior), mean +/- std over seeds.

    A group may hold several configurations: trials whose params differ beyond the seed, the
    bookkeeping keys (`NOT_CONFIG`) and the keys the prior ignores (K for `standard`). Only trials
    with a finite test LL count. The configuration with the best mean validation ELBO is reported
    (chosen on validation data, so the test set plays no part in the choice): its trials are
    averaged per seed (repeats of a seed count once), then mean and sample std (ddof=1; blank for
    one seed) over the seeds. `n_seeds`, `n_trials`: what the numbers rest on; `n_configs`: how many
    configurations the group had; `run_ids`: the chosen configuration's runs.
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
        dim = BITS_PER_DIM_DATASETS.get(dataset)
        if dim is not None:
            # The run's own metric where it was logged, else from its test LL.
            bpd = chosen["test_bits_per_dim"].astype(float)
            chosen = chosen.assign(bpd=bpd.where(bpd.notna(), -chosen["test_ll"] / (dim * math.log(2.0))))
        per_seed = chosen.groupby("seed", sort=False)[["test_ll"] + (["bpd"] if dim else [])].mean()
        ll_mean, ll_std = _mean_std(per_seed["test_ll"])
        pub = published_ll(dataset, model, prior)
        row = {
            "dataset": dataset, "model": model, "prior": prior, "test_ll_mean": ll_mean, "test_ll_std": ll_std,
            "n_seeds": len(per_seed), "n_trials": len(chosen), "n_configs": len(per_config),
            "config": score.idxmax(),
            "published_ll": pub.ll if pub else float("nan"), "published_source": pub.source if pub else "",
            "diff_ll": ll_mean - pub.ll if pub else float("nan"),
        }
        if dim is not None:
            bpd_mean, bpd_std = _mean_std(per_seed["bpd"])
            row.update(bits_per_dim_mean=bpd_mean, bits_per_dim_std=bpd_std,
                       published_bits_per_dim=bits_per_dim(pub.ll, dim) if pub else float("nan"))
        row["run_ids"] = ";".join(chosen["run_id"])
        rows.append(row)
    columns = ["dataset", "model", "prior", "test_ll_mean", "test_ll_std", "n_seeds", "n_trials", "n_configs",
               "config", "published_ll", "published_source", "diff_ll", "bits_per_dim_mean", "bits_per_dim_std",
               "published_bits_per_dim", "run_ids"]
    table = pd.DataFrame(rows, columns=columns)
    if table["bits_per_dim_mean"].isna().all():
        table = table.drop(columns=["bits_per_dim_mean", "bits_per_dim_std", "published_bits_per_dim"])
    return table


def _fmt(value: Any, digits: int = 2, sign: bool = False) -> str:
    if not _finite(value):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown_table(table: pd.DataFrame) -> str:
    """The table for report.md (pandas' to_markdown needs tabulate, which is not a dependency)."""
    bpd = "bits_per_dim_mean" in table
    header = ["dataset", "model", "prior", "test LL (nats)", "seeds", "published", "source", "diff"]
    header += ["bits/dim", "published bits/dim"] if bpd else []
    header += ["configuration"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in table.itertuples(index=False):
        ll = _fmt(r.test_ll_mean) + (f" ± {_fmt(r.test_ll_std)}" if _finite(r.test_ll_std) else "")
        n = str(r.n_seeds) + (f" ({r.n_trials} trials)" if r.n_trials != r.n_seeds else "")
        cells = [r.dataset, r.model, r.prior, ll, n, _fmt(r.published_ll), r.published_source or "–",
                 _fmt(r.diff_ll, sign=True)]
        if bpd:
            b = _fmt(r.bits_per_dim_mean, 4) + (f" ± {_fmt(r.bits_per_dim_std, 4)}"
                                                  if _finite(r.bits_per_dim_std) else "")
            cells += [b if _finite(r.bits_per_dim_mean) else "–", _fmt(r.published_bits_per_dim, 4)]
        config = r.config or "–"
        if r.n_configs > 1:
            config += f" (best of {r.n_configs} by val ELBO)"
        cells.append(config)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# 2.-5. Figures: each takes plain frames and returns a matplotlib Figure (no pyplot state).


def _panel_grid(n: int, width: float = 5.5, height: float = 4.0, max_cols: int = 3):
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(6.5, width * ncols), height * nrows + 0.4), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _series_label(model: str, prior: str, models: set[str]) -> str:
    return prior if len(models) <= 1 else f"{model} / {prior}"


def k_points_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """The points of the K figure: every trial of a K prior that has a finite test LL."""
    if trials.empty:
        return pd.DataFrame(columns=["run_id", "trial", "dataset", "model", "prior", "K", "test_ll"])
    keep = trials["has_ll"] & trials["prior"].isin(K_PRIORS) & trials["K"].notna()
    points = trials.loc[keep, ["run_id", "trial", "dataset", "model", "prior", "K", "test_ll"]].copy()
    points["K"] = points["K"].astype(int)
    return points.reset_index(drop=True)


def ll_vs_k_figure(points: pd.DataFrame, baselines: pd.DataFrame | None = None) -> Figure:
    """Test LL against K (log axis): every trial a point, the best per K a line; one panel per
    dataset, one series per (model, prior). `baselines` (dataset, model, test_ll): the best trial
    of the standard prior, drawn as a horizontal line for reference. Trial points carry
    gid='trials' (one PathCollection per series)."""
    datasets = _order(points["dataset"], DATASET_ORDER)
    fig, axes = _panel_grid(len(datasets))
    models = set(points["model"])
    for ax, dataset in zip(axes, datasets):
        here = points[points["dataset"] == dataset]
        for (model, prior), s in here.groupby(["model", "prior"], sort=False):
            color = PRIOR_COLORS.get(prior)
            line, marker = MODEL_STYLES.get(model, ("-", "o"))
            label = _series_label(model, prior, models)
            ax.scatter(s["K"], s["test_ll"], s=18, alpha=0.45, color=color, marker=marker, gid="trials",
                       edgecolors="none")
            best = s.groupby("K")["test_ll"].max().sort_index()
            ax.plot(best.index, best.values, line, marker=marker, color=color, ms=5, lw=1.5,
                    label=f"{label} (best per K)")
        if baselines is not None and not baselines.empty:
            for b in baselines[baselines["dataset"] == dataset].itertuples(index=False):
                ax.axhline(b.test_ll, color=PRIOR_COLORS["standard"], lw=1,
                           ls=MODEL_STYLES.get(b.model, ("-",))[0] if b.model != "vae" else ":",
                           label=f"{_series_label(b.model, 'standard', models | {b.model})} (best trial)")
        ax.set_xscale("log")
        ks = sorted(set(here["K"]))
        if len(ks) <= 8:   # few K values (a grid): label exactly those
            ax.set_xticks(ks)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("K (pseudo-inputs / components)")
        ax.set_ylabel("test log-likelihood (nats)")
        ax.set_title(dataset)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Test log-likelihood against K (points: trials)")
    return fig


def histograms_figure(per_image: list[tuple[str, str, str, np.ndarray]]) -> Figure:
    """(dataset, model, prior, per-image LL) of the best trial per prior, overlaid per dataset."""
    datasets = _order({d for d, *_ in per_image}, DATASET_ORDER)
    models = {m for _, m, _, _ in per_image}
    fig, axes = _panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        here = [(m, p, v) for d, m, p, v in per_image if d == dataset]
        values = np.concatenate([v for *_, v in here])
        bins = np.histogram_bin_edges(values, bins=min(60, max(10, values.size // (10 * len(here)))))
        for model, prior, v in here:
            color = PRIOR_COLORS.get(prior)
            ax.hist(v, bins=bins, color=color, alpha=0.35, histtype="stepfilled")
            ax.hist(v, bins=bins, color=color, histtype="step", lw=1.2,
                    label=f"{_series_label(model, prior, models)} (mean {v.mean():.2f}, {v.size} images)")
        ax.set_xlabel("test log-likelihood per image (nats)")
        ax.set_ylabel("images")
        ax.set_title(dataset)
        ax.legend(fontsize=8)
    fig.suptitle("Per-image test log-likelihood of the best trial per prior")
    return fig


def best_trial_figure(title: str, panels: list[tuple[str, np.ndarray]]) -> Figure:
    """Image grids side by side at one pixel scale: (caption, grayscale image, [0, 1] or uint8)."""
    widths = [img.shape[1] for _, img in panels]
    height = max(img.shape[0] for _, img in panels)
    inches = 4.0 / max(widths)    # the widest grid gets 4 inches
    fig = Figure(figsize=(inches * sum(widths) + 0.5 * len(panels), inches * height + 1.1), dpi=110,
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), width_ratios=widths, squeeze=False).ravel())
    for ax, (caption, img) in zip(axes, panels):
        vmax = 255 if img.dtype == np.uint8 else 1.0
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig


def learning_curves_figure(curves: pd.DataFrame, trials: pd.DataFrame) -> Figure:
    """Validation ELBO per epoch of every trial; one panel per dataset, colour = prior.

    A cross (gid='asha') marks the last epoch of each trial ASHA stopped, a triangle (gid='nan')
    the last finite epoch of each trial that diverged."""
    info = trials.set_index("run_id")
    datasets = _order(info.loc[curves["run_id"].unique(), "dataset"], DATASET_ORDER)
    models = set(info["model"])
    fig, axes = _panel_grid(len(datasets), width=5.5)
    for ax, dataset in zip(axes, datasets):
        ids = [r for r in curves["run_id"].unique() if info.at[r, "dataset"] == dataset]
        seen, asha, diverged, finals = set(), [], [], []
        here = curves[curves["run_id"].isin(ids)]
        for run_id, c in here.groupby("run_id", sort=False):
            c = c.sort_values("epoch")
            model, prior = info.at[run_id, "model"], info.at[run_id, "prior"]
            label = _series_label(model, prior, models)
            ax.plot(c["epoch"], c["val_elbo"], color=PRIOR_COLORS.get(prior), lw=1, alpha=0.6,
                    ls=MODEL_STYLES.get(model, ("-",))[0], label=None if label in seen else label)
            seen.add(label)
            last = (c["epoch"].iloc[-1], c["val_elbo"].iloc[-1])
            finals.append(last[1])
            if info.at[run_id, "stop_reason"] == "asha":
                asha.append(last)
            elif info.at[run_id, "stop_reason"] == "nan":
                diverged.append(last)
        if asha:
            x, y = zip(*asha)
            ax.scatter(x, y, marker="x", color="k", s=30, zorder=3, gid="asha", label="stopped by ASHA")
        if diverged:
            x, y = zip(*diverged)
            ax.scatter(x, y, marker="v", color="#cc0000", s=30, zorder=3, gid="nan", label="diverged (NaN)")
        # The first epochs' ELBO is far below the rest: keep the final values readable.
        lo, hi = min(finals), here["val_elbo"].max()
        if hi > lo:
            ax.set_ylim(max(here["val_elbo"].min(), lo - 1.5 * (hi - lo)) - 0.02 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation ELBO (nats)")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning curves (validation ELBO)")
    return fig


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
    notes = []
    for r in trials[~trials["has_ll"]].itertuples(index=False):
        what = f"trial {r.trial} ({r.dataset} / {r.model} / {r.prior}, run {r.run_id})"
        if r.status == "RUNNING":
            notes.append(f"{what} is still running (epoch {r.epochs}) and has no test_ll yet: "
                         "left out of the table and the test-LL figures")
        elif r.stop_reason == "nan":
            notes.append(f"{what} diverged (NaN){': ' + r.stop_detail if r.stop_detail else ''}: no test_ll")
        elif r.stop_reason == "error":
            notes.append(f"{what} ended with an error{': ' + r.stop_detail[:200] if r.stop_detail else ''}")
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
    parents = sorted((r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "sweep"),
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
    path = rep.result.out / "table.csv"
    table.to_csv(path, index=False)
    rep.result.files.append(path)
    lines = ["## Test log-likelihood", "",
             "Mean ± std (ddof=1) over seeds of the test log-likelihood in nats (higher is better; repeats "
             "of a seed are averaged first). Where a (dataset, model, prior) holds several configurations, "
             "the one with the best mean validation ELBO is shown (chosen without the test set). "
             "`diff` = ours − published. Also in [table.csv](table.csv).", "", markdown_table(table), ""]
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
    best = best_trials(trials)
    baselines = best[best["prior"] == "standard"][["dataset", "model", "test_ll"]]
    baselines = baselines[baselines["dataset"].isin(points["dataset"])]
    rep.save(ll_vs_k_figure(points, baselines), "ll_vs_K.png")
    return ["## Test log-likelihood against K", "",
            f"{len(points)} trial(s) as points, the best trial per K as a line; the standard prior's best "
            "trial as a horizontal line.", "", "![LL against K](ll_vs_K.png)", ""]


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
    return ["## Best trial per prior", ""] + lines if lines else []


def _curves_section(rep: _Report, client, trials: pd.DataFrame) -> list[str]:
    rows = []
    for r in trials.itertuples(index=False):
        try:
            history = client.get_metric_history(r.run_id, "val_elbo")
        except Exception as exc:
            rep.note(f"trial {r.trial}: cannot read its val_elbo history ({exc})")
            continue
        rows += [(r.run_id, m.step, m.value) for m in history if _finite(m.value)]
    curves = pd.DataFrame(rows, columns=["run_id", "epoch", "val_elbo"])
    rep.result.curves = curves
    if curves.empty:
        rep.note("no trial has logged a validation ELBO yet: no learning curves")
        return []
    rep.save(learning_curves_figure(curves, trials), "learning_curves.png")
    n_asha = int((trials["stop_reason"] == "asha").sum())
    return ["## Learning curves", "",
            f"Validation ELBO per epoch of {curves['run_id'].nunique()} trial(s); a cross marks where ASHA "
            f"stopped a trial ({n_asha} trial(s)).", "", "![learning curves](learning_curves.png)", ""]


def _markdown(result: ReportResult, parents: list, trials: pd.DataFrame, sections: list[str]) -> str:
    lines = [f"# Report: MLflow experiment `{result.experiment}`", "",
             f"- tracking store: `{result.tracking_uri}` (experiment id {result.experiment_id})",
             f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if parents:
        lines.append("- sweeps: " + ", ".join(f"`{p.info.run_name}` ({p.info.run_id}, {p.info.status})"
                                               for p in parents))
    if not trials.empty:
        counts = trials["stop_reason"].replace("", "running/unknown").value_counts()
        lines.append(f"- trials: {len(trials)} ("
                     + ", ".join(f"{n} {reason}" for reason, n in counts.items())
                     + f"); {int(trials['has_ll'].sum())} with a test log-likelihood")
    lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(lines + sections).rstrip() + "\n"
