"""Search and scheduling: the define-by-run space, how Optuna learns how trials ended, and ASHA's
rungs surviving a resume. The calls Ray makes are simulated; no Ray cluster is started."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import ray.cloudpickle
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.variant_generator import generate_variants
from ray.tune.utils.util import flatten_dict

from sweeper.errors import SweeperError
from sweeper.search import (
    PruningAwareOptunaSearch,
    ResumableASHAScheduler,
    SchedulerStateCallback,
    define_by_run_space,
    make_sampler,
    make_scheduler,
    make_search_alg,
    param_space,
    study_storage_url,
    trial_end_state,
)
from sweeper.spec import parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

MAX_EPOCHS = 10


def make_spec(**changes):
    data = {
        "name": "study",
        "trial": {"dataset": "static_mnist", "model": "vae", "max_epochs": MAX_EPOCHS},
        "parameters": {
            "prior": {"distribution": "choice", "values": ["standard", "vamp", "mog"]},
            "K": {"distribution": "int_log_uniform", "min": 10, "max": 1000,
                  "when": {"prior": ["vamp", "mog"]}},
            "lr": {"distribution": "log_uniform", "min": 1.0e-4, "max": 3.0e-3},
            "hidden_dim": {"distribution": "int_uniform", "min": 100, "max": 300},
            "warmup": {"distribution": "choice", "values": [0, 5]},
        },
        "search": {"algorithm": "optuna", "seed": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "num_samples": 8,
        "max_concurrent": 4,
    }
    data.update(changes)
    return parse_spec(data)


def epoch_result(epoch: int, value: float, stop_reason: str | None = None, done: bool = False) -> dict:
    """A flattened result as Ray hands it to the searcher (config included, `done` as Ray sets it)."""
    return flatten_dict({"training_iteration": epoch, "val_elbo": value, "stop_reason": stop_reason,
                         "done": done, "config": {"max_epochs": MAX_EPOCHS}})


def check_sample(config: dict) -> None:
    assert config["prior"] in ("standard", "vamp", "mog")
    assert 1e-4 <= config["lr"] < 3e-3
    assert 100 <= config["hidden_dim"] <= 300 and isinstance(config["hidden_dim"], int)
    assert config["warmup"] in (0, 5)
    if config["prior"] == "standard":
        assert config.get("K") is None     # does not apply: absent (Optuna's space) or None (the trial's)
    else:
        assert 10 <= config["K"] <= 1000 and isinstance(config["K"], int)


def test_define_by_run_space_respects_bounds_and_conditions() -> None:
    space = define_by_run_space(make_spec())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    priors = set()
    for _ in range(60):
        trial = study.ask()
        assert space(trial) is None
        check_sample(trial.params)
        priors.add(trial.params["prior"])
        study.tell(trial, 0.0)
    assert priors == {"standard", "vamp", "mog"}


def test_condition_on_a_fixed_trial_key() -> None:
    spec = make_spec(trial={"dataset": "static_mnist", "prior": "standard", "max_epochs": MAX_EPOCHS},
                     parameters={"K": {"distribution": "int_uniform", "min": 2, "max": 4,
                                       "when": {"prior": ["vamp"]}},
                                 "lr": {"distribution": "uniform", "min": 0.001, "max": 0.002}})
    trial = optuna.create_study().ask()
    define_by_run_space(spec)(trial)
    assert set(trial.params) == {"lr"}


def chained_spec(algorithm: str, priors: list[str]):
    """K tests prior, which itself applies to 2-level models only: a 1-level trial trains with
    the default prior, vamp, so K is searched for it (the default applies, as the spec says)."""
    return make_spec(
        trial={"dataset": "static_mnist", "max_epochs": MAX_EPOCHS},
        parameters={"model": {"distribution": "choice", "values": ["vae", "hvae"]},
                    "prior": {"distribution": "choice", "values": priors, "when": {"model": ["hvae"]}},
                    "K": {"distribution": "int_uniform", "min": 2, "max": 9,
                          "when": {"prior": ["vamp", "mog"] if "mog" in priors else ["vamp"]}}},
        search={"algorithm": algorithm, "seed": 0, **({"sampler": "random"} if algorithm == "optuna" else {})},
        scheduler={"type": "fifo"})


def trained_with(config: dict) -> tuple[str, str, bool]:
    """(model, prior, K searched) of the trial a suggested config gives (None: the default)."""
    from trainables.vae_trainable import split_config

    cfg, _ = split_config({**config, "sweeper": {}})
    return cfg.model, cfg.prior, config.get("K") is not None


@pytest.mark.parametrize("priors,kinds", [
    # Every kind of trial the spec makes, and whether K is searched in it.
    (["standard", "vamp"], {("vae", "vamp", True), ("hvae", "standard", False), ("hvae", "vamp", True)}),
    # Validation accepts 'vamp' in K's condition: not a value of prior, but its default.
    (["standard", "mog"], {("vae", "vamp", True), ("hvae", "standard", False), ("hvae", "mog", True)}),
], ids=["vamp-a-value", "vamp-the-default"])
def test_chained_conditions_mean_the_same_under_optuna_and_random_search(priors, kinds) -> None:
    spec = chained_spec("optuna", priors)
    space, study = define_by_run_space(spec), optuna.create_study(sampler=make_sampler(spec))
    by_optuna = set()
    for _ in range(20):
        trial = study.ask()
        space(trial)      # what Ray's OptunaSearch then passes as the trial's config
        by_optuna.add(trained_with({**spec.trial, **trial.params}))
        study.tell(trial, 0.0)
    space = {"config": param_space(chained_spec("random", priors))}
    rng = np.random.RandomState(0)   # one generator for the sweep, as BasicVariantGenerator keeps
    by_random = {trained_with(s["config"]) for _ in range(20)
                 for _, s in generate_variants(space, random_state=rng)}
    assert by_optuna == kinds
    assert by_random == kinds


@pytest.fixture
def searcher(tmp_path: Path) -> ConcurrencyLimiter:
    return make_search_alg(make_spec(), tmp_path)


def study_trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="study", storage=study_storage_url(tmp_path))
    return study.get_trials(deepcopy=False)


def run_trial(search, trial_id: str, values: list[float], end: dict | None, error: bool = False) -> dict:
    """What Ray does: suggest, one on_trial_result per epoch, then on_trial_complete."""
    config = search.suggest(trial_id)
    check_sample(config)
    for epoch, value in enumerate(values, start=1):
        search.on_trial_result(trial_id, epoch_result(epoch, value))
    search.on_trial_complete(trial_id, result=end, error=error)
    return config


def test_search_alg_shape(tmp_path: Path) -> None:
    search = make_search_alg(make_spec(), tmp_path)
    assert isinstance(search, ConcurrencyLimiter) and search.max_concurrent == 4
    assert isinstance(search.searcher, PruningAwareOptunaSearch)
    assert (tmp_path / "optuna.db").is_file()
    assert study_storage_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    for i in range(4):
        assert search.suggest(f"t{i}") is not None
    assert search.suggest("t4") is None  # the concurrency limit
    random = make_search_alg(make_spec(search={"algorithm": "random", "seed": 3}), tmp_path)
    assert isinstance(random, BasicVariantGenerator)


def test_trials_end_in_the_right_optuna_state(tmp_path: Path, searcher) -> None:
    # Stopped by ASHA after 4 epochs: Ray marks the last result done=True but the trainable set
    # no stop_reason; the last value never went through on_trial_result.
    run_trial(searcher, "asha", [-200, -180, -170], epoch_result(4, -165, None, done=True))
    run_trial(searcher, "completed", [-200 + e for e in range(1, MAX_EPOCHS)],
              epoch_result(MAX_EPOCHS, -150, "completed", done=True))
    run_trial(searcher, "early", [-190, -185], epoch_result(3, -186, "early_stopping", done=True))
    run_trial(searcher, "nan", [-200], epoch_result(2, math.nan, "nan", done=True))
    run_trial(searcher, "error", [-200, -190], None, error=True)
    trials = study_trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE,
                                         TrialState.FAIL, TrialState.FAIL]
    asha, completed, early, nan, error = trials
    assert asha.intermediate_values == {1: -200, 2: -180, 3: -170, 4: -165}
    assert completed.value == -150 and len(completed.intermediate_values) == MAX_EPOCHS
    assert early.value == -186
    assert nan.value is None and nan.intermediate_values == {1: -200}  # no NaN in the curves
    assert error.value is None and error.intermediate_values == {1: -200, 2: -190}


def test_stock_optuna_search_had_the_weakness(tmp_path: Path) -> None:
    """Why the subclass exists: Ray's OptunaSearch calls the ASHA-stopped trial COMPLETE."""
    stock = OptunaSearch(define_by_run_space(make_spec()), metric="val_elbo", mode="max",
                         study_name="stock", storage=optuna.storages.RDBStorage(study_storage_url(tmp_path)))
    run_trial(stock, "asha", [-200, -180], epoch_result(3, -170, None, done=True))
    (trial,) = optuna.load_study(study_name="stock", storage=study_storage_url(tmp_path)).trials
    assert trial.state is TrialState.COMPLETE and trial.value == -170


