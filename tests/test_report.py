"""`sweeper report`: the table and figures of one MLflow experiment.

Fast tests build experiments run by run with `MlflowClient` (exact numbers, partial states);
the slow ones read the MLflow store of one real small sweep (2 priors x 2 K x 2 seeds, ASHA).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from matplotlib.image import imread
from mlflow.entities import Metric, Param

from sweeper.cli import main
from sweeper.errors import SweeperError
from sweeper.figures import learning_curves_figure, ll_vs_k_figure, optuna_figure
from sweeper.published import PUBLISHED, best_reference, published_ll
from sweeper.report import make_report, study_importances

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Helpers: an experiment written run by run


def new_store(tmp_path: Path, name: str) -> tuple[str, mlflow.MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts" / name).as_uri())
    return uri, client, exp_id


def add_parent(client, exp_id: str, name: str, start_time: int) -> str:
    run = client.create_run(exp_id, run_name=name, start_time=start_time,
                            tags={"sweeper.role": "sweep", "sweeper.sweep": name})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def add_trial(client, exp_id: str, parent: str, *, prior: str, seed: int, K: int = 500,
              dataset: str = "frey_faces", val: list[float] = (), final: dict | None = None,
              status: str = "FINISHED", stop: str = "completed", detail: str = "", lr: float = 0.0005) -> str:
    """A trial run as the trainable writes it: params as strings, val_elbo per epoch, final metrics."""
    tags = {"mlflow.parentRunId": parent, "sweeper.role": "trial", "sweeper.trial_id": f"{prior}-{K}-{seed}-{lr}"}
    run = client.create_run(exp_id, run_name=f"trial_{prior}_{K}_{seed}", tags=tags)
    run_id = run.info.run_id
    params = {"dataset": dataset, "model": "vae", "prior": prior, "K": K, "lr": lr, "seed": seed,
              "max_epochs": 3, "test_samples": 5000, "data_root": "None", "device": "auto"}
    metrics = [Metric("val_elbo", v, 0, epoch) for epoch, v in enumerate(val, start=1)]
    metrics += [Metric("epoch", float(epoch), 0, epoch) for epoch in range(1, len(val) + 1)]
    metrics += [Metric(k, v, 0, len(val)) for k, v in (final or {}).items()]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=metrics)
    if stop:
        client.set_tag(run_id, "stop_reason", stop)
        client.set_tag(run_id, "stop_detail", detail)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


# --------------------------------------------------------------------------------------------
# Fast tests


def test_published_numbers_prefer_the_paper_else_the_first_listed():
    assert published_ll("static_mnist", "vae", "vamp").ll == -85.57
    assert published_ll("static_mnist", "vae", "vamp").source == "paper"
    assert published_ll("static_mnist", "vae", "standard").source == "paper (unverified)"
    fashion = published_ll("fashion_mnist", "vae", "standard")
    assert (fashion.ll, fashion.source) == (-228.70, "Exemplar VAE re-runs")     # listed before SEED
    assert published_ll("caltech101", "vae", "vamp_data").source.startswith("SEED")
    assert published_ll("static_mnist", "hvae", "standard").source == "REF re-run"
    assert published_ll("static_mnist", "vae", "mog") is None
    assert all(p.ll < 0 for p in PUBLISHED)


def test_the_best_reference_is_the_highest_sourced_number():
    assert best_reference("static_mnist", "vae", "vamp").ll == -85.57          # the paper beats the re-runs
    assert best_reference("frey_faces", "vae", "standard").ll == -1799.27     # a REF re-run beats SEED
    assert best_reference("frey_faces", "vae", "vamp_data").source.startswith("SEED")
    assert best_reference("caltech101", "vae", "mog") is None


def test_a_comparison_is_consistent_within_two_combined_standard_errors():
    from sweeper.published import CONSISTENT_SE, PublishedLL, compare

    ref = PublishedLL("static_mnist", "vae", "vamp", -85.57, "paper")
    se = math.sqrt(0.3 ** 2 + 0.3 ** 2)                              # 0.42: 2 SE = 0.85 nats
    assert CONSISTENT_SE == 2.0
    assert compare(-86.40, 0.3, ref, 0.3).verdict == "consistent"     # 0.83 below
    low = compare(-86.45, 0.3, ref, 0.3)                              # 0.88 below
    assert (low.verdict, low.flag) == ("below", True) and low.se == pytest.approx(se)
    assert low.text() == f"⚠ 0.88 nats below -85.57 (paper): {0.88 / se:.1f} combined SE ({se:.2f})"
    high = compare(-84.60, 0.3, ref, 0.3)
    assert (high.verdict, high.flag) == ("above", False) and high.text().startswith("0.97 nats above -85.57")
    unknown = compare(-90.0, float("nan"), ref, 0.3)
    assert (unknown.verdict, unknown.flag) == ("SE unknown", False)
    assert unknown.text() == "4.43 nats below -85.57 (paper); SE unknown: no verdict"
    # Frey Faces: a mean over 200 images with a per-image spread of ~200 nats has an SE of ~14:
    # 2.21 nats below REF's run says nothing, and REF's 200 test images are not ours.
    frey = best_reference("frey_faces", "vae", "vamp")
    reading = compare(-1763.05, 14.0, frey, 14.0)
    assert reading.verdict == "consistent" and "unseeded generator" in reading.text()
    assert best_reference("static_mnist", "vae", "vamp").split == ""


def test_older_runs_get_their_standard_error_from_their_per_image_csv(tmp_path):
    """A run logged before test_ll_se: its SE is computed from per_image_ll.csv (numpy's std,
    ddof=1, / sqrt(N)); a run without that file has an unknown SE. A single run's row shows
    ± its SE; a row far below its reference is flagged; the trials table shows the other choice."""
    import numpy as np

    uri, client, exp_id = new_store(tmp_path, "old")
    parent = add_parent(client, exp_id, "old-1", start_time=1)
    per_image = -87.0 + np.linspace(-30.0, 30.0, 101) ** 3 / 9000.0      # SE ~0.11
    old = add_trial(client, exp_id, parent, prior="vamp", seed=0, dataset="static_mnist", val=[-95.0, -90.0],
                    final={"test_ll": float(per_image.mean()), "best_epoch": 2.0})
    client.log_text(old, "index,log_likelihood\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(per_image)),
                    "per_image_ll.csv")
    bare = add_trial(client, exp_id, parent, prior="standard", seed=0, dataset="static_mnist", val=[-99.0],
                     final={"test_ll": -89.0})
    new = add_trial(client, exp_id, parent, prior="mog", seed=0, dataset="static_mnist", val=[-96.0, -91.0, -92.0],
                    final={"test_ll": -86.0, "test_ll_se": 0.31, "best_epoch": 2.0, "best_epoch_after_warmup": 3.0,
                           "test_ll_after_warmup": -86.4, "test_ll_after_warmup_se": 0.32})
    result = make_report("old", uri, tmp_path / "out", log_to_parent=False)

    trials = result.trials.set_index("run_id")
    se = float(np.std(per_image, ddof=1) / np.sqrt(per_image.size))
    assert trials.at[old, "test_ll_se"] == pytest.approx(se, rel=1e-6)
    assert trials.at[old, "test_ll_se_from"] == "per_image_ll.csv" and trials.at[new, "test_ll_se_from"] == "logged"
    assert math.isnan(trials.at[bare, "test_ll_se"])
    table = result.table.set_index("prior")
    vamp = table.loc["vamp"]
    assert vamp.test_ll_se == pytest.approx(se, rel=1e-6) and vamp.n_seeds == 1
    assert vamp.verdict == "below" and vamp.flag                  # ~1.4 nats below -85.57, 2 SE ~0.8
    assert table.loc["standard"].verdict == "SE unknown" and not table.loc["standard"].flag
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| static_mnist | vae | vamp | {per_image.mean():.2f} ± {se:.2f} (SE) |" in md
    assert "| static_mnist | vae | standard | -89.00 (SE unknown) |" in md
    assert "computed from their per_image_ll.csv" in "\n".join(result.notes)
    assert "| -86.00 ± 0.31 | after_warmup: epoch 3, -86.40 ± 0.32 |" in md
    listed = pd.read_csv(tmp_path / "out" / "trials.csv").set_index("run_id")
    assert listed.at[new, "other_choice"] == "after_warmup" and listed.at[new, "other_test_ll_se"] == 0.32


def test_partial_experiment_table_selection_notes_and_newest_parent(tmp_path):
    uri, client, exp_id = new_store(tmp_path, "frey")
    old = add_parent(client, exp_id, "frey-old", start_time=1_000)
    new = add_parent(client, exp_id, "frey-new", start_time=2_000)
    ll = {}   # run id -> test LL of the trials that finished
    for seed, (v, t) in enumerate([(-2310.0, -2300.0), (-2320.0, -2310.0)]):
        ll[add_trial(client, exp_id, old, prior="standard", seed=seed, val=[-3000.0, -2500.0, v],
                     final={"test_ll": t, "test_ll_se": 15.0, "test_bits_per_dim": -t / (560 * math.log(2))})] = t
    # "asha": what older sweeps called any scheduler stop
    asha = add_trial(client, exp_id, new, prior="standard", seed=2, val=[-3100.0], stop="asha",
                     final={"test_ll": -2400.0, "test_ll_se": 15.0})
    # K=10 has the better test LL but the worse validation ELBO: the table must show K=100.
    for K, vals, tests in ((10, (-2290.0, -2300.0), (-2250.0, -2252.0)), (100, (-2280.0, -2282.0), (-2260.0, -2262.0))):
        for seed in (0, 1):
            add_trial(client, exp_id, new, prior="vamp", K=K, seed=seed, val=[-2900.0, -2600.0, vals[seed]],
                      final={"test_ll": tests[seed]})
    nan = add_trial(client, exp_id, new, prior="vamp", K=10, seed=2, val=[-2900.0, float("nan")], status="FAILED",
                    stop="nan", detail="train_loss became nan at epoch 2 (lr=0.1); lower the learning rate")
    running = add_trial(client, exp_id, new, prior="vamp", K=100, seed=3, val=[-2950.0, -2700.0],
                        status="RUNNING", stop="")
    client.create_run(exp_id, run_name="stray")   # neither a sweep nor a trial
    lost = add_trial(client, exp_id, new, prior="vamp", K=10, seed=9, val=[-2000.0], final={"test_ll": -1.0},
                     status="KILLED", stop="")
    client.set_tag(lost, "sweeper.orphaned", "lost by an interrupted sweep")   # not a trial of the sweep

    result = make_report("frey", uri, tmp_path / "out")

    table = result.table.set_index("prior")
    std = table.loc["standard"]
    tests = [-2300.0, -2310.0, -2400.0]
    assert std.test_ll_mean == pytest.approx(statistics.mean(tests))
    assert std.test_ll_std == pytest.approx(statistics.stdev(tests))
    assert (std.n_seeds, std.n_trials, std.n_configs) == (3, 3, 1)     # K is ignored for `standard`
    assert std.published_ll == -1799.27 and std.published_source.startswith("REF re-run")
    assert std.diff_ll == pytest.approx(statistics.mean(tests) + 1799.27)
    # More than 2 combined standard errors below the best reference: flagged, with the reference beside it.
    # Ours: the per-run SE (15) with the seeds' spread; the reference's: our per-run SE.
    combined = math.sqrt(15.0 ** 2 + statistics.stdev(tests) ** 2 / 3 + 15.0 ** 2)
    assert std.test_ll_se == 15.0 and std.combined_se == pytest.approx(combined)
    assert std.flag and std.verdict == "below" and std.best_reference_ll == -1799.27
    assert std.below_best_reference == pytest.approx(-1799.27 - statistics.mean(tests))
    # bits/dim: the logged metric where there is one, else from the test LL
    assert std.bits_per_dim_mean == pytest.approx(statistics.mean(-t / (560 * math.log(2)) for t in tests))
    assert std.published_bits_per_dim == pytest.approx(1799.27 / (560 * math.log(2)))
    vamp = table.loc["vamp"]
    assert vamp.config == "K=100" and vamp.n_configs == 2 and vamp.n_seeds == 2
    assert vamp.test_ll_mean == pytest.approx(-2261.0) and vamp.test_ll_std == pytest.approx(math.sqrt(2))
    assert set(result.trials["run_id"]) >= {nan, running, asha} and len(result.trials) == 9

    notes = "\n".join(result.notes)
    assert running in notes and "still running" in notes
    assert result.trials.set_index("run_id").at[asha, "stop_reason"] == "scheduler"
    assert nan in notes and "diverged" in notes and "lower the learning rate" in notes
    assert "1 run(s) are neither sweeps nor trials" in notes
    assert "1 run(s) of trials lost by an interrupted sweep" in notes and lost not in set(result.trials["run_id"])
    assert "no per_image_ll.csv" in notes                 # these runs have no artifacts
    md = (tmp_path / "out" / "report.md").read_text()
    assert running in md and "still running" in md
    # Several seeds: mean ± std with n and the typical per-run SE (unknown for these runs: no
    # test_ll_se, no per_image_ll.csv), and then no verdict.
    assert "| frey_faces | vae | vamp | -2261.00 ± 1.41 (std, n=2; SE/run unknown) |" in md
    assert vamp.verdict == "SE unknown" and not vamp.flag and "SE unknown: no verdict" in vamp.check
    assert "have no per_image_ll.csv: their standard error is unknown" in notes
    below = -1799.27 - statistics.mean(tests)
    assert (f"⚠ {below:.2f} nats below -1799.27 (REF re-run (RobertYCXu/vae_vampprior)): "
            f"{below / combined:.1f} combined SE ({combined:.2f})") in md
    # REF's Frey Faces split is another random 200 test images: said in the row and under the table.
    assert "other test images: REF shuffles Frey Faces with an unseeded generator" in std.check
    assert "Other test images: on frey_faces, REF shuffles Frey Faces with an unseeded generator" in md
    assert "2 combined standard errors" in md and "sqrt(SE_ours² + SE_ref²)" in md
    # The running and the NaN trial are left out of the K figure but their curves are drawn.
    assert len(result.k_points) == 4 and running not in set(result.k_points["run_id"])
    assert {running, nan} <= set(result.curves["run_id"])
    assert result.curves["val_elbo"].notna().all()
    figure = learning_curves_figure(result.curves, result.trials)
    marks = {c.get_gid(): len(c.get_offsets()) for ax in figure.axes for c in ax.collections if c.get_gid()}
    assert marks == {"scheduler": 1, "nan": 1}
    names = {p.name for p in result.files}
    assert names == {"table.csv", "trials.csv", "ll_vs_K.png", "val_vs_K.png", "learning_curves.png", "report.md",
                     "report.html"}
    listed = pd.read_csv(tmp_path / "out" / "trials.csv", dtype=str, keep_default_na=False).set_index("run_id")
    assert listed.at[nan, "stop_reason"] == "nan" and listed.at[asha, "epochs"] == "1"
    assert listed.at[asha, "K"] == "" and listed.at[asha, "lr"] == "0.0005"   # blank, not the unused default
    # several sweeps in the experiment: the newest gets the report
    assert result.logged_to == new
    logged = {a.path for a in client.list_artifacts(new, "report")}
    assert logged == {f"report/{n}" for n in names}
    assert not client.list_artifacts(old)


def test_the_K_figure_compares_like_with_like_and_curves_are_coloured_by_K(tmp_path):
    """Mixed budgets: trials that ran to their end are averaged over seeds and joined per K; the
    scheduler's short trials are drawn apart (hollow), never on the line, sized by their epochs."""
    uri, client, exp_id = new_store(tmp_path, "mnist")
    parent = add_parent(client, exp_id, "mnist-1", start_time=1)
    ended = {}
    for K, lls in ((10, (-86.4, -86.0)), (100, (-85.9, -85.7))):
        for seed, ll in enumerate(lls):
            ended[add_trial(client, exp_id, parent, prior="vamp", K=K, seed=seed, dataset="static_mnist",
                            val=[-120.0, -95.0, -90.0 - seed], stop="early_stopping",
                            final={"test_ll": ll, "test_ll_se": 0.3})] = (K, ll)
    # A low-lr trial the scheduler cut after 1 epoch at K=30: a low LL that must not make a dip in the line.
    stopped = add_trial(client, exp_id, parent, prior="vamp", K=30, seed=0, dataset="static_mnist", lr=1e-4,
                        val=[-150.0], stop="scheduler", final={"test_ll": -140.0})
    # A diverging trial: its -1e6 must not squash the other curves.
    add_trial(client, exp_id, parent, prior="vamp", K=10, seed=5, dataset="static_mnist",
              val=[-130.0, -1e6, float("nan")], status="FAILED", stop="nan")
    result = make_report("mnist", uri, tmp_path / "out", log_to_parent=False)

    points = result.k_points.set_index("run_id")
    assert bool(points.at[stopped, "ended"]) is False and all(points.loc[list(ended), "ended"])
    figure = ll_vs_k_figure(result.k_points)
    ax = figure.axes[0]
    by_gid = {}
    for c in ax.collections:
        by_gid.setdefault(c.get_gid(), []).append(c)
    ended_xy = sorted((float(x), float(y)) for c in by_gid["ended"] for x, y in c.get_offsets())
    assert ended_xy == sorted((float(K), ll) for K, ll in ended.values())
    stopped_xy = [(float(x), float(y)) for c in by_gid["stopped"] for x, y in c.get_offsets()]
    assert stopped_xy == [(30.0, -140.0)]
    assert by_gid["stopped"][0].get_facecolors().size == 0 or by_gid["stopped"][0].get_facecolors()[0][3] == 0
    # Marker area grows with the epochs: the 1-epoch trial is drawn smaller than the 3-epoch ones.
    assert by_gid["stopped"][0].get_sizes().max() < by_gid["ended"][0].get_sizes().min()
    # The line joins the seed means per K of the ended trials only: no point at K=30.
    line = [l for l in ax.get_lines() if l.get_gid() == "best_ended"]
    assert len(line) == 1
    assert list(line[0].get_xdata()) == [10, 100]
    assert list(line[0].get_ydata()) == pytest.approx([-86.2, -85.8])
    # Seed spread: at each K an error bar of +-std of the two seeds around their mean.
    (spread,) = by_gid["seed_spread"]
    bars = sorted(v for seg in spread.get_segments() for v in (float(seg[0][0]), float(seg[0][1]), float(seg[1][1])))
    sd10, sd100 = statistics.stdev([-86.4, -86.0]), statistics.stdev([-85.9, -85.7])
    assert bars == pytest.approx(sorted([10, -86.2 - sd10, -86.2 + sd10, 100, -85.8 - sd100, -85.8 + sd100]))
    # lr varies (5e-4 and 1e-4): a colour bar for it.
    assert any(a.get_ylabel() == "learning rate" for a in figure.axes)

    # The validation figure: the same points at the metric every choice is made on (the val_elbo of
    # the tested epoch), joined per K at the seed-mean of that metric, never at the test LL.
    val_of = result.trials.set_index("run_id")["select"]
    validation = ll_vs_k_figure(result.k_points, value="select")
    vax = validation.axes[0]
    val_xy = sorted((float(x), float(y)) for c in vax.collections if c.get_gid() == "ended" for x, y in c.get_offsets())
    assert val_xy == sorted((float(K), float(val_of[run_id])) for run_id, (K, _) in ended.items())
    assert sorted(float(val_of[run_id]) for run_id in ended) == [-91.0, -91.0, -90.0, -90.0]
    (vline,) = [l for l in vax.get_lines() if l.get_gid() == "best_ended"]
    assert list(vline.get_ydata()) == pytest.approx([-90.5, -90.5])
    assert vax.get_ylabel() == "val_elbo at the tested epoch (nats)"
    assert (tmp_path / "out" / "val_vs_K.png").is_file()

    curves = learning_curves_figure(result.curves, result.trials)
    assert len([a for a in curves.axes if a.get_ylabel().startswith("K")]) == 1   # coloured by K, colour bar
    colour = {l.get_gid(): l.get_color() for l in curves.axes[0].get_lines()}
    k_of = result.trials.set_index("run_id")["K"]
    by_k = {}
    for run_id in ended:
        by_k.setdefault(int(k_of[run_id]), set()).add(tuple(colour[run_id]))
    assert len(by_k[10]) == 1 and len(by_k[100]) == 1 and by_k[10] != by_k[100]
    low, high = curves.axes[0].get_ylim()
    assert low > -1e5 and high > -95                             # the -1e6 of the diverged trial is cut
    md = (tmp_path / "out" / "report.md").read_text()
    assert "points, mostly the first epochs, lie below it" in md
    # 0.23 below the paper's -85.57, within 2 combined SEs (2 x 0.44): consistent, not flagged.
    row = result.table.iloc[0]
    assert not row.flag and row.best_reference_ll == -85.57 and row.verdict == "consistent"
    assert "consistent with -85.57 (paper): -0.23 nats, 0.5 combined SE (0.44)" in md


