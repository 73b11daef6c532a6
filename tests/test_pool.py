"""Trial pools (trainables/pool.py): many trials as slots of one BatchedTrainer, and its Ray actor."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import ray
import torch

from test_batched import D, config, synthetic
from trainables.pool import Failure, Membership, PoolActor, PoolError, TrialPool, group_key
from trainables.vae.batched import BatchedTrainer
from trainables.vae.config import TrainConfig
from trainables.vae.train import Trainer


def pool_with(splits, **members) -> TrialPool:
    pool = TrialPool("cpu", splits=splits)
    for trial_id, cfg in members.items():
        pool.join(trial_id, cfg)
    return pool


def slot_params(pool: TrialPool, trial_id: str) -> dict[str, torch.Tensor]:
    return pool.state(trial_id)["model"]


def test_trials_of_one_architecture_train_as_one_batch_each_with_its_own_metrics():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0, lr=1e-3), b=config(K=6, seed=1, lr=3e-3, warmup=2))
    key = pool.group_of("a")
    assert pool.group_of("b") == key and {m.key for m in pool.membership.members.values()} == {key}
    first = pool.run_round(key)
    second = pool.run_round(key)
    assert set(first) == set(second) == {"a", "b"}
    assert [first["a"]["epoch"], second["a"]["epoch"]] == [1, 2]
    assert first["b"]["beta"] == 0.5 and first["a"]["beta"] == 1.0      # each its own warm-up
    assert first["a"]["pool_size"] == 2 and first["a"]["train_loss"] != first["b"]["train_loss"]
    assert pool.device_trainers.groups[key].rebuilds == 1              # no change, no rebuild
    assert pool.device_trainers.model_epochs == 4


def test_a_joining_trial_starts_fresh_and_the_others_keep_their_state():
    splits = synthetic(100)
    cfg_a = config(K=3, seed=0)
    pool = pool_with(splits, a=cfg_a, b=config(K=4, seed=1))
    key = pool.group_of("a")
    pool.run_round(key)
    before = pool.state("a")
    pool.join("c", config(K=5, seed=2))
    out = pool.run_round(key)                                          # rebuilt with c
    assert {t: m["epoch"] for t, m in out.items()} == {"a": 2, "b": 2, "c": 1}
    assert out["c"]["pool_size"] == 3 and pool.device_trainers.groups[key].rebuilds == 2
    alone = Trainer(cfg_a, splits, "cpu")                              # a, continued alone from its state
    alone.load_state_dict(copy.deepcopy(before))
    assert out["a"]["train_loss"] == pytest.approx(alone.step()["train_loss"], rel=1e-5)
    fresh = Trainer(config(K=5, seed=2), splits, "cpu").step()        # c, as its seed builds it
    assert out["c"]["train_loss"] == pytest.approx(fresh["train_loss"], rel=1e-5)


def test_a_trial_that_leaves_is_gone_from_the_next_round():
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0), b=config(K=4, seed=1))
    key = pool.group_of("a")
    pool.run_round(key)
    pool.leave("b")
    pool.leave("b")                                                    # idempotent
    out = pool.run_round(key)
    assert set(out) == {"a"} and out["a"]["pool_size"] == 1
    with pytest.raises(PoolError, match="must join again"):
        pool.group_of("b")
    pool.leave("a")
    assert pool.device_trainers.groups == {} and pool.membership.members == {}   # the trainer is freed


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


def test_a_state_that_does_not_load_fails_its_trial_alone_and_the_others_keep_theirs():
    """One member's failure in a rebuild is its own: the others keep their states and train on."""
    splits = synthetic(100)
    pool = pool_with(splits, a=config(K=3, seed=0), b=config(K=4, seed=1))
    key = pool.group_of("a")
    for _ in range(2):
        pool.run_round(key)
    wrong = Trainer(config(K=9, seed=2), splits, "cpu").state_dict()     # K=9 state for a K=4 slot
    pool.join("c", config(K=4, seed=2), wrong)
    out = pool.run_round(key)
    assert isinstance(out["c"], Failure) and "K=9" in out["c"].message
    assert {t: out[t]["epoch"] for t in "ab"} == {"a": 3, "b": 3}       # not rebuilt from their seeds
    assert pool.members(key) == ["a", "b"]                              # c must join again
    out = pool.run_round(key)
    assert {t: m["epoch"] for t, m in out.items()} == {"a": 4, "b": 4}