@pytest.mark.parametrize("result,error,state", [
    (epoch_result(3, -1.0, None, done=True), False, TrialState.PRUNED),
    (epoch_result(3, -1.0, "asha", done=True), False, TrialState.PRUNED),
    (epoch_result(MAX_EPOCHS, -1.0, None, done=True), False, TrialState.COMPLETE),  # ASHA's max_t
    (epoch_result(MAX_EPOCHS, -1.0, "completed", done=True), False, TrialState.COMPLETE),
    (epoch_result(4, -1.0, "early_stopping", done=True), False, TrialState.COMPLETE),
    (epoch_result(4, math.inf, "early_stopping", done=True), False, TrialState.FAIL),
    (epoch_result(4, math.nan, "nan", done=True), False, TrialState.FAIL),
    (epoch_result(4, -1.0, None), True, TrialState.FAIL),
    (None, False, TrialState.PRUNED),  # removed before it ever reported
], ids=["asha", "asha-reason", "max-t", "completed", "early", "inf", "nan", "error", "no-result"])
def test_trial_end_state(result, error, state) -> None:
    assert trial_end_state(result, error, "val_elbo") is state


def test_reaching_an_explicit_max_t_is_complete() -> None:
    result = epoch_result(6, -1.0, None, done=True)
    assert trial_end_state(result, False, "val_elbo", max_t=6) is TrialState.COMPLETE
    assert trial_end_state(result, False, "val_elbo", max_t=8) is TrialState.PRUNED


