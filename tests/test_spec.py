"""Sweep specs: the shipped specs validate; invalid ones are rejected with every problem's path."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sweeper.errors import SpecError
from sweeper.spec import REPORTED_METRICS, SweepSpec, load_spec, parse_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))

VALID = {
    "name": "t",
    "trial": {"dataset": "static_mnist", "model": "vae", "prior": "vamp", "max_epochs": 30},
    "parameters": {
        "K": {"distribution": "int_log_uniform", "min": 10, "max": 1000},
        "lr": {"distribution": "log_uniform", "min": 1.0e-4, "max": 3.0e-3},
    },
    "search": {"algorithm": "optuna", "sampler": "tpe", "seed": 0},
    "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 3},
    "num_samples": 4,
    "max_concurrent": 2,
    "resources": {"cpu": 1, "gpu": 0},
}


def problems_of(data, **kwargs) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "spec.yaml", **kwargs)
    assert info.value.exit_code == 2
    assert "spec.yaml" in str(info.value)
    return info.value.problems


def edit(path: str, value) -> dict:
    """VALID with one dotted path set (value DELETE removes the key)."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_validate(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.source == str(path)
    # The round trip through plain data gives the same spec (the driver logs to_dict()).
    assert parse_spec(yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=False)), str(path)) == spec
    # Key order does not matter, not even for conditions on parameters declared below: the same
    # spec, its parameters in an order where each comes after the keys its condition tests.
    shuffled = parse_spec(yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=True)), str(path))
    assert sorted(shuffled.parameters, key=lambda p: p.name) == sorted(spec.parameters, key=lambda p: p.name)
    assert dataclasses.replace(shuffled, parameters=spec.parameters) == spec
    order = [p.name for p in shuffled.parameters]
    assert all(order.index(key) < order.index(p.name) for p in shuffled.parameters for key in p.when
               if key in order)


def test_shipped_specs_are_what_the_issue_asks() -> None:
    by_name = {p.stem: load_spec(p) for p in SPECS}
    assert {"pseudo_inputs", "priors", "quickstart"} <= set(by_name)
    pi = by_name["pseudo_inputs"]
    assert (pi.parameter("K").distribution, pi.parameter("K").min, pi.parameter("K").max) == \
        ("int_log_uniform", 10, 1000)
    assert pi.scheduler.max_t == 1000 and pi.num_samples == 64 and pi.max_concurrent == 8
    priors = by_name["priors"]
    assert priors.search.algorithm == "random" and priors.scheduler.type == "fifo"
    from trainables.vae.data import DATASETS
    from trainables.vae.priors import PRIORS

    assert set(priors.parameter("dataset").values) == set(DATASETS)
    assert set(priors.parameter("prior").values) == set(PRIORS)
    assert priors.total_trials == len(DATASETS) * len(PRIORS) * len(priors.parameter("seed").values)
    quick = by_name["quickstart"]
    assert quick.resources.gpu == 0 and quick.trial["train_subset"] <= 5000


def test_defaults() -> None:
    spec = parse_spec({"name": "d", "trial": {"dataset": "static_mnist"}})
    assert (spec.metric.name, spec.metric.mode) == ("val_elbo", "max")
    assert (spec.search.algorithm, spec.search.sampler, spec.search.seed) == ("optuna", "tpe", 0)
    assert spec.scheduler.type == "fifo"
    assert (spec.num_samples, spec.max_concurrent, spec.max_failures) == (1, 1, 1)
    assert (spec.resources.cpu, spec.resources.gpu) == (1, 0)
    assert spec.experiment == "d" and spec.parameters == ()
    assert set(REPORTED_METRICS) == {"val_elbo", "val_loss", "train_elbo", "train_loss"}


def test_asha_max_t_defaults_to_max_epochs() -> None:
    spec = parse_spec(VALID)
    assert spec.scheduler.max_t == 30
    spec = parse_spec(edit("parameters.max_epochs", {"distribution": "choice", "values": [20, 40]})
                      | {"trial": {"dataset": "static_mnist"}})
    assert spec.scheduler.max_t == 40


