"""`sweeper report` chooses on validation and compares like with like.

Each test writes a real sqlite MLflow store run by run, as the trainable does (params as strings,
per-epoch metrics with step = epoch, the final metrics at the last step, artifacts), with numbers
chosen so that the trial or configuration that is best on the test set is not the one that is
best on validation at its tested epoch, nor the one whose last epoch is best.
"""

from __future__ import annotations

import base64
import re
import statistics
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.entities import Metric, Param

from sweeper.figures import drawn, ll_vs_k_figure
from sweeper.report import _ordinal, make_report

T0 = 1_700_000_000_000   # ms: the runs' start


def new_store(tmp_path: Path, name: str, metric: tuple[str, str] = ("val_elbo", "max")):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp_id, run_name=f"{name}-1", start_time=T0,
                               tags={"sweeper.role": "sweep", "sweeper.sweep": f"{name}-1"}).info.run_id
    client.log_batch(parent, params=[Param("metric.name", metric[0]), Param("metric.mode", metric[1])])
    client.set_terminated(parent, "FINISHED")
    return uri, client, exp_id, parent


def add_trial(client, exp_id: str, parent: str, name: str, *, prior: str, val: list[float], best_epoch: int | None,
              test_ll: float | None, K: int = 16, lr: float = 5e-4, seed: int = 0, stop: str = "early_stopping",
              log_best_val: bool = True, epoch_s: float = 2.0, end_s: float | None = None,
              test_s: float = 3.0, images: bool = False) -> str:
    """A trial run: val_elbo and epoch_seconds per epoch (one record every epoch_s seconds after its
    start), then best_epoch / best_val_elbo / test_ll and the rest at the last step; the run ends
    `end_s` seconds after its start (a later test evaluation: the wait is not its work)."""
    run_id = client.create_run(exp_id, run_name=name, start_time=T0,
                               tags={"mlflow.parentRunId": parent, "sweeper.role": "trial",
                                     "sweeper.trial_id": name}).info.run_id
    params = {"dataset": "static_mnist", "model": "vae", "prior": prior, "K": K, "lr": lr, "seed": seed,
              "max_epochs": 100, "early_stopping": 50, "test_samples": 5000}
    metrics = []
    for epoch, v in enumerate(val, start=1):
        at = T0 + int(epoch * epoch_s * 1000)
        metrics += [Metric("val_elbo", v, at, epoch), Metric("val_loss", -v, at, epoch),
                    Metric("epoch", float(epoch), at, epoch), Metric("epoch_seconds", epoch_s, at, epoch)]
    last, done = len(val), T0 + int(len(val) * epoch_s * 1000)
    if test_ll is not None:
        final = {"best_epoch": float(best_epoch), "test_ll": test_ll, "test_ll_seconds": test_s}
        if log_best_val:
            final["best_val_elbo"] = val[best_epoch - 1]
        metrics += [Metric(k, v, done, last) for k, v in final.items()]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=metrics)
    if images and test_ll is not None:
        # Per-image LLs whose mean is the run's test LL: the histogram shows which trial it drew.
        values = test_ll + np.linspace(-5, 5, 21)
        client.log_text(run_id, "index,log_likelihood\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(values)),
                        "per_image_ll.csv")
        client.log_image(run_id, np.full((28, 28), 0.5, dtype=np.float32), artifact_file="samples.png")
    client.set_tag(run_id, "stop_reason", stop)
    client.set_terminated(run_id, "FINISHED", end_time=T0 + int(1000 * (end_s or len(val) * epoch_s)))
    return run_id