def test_the_optuna_study_gives_importances_and_parallel_coordinates(tmp_path):
    import optuna

    uri, client, exp_id = new_store(tmp_path, "searched")
    parent = add_parent(client, exp_id, "searched-1", start_time=1)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client.set_tag(parent, "sweeper.optuna_storage", storage)
    client.set_tag(parent, "sweeper.optuna_study", "searched")
    study = optuna.create_study(study_name="searched", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["val_elbo"])

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
        K = trial.suggest_int("K", 10, 1000, log=True)
        return -90.0 - 100.0 * abs(math.log10(lr) + 3) + 0.001 * K    # lr matters, K barely

    study.optimize(objective, n_trials=30)
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    result = make_report("searched", uri, tmp_path / "out", log_to_parent=False)

    png = tmp_path / "out" / "optuna_searched-1.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    found = result.studies["searched-1"]
    importances = study_importances(found)
    assert set(importances) == {"lr", "K"} and importances["lr"] > importances["K"]
    figure = optuna_figure(found, "val_elbo", importances)
    imp_ax, par_ax = figure.axes[:2]
    assert len([p for p in imp_ax.patches]) == 2
    lines = [l for l in par_ax.get_lines() if l.get_gid() == "trial_lines"]
    assert len(lines) == 30                                       # completed trials only
    assert [t.get_text() for t in par_ax.get_xticklabels()] == ["lr", "K", "val_elbo"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Search: the Optuna study" in md and "30 COMPLETE, 1 PRUNED" in md and "](optuna_searched-1.png)" in md