def test_searcher_state_survives_a_resume(tmp_path: Path) -> None:
    """Tuner.restore: the SearchGenerator saves limiter + searcher to the experiment folder and a
    fresh driver restores them into newly built objects."""
    first = SearchGenerator(make_search_alg(make_spec(), tmp_path))
    config = first.searcher.suggest("t1")
    first.searcher.on_trial_result("t1", epoch_result(1, -200))
    first.searcher.on_trial_result("t1", epoch_result(2, -190))
    run_trial(first.searcher, "t0", [-300], epoch_result(2, -290, None, done=True))
    checkpoint = tmp_path / "experiment"
    checkpoint.mkdir()
    first.save_to_dir(str(checkpoint), session_str="s1")
    # Ray also pickles the searcher into tuner.pkl when the Tuner is built.
    ray.cloudpickle.loads(ray.cloudpickle.dumps(first))

    second = SearchGenerator(make_search_alg(make_spec(), tmp_path))
    assert second.has_checkpoint(str(checkpoint))
    second.restore_from_dir(str(checkpoint))
    limiter = second.searcher
    assert limiter.live_trials == {"t1"}
    # The restored trial replays epoch 2 from its checkpoint, then goes on.
    for epoch, value in ((2, -191), (3, -180)):
        limiter.on_trial_result("t1", epoch_result(epoch, value))
    limiter.on_trial_complete("t1", epoch_result(MAX_EPOCHS, -150, "completed", done=True))
    assert limiter.suggest("t2") is not None
    t1, t0, t2 = study_trials(tmp_path)  # in the order they were suggested
    assert t0.state is TrialState.PRUNED
    assert t1.state is TrialState.COMPLETE and t1.value == -150 and t1.params == {
        k: v for k, v in config.items()}
    assert t1.intermediate_values == {1: -200, 2: -190, 3: -180, MAX_EPOCHS: -150}
    assert t2.state is TrialState.RUNNING and t2.number == 2


