"""The report's figures: each takes plain frames and returns a matplotlib Figure (no pyplot state)."""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, FuncFormatter, MaxNLocator, NullFormatter

from trainables.vae.catalog import DATASET_ORDER, K_PRIORS, STOP_NAN, STOP_SCHEDULER, short, standard_error

PRIOR_COLORS = {"standard": "#555753", "vamp": "#3465a4", "vamp_data": "#4e9a06", "mog": "#cc0000"}
PRIOR_MARKERS = {"standard": "D", "vamp": "o", "vamp_data": "s", "mog": "^"}
MODEL_LINESTYLES = {"vae": "-", "hvae": "--"}
# Learning curves: the y-axis starts at this percentile of a panel's values (a diverging trial
# would otherwise squash every other curve into a line).
CURVES_LOW_PERCENTILE = 2.0


def finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def drawn(fig: Figure) -> Counter:
    """What a figure shows, by artist gid: points of scatter collections, segments of line
    collections (error bars), one per line. The report's text is written from this, so it says
    what is drawn."""
    seen: Counter = Counter()
    for ax in fig.axes:
        for artist in ax.get_children():
            gid = artist.get_gid()
            if not gid:
                continue
            if hasattr(artist, "get_offsets") and not hasattr(artist, "get_segments"):
                seen[gid] += len(artist.get_offsets())
            elif hasattr(artist, "get_segments"):
                seen[gid] += len(artist.get_segments())
            else:
                seen[gid] += 1
    return seen


def order(values: Iterable[str], first: tuple[str, ...]) -> list[str]:
    """`first`'s names that occur, in its order, then the others by name."""
    values = set(values)
    return [v for v in first if v in values] + sorted(values - set(first))


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


K_POINT_COLUMNS = ["run_id", "trial", "dataset", "model", "prior", "K", "lr", "seed", "epochs", "ended",
                   "stop_reason", "config", "score", "select", "test_ll"]


def k_points_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """The points of the K figure: every trial of a K prior that has a finite test LL.

    `ended`: it trained to its own end (max epochs or early stopping); the others (stopped by the
    scheduler) were cut at `epochs` and are only comparable with trials of the same budget.
    `config`: every param but the seed and K, so seeds of one setting can be averaged per K.
    `score`: what chooses the best setting per K (the spec's metric at the tested epoch, higher is
    better; sweeper.report.with_histories); `select`: that metric as logged (the validation figure's y).
    """
    if trials.empty:
        return pd.DataFrame(columns=K_POINT_COLUMNS)
    keep = trials["has_ll"] & trials["prior"].isin(K_PRIORS) & trials["K"].notna()
    points = trials.loc[keep].copy()
    points["K"] = points["K"].astype(int)
    points["config"] = [tuple(sorted((k, v) for k, v in c.items() if k != "K")) for c in points["config_params"]]
    return points[K_POINT_COLUMNS].reset_index(drop=True)


def _lr_colouring(values: pd.Series):
    """(norm, colormap) when the learning rate varies among the values, else None."""
    from matplotlib import colormaps

    lr = values[np.isfinite(values.astype(float))].astype(float)
    if lr.nunique() < 2:
        return None
    return LogNorm(lr.min(), lr.max()), colormaps["viridis"]


class _SparseMinorLabels(Formatter):
    """A log colour bar's minor ticks: only those at 2x and 5x a power of ten get a label (all of
    them where fewer than two would be labelled), so a bar within one decade does not print 4e-4,
    5e-4, ..., 9e-4 on top of each other."""

    READABLE = (2, 5)

    def __init__(self) -> None:
        self._ticks: list[float] = []

    def set_locs(self, locs) -> None:
        # Our own copy: matplotlib 3.11 deprecates Formatter.locs.
        super().set_locs(locs)
        self._ticks = [float(v) for v in locs]

    def __call__(self, value: float, pos: int | None = None) -> str:
        low, high = sorted(self.axis.get_view_interval()) if self.axis is not None else (0, np.inf)
        in_view = [v for v in self._ticks if v > 0 and low * (1 - 1e-9) <= v <= high * (1 + 1e-9)]
        readable = [v for v in in_view if self._readable(v)]
        if len(readable) >= 2 and not self._readable(value):
            return ""
        return short(value, 2)

    @classmethod
    def _readable(cls, value: float) -> bool:
        mantissa = value / 10 ** np.floor(np.log10(value))
        return any(abs(mantissa - m) < 1e-6 for m in cls.READABLE)