INVALID = [
    # (id, data, expected path, expected substring of the message)
    ("unknown-top-key", edit("schedular", {}), "schedular", "did you mean 'scheduler'?"),
    ("unknown-nested-key", edit("scheduler.grace", 3), "scheduler.grace", "did you mean 'grace_period'?"),
    ("unknown-param-key", edit("parameters.K.mn", 3), "parameters.K.mn", "did you mean 'min'?"),
    ("unknown-trial-key", edit("trial.batchsize", 50), "trial.batchsize", "did you mean 'batch_size'?"),
    ("wrong-type-count", edit("num_samples", "many"), "num_samples", "expected an integer, got 'many'"),
    ("wrong-type-trial", edit("trial.max_epochs", "ten"), "trial.max_epochs", "expected an integer"),
    ("wrong-type-bound", edit("parameters.lr.min", "small"), "parameters.lr.min", "expected a number"),
    ("missing-name", edit("name", DELETE), "name", "missing required key"),
    ("missing-trial", edit("trial", DELETE), "trial", "missing required key"),
    ("missing-dataset", edit("trial.dataset", DELETE), "trial.dataset", "missing required key"),
    ("missing-distribution", edit("parameters.K", {"min": 1, "max": 2}),
     "parameters.K.distribution", "missing required key"),
    ("min-ge-max", edit("parameters.K", {"distribution": "int_log_uniform", "min": 1000, "max": 10}),
     "parameters.K.min", "1000 must be < max (10)"),
    ("log-nonpositive", edit("parameters.lr.min", 0.0), "parameters.lr.min", "must be > 0 for log_uniform"),
    ("int-fractional", edit("parameters.K.max", 99.5), "parameters.K.max", "is not an integer"),
    ("float-dist-on-int", edit("parameters.K.distribution", "log_uniform"),
     "parameters.K.distribution", "K is an integer"),
    ("unknown-distribution", edit("parameters.lr.distribution", "loguniform"),
     "parameters.lr.distribution", "did you mean 'log_uniform'?"),
    ("choice-empty", edit("parameters.K", {"distribution": "choice", "values": []}),
     "parameters.K.values", "non-empty list"),
    ("grid-not-list", edit("parameters.K", {"distribution": "grid", "values": 10}),
     "parameters.K.values", "non-empty list"),
    ("unknown-dataset", edit("trial.dataset", "mnist"), "trial.dataset", "unknown dataset 'mnist'"),
    ("unknown-prior", edit("trial.prior", "vampp"), "trial.prior", "did you mean 'vamp'?"),
    ("unknown-model", edit("trial.model", "hvaee"), "trial.model", "did you mean 'hvae'?"),
    ("unknown-prior-in-choice",
     edit("trial.prior", DELETE) | {"parameters": {**VALID["parameters"], "prior": {
         "distribution": "choice", "values": ["vamp", "vampp"]}}},
     "parameters.prior.values", "unknown prior 'vampp'"),
    ("out-of-range-bound", edit("parameters.K.min", 0), "parameters.K.min", "must be > 0"),
    ("param-not-trial-key", edit("parameters.lrr", {"distribution": "uniform", "min": 0, "max": 1}),
     "parameters.lrr", "did you mean 'lr'?"),
    ("fixed-and-searched", edit("trial.K", 500), "parameters.K", "also fixed in trial"),
    ("bad-mode", edit("metric", {"name": "val_elbo", "mode": "maximize"}), "metric.mode", "'max'"),
    ("wrong-direction", edit("metric", {"name": "val_loss", "mode": "max"}), "metric.mode", "use mode: min"),
    ("unreported-metric", edit("metric", {"name": "val_acc"}), "metric.name", "not reported by"),
    ("grace-gt-max-t", edit("trial.max_epochs", 5), "scheduler.grace_period", "must be <= max_t (5"),
    ("reduction-factor", edit("scheduler.reduction_factor", 1), "scheduler.reduction_factor", "must be > 1"),
    ("asha-key-on-fifo", edit("scheduler.type", "fifo"), "scheduler.grace_period", "only used by type asha"),
    ("num-samples-zero", edit("num_samples", 0), "num_samples", "must be >= 1"),
    ("max-concurrent-zero", edit("max_concurrent", 0), "max_concurrent", "must be >= 1"),
    ("negative-resource", edit("resources.cpu", -1), "resources.cpu", "must be >= 0"),
    ("gpu-fraction-gt-1", edit("resources.gpu", 1.5), "resources.gpu", "use 1 or 2"),
    ("no-resources", edit("resources", {"cpu": 0, "gpu": 0}), "resources", "set resources.cpu: 1"),
    ("batched-not-a-choice", edit("resources.batched", "yes"), "resources.batched", "auto, true, false"),
    ("checkpoint-every-0", edit("checkpoint_every", 0), "checkpoint_every", "must be >= 1"),
    ("grid-with-optuna", edit("parameters.K", {"distribution": "grid", "values": [10, 100]}),
     "parameters.K.distribution", "grid needs search.algorithm: random"),
    ("sampler-with-random", edit("search", {"algorithm": "random", "sampler": "tpe"}),
     "search.sampler", "only used by algorithm optuna"),
    ("condition-unknown-key", edit("parameters.K.when", {"priorr": ["vamp"]}),
     "parameters.K.when.priorr", "did you mean 'prior'?"),
    ("condition-on-continuous", edit("parameters.K.when", {"lr": [1e-3]}),
     "parameters.K.when.lr", "conditions can only test choice/grid parameters"),
    ("condition-cycle", edit("parameters", {
        "prior": {"distribution": "choice", "values": ["vamp", "mog"], "when": {"K": [10]}},
        "K": {"distribution": "choice", "values": [10, 20], "when": {"prior": ["vamp"]}}})
     | {"trial": {"dataset": "static_mnist", "max_epochs": 30}},
     "parameters.prior.when", "circular conditions"),
    ("condition-bad-value", edit("parameters.K.when", {"prior": ["vamp", "mogg"]}),
     "parameters.K.when.prior[1]", "unknown prior 'mogg'"),
    ("condition-not-list", edit("parameters.K.when", {"prior": "vamp"}),
     "parameters.K.when.prior", "list of allowed values"),
    # prior is conditional itself: a trial where it does not apply has its default, vamp, so
    # vamp could match; vamp_data is neither one of its values nor that default.
    ("condition-never-matches", edit("parameters", {
        "model": {"distribution": "choice", "values": ["vae", "hvae"]},
        "prior": {"distribution": "choice", "values": ["standard", "mog"], "when": {"model": ["hvae"]}},
        "K": {"distribution": "int_uniform", "min": 2, "max": 9, "when": {"prior": ["vamp", "vamp_data"]}}})
     | {"trial": {"dataset": "static_mnist", "max_epochs": 30}},
     "parameters.K.when.prior[1]", "'vamp_data' is not one of parameters.prior.values ['standard', "
                                   "'mog'] nor its default 'vamp'"),
    ("bad-name", edit("name", "my sweep"), "name", "folder name"),
    ("cuda-without-gpu", edit("trial.device", "cuda"), "trial.device", "resources.gpu is 0"),
]