def test_trial_finished_in_the_study_before_a_crash_is_left_alone(tmp_path: Path) -> None:
    first = make_search_alg(make_spec(), tmp_path)
    first.suggest("t1")
    first.on_trial_result("t1", epoch_result(1, -200))
    path = tmp_path / "searcher.pkl"
    first.save(str(path))  # checkpoint taken while t1 runs ...
    first.on_trial_complete("t1", epoch_result(2, -190, "early_stopping", done=True))  # ... then told
    second = make_search_alg(make_spec(), tmp_path)
    second.restore(str(path))
    second.searcher.on_trial_result("t1", epoch_result(2, -190))  # no UpdateFinishedTrialError
    second.on_trial_complete("t1", epoch_result(2, -190, "early_stopping", done=True))
    (t1,) = study_trials(tmp_path)
    assert t1.state is TrialState.COMPLETE and t1.value == -190


def test_param_space_for_optuna_is_the_fixed_keys() -> None:
    spec = make_spec()
    assert param_space(spec) == spec.trial


def test_param_space_for_random_search() -> None:
    spec = make_spec(search={"algorithm": "random", "seed": 7},
                     parameters={**make_spec().to_dict()["parameters"],
                                 "seed": {"distribution": "grid", "values": [0, 1, 2]}})
    space = param_space(spec)
    assert space["dataset"] == "static_mnist"
    configs = [s["config"] for _, s in generate_variants({"config": space}, random_state=7)]
    assert len(configs) == 3 and sorted(c["seed"] for c in configs) == [0, 1, 2]
    many = [s["config"] for _ in range(40)
            for _, s in generate_variants({"config": space}, random_state=None)]
    for config in many:
        if config["prior"] == "standard":
            assert config["K"] is None  # condition false: does not apply, the trial keeps its default
        check_sample(config)
    assert {c["prior"] for c in many} == {"standard", "vamp", "mog"}
    from trainables.vae_trainable import split_config

    cfg, _ = split_config({**next(c for c in many if c["prior"] == "standard"), "sweeper": {}})
    assert cfg.prior == "standard" and cfg.K == 500              # None: the default applies
    assert {c["K"] for c in many if c["prior"] != "standard"} - {500}
    again = [s["config"] for _, s in generate_variants({"config": space}, random_state=7)]
    assert again == configs  # search.seed reproduces the sweep


def test_make_scheduler() -> None:
    assert isinstance(make_scheduler(make_spec(scheduler={"type": "fifo"})), FIFOScheduler)
    asha = make_scheduler(make_spec())
    assert isinstance(asha, ResumableASHAScheduler)
    assert [m for m, _ in asha._brackets[0]._rungs] == [8, 4, 2, 1]
    assert asha._metric is None and asha._mode is None  # TuneConfig sets them


def fed_asha(results: list[tuple[str, int, float]]) -> tuple[ResumableASHAScheduler, dict]:
    asha = make_scheduler(make_spec())
    asha.set_search_properties("val_elbo", "max")
    trials: dict[str, SimpleNamespace] = {}
    for trial_id, epoch, value in results:
        if trial_id not in trials:
            trials[trial_id] = SimpleNamespace(trial_id=trial_id)
            asha.on_trial_add(None, trials[trial_id])
        asha.on_trial_result(None, trials[trial_id],
                             {"training_iteration": epoch, "val_elbo": value})
    return asha, trials