def _plain_ticks(bar) -> None:
    """Colour-bar ticks as numbers people read (500, 2.3e-3), not 10^x."""
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: short(v, 2)))
    bar.ax.yaxis.set_minor_formatter(_SparseMinorLabels())


def _epoch_sizes(epochs: pd.Series | np.ndarray, top: float) -> np.ndarray:
    """Marker area grows with the epochs trained (sqrt: 4x the epochs = 2x the area)."""
    e = np.maximum(np.asarray(epochs, dtype=float), 1.0)
    return 12.0 + 110.0 * np.sqrt(e / max(top, 1.0))


def ll_vs_k_figure(points: pd.DataFrame, baselines: pd.DataFrame | None = None,
                   chosen_on: str = "val_elbo", value: str = "test_ll") -> Figure:
    """Test LL (or, `value="select"`, the validation metric `chosen_on` at the tested epoch)
    against K (log axis), like with like; one panel per dataset.

    - Trials that trained to their own end (filled markers, gid='ended') are comparable with each
      other: the seeds of one setting are averaged per K (error bar: their std, gid='seed_spread'),
      and a line (gid='best_ended') joins, per K, the setting with the best mean `score` (the
      metric `chosen_on`, never the test LL) of each (model, prior), at its mean `value`.
    - Trials the scheduler stopped (hollow markers, gid='stopped') ran a shorter budget: they are
      drawn, never joined, and their budget is visible as the marker size.
    - Marker area grows with the epochs trained; colour is the learning rate (colour bar) when it
      varies, else the prior. Shape: the prior.
    `baselines` (dataset, model, test_ll, n_seeds): the standard prior's configuration chosen on
    validation among its ended trials, a horizontal line (gid='baseline'); test LL figure only.
    """
    if value not in ("test_ll", "select"):
        raise ValueError(f"value: {value!r}; choose 'test_ll' or 'select'")
    testing = value == "test_ll"
    points = points[np.isfinite(points[value].astype(float))] if len(points) else points
    datasets = order(points["dataset"], DATASET_ORDER)
    fig, axes = _panel_grid(len(datasets))
    models = set(points["model"])
    colouring = _lr_colouring(points["lr"])
    top = float(points["epochs"].max()) if len(points) else 1.0

    def colour(frame: pd.DataFrame, prior: str):
        if colouring is None:
            return PRIOR_COLORS.get(prior, "#3465a4")
        norm, cmap = colouring
        return [cmap(norm(v)) for v in frame["lr"].astype(float)]

    for ax, dataset in zip(axes, datasets):
        here = points[points["dataset"] == dataset]
        for (model, prior), s in here.groupby(["model", "prior"], sort=False):
            marker = PRIOR_MARKERS.get(prior, "o")
            label = _series_label(model, prior, models)
            ended, stopped = s[s["ended"]], s[~s["ended"]]
            if len(ended):
                ax.scatter(ended["K"], ended[value], s=_epoch_sizes(ended["epochs"], top), c=colour(ended, prior),
                           marker=marker, alpha=0.55, edgecolors="k", linewidths=0.4, gid="ended",
                           label=f"{label}: trained to its end")
                # Seeds of one setting at one K: mean and spread.
                agg = ended.groupby(["config", "K"], sort=False).agg(
                    mean=(value, "mean"), std=(value, "std"), n=(value, "size"),
                    score=("score", "mean"), lr=("lr", "first")).reset_index()
                spread = agg[agg["n"] > 1]
                if len(spread):
                    bars = ax.errorbar(spread["K"], spread["mean"], yerr=spread["std"], fmt="none", ecolor="k",
                                       elinewidth=1.0, capsize=3)
                    for collection in bars.lines[2]:
                        collection.set_gid("seed_spread")
                # Per K the setting chosen on validation (the first where none has a score), at its test LL.
                chosen = agg.loc[agg["score"].fillna(-np.inf).groupby(agg["K"]).idxmax()].set_index("K").sort_index()
                if len(chosen) > 1:
                    line_style = MODEL_LINESTYLES.get(model, "-")
                    ax.plot(chosen.index, chosen["mean"], line_style, color=PRIOR_COLORS.get(prior, "#3465a4"),
                            lw=1.2, alpha=0.8, gid="best_ended",
                            label=f"{label}: per K, the setting with the best {chosen_on} (seed mean)")
            if len(stopped):
                ax.scatter(stopped["K"], stopped[value], s=_epoch_sizes(stopped["epochs"], top),
                           marker=marker, facecolors="none", edgecolors=colour(stopped, prior), linewidths=1.0,
                           alpha=0.8, gid="stopped", label=f"{label}: stopped by the scheduler (shorter budget)")
        if testing and baselines is not None and not baselines.empty:
            for b in baselines[baselines["dataset"] == dataset].itertuples(index=False):
                seeds = f", mean of {int(b.n_seeds)} seeds" if "n_seeds" in baselines and b.n_seeds > 1 else ""
                ax.axhline(b.test_ll, color=PRIOR_COLORS["standard"], lw=1, gid="baseline",
                           ls=MODEL_LINESTYLES.get(b.model, "-") if b.model != "vae" else ":",
                           label=f"{_series_label(b.model, 'standard', models | {b.model})}: chosen by "
                                 f"{chosen_on}{seeds}")
        ax.set_xscale("log")
        ks = sorted(set(here["K"]))
        if len(ks) <= 8:   # few K values (a grid): label exactly those
            ax.set_xticks(ks)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("K (pseudo-inputs / components)")
        ax.set_ylabel("test log-likelihood (nats)" if testing else f"{chosen_on} at the tested epoch (nats)")
        ax.set_title(dataset)
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        for e in sorted({int(top), max(1, int(round(top / 10)))}):
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="#bbbbbb", markeredgecolor="k",
                                  markersize=math.sqrt(float(_epoch_sizes([e], top)[0]))))
            labels.append(f"{e} epoch(s) trained")
        ax.legend(handles, labels, fontsize=7)
    if colouring is not None:
        norm, cmap = colouring
        from matplotlib.cm import ScalarMappable

        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8)
        bar.set_label("learning rate")
        _plain_ticks(bar)
    what = "Test log-likelihood" if testing else f"Validation {chosen_on}"
    fig.suptitle(f"{what} against K (filled: trained to its end; hollow: stopped by the scheduler)", fontsize=10)
    return fig