def test_a_late_leave_of_an_earlier_incarnation_does_not_remove_the_trial():
    pool = pool_with(synthetic(100))
    first = pool.join("a", config(seed=0))
    second = pool.join("a", config(seed=0))        # a retry of the trial joined again
    pool.leave("a", first)                           # the dead process's cleanup, late
    assert pool.members(pool.group_of("a")) == ["a"]
    pool.leave("a", second)
    assert pool.membership.members == {}


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


# -- the actor's logic, on an event loop of the test (no Ray: deterministic, and fast) -----------
def run(coroutine, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def on_thread(event: threading.Event) -> None:
    """Wait for a threading.Event without blocking the event loop."""
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, 60), "timed out"


def alone(cfg: TrainConfig, splits, epochs: int) -> list[dict]:
    trainer = Trainer(cfg, splits, "cpu")
    return [trainer.step() for _ in range(epochs)]


def test_the_actor_runs_a_round_once_every_member_asked_for_it():
    splits = synthetic(100)

    async def scenario():
        actor = PoolActor("cpu", 60, splits)
        await actor.join("a", config(K=3, seed=0))
        await actor.join("b", config(K=5, seed=1))
        first = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)                     # a's request is in
        stats = await actor.stats()                # answered by the device thread: after any queued round
        assert stats["rounds"] == 0 and not first.done()       # a waits for b: no round was started
        a, b = await asyncio.gather(first, actor.step("b"))
        assert a["epoch"] == b["epoch"] == 1 and a["pool_size"] == b["pool_size"] == 2
        assert (await actor.stats())["rounds"] == 1
        # A member that leaves releases the one waiting for it.
        waiting = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)
        await actor.leave("b")
        assert (await waiting)["pool_size"] == 1

    run(scenario())


def test_a_trial_that_joins_while_the_device_is_busy_trains_only_the_epochs_it_asks_for():
    """c joins while another group's round holds the device: its group's next round, planned
    before c asked, must not train c (c's first step would return epoch 2)."""
    splits = synthetic(100)
    started, release = threading.Event(), threading.Event()

    def build(configs, *args, **kw):
        if configs[0].prior == "mog":              # the other group's rebuild holds the device thread
            started.set()
            release.wait(60)
        return BatchedTrainer(configs, *args, **kw)

    async def scenario():
        actor = PoolActor("cpu", 60, splits, build=build)
        for trial_id, cfg in (("a", config(seed=0)), ("b", config(seed=1)), ("x", config(prior="mog", seed=2))):
            await actor.join(trial_id, cfg)
        other = asyncio.ensure_future(actor.step("x"))
        await on_thread(started)                   # the device thread is busy now
        await actor.join("c", config(seed=3))
        a, b = asyncio.ensure_future(actor.step("a")), asyncio.ensure_future(actor.step("b"))
        await asyncio.sleep(0)
        release.set()
        assert (await other)["epoch"] == 1
        c = await actor.step("c")
        results = {"a": await a, "b": await b, "c": c}
        assert {t: m["epoch"] for t, m in results.items()} == {"a": 1, "b": 1, "c": 1}
        assert {m["pool_size"] for m in results.values()} == {3}          # one round, all three
        for t, seed in (("a", 0), ("c", 3)):
            assert results[t]["train_loss"] == pytest.approx(alone(config(seed=seed), splits, 1)[0]["train_loss"],
                                                             rel=1e-5)

    run(scenario())