def test_only_nan_trials_give_notes_and_the_learning_curves(tmp_path):
    uri, client, exp_id = new_store(tmp_path, "diverged")
    parent = add_parent(client, exp_id, "diverged-1", start_time=1)
    add_trial(client, exp_id, parent, prior="vamp", seed=0, val=[-600.0, float("nan")], status="FAILED",
              stop="nan", detail="train_loss became inf at epoch 2")
    result = CliRunner().invoke(main, ["report", "diverged", "--tracking-uri", uri, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "no trial has a test log-likelihood yet" in result.output and "diverged (NaN)" in result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["learning_curves.png", "report.html", "report.md",
                                                                  "trials.csv"]


def test_an_empty_experiment_gives_a_clear_message(tmp_path):
    uri, client, _ = new_store(tmp_path, "empty")
    out = tmp_path / "empty-report"
    result = CliRunner().invoke(main, ["report", "empty", "--tracking-uri", uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    assert "has no runs yet" in result.output
    assert "has no runs yet" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]


def test_an_unknown_experiment_is_an_error_naming_it_and_the_known_ones(tmp_path):
    uri, _, _ = new_store(tmp_path, "vampprior-priors")
    result = CliRunner().invoke(main, ["report", "vampprior-prior", "--tracking-uri", uri,
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)                    # no traceback
    assert "no MLflow experiment named 'vampprior-prior'" in result.output
    assert "'vampprior-priors'" in result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(SweeperError, match="vampprior-prior"):
        make_report("vampprior-prior", uri, tmp_path / "o")


def test_a_missing_database_is_an_error_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["report", "anything"])           # default: ./mlflow.db
    assert result.exit_code == 1 and "no MLflow database at" in result.output
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------
# On a real sweep


@pytest.fixture(scope="module")
def sweep(shared_datasets, tmp_path_factory):
    """2 priors x 2 K x 2 seeds on a static MNIST subset, 3 epochs, ASHA: ~30 s on 2 CPU cores."""
    from sweeper.run import run_sweep

    tmp = tmp_path_factory.mktemp("report-sweep")
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="report_check", experiment="report-check", num_samples=1, max_concurrent=2,
                search={"algorithm": "random", "seed": 0},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    spec["trial"].update(max_epochs=3, warmup=1, train_subset=500, val_subset=200, test_subset=100,
                         test_samples=50)
    spec["parameters"] = {"prior": {"distribution": "grid", "values": ["standard", "vamp"]},
                          "K": {"distribution": "grid", "values": [4, 16]},
                          "seed": {"distribution": "grid", "values": [0, 1]}}
    path = tmp / "report.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWEEPER_DATA_DIR", str(shared_datasets))
        outcome = run_sweep(path, workdir=tmp, echo=lambda s: None)
    return outcome, tmp


@pytest.fixture(scope="module")
def report(sweep):
    outcome, tmp = sweep
    return make_report("report-check", outcome.tracking_uri, tmp / "report")


def trial_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("report-check")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sweeper.role") == "trial"]


@pytest.mark.slow
def test_every_file_is_produced_valid_and_logged_to_the_sweep(sweep, report):
    outcome, _ = sweep
    out = report.out
    expected = {"table.csv", "trials.csv", "ll_vs_K.png", "val_vs_K.png", "ll_histograms.png", "learning_curves.png",
                "report.md",
                "report.html", "best_static_mnist_vae_standard.png", "best_static_mnist_vae_vamp.png"}
    assert {p.name for p in report.files} == expected
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = imread(png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0, png.name
    csv = pd.read_csv(out / "table.csv")
    assert list(csv["prior"]) == ["standard", "vamp"] and csv["test_ll_mean"].notna().all()
    md = (out / "report.md").read_text()
    assert "| dataset | model | prior | test LL (nats) |" in md
    for png in out.glob("*.png"):
        assert f"]({png.name})" in md                            # every figure is shown in report.md
    assert "compare with care" in md                             # subsets: not the published setting
    assert report.logged_to == outcome.parent_run_id
    client = mlflow.MlflowClient(outcome.tracking_uri)
    assert {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")} == {
        f"report/{n}" for n in expected}


@pytest.mark.slow
def test_the_table_equals_the_runs_metrics(sweep, report):
    outcome, _ = sweep
    runs = [r for r in trial_runs(outcome.tracking_uri) if "test_ll" in r.data.metrics]
    assert len(runs) == 8
    table = report.table.set_index("prior")
    for prior in ("standard", "vamp"):
        mine = [r for r in runs if r.data.params["prior"] == prior]
        # standard ignores K: one configuration; vamp: one per K, chosen by mean validation ELBO
        key = (lambda r: "") if prior == "standard" else (lambda r: r.data.params["K"])
        configs = {}
        for r in mine:
            configs.setdefault(key(r), []).append(r)
        best = max(configs, key=lambda k: statistics.mean(r.data.metrics["val_elbo"] for r in configs[k]))
        per_seed = {}
        for r in configs[best]:
            per_seed.setdefault(r.data.params["seed"], []).append(r.data.metrics["test_ll"])
        seed_means = [statistics.mean(v) for v in per_seed.values()]
        row = table.loc[prior]
        assert row.test_ll_mean == pytest.approx(statistics.mean(seed_means), abs=1e-9)
        assert row.test_ll_std == pytest.approx(statistics.stdev(seed_means), abs=1e-9)
        assert row.n_seeds == 2 and row.n_trials == len(configs[best])
        assert set(row.run_ids.split(";")) == {r.info.run_id for r in configs[best]}
        assert row.config == ("" if prior == "standard" else f"K={best}") or pd.isna(row.config)
        published = {"standard": -88.56, "vamp": -85.57}[prior]
        assert row.published_ll == published
        assert row.diff_ll == pytest.approx(statistics.mean(seed_means) - published)


@pytest.mark.slow
def test_the_K_figure_has_one_point_per_trial(sweep, report):
    outcome, _ = sweep
    vamp = {r.info.run_id: (int(r.data.params["K"]), r.data.metrics["test_ll"])
            for r in trial_runs(outcome.tracking_uri)
            if r.data.params["prior"] == "vamp" and "test_ll" in r.data.metrics}
    assert len(vamp) == 4
    points = report.k_points
    assert len(points) == len(vamp)
    assert {r.run_id: (r.K, r.test_ll) for r in points.itertuples()} == vamp
    figure = ll_vs_k_figure(points)
    offsets = [(float(x), float(y)) for ax in figure.axes for c in ax.collections
               if c.get_gid() in ("ended", "stopped") for x, y in c.get_offsets()]
    assert sorted(offsets) == sorted(vamp.values())
    assert figure.axes[0].get_xscale() == "log"


@pytest.mark.slow
def test_learning_curves_cover_every_trial_and_mark_scheduler_stops(sweep, report):
    outcome, _ = sweep
    runs = trial_runs(outcome.tracking_uri)
    assert set(report.curves["run_id"]) == {r.info.run_id for r in runs}
    for r in runs:   # one point per epoch the run logged
        assert (report.curves["run_id"] == r.info.run_id).sum() == int(r.data.metrics["epoch"])
    stopped = [r for r in runs if r.data.tags["stop_reason"] == "scheduler"]
    assert stopped and all(r.data.tags["sweeper.scheduler"] == "asha" for r in stopped)
    figure = learning_curves_figure(report.curves, report.trials)
    marked = sum(len(c.get_offsets()) for ax in figure.axes for c in ax.collections if c.get_gid() == "scheduler")
    assert marked == len(stopped)


def test_configurations_whose_rounded_labels_coincide_stay_apart():
    from sweeper.report import _config_labels

    group = pd.DataFrame({"config_params": [{"lr": "0.002341", "K": "5"}, {"lr": "0.002344", "K": "5"},
                                            {"lr": "0.002341", "K": "5"}]})
    labels = list(_config_labels(group))
    assert labels[0] == labels[2] != labels[1]
    group = pd.DataFrame({"config_params": [{"lr": "0.0023382678"}, {"lr": "0.001"}]})
    assert list(_config_labels(group)) == ["lr=2.34e-3", "lr=1e-3"]                 # rounded when distinct


@pytest.mark.parametrize(("low", "high", "labels"), [
    (3.5e-4, 2.3e-3, {"5e-4", "1e-3", "2e-3"}),        # one decade of lr: not 4e-4, 6e-4, ..., 9e-4 too
    (13, 48, {"20", "30", "40"}),                      # too few readable ticks in view: label them all
])
def test_a_log_colour_bar_labels_readable_ticks_only(low, high, labels):
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    from sweeper.figures import _plain_ticks

    fig, ax = plt.subplots()
    bar = fig.colorbar(ScalarMappable(norm=LogNorm(low, high), cmap="viridis"), ax=ax)
    _plain_ticks(bar)
    fig.canvas.draw()
    axis = bar.ax.yaxis
    shown = {t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels()
             if t.get_text() and low <= t.get_position()[1] <= high}
    plt.close(fig)
    assert shown == labels
