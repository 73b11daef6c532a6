"""Rung fidelity: did ASHA's rungs rank the trials the way they ended?

ASHA stops a trial at a rung (epochs grace, grace x reduction_factor, ...) when it trails the
trials recorded there. That is only right if the ranking at the rung predicts the ranking at the
end, which nothing guarantees: the KL warm-up, the learning rate and early stopping reorder trials
late. Measuring it needs trials that the scheduler did not stop: the audit trials
(`scheduler.audit` in the spec), a random, seeded choice of the sweep's trials that ASHA records
at its rungs but never stops (sweeper/search.py, `ResumableASHAScheduler`). Their MLflow runs are
tagged `TAG_AUDIT` (and `TAG_AUDIT_WOULD_STOP`, the epoch where ASHA would have stopped them).

`rung_fidelity` is a pure function of the trials' curves (`TrialCurve`: the spec's metric per
epoch, the final outcome, the stop reason, the audit flags) and the rungs' epochs. It gives:

- per rung, Spearman's rank correlation between the audit trials' metric at the rung and their
  final outcome (the metric at the tested epoch: what the sweep chooses on), and with their test
  log-likelihood, shown beside and never used to choose; with n, the number of audit trials behind
  it. Only audit trials: the trials ASHA let through are selected by the rung itself, so their
  correlation is not the rung's;
- for every pair of successive rungs, the correlation among the trials that reached both;
- how many trials the scheduler stopped were ahead of the eventual winner (the trial the sweep
  chooses, on validation) at the epoch they were stopped, compared at that same epoch of the
  winner's own history;
- which audit trials ASHA would have stopped, and how they ended;
- a short verdict. Below 3 trials a correlation is not measured, and it says so.

`log_rung_fidelity` (the driver's end of sweep) and `sweep_fidelity` (`sweeper report`) read the
curves from MLflow and hand them to it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sweeper.spec import AUDIT_MIN
from trainables.vae.catalog import (METRIC_BEST_EPOCH, METRIC_BEST_VAL_ELBO, METRIC_TEST_LL, METRIC_VAL_ELBO,
                                    STOP_SCHEDULER, stop_reason)

# MLflow tags on an audit trial's run (the trial-side names live in trainables/tracking.py; these
# are the driver's: it alone knows which trials are audit trials).
TAG_AUDIT = "sweeper.audit"                        # "true" on an audit trial's run
TAG_AUDIT_WOULD_STOP = "sweeper.audit_would_stop"  # the epoch where ASHA would have stopped it
# ... and on its Optuna trial, as user attributes.
USER_ATTR_AUDIT = "audit"
USER_ATTR_AUDIT_WOULD_STOP = "audit_would_stop"

# Up to this many trials the p-value is exact (every permutation: 8! = 40320); above, scipy's
# t-distribution approximation, which is close from about 10 trials on.
EXACT_P_UP_TO = 8
# How a rank correlation reads (the usual bands: strong, weak, none, reversed).
AGREES, WEAK, REVERSED = 0.7, 0.3, -0.3


def asha_rungs(grace_period: float, reduction_factor: float, max_t: float) -> list[int]:
    """The epochs at which ASHA (one bracket, as `make_scheduler` builds it) records and may stop
    a trial: Ray's milestones grace x rf^k, as the first whole epoch at or after each; the
    milestones at or beyond max_t are left out (a trial is stopped there by its budget, never
    recorded)."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)   # Ray's MAX_RUNGS, s = 0
    return [e for e in (math.ceil(grace_period * reduction_factor ** k) for k in range(count)) if e < max_t]


# --------------------------------------------------------------------------------------------
# The trials, and what is measured


@dataclass(frozen=True)
class TrialCurve:
    """One trial as rung fidelity sees it."""

    run_id: str
    name: str
    history: Mapping[int, float]          # the spec's metric per epoch (MLflow steps = epochs)
    final: float | None = None            # the metric at the tested epoch (what the sweep chooses on)
    test_ll: float | None = None          # shown beside, never used to choose
    stop_reason: str = ""                 # completed, early_stopping, scheduler, nan, error, "" (running)
    audit: bool = False                   # exempt from the scheduler's stops
    would_stop: int | None = None         # an audit trial: the epoch where ASHA would have stopped it

    @property
    def last_epoch(self) -> int | None:
        return max(self.history) if self.history else None

    def at(self, epoch: int) -> float | None:
        value = self.history.get(epoch)
        return value if _finite(value) else None