def test_only_the_event_loop_touches_the_membership(monkeypatch):
    """A device thread that reads the pool's members while the event loop changes them fails with
    "dictionary changed size during iteration", rarely. Every access to the membership - its
    attributes, the members dict (reads and iteration, also of views handed on), each member and
    its request - under joins, leaves, rounds and state requests at once, is on the event loop's
    thread."""
    import trainables.pool as pool_module

    splits = synthetic(100)
    threads = set()

    def seen(items):
        for item in items:                       # records the thread that iterates, wherever that is
            threads.add(threading.current_thread().name)
            yield item

    class WatchedDict(dict):
        def __getitem__(self, key):
            threads.add(threading.current_thread().name)
            return super().__getitem__(key)

        def get(self, *args):
            threads.add(threading.current_thread().name)
            return super().get(*args)

        def __contains__(self, key):
            threads.add(threading.current_thread().name)
            return super().__contains__(key)

        def __len__(self):
            threads.add(threading.current_thread().name)
            return super().__len__()

        def __iter__(self):
            return seen(super().__iter__())

        def keys(self):
            return seen(super().keys())

        def values(self):
            return seen(super().values())

        def items(self):
            return seen(super().items())

    def watched(cls):
        class Watched(cls):
            def __getattribute__(self, name):
                threads.add(threading.current_thread().name)
                return super().__getattribute__(name)
        return Watched

    monkeypatch.setattr(pool_module, "Member", watched(pool_module.Member))
    monkeypatch.setattr(pool_module, "Request", watched(pool_module.Request))

    class WatchedMembership(watched(Membership)):
        def __init__(self):
            super().__init__()
            self.members = WatchedDict()

    async def scenario():
        actor = PoolActor("cpu", 60, splits)
        actor._membership = WatchedMembership()
        await actor.join("a", config(seed=0))
        await actor.join("b", config(seed=1))

        async def churn():
            for i in range(40):
                await actor.join(f"y{i}", config(prior="mog", seed=i))
                await actor.state("a")
                await actor.leave(f"y{i}")

        async def train():
            out = []
            for _ in range(6):
                out.append(await asyncio.gather(actor.step("a"), actor.step("b")))
            return out

        rounds, _ = await asyncio.gather(train(), churn())
        assert [a["epoch"] for a, _ in rounds] == [1, 2, 3, 4, 5, 6]
        await actor.stats()                      # the device thread has done all queued work
        return threading.current_thread().name

    loop_thread = run(scenario())
    assert loop_thread in threads and threads == {loop_thread}


def test_a_member_that_fails_fails_alone_and_joins_again_from_its_checkpoint():
    """One failure in a round fails that trial alone: the group is not evicted or failed with it."""
    splits = synthetic(100)

    async def scenario():
        actor = PoolActor("cpu", 60, splits)
        await actor.join("a", config(K=3, seed=0))
        await actor.join("b", config(K=4, seed=1))
        await asyncio.gather(actor.step("a"), actor.step("b"))
        checkpoint = await actor.state("b")
        wrong = Trainer(config(K=9, seed=1), splits, "cpu").state_dict()    # a K=9 state for b's K=4 slot
        await actor.join("b", config(K=4, seed=1), wrong)                   # a retry with a bad checkpoint
        a, b = await asyncio.gather(actor.step("a"), actor.step("b"), return_exceptions=True)
        assert isinstance(b, PoolError) and "K=9" in str(b)
        assert a["epoch"] == 2 and a["pool_size"] == 1                      # a trained on
        with pytest.raises(PoolError, match="must join again"):
            await actor.step("b")
        await actor.join("b", config(K=4, seed=1), checkpoint)              # Tune retries it properly
        a, b = await asyncio.gather(actor.step("a"), actor.step("b"))
        assert (a["epoch"], b["epoch"]) == (3, 2)
        assert b["train_loss"] == pytest.approx(alone(config(K=4, seed=1), splits, 2)[1]["train_loss"], rel=1e-5)

    run(scenario())