def histograms_figure(per_image: list[tuple[str, str, str, np.ndarray, str]]) -> Figure:
    """(dataset, model, prior, per-image LL, budget) of the trial shown per prior (chosen on
    validation), overlaid per dataset; the legend gives each trial's mean ± its standard error (the
    per-image std / sqrt(images)) and budget ('6 epoch(s), early stopping')."""
    datasets = order({d for d, *_ in per_image}, DATASET_ORDER)
    models = {m for _, m, *_ in per_image}
    fig, axes = _panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        here = [(m, p, v, b) for d, m, p, v, b in per_image if d == dataset]
        values = np.concatenate([v for _, _, v, _ in here])
        bins = np.histogram_bin_edges(values, bins=min(60, max(10, values.size // (10 * len(here)))))
        for model, prior, v, budget in here:
            color = PRIOR_COLORS.get(prior)
            ax.hist(v, bins=bins, color=color, alpha=0.35, histtype="stepfilled")
            ax.hist(v, bins=bins, color=color, histtype="step", lw=1.2,
                    label=f"{_series_label(model, prior, models)}: mean {v.mean():.2f} ± "
                          f"{standard_error(v.tolist()):.2f} (SE), {v.size} images\n({budget})")
        ax.set_xlabel("test log-likelihood per image (nats)")
        ax.set_ylabel("images")
        ax.set_title(dataset)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Per-image test log-likelihood of the trial shown per prior")
    return fig


# Each image grid of the best-trial figure is drawn at least this wide: legible, and the same
# scale as the grids the MLflow UI shows (trainables.vae.evaluate.image_grid's nearest-neighbour upscale).
PANEL_PIXELS = 560


def best_trial_figure(title: str, panels: list[tuple[str, np.ndarray]]) -> Figure:
    """Image grids side by side, each at least PANEL_PIXELS wide, pixels kept square and sharp
    (nearest neighbour); values mapped [0, 1] (or 0..255) -> black..white the same way in every panel."""
    dpi = 100
    widths = [img.shape[1] for _, img in panels]
    heights = [img.shape[0] for _, img in panels]
    scale = max(1.0, PANEL_PIXELS / min(widths))          # screen pixels per image pixel
    fig = Figure(figsize=(scale * sum(widths) / dpi + 0.3 * len(panels), scale * max(heights) / dpi + 0.9),
                 dpi=dpi, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), width_ratios=widths, squeeze=False).ravel())
    for ax, (caption, img) in zip(axes, panels):
        if img.ndim == 3:            # PNGs read back as RGB(A) of a gray grid
            img = img[..., 0]
        vmax = 255 if img.dtype == np.uint8 else 1.0
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(caption, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


def curve_colouring(trials: pd.DataFrame):
    """How learning curves are coloured: ('K', norm, cmap) when K varies among the trials of K
    priors, else ('lr', norm, cmap) when the learning rate varies, else ('prior', None, None)."""
    from matplotlib import colormaps

    ks = trials.loc[trials["prior"].isin(K_PRIORS), "K"].dropna().astype(float)
    if ks.nunique() > 1:
        return "K", LogNorm(ks.min(), ks.max()), colormaps["plasma"]
    lr = _lr_colouring(trials["lr"])
    if lr is not None:
        return ("lr",) + lr
    return "prior", None, None


def curves_clip(values: np.ndarray) -> float:
    """The lower y-limit of a learning-curve panel: the CURVES_LOW_PERCENTILE-th percentile of its
    values, or 3 interquartile ranges below the lower quartile where that is higher (few points:
    one diverging trial is more than 2% of them)."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(max(np.percentile(values, CURVES_LOW_PERCENTILE), q1 - 3.0 * (q3 - q1)))


def learning_curves_figure(curves: pd.DataFrame, trials: pd.DataFrame) -> Figure:
    """Validation ELBO per epoch of every trial; one panel per dataset.

    Colour: K (continuous colour map and colour bar; the standard prior, which has no K, in gray)
    when K varies, else the learning rate when it varies, else the prior. Line style: the model.
    A dot (gid='best_epoch') marks each trial's tested (best) epoch, whose weights were restored;
    a cross (gid='scheduler') the last epoch of each trial the scheduler stopped, a triangle
    (gid='nan') the last finite epoch of each trial that diverged. The y-axis starts at the
    CURVES_LOW_PERCENTILE-th percentile of the panel's values, so one diverging trial cannot flatten
    the others (`curves_clip`)."""
    info = trials.set_index("run_id")
    datasets = order(info.loc[curves["run_id"].unique(), "dataset"], DATASET_ORDER)
    models = set(info["model"])
    by, norm, cmap = curve_colouring(info.loc[curves["run_id"].unique()].reset_index())
    fig, axes = _panel_grid(len(datasets), width=5.5)
    for ax, dataset in zip(axes, datasets):
        ids = [r for r in curves["run_id"].unique() if info.at[r, "dataset"] == dataset]
        seen, stops, diverged, tested = set(), [], [], []
        here = curves[curves["run_id"].isin(ids)]
        for run_id, c in here.groupby("run_id", sort=False):
            c = c.sort_values("epoch")
            model, prior = info.at[run_id, "model"], info.at[run_id, "prior"]
            value = info.at[run_id, by] if by != "prior" else None
            if by == "prior":
                color, label = PRIOR_COLORS.get(prior), _series_label(model, prior, models)
            elif value is None or not finite(float(value)):
                color, label = PRIOR_COLORS["standard"], f"{_series_label(model, prior, models)} (no {by})"
            else:
                color, label = cmap(norm(float(value))), None
            ax.plot(c["epoch"], c["val_elbo"], color=color, lw=1, alpha=0.7, gid=run_id,
                    ls=MODEL_LINESTYLES.get(model, "-"), label=None if label in seen else label)
            seen.add(label)
            best = info.at[run_id, "best_epoch"] if "best_epoch" in info else None
            at_best = c[c["epoch"] == best] if best is not None and pd.notna(best) else c.iloc[0:0]
            if len(at_best):
                tested.append((at_best["epoch"].iloc[0], at_best["val_elbo"].iloc[0], color))
            last = (c["epoch"].iloc[-1], c["val_elbo"].iloc[-1])
            if info.at[run_id, "stop_reason"] == STOP_SCHEDULER:
                stops.append(last)
            elif info.at[run_id, "stop_reason"] == STOP_NAN:
                diverged.append(last)
        if tested:
            x, y, colors = zip(*tested)
            ax.scatter(x, y, marker="o", c=list(colors), edgecolors="k", linewidths=0.5, s=18, zorder=3,
                       gid="best_epoch", label="tested (best) epoch")
        if stops:
            x, y = zip(*stops)
            ax.scatter(x, y, marker="x", color="k", s=30, zorder=3, gid="scheduler", label="stopped by the scheduler")
        if diverged:
            x, y = zip(*diverged)
            ax.scatter(x, y, marker="v", color="#cc0000", s=30, zorder=3, gid="nan", label="diverged (NaN)")
        values = here["val_elbo"].to_numpy(dtype=float)
        lo, hi = curves_clip(values), float(values.max())
        if hi > lo:
            ax.set_ylim(lo, hi + 0.05 * (hi - lo))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation ELBO (nats)")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if by != "prior":
        from matplotlib.cm import ScalarMappable

        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8)
        bar.set_label("K (pseudo-inputs / components)" if by == "K" else "learning rate")
        _plain_ticks(bar)
    fig.suptitle("Learning curves (validation ELBO); the lowest values are cut (see the report)")
    return fig


def _axis_values(values: list, log: bool) -> tuple[np.ndarray, list[float], list[str]]:
    """Values of one parallel-coordinates axis scaled to [0, 1], with tick positions and labels."""
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        x = np.log10(np.asarray(values, dtype=float)) if log else np.asarray(values, dtype=float)
        lo, hi = float(x.min()), float(x.max())
        if hi == lo:   # one value: mid-axis, as a single category
            return np.full(len(x), 0.5), [0.5], [short(10 ** lo if log else lo)]
        ticks = np.linspace(lo, hi, 3)
        labels = [short(10 ** t if log else t) for t in ticks]
        return (x - lo) / (hi - lo), list((ticks - lo) / (hi - lo)), labels
    cats = sorted({str(v) for v in values})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return np.array([pos[str(v)] for v in values]), list(pos.values()), cats


def optuna_figure(study, metric: str, importances: dict[str, float],
                  why: str = "too few completed trials") -> Figure:
    """Left: PED-ANOVA importances (bars, gid='importance'), or `why` they are left out. Right: one
    line per COMPLETE trial across the searched parameters and the metric, coloured by the metric
    (gid='trial_lines')."""
    import optuna
    from matplotlib import colormaps

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    params = sorted({k for t in complete for k in t.params}, key=lambda k: -importances.get(k, 0.0))
    fig = Figure(figsize=(13, 4.6), dpi=100, layout="constrained")
    ax_imp, ax_par = fig.subplots(1, 2, width_ratios=[1, 2.4])
    if importances:
        names = list(importances)[::-1]
        ax_imp.barh(names, [importances[n] for n in names], color="#3465a4", gid="importance")
        ax_imp.set_xlabel("importance (PED-ANOVA, normalised)")
    else:
        ax_imp.text(0.5, 0.5, textwrap.fill(why, 40), ha="center", va="center", transform=ax_imp.transAxes,
                    fontsize=9)
        ax_imp.set_axis_off()
    ax_imp.set_title("parameter importance")
    if complete and params:
        axes_names = params + [metric]
        columns = []
        for name in params:
            values = [t.params.get(name) for t in complete]
            present = [v for v in values if v is not None]
            dist = next((t.distributions[name] for t in complete if name in t.distributions), None)
            scaled, ticks, labels = _axis_values(present, bool(getattr(dist, "log", False)))
            full = np.full(len(values), np.nan)
            full[[i for i, v in enumerate(values) if v is not None]] = scaled
            columns.append((full, ticks, labels))
        metric_values = np.array([t.value for t in complete])
        columns.append(_axis_values(list(metric_values), False))
        low, high = float(metric_values.min()), float(metric_values.max())
        norm = Normalize(low, high) if high > low else Normalize(low - 1.0, high + 1.0)
        cmap = colormaps["viridis"]
        xs = np.arange(len(axes_names))
        ys = np.stack([c[0] for c in columns], axis=1)        # [trials, axes]
        lines = []
        for row, value in sorted(zip(ys, metric_values), key=lambda rv: rv[1]):   # best drawn last
            lines.append(ax_par.plot(xs, row, color=cmap(norm(value)), lw=1.2, alpha=0.8)[0])
        for line in lines:
            line.set_gid("trial_lines")
        for x, (_, ticks, labels) in zip(xs, columns):
            ax_par.axvline(x, color="k", lw=0.8)
            for t, label in zip(ticks, labels):
                ax_par.text(x + 0.03, t, label, fontsize=7, va="center")
        ax_par.set_xticks(xs, axes_names)
        ax_par.set_yticks([])
        ax_par.set_xlim(-0.1, len(axes_names) - 0.6)
        ax_par.set_ylim(-0.05, 1.05)
        from matplotlib.cm import ScalarMappable

        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_par, shrink=0.9).set_label(metric)
        ax_par.set_title(f"parallel coordinates: {len(complete)} completed trial(s)")
    else:
        ax_par.text(0.5, 0.5, "no completed trial with parameters", ha="center", va="center",
                    transform=ax_par.transAxes)
        ax_par.set_axis_off()
    fig.suptitle(f"Optuna study {study.study_name!r}")
    return fig