def test_asha_rungs_round_trip(tmp_path: Path) -> None:
    history = [(f"t{i}", e, -100.0 * (i + 1) + e) for e in (1, 2, 3, 4) for i in range(5)]
    original, trials = fed_asha(history)
    path = tmp_path / "asha.pkl"
    original.save(str(path))

    restored = make_scheduler(make_spec())
    restored.set_search_properties("val_elbo", "max")
    restored.restore(str(path))
    assert [b._rungs for b in restored._brackets] == [b._rungs for b in original._brackets]
    assert any(recorded for _, recorded in restored._brackets[0]._rungs)
    # Same decisions on new results: a weak newcomer is stopped at the first rung, a strong one not.
    for name, value in (("weak", -1000.0), ("strong", 0.0)):
        decisions = []
        for asha in (original, restored):
            trial = SimpleNamespace(trial_id=name)
            asha.on_trial_add(None, trial)
            decisions.append(asha.on_trial_result(None, trial, {"training_iteration": 1,
                                                                "val_elbo": value}))
        assert decisions[0] == decisions[1]
        assert decisions[0] == (TrialScheduler.STOP if name == "weak" else TrialScheduler.CONTINUE)
    # A fresh scheduler (what Tuner.restore gives) would have let the weak trial go on.
    fresh = make_scheduler(make_spec())
    fresh.set_search_properties("val_elbo", "max")
    fresh.on_trial_add(None, SimpleNamespace(trial_id="weak"))
    assert fresh.on_trial_result(None, SimpleNamespace(trial_id="weak"),
                                 {"training_iteration": 1, "val_elbo": -1000.0}) == TrialScheduler.CONTINUE


def test_scheduler_state_callback_and_layout_check() -> None:
    original, _ = fed_asha([("a", 1, -10.0), ("b", 1, -20.0), ("a", 2, -5.0)])
    state = pickle.loads(pickle.dumps(SchedulerStateCallback(original).get_state()))
    restored = make_scheduler(make_spec())
    SchedulerStateCallback(restored).set_state(state)
    assert restored.state_dict() == original.state_dict()
    assert SchedulerStateCallback(FIFOScheduler()).get_state() is None
    other = make_scheduler(make_spec(scheduler={"type": "asha", "grace_period": 2,
                                                "reduction_factor": 2}))
    with pytest.raises(SweeperError, match="scheduler or max_epochs changed"):
        other.load_state_dict(state["scheduler"])


# --------------------------------------------------------------------------------------------
# The driver's callbacks and Ctrl-C handler (sweeper/callbacks.py, sweeper/run.py), without Ray


def test_a_retried_trial_loses_its_error_tag_and_a_scheduler_stop_is_recorded_over_it(tmp_path: Path) -> None:
    import mlflow
    from types import SimpleNamespace

    from sweeper.callbacks import TrialRunsCallback
    from trainables import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp).info.run_id
    run = tracking.open_trial_run(uri, exp, parent, "t1", "vamp K=5", {"prior": "vamp"}, "s")
    run.set_tags({"stop_reason": "error", "stop_detail": "RuntimeError: pool round failed"})
    run.terminate("FAILED")
    again = tracking.open_trial_run(uri, exp, parent, "t1", "vamp K=5", {"prior": "vamp"}, "s")   # Tune's retry
    assert again.run_id == run.run_id and not again.created
    tags = client.get_run(run.run_id).data.tags
    assert "stop_reason" not in tags and "stop_detail" not in tags
    assert client.get_run(run.run_id).info.status == "RUNNING"
    # It errors again and is retried no more... or the scheduler stops it: the tag says which.
    again.set_tags({"stop_reason": "error"})
    callback = TrialRunsCallback(uri, exp, parent, "asha", "s")
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t1", last_result={"training_iteration": 3}))
    tags = client.get_run(run.run_id).data.tags
    assert tags["stop_reason"] == "scheduler" and tags["sweeper.scheduler"] == "asha"
    assert "after epoch 3" in tags["stop_detail"]


def test_the_time_left_comes_from_tunes_trials_including_those_finished_before_a_resume() -> None:
    from types import SimpleNamespace

    from sweeper.callbacks import TimeLeftCallback, asha_expected_epochs

    assert asha_expected_epochs(10, 3, 1000) == pytest.approx(10 + 20 / 3 + 60 / 9 + 180 / 27 + 540 / 81 + 190 / 243)
    callback = TimeLeftCallback(total_trials=4, max_epochs=100, expected_epochs=None, at_once=2, every_s=1e9)
    trials = [SimpleNamespace(trial_id="a", status="TERMINATED", last_result={"training_iteration": 100}),
              SimpleNamespace(trial_id="b", status="ERROR", last_result={"training_iteration": 7}),
              SimpleNamespace(trial_id="c", status="RUNNING", last_result={"training_iteration": 40})]
    callback.seconds = {"c": 36.0}
    text = callback.estimate(trials)
    # c: 60 epochs left, d (not started): 100; 160 epochs x 36 s / 2 at once = 48 min
    assert "at most ~48 min" in text and "2 trial(s) to go" in text and "36.0 s per epoch" in text