def test_every_choice_is_made_on_validation_at_the_tested_epoch(tmp_path):
    """Best on test, best at the last epoch and best at the tested epoch are three different
    configurations: the table, the trial shown, the best setting per K and the standard prior's
    line follow the tested epoch's validation ELBO, and the report says so."""
    uri, client, exp_id, parent = new_store(tmp_path, "choices")
    ids = {}
    # K=10: best validation at its tested epoch 2 (-100), then it falls (-130 at the last epoch).
    # Seed 1 is an older run without best_val_elbo: its value is the val_elbo record at best_epoch.
    ids["A0"] = add_trial(client, exp_id, parent, "A0", prior="vamp", K=10, seed=0, val=[-120.0, -100.0, -130.0],
                          best_epoch=2, test_ll=-96.0, images=True)
    ids["A1"] = add_trial(client, exp_id, parent, "A1", prior="vamp", K=10, seed=1, val=[-121.0, -101.0, -131.0],
                          best_epoch=2, test_ll=-94.0, log_best_val=False, images=True)
    # K=100: two learning rates. B1 is better on validation, B2 on test and at the last epoch.
    ids["B1"] = add_trial(client, exp_id, parent, "B1", prior="vamp", K=100, val=[-120.0, -104.0], best_epoch=2,
                          test_ll=-92.0, images=True)
    ids["B2"] = add_trial(client, exp_id, parent, "B2", prior="vamp", K=100, lr=1e-3, val=[-120.0, -106.0, -105.0],
                          best_epoch=3, test_ll=-90.0, images=True)
    # Standard prior: S1 better on validation (its tested epoch), S2 on test.
    ids["S1"] = add_trial(client, exp_id, parent, "S1", prior="standard", val=[-110.0, -108.0, -140.0], best_epoch=2,
                          test_ll=-99.0, images=True)
    ids["S2"] = add_trial(client, exp_id, parent, "S2", prior="standard", lr=1e-3, val=[-115.0, -112.0],
                          best_epoch=2, test_ll=-97.0, images=True)

    result = make_report("choices", uri, tmp_path / "out", log_to_parent=False)

    table = result.table.set_index("prior")
    vamp, std = table.loc["vamp"], table.loc["standard"]
    # Chosen: K=10 (mean tested-epoch val ELBO -100.5), not K=100 lr=1e-3 (best test LL and last epoch).
    assert vamp.config == "K=10, lr=5e-4" and vamp.n_configs == 3
    assert vamp.test_ll_mean == pytest.approx(statistics.mean([-96.0, -94.0]))
    assert vamp.select_mean == pytest.approx(-100.5)                        # A1's value read from its history
    assert set(vamp.run_ids.split(";")) == {ids["A0"], ids["A1"]}
    assert std.config == "lr=5e-4" and std.test_ll_mean == -99.0
    trials = result.trials.set_index("run_id")
    assert trials.at[ids["A1"], "best_val_elbo"] == -101.0 and trials.at[ids["A1"], "select_at"] == "best epoch"

    # The trial shown per prior (images, histogram): the configuration's seed best on validation.
    assert set(result.shown["run_id"]) == {ids["A0"], ids["S1"]}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "vae / vamp: trial A0" in md and "vae / standard: trial S1" in md
    # The test LL ± its SE, from the run's per_image_ll.csv (a run without test_ll_se): std / sqrt(21).
    se = np.std(-96.0 + np.linspace(-5, 5, 21), ddof=1) / np.sqrt(21)
    assert re.search(rf"!\[static_mnist / vae / vamp, K=10: trial A0 \(.*test LL -96\.00 ± {se:.2f}\)\]", md)
    assert "val_elbo -100.00 at epoch 2" in md
    assert "never used to choose" in md and "the highest `val_elbo` at the tested epoch" in md

    # The K figure: at K=100 the line takes B1 (chosen on validation), not B2 (better on test).
    fig = ll_vs_k_figure(result.k_points, result.baselines)
    (line,) = [l for l in fig.axes[0].get_lines() if l.get_gid() == "best_ended"]
    assert list(line.get_xdata()) == [10, 100]
    assert list(line.get_ydata()) == pytest.approx([-95.0, -92.0])
    # The standard prior's line: S1, its configuration chosen on validation.
    (base,) = [l for l in fig.axes[0].get_lines() if l.get_gid() == "baseline"]
    assert list(base.get_ydata()) == [-99.0, -99.0]
    assert "The horizontal line is the standard prior" in md

    listed = pd.read_csv(tmp_path / "out" / "trials.csv").set_index("trial")
    assert listed.at["A1", "best_epoch"] == 2 and listed.at["A1", "best_val_elbo"] == -101.0
    assert listed.at["A1", "last_val_elbo"] == -131.0


def test_the_spec_metric_and_its_direction_choose(tmp_path):
    """A sweep that minimised val_loss: the lowest val_loss at the tested epoch chooses."""
    uri, client, exp_id, parent = new_store(tmp_path, "loss", metric=("val_loss", "min"))
    low = add_trial(client, exp_id, parent, "low", prior="vamp", K=10, val=[-120.0, -100.0], best_epoch=2,
                    test_ll=-96.0)
    add_trial(client, exp_id, parent, "high", prior="vamp", K=20, val=[-120.0, -110.0], best_epoch=2, test_ll=-90.0)
    result = make_report("loss", uri, tmp_path / "out", log_to_parent=False)
    row = result.table.iloc[0]
    assert row.config == "K=10" and row.run_ids == low and row.select_mean == 100.0
    assert "val_loss (chooses)" in (tmp_path / "out" / "report.md").read_text()
    assert "val_loss_at_best_epoch" in pd.read_csv(tmp_path / "out" / "trials.csv").columns