def test_a_group_too_big_for_memory_trains_as_smaller_trainers_and_a_failed_batch_fails_only_its_trials():
    splits = synthetic(100)
    cfgs = {f"t{i}": config(K=2 + i, seed=i, lr=1e-3 * (1 + i)) for i in range(5)}
    built = []

    class Flaky(BatchedTrainer):
        def step(self):
            if any(c.seed == 4 for c in self.configs) and self.epoch == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().step()

    def build(configs, *args, **kw):
        if len(configs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        built.append(len(configs))
        return Flaky(configs, *args, **kw)

    async def scenario():
        actor = PoolActor("cpu", 60, splits, build=build)
        for t, c in cfgs.items():
            await actor.join(t, c)
        first = await asyncio.gather(*(actor.step(t) for t in cfgs))
        assert [m["epoch"] for m in first] == [1] * 5 and max(m["pool_size"] for m in first) == 2
        second = await asyncio.gather(*(actor.step(t) for t in cfgs), return_exceptions=True)
        failed = {t for t, r in zip(cfgs, second) if isinstance(r, Exception)}
        assert failed == {"t3", "t4"} or failed == {"t4"}                 # t4's trainer, and whoever shared it
        assert all("illegal memory access" in str(r) for r in second if isinstance(r, Exception))
        for t, r in zip(cfgs, second):
            if t not in failed:
                assert r["epoch"] == 2
                assert r["train_loss"] == pytest.approx(alone(cfgs[t], splits, 2)[1]["train_loss"], rel=1e-5)
        return failed

    run(scenario())
    assert max(built) == 2                                               # never again a trainer of 3+


def test_a_member_that_is_alive_is_not_evicted_and_a_rejoined_one_is_a_new_request():
    splits = synthetic(100)
    now = [0.0]

    async def scenario():
        actor = PoolActor("cpu", 1.0, splits, clock=lambda: now[0])
        await actor.join("a", config(seed=0))
        await actor.join("b", config(seed=1))
        waiting = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)
        for _ in range(8):                     # b checkpoints for 2.4 s (> wait_s) before it asks
            await actor.state("b")
            now[0] += 0.3
        assert actor.stale_members(actor._membership.get("a").key) == []
        a, b = await asyncio.gather(waiting, actor.step("b"))
        assert a["pool_size"] == b["pool_size"] == 2 and actor.evicted == []
        # a's process dies while it waits; its retry joins again: the dead request does not count.
        stale = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)
        await actor.join("a", config(seed=0))
        with pytest.raises(PoolError, match="joined the pool again"):
            await stale
        first_b = asyncio.ensure_future(actor.step("b"))
        await asyncio.sleep(0)
        assert (await actor.stats())["rounds"] == 1 and not first_b.done()   # b waits for the new a
        a, b = await asyncio.gather(actor.step("a"), first_b)
        assert a["epoch"] == 1 and b["epoch"] == 2          # a starts fresh, b goes on
        # b stops asking (its process died); a waits; after wait_s b is evicted and a trains alone.
        waiting = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)
        now[0] += 0.5
        assert actor.stale_members(actor._membership.get("a").key) == []
        now[0] += 1.0
        assert actor.stale_members(actor._membership.get("a").key) == ["b"]
        assert (await waiting)["pool_size"] == 1 and actor.evicted == ["b"]
        with pytest.raises(PoolError, match="must join again"):
            await actor.step("b")

    run(scenario())


# -- the Ray actor ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="ERROR")
    yield
    ray.shutdown()


def test_the_actor_through_ray_takes_validated_configs_and_answers_every_member(local_ray):
    actor = ray.remote(PoolActor).options(max_concurrency=100).remote("cpu", 60, synthetic(100))
    ray.get([actor.join.remote("a", TrainConfig.from_dict({**config(K=3, seed=0).to_dict()})),
             actor.join.remote("b", config(K=5, seed=1).to_dict())])     # a config or a mapping
    a, b = ray.get([actor.step.remote("a"), actor.step.remote("b")], timeout=120)
    assert a["epoch"] == b["epoch"] == 1 and a["pool_size"] == 2
    state = ray.get(actor.state.remote("b"))
    assert state["epoch"] == 1 and state["model"]["prior.pseudo_params"].device.type == "cpu"
    assert ray.get(actor.pseudo_inputs.remote("a", 2)).shape == (2, D)
    ray.kill(actor)


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
