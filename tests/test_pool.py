"""Trial pools (trainables/pool.py): many trials as slots of one BatchedTrainer, and its Ray actor."""

from __future__ import annotations

import copy
import time

import pytest
import ray
import torch

from test_batched import config, synthetic
from trainables.vae.errors import ConfigError
from trainables.pool import PoolActor, TrialPool, group_key
from trainables.vae.train import Trainer


def pool_with(splits, **members) -> TrialPool:
    pool = TrialPool("cpu", splits=splits)
    for trial_id, cfg in members.items():
        pool.join(trial_id, cfg)
    return pool


def slot_params(pool: TrialPool, trial_id: str) -> dict[str, torch.Tensor]:
    group = pool.groups[pool.group_of(trial_id)]
    return {k: v.detach().clone() for k, v in group.trainer.extract(group.slots.index(trial_id)).state_dict().items()}


def test_trials_of_one_architecture_train_as_one_batch_each_with_its_own_metrics():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0, lr=1e-3), b=config(K=6, seed=1, lr=3e-3, warmup=2))
    key = pool.group_of("a")
    assert pool.group_of("b") == key and len(pool.groups) == 1
    first = pool.run_round(key)
    second = pool.run_round(key)
    assert set(first) == set(second) == {"a", "b"}
    assert [first["a"]["epoch"], second["a"]["epoch"]] == [1, 2]
    assert first["b"]["beta"] == 0.5 and first["a"]["beta"] == 1.0      # each its own warm-up
    assert first["a"]["pool_size"] == 2 and first["a"]["train_loss"] != first["b"]["train_loss"]
    assert pool.groups[key].rebuilds == 1                              # no change, no rebuild
    assert pool.stats()["model_epochs"] == 4


def test_a_joining_trial_starts_fresh_and_the_others_keep_their_state():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0), b=config(K=4, seed=1))
    key = pool.group_of("a")
    pool.run_round(key)
    before = slot_params(pool, "a")
    pool.join("c", config(K=5, seed=2))
    pool._rebuild(pool.groups[key])                                    # what the next round does first
    after = slot_params(pool, "a")
    assert all(torch.equal(before[k], after[k]) for k in before)
    out = pool.run_round(key)
    assert {t: m["epoch"] for t, m in out.items()} == {"a": 2, "b": 2, "c": 1}
    assert out["c"]["pool_size"] == 3


def test_a_trial_that_leaves_is_gone_from_the_next_round():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0), b=config(K=4, seed=1))
    key = pool.group_of("a")
    pool.run_round(key)
    pool.leave("b")
    pool.leave("b")                                                    # idempotent
    out = pool.run_round(key)
    assert set(out) == {"a"} and out["a"]["pool_size"] == 1
    with pytest.raises(KeyError, match="must join again"):
        pool.group_of("b")
    pool.leave("a")
    assert pool.groups == {}                                           # the trainer is freed


def test_a_slot_state_is_a_trainer_checkpoint_and_rejoining_with_it_continues_the_trial():
    splits = synthetic(100)
    cfg = config(K=4, seed=3, lr=2e-3, early_stopping=5)
    pool = pool_with(splits, a=cfg, b=config(K=2, seed=4))
    key = pool.group_of("a")
    for _ in range(3):
        pool.run_round(key)
    state = pool.state("a")
    assert state["epoch"] == 3 and state["model"]["prior.pseudo_params"].shape[0] == 4
    # A plain Trainer resumes it (this is how a pooled trial is finalized and evaluated).
    plain = Trainer(cfg, splits, "cpu")
    plain.load_state_dict(copy.deepcopy(state))
    params = slot_params(pool, "a")
    assert all(torch.equal(p, params[n]) for n, p in plain.model.named_parameters())
    assert plain.step()["epoch"] == 4
    # A retry: the trial leaves (its actor died), joins again from its checkpoint.
    pool.leave("a")
    pool.run_round(key)                                                # b goes on alone
    pool.join("a", cfg, state)
    out = pool.run_round(key)
    assert out["a"]["epoch"] == 4 and out["b"]["epoch"] == 5