def test_budgets_time_importances_and_the_html_report(tmp_path):
    """The quickstart's shape: the standard prior's trials were cut by the scheduler, the
    VampPrior's ran to their end. The table says so in each row, the K figure's text promises no
    line it does not draw, importances from 3 VampPrior-only trials are left out with the reason,
    times are each trial's own, and report.html shows every figure inline."""
    uri, client, exp_id, parent = new_store(tmp_path, "quick")
    # Cut after 1 epoch, evaluated 60 s after its start (it waited for the other trials).
    cut = add_trial(client, exp_id, parent, "cut", prior="standard", val=[-200.0], best_epoch=1, test_ll=-190.0,
                    stop="scheduler", epoch_s=4.0, end_s=60.0, test_s=2.5)
    for K, last in ((10, -151.0), (30, -150.0)):
        add_trial(client, exp_id, parent, f"v{K}", prior="vamp", K=K, val=[-200.0, -160.0, last], best_epoch=3,
                  test_ll=-140.0, stop="completed", epoch_s=3.0)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client.set_tag(parent, "sweeper.optuna_storage", storage)
    client.set_tag(parent, "sweeper.optuna_study", "quick")
    study = optuna.create_study(study_name="quick", storage=storage, direction="maximize")
    space = {"prior": optuna.distributions.CategoricalDistribution(["standard", "vamp"]),
             "K": optuna.distributions.IntDistribution(5, 50, log=True)}
    for K in (10, 30, 40):
        study.add_trial(optuna.trial.create_trial(params={"prior": "vamp", "K": K}, distributions=space,
                                                  value=-150.0 - K / 100))
    result = make_report("quick", uri, tmp_path / "out", log_to_parent=False)
    out = tmp_path / "out"
    md = (out / "report.md").read_text()

    # Budgets in the rows, flagged: the rows of static_mnist did not train alike.
    table = result.table.set_index("prior")
    assert table.loc["standard", "budget"] == "stopped by the scheduler ×1, epochs 1 (best 1)"
    assert table.loc["vamp", "budget"] == "completed (max_epochs) ×1, epochs 3 (best 3)"
    assert table["budget_differs"].all()
    assert "| ⚠ stopped by the scheduler ×1, epochs 1 (best 1) |" in md and "⚠ in `budget`" in md
    # No standard line is drawn, and the text does not promise one.
    fig = ll_vs_k_figure(result.k_points, result.baselines)
    assert drawn(fig)["baseline"] == 0 and result.baselines.empty
    assert "No standard-prior line: none of its 1 trial(s) with a test LL trained to its end" in md
    assert "is the horizontal line" not in md and "The horizontal line" not in md
    assert "The line joins, per K" in md and drawn(fig)["best_ended"] == 1

    # Importances: 3 completed trials, all vamp: left out, with why.
    assert "Parameter importances are left out" in md and "standard: 0" in md and "K (3 completed" in md
    assert "prior 0.00" not in md and "PED-ANOVA, normalised): " not in md

    # Time: the trial's own (4 s of training, 2.5 s of test evaluation), not the 60 s its run was open.
    listed = pd.read_csv(out / "trials.csv").set_index("run_id")
    assert listed.at[cut, "wall_seconds"] == 4.0 and listed.at[cut, "train_seconds"] == 4.0
    assert listed.at[cut, "test_ll_seconds"] == 2.5
    assert ("| cut | static_mnist | vae | standard |  | 5e-4 | 0 | scheduler | 1 | 1 | -200.00 | -190.00 (SE unknown) "
            "| – | 4 s | 2 s |" in md)
    assert "2nd percentile" in md and "2th" not in md

    # report.md: figures beside it (any markdown viewer); report.html: the same with figures inline.
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all(f"]({name})" in md for name in pngs)
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert {base64.b64decode(s.split(",", 1)[1]) for s in sources} == {(out / n).read_bytes() for n in pngs}
    assert page.count("<table>") == 2 and "<th>val_elbo (chooses)</th>" in page
    assert "<td>⚠ stopped by the scheduler ×1, epochs 1 (best 1)</td>" in page


@pytest.mark.parametrize(("n", "text"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                         (12, "12th"), (13, "13th"), (21, "21st"), (22, "22nd"), (2.5, "2.5th")])
def test_ordinals(n, text):
    assert _ordinal(n) == text
