"""Rung fidelity (sweeper/fidelity.py) on hand-made curves: a rung that ranks the audit trials
upside down says so, a rung with too few trials is not measured, stopped trials are compared with
the winner at their own stop epoch, and `sweeper report` gets the section from MLflow."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from sweeper.fidelity import (TAG_AUDIT, TAG_AUDIT_WOULD_STOP, TrialCurve, asha_rungs, rung_fidelity, spearman)

RUNGS = [10, 30, 90]


def curve(name: str, points: dict[int, float], final: float | None, *, audit: bool = True, stop: str = "early_stopping",
          test_ll: float | None = None, would_stop: int | None = None) -> TrialCurve:
    """A trial whose metric is linear between the given epochs (every epoch has a value, as MLflow holds it)."""
    epochs = sorted(points)
    history = {e: float(np.interp(e, epochs, [points[k] for k in epochs])) for e in range(1, epochs[-1] + 1)}
    return TrialCurve(name, name, history, final, test_ll, stop, audit, would_stop)


def upside_down_sweep() -> list[TrialCurve]:
    """Five audit trials: at epoch 10 their order is exactly the reverse of their end, at 30 it is
    already right, at 90 too (the fast starters plateau, the slow ones overtake them)."""
    trials = []
    for i in range(5):   # i = 4 ends best
        trials.append(curve(f"a{i}", {1: -200.0, 10: -100.0 - i, 30: -95.0 + i, 90: -90.0 + 2 * i, 120: -89.0 + 2 * i},
                            final=-89.0 + 2 * i, test_ll=-92.0 + 2 * i))
    return trials


def test_a_rung_that_ranks_upside_down_says_so() -> None:
    f = rung_fidelity(upside_down_sweep(), RUNGS, max_t=1000)
    by_epoch = {r.epoch: r for r in f.rungs}
    assert f.audit == 5
    assert by_epoch[10].with_final.rho == pytest.approx(-1.0) and by_epoch[10].with_final.n == 5
    assert by_epoch[10].with_final.reading == "upside down"
    assert by_epoch[10].with_final.p == pytest.approx(2 / 120)      # exact: 2 of the 5! pairings are this extreme
    assert by_epoch[10].with_test.rho == pytest.approx(-1.0)
    assert by_epoch[30].with_final.rho == pytest.approx(1.0) and by_epoch[90].with_final.reading == "agrees"
    assert "epoch 10: upside down" in f.verdict
    assert "Stopping at epoch(s) 10 stops trials on a ranking that does not predict the end" in f.verdict
    assert "from epoch 30 on the ranking holds" in f.verdict
    metrics = f.metrics()
    assert metrics["rung_fidelity_val_at_10"] == pytest.approx(-1.0) and metrics["rung_fidelity_n_at_10"] == 5
    assert metrics["rung_fidelity_val_at_30"] == pytest.approx(1.0)
    assert metrics["rung_agreement_10_30"] == pytest.approx(-1.0) and metrics["rung_agreement_n_10_30"] == 5
    text = f.markdown()
    assert "| 10 | 5 | -1.00 | 0.017 | upside down | -1.00 | 5 |" in text
    assert json.loads(json.dumps(f.to_dict()))["rungs"][0]["with_final"]["rho"] == pytest.approx(-1.0)


def test_only_audit_trials_measure_a_rung_and_fewer_than_three_are_not_measured() -> None:
    trials = upside_down_sweep()[:2]
    # Survivors ASHA promoted are a selected few: however they rank, they do not measure the rung.
    trials += [curve(f"s{i}", {1: -150.0, 10: -90.0 + i, 120: -80.0 + i}, final=-80.0 + i, audit=False,
                     stop="completed") for i in range(4)]
    f = rung_fidelity(trials, RUNGS, max_t=1000)
    first = f.rungs[0]
    assert first.with_final.n == 2 and first.with_final.rho is None
    assert first.with_final.why == "2 trial(s); at least 3 are needed"
    assert "rung_fidelity_val_at_10" not in f.metrics() and f.metrics()["rung_fidelity_n_at_10"] == 2
    assert "Not measured at epoch(s) 10, 30, 90" in f.verdict
    none = rung_fidelity([t for t in trials if not t.audit], RUNGS)
    assert none.audit == 0 and "No audit trials" in none.verdict


def test_an_audit_trial_that_ended_before_a_rung_is_counted_only_where_it_was() -> None:
    trials = upside_down_sweep()
    trials[0] = curve("a0", {1: -200.0, 10: -100.0, 20: -99.0}, final=-99.0)     # early stopping at 20
    f = rung_fidelity(trials, RUNGS)
    assert [(r.epoch, r.with_final.n, r.ended_before) for r in f.rungs] == [(10, 5, 0), (30, 4, 1), (90, 4, 1)]


def test_stopped_trials_are_compared_with_the_winner_at_their_own_stop_epoch() -> None:
    winner = curve("w", {1: -150.0, 10: -100.0, 20: -95.0, 200: -80.0}, final=-80.0, audit=False, stop="completed")
    short_winner = curve("w", {1: -150.0, 10: -100.0, 20: -95.0}, final=-80.0, audit=False)
    ahead = curve("ahead", {1: -120.0, 10: -98.0}, final=-97.0, audit=False, stop="scheduler")    # -98 > -100
    behind = curve("behind", {1: -120.0, 10: -105.0}, final=-104.0, audit=False, stop="scheduler")
    late = curve("late", {1: -120.0, 30: -90.0}, final=-90.0, audit=False, stop="scheduler")     # at 30: -92.7 (w)
    budget = curve("budget", {1: -120.0, 50: -70.0}, final=-70.0, audit=False, stop="scheduler")  # ran its max_t
    f = rung_fidelity([winner, ahead, behind, late, budget], RUNGS, max_t=50)
    assert f.winner == "budget"      # the best final value wins unless the sweep's choice is given
    f = rung_fidelity([winner, ahead, behind, late, budget], RUNGS, max_t=50, winner="w")
    assert f.winner == "w"
    assert [(s.name, s.epoch, s.ahead) for s in f.stopped] == [("ahead", 10, True), ("behind", 10, False),
                                                              ("late", 30, True)]
    assert f.stopped[0].winner_value == pytest.approx(-100.0)
    assert f.metrics()["stopped_ahead_of_winner"] == 2 and f.metrics()["stopped_compared_with_winner"] == 3
    assert "2 of the 3 trial(s) the scheduler stopped were ahead of the winner (w)" in f.verdict
    # The winner's history does not reach epoch 30: that stop cannot be compared, and it says so.
    f = rung_fidelity([short_winner, ahead, behind, late], RUNGS, winner="w")
    assert [s.ahead for s in f.stopped] == [True, False, None]
    assert "1 of the 2 trial(s)" in f.verdict and "1 more could not be compared" in f.verdict


def test_audit_trials_asha_would_have_stopped_are_listed_with_how_they_ended() -> None:
    trials = upside_down_sweep()
    trials[4] = curve("a4", {1: -200.0, 10: -104.0, 30: -91.0, 120: -81.0}, final=-81.0, would_stop=10)
    trials[0] = curve("a0", {1: -200.0, 10: -100.0, 30: -95.0, 120: -89.0}, final=-89.0, would_stop=30)
    f = rung_fidelity(trials, RUNGS)
    assert [(w.name, w.epoch, w.rank, w.of, w.winner) for w in f.would_stop] == [("a4", 10, 1, 5, True),
                                                                                 ("a0", 30, 5, 5, False)]
    assert "the winner itself would have been stopped after epoch 10" in f.verdict
    assert f.metrics()["audit_would_stop"] == 2


def test_min_mode_and_test_ll_are_oriented_so_that_plus_one_means_the_same_order() -> None:
    # val_loss: lower is better; the trial with the lowest loss has the highest test LL.
    trials = [curve(f"a{i}", {1: 200.0, 10: 100.0 - i, 40: 90.0 - i}, final=90.0 - i, test_ll=-95.0 + i)
              for i in range(4)]
    f = rung_fidelity(trials, [10, 30], metric="val_loss", mode="min")
    assert f.rungs[0].with_final.rho == pytest.approx(1.0) and f.rungs[0].with_test.rho == pytest.approx(1.0)
    assert f.winner == "a3" and f.final_name == "val_loss at the tested epoch"


def test_ties_and_failed_audit_trials_are_not_measured() -> None:
    trials = [curve(f"a{i}", {1: -200.0, 10: -100.0, 40: -90.0 + i}, final=-90.0 + i) for i in range(4)]
    trials.append(curve("nan", {1: -200.0, 10: -100.0}, final=None, stop="nan"))
    f = rung_fidelity(trials, [10])
    assert f.rungs[0].with_final.rho is None and f.rungs[0].with_final.why == "every value tied"
    assert f.audit == 4 and f.audit_without_final == ["nan"]
    assert "1 audit trial(s) ended without a tested epoch" in f.verdict


@pytest.mark.parametrize("n", [3, 4, 6, 8, 12])
def test_spearman_p_is_exact_for_few_trials(n: int) -> None:
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(size=n)
    c = spearman(list(x), list(y))
    assert c.rho == pytest.approx(spearmanr(x, y).statistic)
    if n <= 8:
        # Spearman's rho of x with every ordering of y by the textbook formula for untied ranks,
        # 1 - 6 sum(d^2) / (n (n^2 - 1)) (scipy per ordering took 20 s at n=8); the first ordering is y.
        rx, ry = rankdata(x), rankdata(y)
        orderings = np.array(list(itertools.permutations(ry)))                 # [n!, n]
        rhos = 1 - 6 * ((orderings - rx) ** 2).sum(axis=1) / (n * (n * n - 1))
        assert rhos[0] == pytest.approx(spearmanr(x, y).statistic)
        assert c.p == pytest.approx(np.mean(np.abs(rhos) >= abs(c.rho) - 1e-9))
    else:
        assert c.p == pytest.approx(spearmanr(x, y).pvalue)


@pytest.mark.parametrize("grace,rf,max_t", [(10, 3, 1000), (10, 3, 100), (1, 2, 4), (1, 2, 6), (3, 2.5, 100),
                                            (10, 4, 10), (5, 1.5, 40)])
def test_asha_rungs_are_the_schedulers(grace, rf, max_t) -> None:
    from sweeper.search import ResumableASHAScheduler

    layout = ResumableASHAScheduler(max_t=max_t, grace_period=grace, reduction_factor=rf)._layout()
    # Ray records a trial at a milestone at the first epoch >= it, and never at max_t (stopped there).
    expected = sorted(int(np.ceil(m)) for m in layout["milestones"][0] if np.ceil(m) < max_t)
    assert asha_rungs(grace, rf, max_t) == expected
    assert asha_rungs(10, 3, 1000) == [10, 30, 90, 270, 810]


def test_the_report_has_a_rung_fidelity_section_per_sweep(tmp_path) -> None:
    """From MLflow as a sweep leaves it: audit tags, per-epoch histories, the parent's spec params."""
    from mlflow.entities import Param

    from sweeper.report import make_report
    from test_report_choices import add_trial, new_store

    uri, client, exp_id, parent = new_store(tmp_path, "fid")
    client.log_batch(parent, params=[Param(k, v) for k, v in {"scheduler.type": "asha", "scheduler.grace_period": "2",
                                                               "scheduler.reduction_factor": "2",
                                                               "scheduler.max_t": "20"}.items()])
    for i in range(4):   # at epoch 2 the order is the reverse of the end
        val = [-200.0, -100.0 - i] + [-95.0 + i + 0.1 * e for e in range(10)]
        run = add_trial(client, exp_id, parent, f"a{i}", prior="vamp", val=val, best_epoch=len(val),
                        test_ll=-90.0 + i)
        client.set_tag(run, TAG_AUDIT, "true")
        if i == 3:
            client.set_tag(run, TAG_AUDIT_WOULD_STOP, "2")
    add_trial(client, exp_id, parent, "stopped", prior="vamp", val=[-200.0, -99.0], best_epoch=2, test_ll=-99.0,
              stop="scheduler")
    make_report("fid", uri, tmp_path / "report", log_to_parent=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Rung fidelity" in text and "### Sweep `fid-1`" in text
    assert "| 2 | 4 | -1.00 | 0.083 | upside down |" in text
    assert "| 4 | 4 | +1.00 |" in text
    assert "1 of the 1 trial(s) the scheduler stopped were ahead of the winner (a3 (trial_a3))" in text
    assert "the winner itself would have been stopped after epoch 2" in text
    assert "Not measured at epoch(s) 16" in text       # no trial got that far