def test_a_trial_whose_training_stopped_is_not_waited_for():
    splits = synthetic(100)
    pool = pool_with(splits, short=config(K=3, seed=0, max_epochs=1), long=config(K=3, seed=1, max_epochs=5))
    key = pool.group_of("short")
    out = pool.run_round(key)
    assert out["short"]["stop_reason"] == "completed" and out["long"]["stop_reason"] is None
    assert pool.training_members(key) == ["long"]
    assert set(pool.run_round(key)) == {"long"}                         # the stopped slot reports nothing
    assert pool.state("short")["stop_reason"] == "completed"            # still there until it leaves


def test_a_failed_rebuild_loses_no_members_state():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0), b=config(K=4, seed=1))
    key = pool.group_of("a")
    for _ in range(2):
        pool.run_round(key)
    wrong = Trainer(config(K=9, seed=2), splits, "cpu").state_dict()     # K=9 state for a K=4 slot
    pool.join("c", config(K=4, seed=2), wrong)
    with pytest.raises(ConfigError, match="K=9"):
        pool.run_round(key)
    pool.leave("c")
    out = pool.run_round(key)
    assert {t: m["epoch"] for t, m in out.items()} == {"a": 3, "b": 3}   # not rebuilt from their seeds


def test_a_late_leave_of_an_earlier_incarnation_does_not_remove_the_trial():
    pool = pool_with(synthetic(100))
    first = pool.join("a", config(seed=0))
    second = pool.join("a", config(seed=0))        # a retry of the trial joined again
    pool.leave("a", first)                           # the dead process's cleanup, late
    assert pool.members(pool.group_of("a")) == ["a"]
    pool.leave("a", second)
    assert pool.groups == {}