@dataclass(frozen=True)
class Correlation:
    """Spearman's rank correlation of n pairs; `rho` None when it cannot be measured (`why`)."""

    n: int
    rho: float | None = None
    p: float | None = None      # two-sided; exact (permutations) up to EXACT_P_UP_TO trials
    why: str = ""

    @property
    def reading(self) -> str:
        if self.rho is None:
            return "cannot be measured"
        if self.rho >= AGREES:
            return "agrees"
        if self.rho >= WEAK:
            return "agrees weakly"
        if self.rho > REVERSED:
            return "no better than chance"
        return "upside down"

    def text(self) -> str:
        if self.rho is None:
            return f"cannot be measured ({self.why})"
        p = "" if self.p is None else f", p = {self.p:.2g}"
        return f"ρ = {self.rho:+.2f} (n = {self.n}{p})"


@dataclass(frozen=True)
class RungFidelity:
    """How one rung ranked the audit trials, against their end."""

    epoch: int
    with_final: Correlation     # the metric at the rung vs the final outcome (validation)
    with_test: Correlation      # ... vs the test log-likelihood (beside; never used to choose)
    ended_before: int = 0       # audit trials with a final outcome that ended before this rung


@dataclass(frozen=True)
class RungAgreement:
    """Successive rungs: the ranking at `first` vs at `second`, among trials that reached both."""

    first: int
    second: int
    correlation: Correlation


@dataclass(frozen=True)
class StoppedTrial:
    """A trial the scheduler stopped, against the winner at the epoch it was stopped."""

    name: str
    epoch: int
    value: float
    winner_value: float | None   # None: the winner's history does not reach that epoch
    ahead: bool | None


@dataclass(frozen=True)
class WouldStop:
    """An audit trial that ASHA would have stopped, and how it ended among the audit trials."""

    name: str
    epoch: int
    final: float | None
    rank: int | None      # 1 = the best final outcome among the audit trials
    of: int
    winner: bool = False