def test_without_asha_the_trials_that_stopped_early_set_the_expected_budget_per_dataset() -> None:
    """The paper's settings stop trials early, each dataset at its own epoch (Caltech 101: 100-245
    of 1000): "at most" alone said ~13.6 h to 3.5 days of a static MNIST study of ~6 h."""
    from sweeper.callbacks import TimeLeftCallback

    def trial(tid, status, epochs, dataset, reason=None):
        result = {"training_iteration": epochs, **({"stop_reason": reason} if reason else {})}
        return SimpleNamespace(trial_id=tid, status=status, last_result=result, config={"dataset": dataset})

    callback = TimeLeftCallback(total_trials=5, max_epochs=1000, expected_epochs=None, at_once=2, every_s=1e9)
    callback.seconds = {"c": 2.0, "d": 2.0}
    running = [trial("c", "RUNNING", 100, "caltech101"), trial("d", "RUNNING", 50, "frey_faces")]
    completed = trial("e", "TERMINATED", 1000, "caltech101", "completed")      # not an early stop
    expected, at_most = callback.seconds_left(running + [completed])
    # (and 2 trials not started yet: 1000 epochs each)
    assert expected is None and at_most == pytest.approx((900 + 950 + 2000) * 2.0 / 2)
    assert "at most ~1.1 h (every trial to 1000 epochs)" in callback.estimate(running + [completed])
    trials = running + [completed, trial("a", "TERMINATED", 300, "caltech101", "early_stopping"),
                        trial("b", "TERMINATED", 200, "caltech101", "early_stopping")]
    expected, at_most = callback.seconds_left(trials)
    # c: Caltech's early stops trained 250 epochs on average, 150 to go; d: no Frey trial ended
    # yet, so every dataset's mean, 200 to go; 2 s per epoch, 2 at once.
    assert expected == pytest.approx((150 * 2.0 + 200 * 2.0) / 2)
    assert at_most == pytest.approx((900 * 2.0 + 950 * 2.0) / 2)
    text = callback.estimate(trials)
    assert text.startswith("time left: ~5 min 50 s expected (the 2 trial(s) that stopped early trained ~250 "
                           "epochs), at most ~31 min:"), text
    # A trial past the mean may stop at any epoch: only its end is left.
    expected, _ = callback.seconds_left([trial("c", "RUNNING", 400, "caltech101")] + trials[1:])
    assert expected == pytest.approx(200 * 2.0 / 2)