@pytest.mark.parametrize("data,path,message", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected(data, path, message) -> None:
    problems = problems_of(data)
    matching = [p for p in problems if p.startswith(f"{path}: ")]
    assert matching, f"no problem at {path!r} in {problems}"
    assert any(message in p for p in matching), f"{message!r} not in {matching}"


def test_every_problem_is_reported_at_once() -> None:
    data = edit("schedular", {})
    data["num_samples"] = 0
    data["trial"]["prior"] = "vampp"
    data["parameters"]["K"]["min"] = 5000
    data["parameters"]["lr"]["distribution"] = "loguniform"
    data["resources"]["gpu"] = -1
    problems = problems_of(data)
    paths = {p.partition(": ")[0] for p in problems}
    assert {"schedular", "num_samples", "trial.prior", "parameters.K.min",
            "parameters.lr.distribution", "resources.gpu"} <= paths, problems


@pytest.mark.parametrize("batched,gpu,pooled", [("auto", 0, False), ("auto", 0.25, True), ("auto", 1, False),
                                                 (True, 0, True), (False, 0.25, False)])
def test_trials_sharing_a_gpu_are_batched_unless_the_spec_says_no(batched, gpu, pooled) -> None:
    data = edit("resources", {"cpu": 1, "gpu": gpu, "batched": batched})
    spec = parse_spec(data, "spec.yaml", cluster_resources={"CPU": 4, "GPU": 1})
    assert spec.resources.pooled is pooled
    assert parse_spec(spec.to_dict(), "again.yaml").resources == spec.resources


def test_checkpoint_frequency_defaults_to_every_epoch_and_to_10_for_pooled_trials() -> None:
    assert parse_spec(VALID, "a.yaml").checkpoint_frequency == 1
    pooled = parse_spec(edit("resources.batched", True), "b.yaml")
    assert pooled.checkpoint_frequency == 10
    chosen = edit("resources.batched", True)
    chosen["checkpoint_every"] = 3
    spec = parse_spec(chosen, "c.yaml")
    assert spec.checkpoint_frequency == 3 and parse_spec(spec.to_dict(), "d.yaml") == dataclasses_replace(spec)


def dataclasses_replace(spec: SweepSpec) -> SweepSpec:
    """The spec as parse_spec gives it back from its own to_dict (only the source differs)."""
    import dataclasses

    return dataclasses.replace(spec, source="d.yaml")


def test_cluster_resources() -> None:
    parse_spec(VALID, cluster_resources={"CPU": 2, "GPU": 0})
    problems = problems_of(edit("resources.gpu", 0.25), cluster_resources={"CPU": 2, "GPU": 0})
    assert any(p.startswith("resources.gpu: ") and "no GPU" in p and "--set resources.gpu=0" in p
               for p in problems), problems
    problems = problems_of(edit("resources.cpu", 4), cluster_resources={"CPU": 2.0, "GPU": 0})
    assert any(p.startswith("resources.cpu: ") and "has 2" in p for p in problems), problems
    parse_spec(edit("resources.gpu", 0.25), cluster_resources={"CPU": 2, "GPU": 1})


NO_GPU = {"CPU": 2, "GPU": 0}


def fixes_in(problem: str) -> list[str]:
    """The `--set` overrides a problem's message proposes (after 'e.g.')."""
    return re.findall(r"--set (\S+)", problem.partition("e.g. ")[2])


@pytest.mark.parametrize("gpu", [0, 1, 0.25])
def test_cuda_on_a_machine_without_gpu_gets_one_message_whose_fix_works(gpu, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(edit("trial.device", "cuda") | {"resources": {"cpu": 1, "gpu": gpu}}))
    with pytest.raises(SpecError) as info:
        load_spec(path, cluster_resources=NO_GPU)
    (problem,) = info.value.problems     # one message, not one per field
    assert problem.startswith("trial.device: 'cuda' needs a GPU and the cluster has none"), problem
    assert "resources.gpu (e.g. 1" not in problem          # a fix that would only move the problem
    fixes = fixes_in(problem)
    assert fixes == ["trial.device=auto"] + (["resources.gpu=0"] if gpu else [])
    spec = load_spec(path, fixes, cluster_resources=NO_GPU)
    assert spec.trial["device"] == "auto" and spec.resources.gpu == 0


POOLED_DEVICES = [
    # (device, resources, cluster, None when accepted, else what the message must say)
    ("auto", {"gpu": 0.25}, {"CPU": 8, "GPU": 1}, None),
    ("cuda", {"gpu": 0.25}, {"CPU": 8, "GPU": 1}, None),
    ("cuda:0", {"gpu": 0.25}, {"CPU": 8, "GPU": 1}, None),
    ("cuda", {"gpu": 2, "batched": True}, {"CPU": 8, "GPU": 2}, None),
    ("auto", {"gpu": 0, "batched": True}, NO_GPU, None),
    ("cpu", {"gpu": 0, "batched": True}, NO_GPU, None),
    ("cuda:1", {"gpu": 0.25}, {"CPU": 8, "GPU": 2}, "use device: auto"),
    ("cuda:1", {"gpu": 2, "batched": True}, {"CPU": 8, "GPU": 2}, "or resources.batched: false"),
    ("cpu", {"gpu": 0.25}, {"CPU": 8, "GPU": 1}, "or resources.batched: false"),
    ("mps", {"gpu": 0.25}, None, "or resources.batched: false"),
    ("mps", {"gpu": 0, "batched": True}, NO_GPU, "or resources.batched: false"),
]


@pytest.mark.parametrize("device,resources,cluster,refusal", POOLED_DEVICES,
                         ids=[f"{d}-{r}" for d, r, _, _ in POOLED_DEVICES])
def test_pooled_trials_train_on_their_pools_device_or_are_refused(device, resources, cluster, refusal) -> None:
    data = edit("trial.device", device) | {"resources": {"cpu": 1, **resources}}
    if refusal is None:
        spec = parse_spec(data, cluster_resources=cluster)
        assert spec.resources.pooled and spec.trial["device"] == device
        return
    (problem,) = problems_of(data, cluster_resources=cluster)
    assert problem.startswith(f"trial.device: {device!r}: pooled trials ("), problem
    assert refusal in problem
    # Each way out the message offers validates: device auto, or (where it says so) unpooled.
    parse_spec(edit("trial.device", "auto") | {"resources": data["resources"]}, cluster_resources=cluster)
    if "resources.batched: false" in problem:
        alone = parse_spec(data | {"resources": {**data["resources"], "batched": False}}, cluster_resources=cluster)
        assert not alone.resources.pooled


def test_searched_devices_are_checked_value_by_value() -> None:
    data = edit("parameters.device", {"distribution": "choice", "values": ["auto", "cpu", "cuda"]})
    problems = problems_of(data | {"resources": {"cpu": 1, "gpu": 0.25}}, cluster_resources={"CPU": 8, "GPU": 1})
    assert [p.partition(": ")[0] for p in problems] == ["parameters.device.values[1]"], problems
    (problem,) = problems_of(data, cluster_resources=NO_GPU)
    assert problem.startswith("parameters.device.values[2]: 'cuda' needs a GPU and the cluster has none")


def test_an_unpooled_trial_sees_only_the_gpus_it_reserves() -> None:
    (problem,) = problems_of(edit("trial.device", "cuda:1") | {"resources": {"cpu": 1, "gpu": 1}},
                             cluster_resources={"CPU": 8, "GPU": 2})
    assert problem.startswith("trial.device: 'cuda:1': Ray shows a trial only the GPUs it reserves, as cuda:0 ")
    parse_spec(edit("trial.device", "cuda:1") | {"resources": {"cpu": 1, "gpu": 2}},
               cluster_resources={"CPU": 8, "GPU": 2})


def test_combinations_of_a_grid_are_checked() -> None:
    data = edit("trial.prior", DELETE)
    data["trial"]["fixed_pseudo_inputs"] = True
    data["parameters"]["prior"] = {"distribution": "choice", "values": ["vamp_data", "mog"]}
    problems = problems_of(data)
    assert any(p.startswith("trial.fixed_pseudo_inputs: ") and "prior='mog'" in p for p in problems)
    # The same flag, set only where it applies, is fine.
    data["trial"].pop("fixed_pseudo_inputs")
    data["parameters"]["fixed_pseudo_inputs"] = {"distribution": "choice", "values": [True, False],
                                                 "when": {"prior": ["vamp_data"]}}
    parse_spec(data)


def test_conditions() -> None:
    data = edit("trial.prior", DELETE)
    data["parameters"] = {"prior": {"distribution": "choice", "values": ["standard", "vamp"]},
                          **VALID["parameters"]}
    data["parameters"]["K"] = {**data["parameters"]["K"], "when": {"prior": ["vamp"]}}
    spec = parse_spec(data)
    K = spec.parameter("K")
    assert K.when == {"prior": ("vamp",)}
    assert K.applies({"prior": "vamp"}) and not K.applies({"prior": "standard"})
    # Declared below the parameter it tests: sampled in dependency order all the same.
    data["parameters"] = {"K": data["parameters"]["K"], "lr": data["parameters"]["lr"],
                          "prior": data["parameters"]["prior"]}
    assert [p.name for p in parse_spec(data).parameters] == ["lr", "prior", "K"]
    # A fixed trial key may be tested too (useful with --set).
    parse_spec(edit("parameters.K.when", {"dataset": ["static_mnist"]}))


def test_yaml_details(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntrial: {dataset: static_mnist, lr: 1e-4}\n")
    assert load_spec(path).trial["lr"] == 1e-4  # YAML 1.1 would read "1e-4" as text
    path.write_text("name: s\nname: t\ntrial: {dataset: static_mnist}\n")
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        load_spec(path)
    path.write_text("name: [s\n")
    with pytest.raises(SpecError, match="line 2"):
        load_spec(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(VALID))
    spec = load_spec(path, ["trial.max_epochs=12", "parameters.K.max=200", "scheduler.grace_period=2",
                            "search.sampler=random", "trial.image_every=0", "description=a b c"],
                     num_samples=3, max_concurrent=1)
    assert spec.trial["max_epochs"] == 12 and spec.scheduler.max_t == 12
    assert spec.parameter("K").max == 200 and spec.scheduler.grace_period == 2
    assert spec.search.sampler == "random" and spec.trial["image_every"] == 0
    assert (spec.num_samples, spec.max_concurrent, spec.description) == (3, 1, "a b c")
    # A missing block is created.
    spec = load_spec(path, ["metric.name=val_loss", "metric.mode=min", "parameters.K.when={prior: [vamp]}"])
    assert spec.metric.mode == "min" and spec.parameter("K").when == {"prior": ("vamp",)}


def test_bad_overrides_are_problems(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(VALID))
    with pytest.raises(SpecError) as info:
        load_spec(path, ["trial.max_epoch=3", "name.x=1", "nonsense", "search..seed=1",
                         "trial.max_epochs=3"], num_samples=0)
    problems = info.value.problems
    assert any(p.startswith("trial.max_epoch: ") and "did you mean 'max_epochs'?" in p
               and "(from --set trial.max_epoch=3)" in p for p in problems), problems
    assert any(p.startswith("--set name.x=1: ") and "not a mapping" in p for p in problems)
    assert any(p.startswith("--set 'nonsense': ") and "dotted.path=value" in p for p in problems)
    assert any(p.startswith("--set search..seed=1: ") and "empty key" in p for p in problems)
    assert any(p.startswith("num_samples: ") and "--num-samples 0" in p for p in problems)
    # A problem caused by an override elsewhere says which option set the value.
    assert any(p.startswith("scheduler.grace_period: ") and "--set trial.max_epochs=3" in p
               for p in problems), problems


def test_did_you_mean_suggestions() -> None:
    problems = problems_of(edit("parameters.latent_dims", {"distribution": "int_uniform",
                                                           "min": 2, "max": 8}))
    assert "parameters.latent_dims: not a trial key; did you mean 'latent_dim'?" in problems
    problems = problems_of(edit("parameters.K.values", [1, 2]))
    assert any(p.startswith("parameters.K.values: ") and "int_log_uniform" in p
               and "choice / grid" in p for p in problems), problems
    problems = problems_of(edit("zzz", 1))
    assert any(p.startswith("zzz: unknown key; expected one of [") for p in problems)


def test_spec_is_frozen() -> None:
    spec = parse_spec(VALID)
    assert isinstance(spec, SweepSpec)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


def test_an_unclosed_brace_is_reported_where_it_opens_not_where_yaml_noticed(tmp_path: Path) -> None:
    """PyYAML notices an unclosed flow mapping at the next key, a line later; the message names
    the line where the brace opens."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrial: {dataset: static_mnist, prior: vamp\nparameters:\n  lr: {distribution: uniform}\n")
    with pytest.raises(SpecError) as error:
        load_spec(path)
    (problem,) = error.value.problems
    assert problem.startswith("line 2, column 8: invalid YAML: the flow mapping that starts here is not closed")
    assert "line 3" in problem                      # where the parser gave up, for reference


def test_a_spec_that_does_not_exist_points_at_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as error:
        load_spec(tmp_path / "pseudo_input.yaml")
    (problem,) = error.value.problems
    shipped = Path(__file__).resolve().parents[1] / "search_spaces"
    assert f"the shipped specs are in {shipped} (priors.yaml, pseudo_inputs.yaml, quickstart.yaml)" in problem


def test_stopped_trials_policy_is_validated_and_round_trips() -> None:
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml").read_text())
    spec = parse_spec({**base, "stopped_trials": {"test_ll": "estimate", "samples": 200}})
    assert (spec.stopped_trials.test_ll, spec.stopped_trials.samples, spec.stopped_trials.images) == ("estimate", 200, 2000)
    assert parse_spec(spec.to_dict()).stopped_trials == spec.stopped_trials
    assert parse_spec(base).stopped_trials.test_ll == "full" and "stopped_trials" not in parse_spec(base).to_dict()
    with pytest.raises(SpecError) as error:
        parse_spec({**base, "scheduler": {"type": "fifo"}, "stopped_trials": {"test_ll": "nonee", "images": 0}})
    problems = error.value.problems
    assert any(p.startswith("stopped_trials.test_ll: unknown value 'nonee'") and "'none'" in p for p in problems)
    assert any(p.startswith("stopped_trials: only used when a scheduler stops trials") for p in problems)
    assert any(p.startswith("stopped_trials.images: only used by test_ll: estimate") for p in problems)
    with pytest.raises(SpecError, match=r"stopped_trials\.samples"):
        parse_spec({**base, "stopped_trials": {"test_ll": "estimate", "samples": 0}})


# scheduler.audit: a count or a fraction of the trials exempt from ASHA's stops (sweeper/fidelity.py)
AUDIT_INVALID = [
    ("on-fifo", {"type": "fifo", "audit": 2}, 4, "only used by type asha: audit trials are the ones exempt from ASHA's "
                                                 "early stops, and fifo never stops a trial early"),
    ("more-than-trials", {"audit": 5}, 4, "5 audit trials exceed the 4 trial(s) the sweep runs"),
    ("too-few", {"audit": 2}, 4, "2 audit trial(s) cannot measure a rank correlation, which needs at least 3; use 3"),
    ("negative", {"audit": -1}, 4, "-1 must be >= 0 (0 turns audit trials off)"),
    ("fraction-above-one", {"audit": 1.5}, 4, "1.5: a fraction of the trials must be > 0 and < 1"),
    ("whole-float", {"audit": 4.0}, 8, "for a count write an integer (4)"),
    ("not-a-number", {"audit": "all"}, 4, "expected a number of trials or a fraction of them, got 'all'"),
    ("a-bool", {"audit": True}, 4, "expected a number of trials or a fraction of them, got True"),
    ("fraction-of-too-few", {"audit": 0.5}, 2, "0.5 of the 2 trial(s) the sweep runs (num_samples x grid points) "
                                               "cannot measure a rank correlation"),
]


@pytest.mark.parametrize("scheduler,num_samples,message", [c[1:] for c in AUDIT_INVALID],
                         ids=[c[0] for c in AUDIT_INVALID])
def test_invalid_audit_is_rejected_with_the_fix(scheduler, num_samples, message) -> None:
    data = copy.deepcopy(VALID) | {"num_samples": num_samples}
    data["scheduler"] = {**VALID["scheduler"], **scheduler}
    if scheduler.get("type") == "fifo":
        data["scheduler"] = scheduler
    problems = [p for p in problems_of(data) if p.startswith("scheduler.audit: ")]
    assert problems and any(message in p for p in problems), problems


def test_audit_counts_and_fractions() -> None:
    def audit_trials(audit, num_samples: int) -> int:
        spec = parse_spec(VALID | {"num_samples": num_samples, "scheduler": {**VALID["scheduler"], "audit": audit}})
        assert parse_spec(spec.to_dict()) == dataclasses.replace(spec, source="<spec>")   # round trip
        return spec.audit_trials

    assert audit_trials(4, 64) == 4 and audit_trials(0, 64) == 0
    assert audit_trials(0.125, 64) == 8 and audit_trials(0.25, 10) == 3      # 2.5 rounds up
    assert audit_trials(0.1, 8) == 3 and audit_trials(0.5, 4) == 3 and audit_trials(0.9, 3) == 3   # at least 3
    assert parse_spec(VALID).audit_trials == 0 and "audit" not in parse_spec(VALID).to_dict()["scheduler"]
    # audit: 0 is the spec without it (what --resume compares): a sweep started before audit trials resumes with it.
    zero = parse_spec(VALID | {"scheduler": {**VALID["scheduler"], "audit": 0}})
    assert zero.to_dict() == parse_spec(VALID).to_dict()
    # --num-samples and --set reach it like any value: too few trials for the count is named with its origin.
    with pytest.raises(SpecError, match=r"scheduler.audit: 6 audit trials exceed the 4 trial\(s\).*\(from --set "
                                        r"scheduler.audit=6\)"):
        parse_spec(VALID, "spec.yaml", ["scheduler.audit=6"], num_samples=4)
    assert load_spec(SPECS[[p.stem for p in SPECS].index("pseudo_inputs")]).audit_trials >= 3