@dataclass
class Fidelity:
    metric: str
    mode: str
    rungs: list[RungFidelity]
    successive: list[RungAgreement]
    audit: int                                  # audit trials with a final outcome (behind the correlations)
    audit_without_final: list[str] = field(default_factory=list)   # audit trials that failed or have not ended
    winner: str | None = None
    stopped: list[StoppedTrial] = field(default_factory=list)
    would_stop: list[WouldStop] = field(default_factory=list)
    verdict: str = ""

    @property
    def final_name(self) -> str:
        return METRIC_BEST_VAL_ELBO if self.metric == METRIC_VAL_ELBO else f"{self.metric} at the tested epoch"

    @property
    def stopped_ahead(self) -> int:
        return sum(1 for s in self.stopped if s.ahead)

    @property
    def stopped_compared(self) -> int:
        return sum(1 for s in self.stopped if s.ahead is not None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(final=self.final_name, stopped_ahead_of_winner=self.stopped_ahead,
                   stopped_compared_with_winner=self.stopped_compared)
        return json.loads(json.dumps(out, default=float))   # plain JSON (numpy floats included)

    def metrics(self) -> dict[str, float]:
        """The numbers for the parent run: per rung `rung_fidelity_val_at_<epoch>` (and `_test_at_`,
        `_n_at_`), `rung_agreement_<e1>_<e2>` (and `_n_`), the stopped trials against the winner,
        the audit trials. A correlation that cannot be measured is left out (its n is there)."""
        out: dict[str, float] = {"audit_trials": self.audit, "audit_would_stop": len(self.would_stop)}
        for r in self.rungs:
            out[f"rung_fidelity_n_at_{r.epoch}"] = r.with_final.n
            if r.with_final.rho is not None:
                out[f"rung_fidelity_val_at_{r.epoch}"] = r.with_final.rho
            if r.with_test.rho is not None:
                out[f"rung_fidelity_test_at_{r.epoch}"] = r.with_test.rho
        for a in self.successive:
            out[f"rung_agreement_n_{a.first}_{a.second}"] = a.correlation.n
            if a.correlation.rho is not None:
                out[f"rung_agreement_{a.first}_{a.second}"] = a.correlation.rho
        if self.winner is not None:
            out["stopped_ahead_of_winner"] = self.stopped_ahead
            out["stopped_compared_with_winner"] = self.stopped_compared
        return out

    def text(self) -> str:
        """What the driver prints at the end of the sweep."""
        lines = [f"\nrung fidelity ({self.audit} audit trial(s); Spearman ρ of {self.metric} at each rung with the "
                 f"final {self.final_name}, and with {METRIC_TEST_LL} beside):"]
        for r in self.rungs if self.audit else []:     # without audit trials the verdict says why
            test = f"; with {METRIC_TEST_LL}: {r.with_test.text()}" if r.with_test.rho is not None else ""
            reading = f": {r.with_final.reading}" if r.with_final.rho is not None else ""
            lines.append(f"  epoch {r.epoch}: {r.with_final.text()}{reading}{test}")
        for a in self.successive:
            lines.append(f"  successive rungs {a.first} -> {a.second}: {a.correlation.text()}")
        lines.append(verdict(self, with_rungs=False))
        return "\n".join(lines)

    def markdown(self, title: str = "Rung fidelity", level: int = 2) -> str:
        """The section of rung_fidelity.md and of `sweeper report`."""
        h = "#" * level
        final = self.final_name
        lines = [f"{h} {title}", "", self.verdict, "",
                 f"Per rung: Spearman's rank correlation ρ between the audit trials' `{self.metric}` at the rung "
                 f"and their final `{final}` (the value the sweep chooses on), and with their `{METRIC_TEST_LL}` "
                 f"(beside it; never used to choose). n: the audit trials behind it (those that reached the rung "
                 f"and ended with a tested epoch); p: two-sided, exact (every permutation) up to {EXACT_P_UP_TO} "
                 f"trials. Below {AUDIT_MIN} trials a correlation is not measured. Reading: ρ ≥ {AGREES} agrees, "
                 f"≥ {WEAK} agrees weakly, above {REVERSED} no better than chance, else upside down.", "",
                 "| rung (epoch) | n | ρ with final | p | reading | ρ with test LL | n (test) |",
                 "|---:|---:|---:|---:|:---|---:|---:|"]
        for r in self.rungs:
            v, t = r.with_final, r.with_test
            lines.append(f"| {r.epoch} | {v.n} | {_rho(v)} | {_p(v)} | {v.reading if v.rho is not None else v.why} "
                         f"| {_rho(t)} | {t.n} |")
        if self.successive:
            lines += ["", "Successive rungs: the ranking at one rung against the next, among every trial that "
                          "reached both (audit trials and the ones ASHA promoted).", "",
                      "| rungs | n | ρ | p |", "|:---|---:|---:|---:|"]
            lines += [f"| {a.first} → {a.second} | {a.correlation.n} | {_rho(a.correlation)} | {_p(a.correlation)} |"
                      for a in self.successive]
        if self.stopped:
            lines += ["", f"Trials the scheduler stopped, against the winner `{self.winner}` at the epoch each was "
                          f"stopped (`{self.metric}`; ahead: better than the winner was at that epoch).", "",
                      "| trial | stopped after epoch | value | winner's value | ahead |", "|:---|---:|---:|---:|:---|"]
            lines += [f"| {s.name} | {s.epoch} | {s.value:.2f} | "
                      f"{'' if s.winner_value is None else f'{s.winner_value:.2f}'} | "
                      f"{'—' if s.ahead is None else 'yes' if s.ahead else 'no'} |" for s in self.stopped]
        if self.would_stop:
            lines += ["", f"Audit trials that ASHA would have stopped, and how they ended among the {self.audit} "
                          "audit trials (rank 1: the best final value).", "",
                      f"| trial | would have stopped after epoch | final `{final}` | rank |", "|:---|---:|---:|---:|"]
            lines += [f"| {w.name}{' (the winner)' if w.winner else ''} | {w.epoch} | "
                      f"{'' if w.final is None else f'{w.final:.2f}'} | "
                      f"{'' if w.rank is None else f'{w.rank} of {w.of}'} |" for w in self.would_stop]
        return "\n".join(lines) + "\n"


def _rho(c: Correlation) -> str:
    return "" if c.rho is None else f"{c.rho:+.2f}"


def _p(c: Correlation) -> str:
    return "" if c.p is None else f"{c.p:.2g}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman's ρ of paired values, with its two-sided p-value; not measured below AUDIT_MIN
    pairs or when one side is all ties."""
    from scipy.stats import rankdata, spearmanr

    n = len(x)
    if n < AUDIT_MIN:
        return Correlation(n, why=f"{n} trial(s); at least {AUDIT_MIN} are needed")
    rx, ry = rankdata(x), rankdata(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return Correlation(n, why="every value tied")
    result = spearmanr(x, y)
    rho = float(result.statistic)
    if n <= EXACT_P_UP_TO:
        # Every pairing of the ranks is equally likely when the two are unrelated.
        perms = np.array(list(itertools.permutations(ry)))
        cx = rx - rx.mean()
        cp = perms - perms.mean(axis=1, keepdims=True)
        all_rho = cp @ cx / (np.linalg.norm(cx) * np.linalg.norm(cp, axis=1))
        p = float(np.mean(np.abs(all_rho) >= abs(rho) - 1e-9))
    else:
        p = float(result.pvalue)
    return Correlation(n, rho, p)


# --------------------------------------------------------------------------------------------
# The measurement


def rung_fidelity(trials: Sequence[TrialCurve], rungs: Sequence[int], *, metric: str = METRIC_VAL_ELBO,
                  mode: str = "max", max_t: int | None = None, winner: str | None = None) -> Fidelity:
    """Rung fidelity of one sweep (see the module docstring).

    `rungs`: the epochs at which the scheduler records and may stop trials (`asha_rungs`);
    `max_t`: the scheduler's budget (a trial stopped there ran its budget, it was not cut short);
    `winner`: the run id of the trial the sweep chose, else the trial with the best final value
    (on validation, as the driver's summary chooses). Values are compared the way `mode` says is
    better; every correlation is oriented so that +1 means the same order."""
    sign = 1.0 if mode == "max" else -1.0
    rungs = sorted(set(int(r) for r in rungs))
    audit = [t for t in trials if t.audit and _finite(t.final)]
    unfinished = [t.name for t in trials if t.audit and not _finite(t.final)]

    per_rung = []
    for epoch in rungs:
        there = [t for t in audit if t.at(epoch) is not None]
        ended_before = sum(1 for t in audit if (t.last_epoch or 0) < epoch)
        with_final = spearman([sign * t.at(epoch) for t in there], [sign * t.final for t in there])
        tested = [t for t in there if _finite(t.test_ll)]
        with_test = spearman([sign * t.at(epoch) for t in tested], [t.test_ll for t in tested])
        per_rung.append(RungFidelity(epoch, with_final, with_test, ended_before))

    successive = []
    for first, second in zip(rungs, rungs[1:]):
        both = [t for t in trials if t.at(first) is not None and t.at(second) is not None]
        if both:
            successive.append(RungAgreement(first, second, spearman([t.at(first) for t in both],
                                                                    [t.at(second) for t in both])))

    finals = [t for t in trials if _finite(t.final)]
    chosen = next((t for t in trials if t.run_id == winner), None) if winner else None
    if chosen is None and finals:
        chosen = max(finals, key=lambda t: sign * t.final)

    stopped = []
    for t in trials:
        epoch = t.last_epoch
        if (t is chosen or t.audit or t.stop_reason != STOP_SCHEDULER or epoch is None
                or (max_t is not None and epoch >= max_t) or t.at(epoch) is None):
            continue
        theirs = chosen.at(epoch) if chosen is not None else None
        ahead = None if theirs is None else sign * t.at(epoch) > sign * theirs
        stopped.append(StoppedTrial(t.name, epoch, t.at(epoch), theirs, ahead))

    ranked = sorted(audit, key=lambda t: -sign * t.final)
    rank_of = {t.run_id: i + 1 for i, t in enumerate(ranked)}
    would_stop = [WouldStop(t.name, t.would_stop, t.final if _finite(t.final) else None, rank_of.get(t.run_id),
                            len(audit), t is chosen)
                  for t in trials if t.audit and t.would_stop is not None]
    out = Fidelity(metric, mode, per_rung, successive, len(audit), unfinished,
                   chosen.name if chosen is not None else None, stopped, sorted(would_stop, key=lambda w: w.epoch))
    out.verdict = verdict(out)
    return out


def verdict(f: Fidelity, with_rungs: bool = True) -> str:
    """A few sentences: which rungs rank like the end, what the stops cost, what ASHA would have
    done (`with_rungs`: starting with each rung's correlation, which the console prints as lines)."""
    parts = []
    if not f.audit:
        parts.append("No audit trials ended with a tested epoch (the spec's scheduler.audit), so how well each "
                     "rung ranks the trials cannot be measured in this sweep; the agreement between rungs and the "
                     "stopped trials below are among the trials ASHA itself selected.")
    else:
        measured = [r for r in f.rungs if r.with_final.rho is not None]
        said = [f"epoch {r.epoch}: {r.with_final.reading}, {r.with_final.text()}" for r in measured]
        if said and with_rungs:
            parts.append(f"Ranked at each rung, the {f.audit} audit trials against their final {f.final_name}: "
                         + "; ".join(said) + ".")
        unmeasured = [str(r.epoch) for r in f.rungs if r.with_final.rho is None]
        if unmeasured:
            parts.append(f"Not measured at epoch(s) {', '.join(unmeasured)}: fewer than {AUDIT_MIN} audit trials "
                         "reached them with a tested epoch (or their values were all tied).")
        trusted = [r for r in measured if r.with_final.rho >= AGREES and (r.with_final.p or 0) < 0.05]
        wrong = [r for r in measured if r.with_final.rho < WEAK]
        if wrong:
            first_ok = next((r.epoch for r in trusted if r.epoch > wrong[-1].epoch), None)
            parts.append(f"Stopping at epoch(s) {', '.join(str(r.epoch) for r in wrong)} stops trials on a ranking "
                         "that does not predict the end" + (f"; from epoch {first_ok} on the ranking holds." if first_ok
                                                            else "."))
        elif trusted and len(trusted) == len(measured):
            parts.append("Every measured rung ranks the trials as they end.")
        if any(r.with_final.rho is not None and r.with_final.p is not None and r.with_final.p >= 0.05
               for r in f.rungs):
            parts.append("Where p ≥ 0.05 the correlation could be chance with this few trials: more audit trials "
                         "would tell.")
    if f.audit_without_final:
        parts.append(f"{len(f.audit_without_final)} audit trial(s) ended without a tested epoch (failed, diverged or "
                     "still running) and are not counted.")
    if f.winner is not None and f.stopped:
        compared = f.stopped_compared
        text = (f"{f.stopped_ahead} of the {compared} trial(s) the scheduler stopped were ahead of the winner "
                f"({f.winner}) at the epoch they were stopped")
        missing = len(f.stopped) - compared
        if missing:
            text += f" ({missing} more could not be compared: the winner's history does not reach their epoch)"
        parts.append(text + ".")
    if f.would_stop:
        ranks = ", ".join(f"{w.rank}" for w in f.would_stop if w.rank is not None)
        text = (f"ASHA would have stopped {len(f.would_stop)} of the audit trials; their final ranks among the "
                f"{f.audit} audit trials: {ranks or 'none ended'} (1 = best)")
        winner = next((w for w in f.would_stop if w.winner), None)
        if winner is not None:
            text += f"; the winner itself would have been stopped after epoch {winner.epoch}"
        parts.append(text + ".")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# From MLflow


def curves_from_runs(client, runs: Iterable, metric: str) -> list[TrialCurve]:
    """The trial runs of a sweep as `TrialCurve`s: the metric's history (one read per run), the
    metric at the tested epoch (`best_val_elbo` for val_elbo, else the history at `best_epoch`),
    test LL, stop reason and audit tags. Orphaned runs (see run.mark_lost_trials) are left out."""
    from sweeper import tracking

    out = []
    for run in runs:
        tags, m = run.data.tags, run.data.metrics
        if tracking.TAG_ORPHANED in tags or tags.get(tracking.TAG_ROLE) == tracking.ROLE_SWEEP:
            continue
        history = {int(h.step): float(h.value) for h in client.get_metric_history(run.info.run_id, metric)}
        final = None
        if METRIC_BEST_EPOCH in m:
            best = m.get(METRIC_BEST_VAL_ELBO) if metric == METRIC_VAL_ELBO else None
            final = best if _finite(best) else history.get(int(m[METRIC_BEST_EPOCH]))
        would = tags.get(TAG_AUDIT_WOULD_STOP)
        name = run.info.run_name or run.info.run_id
        if tags.get(tracking.TAG_TRIAL):   # run names repeat where configs do: the trial tells them apart
            name = f"{name} (trial_{tags[tracking.TAG_TRIAL]})"
        out.append(TrialCurve(run.info.run_id, name, history,
                              final if _finite(final) else None,
                              m.get(METRIC_TEST_LL) if _finite(m.get(METRIC_TEST_LL)) else None,
                              stop_reason(tags.get(tracking.TAG_STOP)) or "", tags.get(TAG_AUDIT) == "true",
                              int(float(would)) if would else None))
    return out


def measure(client, runs: Iterable, *, metric: str, mode: str, grace_period: float, reduction_factor: float,
            max_t: int, winner: str | None = None) -> Fidelity:
    """`rung_fidelity` of a sweep's trial runs under the ASHA it ran with."""
    return rung_fidelity(curves_from_runs(client, runs, metric), asha_rungs(grace_period, reduction_factor, max_t),
                         metric=metric, mode=mode, max_t=max_t, winner=winner)


def log_rung_fidelity(spec, tracking_uri: str, experiment_id: str, parent, echo: Callable[[str], None],
                      winner: str | None = None) -> Fidelity | None:
    """At the sweep's end (after its summary): measure, print, and log to the parent run its
    metrics (`Fidelity.metrics`) and rung_fidelity.md / rung_fidelity.json. None under FIFO (no
    rungs). `winner`: the run id of the summary's best trial."""
    from sweeper import tracking

    s = spec.scheduler
    if s.type != "asha":
        return None
    max_t = s.max_t or int(spec.base_config()["max_epochs"])
    fidelity = measure(tracking.client(tracking_uri), tracking.child_runs(tracking_uri, experiment_id, parent.run_id),
                       metric=spec.metric.name, mode=spec.metric.mode, grace_period=s.grace_period,
                       reduction_factor=s.reduction_factor, max_t=max_t, winner=winner)
    echo(fidelity.text())
    parent.log_metrics(fidelity.metrics())
    parent.log_text(fidelity.markdown(), "rung_fidelity.md")
    parent.log_text(json.dumps(fidelity.to_dict(), indent=2) + "\n", "rung_fidelity.json")
    return fidelity


def sweep_fidelity(client, parent, runs: Iterable) -> Fidelity | None:
    """Rung fidelity of one sweep from what MLflow holds (`sweeper report`): its scheduler from the
    parent run's params (the spec, flattened), its trials among `runs`; None for a sweep without
    ASHA."""
    from sweeper import tracking

    params: Mapping[str, str] = parent.data.params
    if params.get("scheduler.type") != "asha":
        return None
    try:
        grace, rf = float(params["scheduler.grace_period"]), float(params["scheduler.reduction_factor"])
        max_t = int(float(params.get("scheduler.max_t") or params["trial.max_epochs"]))
    except (KeyError, ValueError):
        return None     # a sweep logged by an older version: its rungs are not known
    children = [r for r in runs if r.data.tags.get(tracking.TAG_PARENT) == parent.info.run_id]
    metric = params.get("metric.name", METRIC_VAL_ELBO)
    return measure(client, children, metric=metric, mode=params.get("metric.mode", "max"), grace_period=grace,
                   reduction_factor=rf, max_t=max_t, winner=parent.data.tags.get("best_run_id"))