def test_the_time_left_counts_the_test_evaluations_of_the_trials_asha_will_stop() -> None:
    """Under ASHA most trials end as an evaluation task (a start-up, then the test), not as their
    own test: the quickstart's estimate ran ~35% low when it counted one cold start for them all."""
    from types import SimpleNamespace

    from sweeper.callbacks import TimeLeftCallback, asha_stopped_share
    from sweeper.evaluations import Evaluations

    assert asha_stopped_share(1, 2, 6) == pytest.approx(1 - 1 / 8)          # rungs 1, 2, 4
    assert asha_stopped_share(10, 3, 1000) == pytest.approx(1 - 3 ** -5)    # rungs 10, 30, 90, 270, 810
    assert asha_stopped_share(10, 3, 10) == 0.0
    callback = TimeLeftCallback(total_trials=4, max_epochs=20, expected_epochs=2.0, at_once=2, every_s=1e9,
                                sweep_id="time-left", finish_guess_epochs=1.0, stopped_test_fraction=0.5,
                                stopped_share=0.75)
    callback.seconds, callback.startup_s = {"a": 1.0, "b": 1.0}, [9.0, 3.0]      # cold 9 s, warm 3 s
    trials = [SimpleNamespace(trial_id=t, status="RUNNING", last_result={"training_iteration": 1}) for t in "ab"]
    # a, b: 1 epoch left; c, d: a start-up and 2 epochs. Each end: 1/4 its own test (1 s), 3/4 an
    # evaluation task, guessed as a cold start-up and half a test (9 + 0.5 s).
    end = 0.25 * 1.0 + 0.75 * 9.5
    expected, at_most = callback.seconds_left(trials)
    assert expected == pytest.approx((2 * 1.0 + 2 * (3.0 + 2.0) + 4 * end) / 2)
    assert at_most == pytest.approx((2 * 19.0 + 2 * (3.0 + 20.0) + 4 * 1.0) / 2)  # nobody stopped: no evaluations
    # Once evaluations have ended, their measured wall time replaces the guess, and those in flight
    # count too.
    Evaluations._BY_SWEEP["time-left"] = Evaluations("sqlite://", spec=None, seconds=[8.0, 12.0],
                                                     in_flight={"x": (None, None, None)})
    try:
        expected, _ = callback.seconds_left(trials)
    finally:
        Evaluations.forget("time-left")
    end = 0.25 * 1.0 + 0.75 * 10.0
    assert expected == pytest.approx((2 * 1.0 + 2 * (3.0 + 2.0) + 4 * end + 10.0) / 2)


# --------------------------------------------------------------------------------------------
# Audit trials: recorded at ASHA's rungs, never stopped by them (sweeper/fidelity.py measures them)


def audited_asha(audit=(1,)) -> ResumableASHAScheduler:
    from ray.air.constants import TRAINING_ITERATION

    asha = ResumableASHAScheduler(time_attr=TRAINING_ITERATION, max_t=10, grace_period=1, reduction_factor=2,
                                  audit=audit)
    asha.set_search_properties("val_elbo", "max")
    return asha


def feed(asha, trial_id: str, epoch: int, value: float) -> str:
    if trial_id not in asha._position:
        asha.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
    return asha.on_trial_result(None, SimpleNamespace(trial_id=trial_id), {"training_iteration": epoch,
                                                                          "val_elbo": value})


def test_an_audit_trial_below_the_cut_off_is_recorded_but_goes_on() -> None:
    asha = audited_asha(audit=(1,))                   # the second trial Tune adds is the audit trial
    assert feed(asha, "a", 1, -10.0) == TrialScheduler.CONTINUE
    assert feed(asha, "b", 1, -1000.0) == TrialScheduler.CONTINUE      # plain ASHA stops it here
    assert feed(asha, "c", 1, -1000.0) == TrialScheduler.STOP          # an ordinary trial below the cut-off
    assert asha.is_audit("b") and not asha.is_audit("a") and asha.audit_trials() == ["b"]
    assert asha.would_have_stopped("b") == 1 and asha.would_have_stopped("a") is None
    rungs = dict(asha._brackets[0]._rungs)
    assert rungs[1] == {"a": -10.0, "b": -1000.0, "c": -1000.0}       # recorded where it would have been
    # The cut-offs the others meet are plain ASHA's on the same results.
    plain = audited_asha(audit=())
    assert [feed(plain, t, 1, v) for t, v in (("a", -10.0), ("b", -1000.0), ("c", -1000.0))] == \
        [TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.STOP]
    assert dict(plain._brackets[0]._rungs)[1] == rungs[1]
    # Past where it would have been stopped, it is recorded at no rung: a dropped trial lowers no later cut-off.
    assert feed(asha, "b", 2, -1.0) == TrialScheduler.CONTINUE
    assert feed(asha, "a", 2, -9.0) == TrialScheduler.CONTINUE
    assert dict(asha._brackets[0]._rungs)[2] == {"a": -9.0}
    asha.on_trial_complete(None, SimpleNamespace(trial_id="b"), {"training_iteration": 8, "val_elbo": -0.5})
    assert "b" not in dict(asha._brackets[0]._rungs)[8]
    # Its budget's end stops it as any trial.
    assert feed(asha, "b", 10, -0.5) == TrialScheduler.STOP
    assert asha._num_stopped == 2         # c, and b at max_t; not b's would-be stop