def test_other_architectures_get_their_own_group_and_2_level_models_pool_too():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(prior="vamp"), b=config(prior="mog"), c=config(prior="vamp", hidden_dim=8),
                     d=config(model="hvae", seed=1), e=config(model="hvae", K=3, seed=2))
    assert len({pool.group_of(t) for t in "abcd"}) == 4 and pool.group_of("d") == pool.group_of("e")
    assert group_key(config(prior="vamp", K=3, lr=1e-2, seed=7)) == group_key(config(prior="vamp", K=9))
    metrics = pool.run_round(pool.group_of("d"))
    assert set(metrics) == {"d", "e"} and all(m["pool_size"] == 2 for m in metrics.values())
    alone = Trainer(config(model="hvae", seed=1), splits, "cpu").step()
    assert metrics["d"]["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)   # a slot is its trial


# -- the Ray actor ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="ERROR")
    yield
    ray.shutdown()


def _actor(wait_s: float):
    """A PoolActor on synthetic data (the sweep's pools load the trials' dataset)."""
    return ray.remote(PoolActor).options(max_concurrency=100).remote("cpu", wait_s, synthetic(100))


def test_the_actor_runs_a_round_once_every_member_asked_for_it(local_ray):
    actor = _actor(wait_s=60)
    ray.get([actor.join.remote("a", config(K=3, seed=0).to_dict()), actor.join.remote("b", config(K=5, seed=1).to_dict())])
    first = actor.step.remote("a")
    time.sleep(0.5)
    ready, _ = ray.wait([first], timeout=0.1)
    assert not ready                                                   # a waits for b
    a, b = ray.get([first, actor.step.remote("b")])
    assert a["epoch"] == b["epoch"] == 1 and a["pool_size"] == b["pool_size"] == 2
    assert ray.get(actor.stats.remote())["rounds"] == 1
    # A member that leaves releases the one waiting for it.
    waiting = actor.step.remote("a")
    ray.get(actor.leave.remote("b"))
    assert ray.get(waiting, timeout=30)["pool_size"] == 1


def test_a_member_that_is_alive_is_not_evicted_and_a_rejoined_one_is_a_new_request(local_ray):
    actor = _actor(wait_s=1.0)
    ray.get([actor.join.remote("a", config(seed=0).to_dict()), actor.join.remote("b", config(seed=1).to_dict())])
    waiting = actor.step.remote("a")
    for _ in range(8):                     # b checkpoints for 2.4 s (> wait_s) before it asks
        ray.get(actor.state.remote("b"))
        time.sleep(0.3)
    a, b = ray.get([waiting, actor.step.remote("b")], timeout=60)
    assert a["pool_size"] == b["pool_size"] == 2 and ray.get(actor.stats.remote())["evicted"] == []
    # a's process dies while it waits; its retry joins again: the dead request does not count.
    stale = actor.step.remote("a")
    ray.get(actor.join.remote("a", config(seed=0).to_dict()))
    with pytest.raises(ray.exceptions.RayTaskError, match="joined the pool again"):
        ray.get(stale, timeout=30)
    first_b = actor.step.remote("b")
    time.sleep(0.5)
    assert not ray.wait([first_b], timeout=0.1)[0]   # b waits for the new a
    a, b = ray.get([actor.step.remote("a"), first_b], timeout=60)
    assert a["epoch"] == 1 and b["epoch"] == 2          # a starts fresh, b goes on


def test_the_actor_evicts_a_member_that_stops_asking_and_tells_it_to_rejoin(local_ray):
    actor = _actor(wait_s=1.0)
    ray.get([actor.join.remote("a", config(seed=0).to_dict()), actor.join.remote("gone", config(seed=1).to_dict())])
    result = ray.get(actor.step.remote("a"), timeout=60)               # "gone" never asks
    assert result["pool_size"] == 1
    assert ray.get(actor.stats.remote())["evicted"] == ["gone"]
    with pytest.raises(ray.exceptions.RayTaskError, match="must join again"):
        ray.get(actor.step.remote("gone"))


def test_a_trial_finds_its_nodes_pool_by_name_and_the_driver_removes_the_sweeps_pools(local_ray):
    from trainables.pool import POOL_NAMESPACE, get_pool, remove_pools

    @ray.remote(num_cpus=0)
    def from_a_trial(sweep_id: str) -> str:
        actor = get_pool(sweep_id, wait_s=5)
        return ray.get(actor.stats.remote())["device"]

    # Two "trials" of sweep s1 on this CPU node share one pool; sweep s2 has its own.
    assert ray.get([from_a_trial.remote("s1"), from_a_trial.remote("s1"), from_a_trial.remote("s2")]) == ["cpu"] * 3

    def pools() -> list[str]:
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == POOL_NAMESPACE)

    node = ray.get_runtime_context().get_node_id()
    assert pools() == [f"s1/{node}/cpu", f"s2/{node}/cpu"]
    assert remove_pools("s1") == 1
    deadline = time.time() + 30
    while pools() != [f"s2/{node}/cpu"] and time.time() < deadline:
        time.sleep(0.2)
    assert pools() == [f"s2/{node}/cpu"]
    remove_pools("s2")


def test_the_driver_takes_a_trial_that_tune_stopped_out_of_its_pool(local_ray):
    """Tune keeps a stopped trial's actor for reuse without calling its cleanup; the driver's
    callback makes it leave, so the others do not wait for it."""
    from types import SimpleNamespace

    from sweeper.callbacks import PoolLeaveCallback
    from trainables.pool import get_pool, remove_pools, sweep_pools

    @ray.remote(num_cpus=0)
    def join_from_a_trial(trial_id: str, cfg: dict) -> None:
        pool = get_pool("s3", wait_s=60)
        ray.get(pool.join.remote(trial_id, cfg))

    ray.get([join_from_a_trial.remote(t, config(seed=0).to_dict()) for t in ("x", "y")])
    (pool,) = sweep_pools("s3")
    assert [g["members"] for g in ray.get(pool.stats.remote())["groups"]] == [2]
    PoolLeaveCallback("s3").on_trial_complete(iteration=1, trials=[], trial=SimpleNamespace(trial_id="x"))
    deadline = time.time() + 30
    while ray.get(pool.stats.remote())["groups"][0]["members"] != 1 and time.time() < deadline:
        time.sleep(0.1)
    assert ray.get(pool.stats.remote())["groups"][0]["members"] == 1
    remove_pools("s3")