def test_an_audit_trial_above_the_cut_offs_counts_at_every_rung_as_any_trial() -> None:
    asha = audited_asha(audit=(0,))
    for epoch, value in ((1, -10.0), (2, -9.0), (4, -8.0)):
        assert feed(asha, "a", epoch, value) == TrialScheduler.CONTINUE
    assert asha.would_have_stopped("a") is None
    assert {m: dict(r) for m, r in asha._brackets[0]._rungs if r} == {1: {"a": -10.0}, 2: {"a": -9.0}, 4: {"a": -8.0}}


def test_audit_trials_survive_a_resume_and_a_retry(tmp_path: Path) -> None:
    asha = audited_asha(audit=(1, 2))
    for trial_id, value in (("a", -10.0), ("b", -1000.0), ("c", -5.0)):
        feed(asha, trial_id, 1, value)
    path = tmp_path / "asha.pkl"
    asha.save(str(path))
    # Tuner.restore: a fresh scheduler (here even with another plan), its state loaded, then Tune adds
    # the restored trials again, in any order, and new ones after them.
    restored = audited_asha(audit=(0,))
    restored.restore(str(path))
    for trial_id in ("c", "b", "a", "d"):
        restored.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
    assert sorted(restored.audit_trials()) == ["b", "c"] and not restored.is_audit("d")
    assert restored.would_have_stopped("b") == 1
    assert restored.state_dict()["audit"]["position"] == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert feed(restored, "b", 2, -3.0) == TrialScheduler.CONTINUE and "b" not in dict(restored._brackets[0]._rungs)[2]
    # A retried trial is added again (Tune's on_trial_error path): it keeps its place.
    asha.on_trial_add(None, SimpleNamespace(trial_id="b"))
    assert asha.is_audit("b") and feed(asha, "e", 1, -1.0) == TrialScheduler.CONTINUE and not asha.is_audit("e")
    # A sweep saved before audit trials existed (format 1) resumes without any.
    old = {k: v for k, v in asha.state_dict().items() if k != "audit"} | {"format": 1}
    again = audited_asha(audit=(0,))
    again.load_state_dict(old)
    again.on_trial_add(None, SimpleNamespace(trial_id="a"))
    assert again.audit_trials() == [] and dict(again._brackets[0]._rungs)[1]["b"] == -1000.0
    with pytest.raises(SweeperError, match="format 7"):
        again.load_state_dict(old | {"format": 7})


def test_the_audit_choice_is_random_but_reproducible_for_a_seed() -> None:
    from sweeper.search import audit_plan

    plans = {seed: audit_plan(64, 8, seed) for seed in range(20)}
    assert all(len(p) == 8 and len(set(p)) == 8 and set(p) <= set(range(64)) for p in plans.values())
    assert plans[0] == audit_plan(64, 8, 0) and len(set(plans.values())) == 20
    assert sum(p[0] for p in plans.values()) / 20 < 20      # not simply the first trials, nor the last
    assert audit_plan(8, 0, 0) == () and audit_plan(4, 4, 3) == (0, 1, 2, 3)
    spec = make_spec(scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "audit": 3}, num_samples=8)
    asha = make_scheduler(spec)
    asha.set_search_properties("val_elbo", "max")
    for i in range(8):
        asha.on_trial_add(None, SimpleNamespace(trial_id=f"t{i}"))
    assert [int(t[1:]) for t in asha.audit_trials()] == list(audit_plan(8, 3, spec.search.seed))


def test_the_time_left_counts_audit_trials_at_their_whole_budget() -> None:
    from sweeper.callbacks import asha_expected_epochs
    from sweeper.run import _time_left

    asha = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    plain = _time_left(make_spec(scheduler=asha, num_samples=6), 2, "s")
    audited = _time_left(make_spec(scheduler=asha | {"audit": 3}, num_samples=6), 2, "s")
    assert plain.expected == pytest.approx(asha_expected_epochs(1, 2, MAX_EPOCHS))
    assert audited.expected == pytest.approx((3 * plain.expected + 3 * MAX_EPOCHS) / 6)
