"""Trial pools (trainables/pool.py) when things go wrong: a trainer out of memory in its step or
its build, a trial evicted between its step and its checkpoint, trials that stop answering and
never leave, a caller that gives up on its step.

The actor's logic runs on an event loop of the test with a fake clock (no Ray): what happens is
decided by the clock the test moves, not by how fast this machine is. Only the actor's own
background pass over its members runs on real time; `eventually` waits for it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

import pytest
import torch

from test_batched import D, config, synthetic
from test_pool import alone, on_thread, run
from trainables.pool import Failure, NotAMember, PoolActor, TrialPool
from trainables.vae.batched import BatchedTrainer
from trainables.vae.train import Trainer

WAIT_S = 1.0          # fake seconds; members are forgotten after 10 x WAIT_S (the default)


def out_of_memory(where: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory (simulated, in a trainer's {where})")


class OutOfMemoryInStep(BatchedTrainer):
    """Runs out of memory in its step when it holds more than `limit` slots - after the step has
    changed every slot's weights, optimizer and generators, so a retry that did not go back to
    the states before the step would train an epoch twice."""

    limit = 2

    def step(self):
        out = super().step()
        if self.M > self.limit:
            raise out_of_memory("step")
        return out


def held_slots(actor_or_pool) -> list[tuple[str, int]]:
    """Every slot state the device side holds: in its trainers, and parked outside them."""
    device = actor_or_pool._device if isinstance(actor_or_pool, PoolActor) else actor_or_pool.device_trainers
    return sorted(s for g in device.groups.values()
                  for s in [*g.parked, *(slot for shard in g.shards for slot in shard.slots)])


async def eventually(condition, what: str, timeout: float = 10.0) -> None:
    """Wait until the actor's periodic pass over its members has made `condition` true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


# -- out of memory --------------------------------------------------------------------------------
def test_a_trainer_out_of_memory_in_its_step_is_split_and_the_round_rerun_from_the_states_before_it():
    splits = synthetic(100)
    cfgs = {f"t{i}": config(K=2 + i, seed=i, lr=1e-3 * (1 + i), warmup=i % 2) for i in range(5)}
    sizes = []

    def build(configs, *args, **kw):
        sizes.append(len(configs))
        return OutOfMemoryInStep(configs, *args, **kw)

    pool = TrialPool("cpu", splits=splits, build=build)
    for t, c in cfgs.items():
        pool.join(t, c)
    key = pool.group_of("t0")
    rounds = [pool.run_round(key)]
    built = list(sizes)                               # the 5 that ran out of memory, then smaller ones
    rounds += [pool.run_round(key) for _ in range(2)]
    for t, c in cfgs.items():
        want = alone(c, splits, 3)
        for epoch, out in enumerate(rounds, 1):
            got = out[t]
            assert not isinstance(got, Failure), f"{t}, epoch {epoch}: {got}"
            assert got["epoch"] == epoch and got["pool_size"] <= 2
            for name in ("train_loss", "val_elbo"):      # each epoch once, as the trial alone trains it
                assert got[name] == pytest.approx(want[epoch - 1][name], rel=1e-5), (t, epoch, name)
    assert built[0] == 5 and sizes == built          # split in the first round, no rebuild after it
    assert pool.state("t4")["epoch"] == 3


def test_the_trainer_size_learned_from_an_out_of_memory_outlives_its_group():
    """Every member of a group leaves (e.g. all failed and Tune retries them): the group is
    freed, and when it is built again it starts at the size that fitted, not at the one that
    ran out of memory."""
    splits = synthetic(100)
    cfgs = {f"t{i}": config(K=2 + i, seed=i) for i in range(5)}
    tried = []

    def build(configs, *args, **kw):
        tried.append(len(configs))
        if len(configs) > 2:
            raise out_of_memory("build")
        return BatchedTrainer(configs, *args, **kw)

    pool = TrialPool("cpu", splits=splits, build=build)
    for t, c in cfgs.items():
        pool.join(t, c)
    key = pool.group_of("t0")
    assert all(m["pool_size"] <= 2 for m in pool.run_round(key).values())
    for t in cfgs:
        pool.leave(t)
    assert pool.device_trainers.groups == {}
    tried.clear()
    for t, c in cfgs.items():
        pool.join(t, c)
    assert all(m["epoch"] == 1 for m in pool.run_round(key).values())
    assert tried and max(tried) <= 2, f"trainers tried after the group was built again: {tried}"


@pytest.mark.parametrize("where", ["build", "step"])
def test_a_trainer_that_ran_out_of_memory_is_freed_before_smaller_ones_are_built(where):
    """The exception's traceback holds the failed trainer (its frames' locals): the smaller
    trainers are built only once it is gone, so its device memory can go back first."""
    splits = synthetic(100)
    failed = []             # weak references to the trainers that ran out of memory
    alive_at_build = []     # per build after a failure: was a failed trainer still alive?

    class Trainer_(BatchedTrainer):
        def step(self):
            if where == "step" and self.M > 2:
                failed.append(weakref.ref(self))
                raise out_of_memory("step")
            return super().step()

    def build(configs, *args, **kw):
        if failed:
            alive_at_build.append(any(r() is not None for r in failed))
        trainer = Trainer_(configs, *args, **kw)
        if where == "build" and len(configs) > 2:
            failed.append(weakref.ref(trainer))
            raise out_of_memory("build")
        return trainer

    pool = TrialPool("cpu", splits=splits)
    pool.device_trainers._build = build
    for i in range(4):
        pool.join(f"t{i}", config(K=2 + i, seed=i))
    out = pool.run_round(pool.group_of("t0"))
    assert all(not isinstance(r, Failure) for r in out.values()), out
    assert failed and alive_at_build
    assert not any(alive_at_build), "smaller trainers were built while the failed one was still alive"


# -- eviction and what the pool keeps of evicted or silent trials ---------------------------------
def test_a_trial_evicted_after_its_step_still_checkpoints_and_joins_again_from_that_state():
    """Tune asks for a's checkpoint late, after a's group went on without it: the pool still
    answers for the epoch a completed, and a joins again from it (no Tune retry)."""
    splits = synthetic(100)
    now = [0.0]
    cfg_a = config(K=3, seed=0)

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits, clock=lambda: now[0])
        await actor.join("a", cfg_a)
        await actor.join("b", config(K=4, seed=1))
        await asyncio.gather(actor.step("a"), actor.step("b"))
        waiting = asyncio.ensure_future(actor.step("b"))
        await asyncio.sleep(0)
        now[0] += 1.5 * WAIT_S                       # a's process is slow: b waits for it, then goes on
        assert (await waiting)["pool_size"] == 1 and actor.evicted == ["a"]
        state = await actor.state("a")               # Tune's save_checkpoint after epoch 1, late
        assert state["epoch"] == 1
        assert (await actor.pseudo_inputs("a", 2)).shape == (2, D)
        with pytest.raises(NotAMember, match="evicted"):
            await actor.step("a")
        await actor.join("a", cfg_a, state)          # a joins again with the state it checkpointed
        a, b = await asyncio.gather(actor.step("a"), actor.step("b"))
        assert (a["epoch"], b["epoch"]) == (2, 3) and a["pool_size"] == 2
        assert a["train_loss"] == pytest.approx(alone(cfg_a, splits, 2)[1]["train_loss"], rel=1e-5)
        await actor.stats()                          # the device has done the queued work
        assert [t for t, _ in held_slots(actor)] == ["a", "b"]    # a's parked state was replaced

    run(scenario())


def test_a_stopped_member_that_never_leaves_is_forgotten():
    splits = synthetic(100)
    now = [0.0]

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits, clock=lambda: now[0])
        await actor.join("a", config(K=3, seed=0, max_epochs=1))
        await actor.join("b", config(K=4, seed=1, max_epochs=5))
        a, b = await asyncio.gather(actor.step("a"), actor.step("b"))
        assert a["stop_reason"] == "completed" and b["stop_reason"] is None
        # a's process dies before it calls state() and leave(); b trains on.
        now[0] += 10 * WAIT_S + 1
        assert (await actor.step("b"))["epoch"] == 2
        await eventually(lambda: "a" not in actor._membership.members, "a is forgotten")
        with pytest.raises(NotAMember):
            await actor.state("a")
        assert (await actor.step("b"))["epoch"] == 3
        assert [t for t, _ in held_slots(actor)] == ["b"]

    run(scenario())


def test_a_group_none_of_whose_members_trains_frees_its_trainer_and_keeps_their_states():
    splits = synthetic(100)
    trainers = []

    def build(configs, *args, **kw):
        trainer = BatchedTrainer(configs, *args, **kw)
        trainers.append(weakref.ref(trainer))
        return trainer

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits, build=build)
        cfgs = {"a": config(K=3, seed=0, max_epochs=1), "b": config(K=4, seed=1, max_epochs=1)}
        for t, c in cfgs.items():
            await actor.join(t, c)
        await asyncio.gather(actor.step("a"), actor.step("b"))     # both stop: they are being finalized
        stats = await actor.stats()
        assert list(stats["trainers"].values()) == [[]], stats["trainers"]
        assert trainers and all(r() is None for r in trainers), "the trainer is still alive"
        for t, c in cfgs.items():                                   # their states are still answered
            state = await actor.state(t)
            assert state["epoch"] == 1 and state["stop_reason"] == "completed"
            single = Trainer(c, splits, "cpu")
            single.step()
            for name, value in single.model.state_dict().items():
                assert torch.allclose(state["model"][name], value, rtol=1e-4, atol=1e-6), (t, name)
        await actor.leave("a")
        await actor.leave("b")
        await actor.stats()
        assert actor._device.groups == {}

    run(scenario())


def test_a_dead_trial_alone_in_its_group_is_forgotten_and_its_trainer_freed():
    splits = synthetic(100)
    now = [0.0]
    trainers = []

    def build(configs, *args, **kw):
        trainer = BatchedTrainer(configs, *args, **kw)
        trainers.append(weakref.ref(trainer))
        return trainer

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits, clock=lambda: now[0], build=build)
        await actor.join("a", config(seed=0))
        assert (await actor.step("a"))["epoch"] == 1
        now[0] += 5 * WAIT_S                      # silent, but not for long enough yet
        await asyncio.sleep(0.5)                  # (a couple of the actor's passes over its members)
        assert "a" in actor._membership.members
        now[0] += 5 * WAIT_S + 1                  # a's process died after its step, without leaving
        await eventually(lambda: actor._membership.members == {}, "a is forgotten")
        await actor.stats()
        assert actor._device.groups == {} and all(r() is None for r in trainers)

    run(scenario())


def test_an_evicted_trials_state_is_kept_until_it_is_forgotten():
    splits = synthetic(100)
    now = [0.0]

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits, clock=lambda: now[0])
        await actor.join("a", config(K=3, seed=0))
        await actor.join("b", config(K=4, seed=1))
        await asyncio.gather(actor.step("a"), actor.step("b"))     # both at epoch 1
        waiting = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)
        now[0] += 1.5 * WAIT_S                                      # b is evicted; a goes on
        assert (await waiting)["pool_size"] == 1 and actor.evicted == ["b"]
        now[0] += 8 * WAIT_S                                        # b silent for 9.5 x WAIT_S
        assert (await actor.step("a"))["epoch"] == 3
        assert (await actor.state("b"))["epoch"] == 1
        now[0] += 1 * WAIT_S                                        # b's last call was 1 x WAIT_S ago
        assert (await actor.step("a"))["epoch"] == 4
        assert (await actor.state("b"))["epoch"] == 1
        now[0] += 10 * WAIT_S + 1
        assert (await actor.step("a"))["epoch"] == 5
        await eventually(lambda: "b" not in actor._membership.members, "b is forgotten")
        with pytest.raises(NotAMember):
            await actor.state("b")
        await actor.stats()
        assert [t for t, _ in held_slots(actor)] == ["a"]

    run(scenario())


# -- a caller that gives up on its step -----------------------------------------------------------
def test_a_step_whose_caller_gave_up_does_not_hold_up_its_group():
    splits = synthetic(100)
    now = [0.0]

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits, clock=lambda: now[0])
        await actor.join("a", config(K=3, seed=0))
        await actor.join("b", config(K=4, seed=1))
        gave_up = asyncio.ensure_future(actor.step("a"))
        await asyncio.sleep(0)
        gave_up.cancel()                                  # e.g. ray.cancel on a's call
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        b = asyncio.ensure_future(actor.step("b"))
        await asyncio.sleep(0)
        assert not b.done()                               # b waits for a: a may ask again
        now[0] += 1.5 * WAIT_S                            # it does not: a is evicted, b trains alone
        done, _ = await asyncio.wait({b}, timeout=5)
        assert b in done, "b still waits: a's cancelled request counts as waiting and a is never evicted"
        assert b.result()["pool_size"] == 1 and actor.evicted == ["a"]

    run(scenario())


def test_a_step_given_up_while_its_round_runs_is_answered_by_the_next_step():
    """The round trained the trial's next epoch, but its caller had gone: its next step gets
    that epoch (it sees every epoch once, in order), not the one after."""
    splits = synthetic(100)
    started, release = threading.Event(), threading.Event()

    def build(configs, *args, **kw):
        started.set()
        release.wait(60)                          # the round holds the device thread
        return BatchedTrainer(configs, *args, **kw)

    async def scenario():
        actor = PoolActor("cpu", 60, splits, build=build)
        await actor.join("a", config(K=3, seed=0))
        await actor.join("b", config(K=4, seed=1))
        gave_up, b = asyncio.ensure_future(actor.step("a")), asyncio.ensure_future(actor.step("b"))
        await on_thread(started)
        gave_up.cancel()
        release.set()
        assert (await b)["epoch"] == 1
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        first = await asyncio.wait_for(actor.step("a"), 10)
        assert first["epoch"] == 1
        a, b = await asyncio.gather(actor.step("a"), actor.step("b"))
        assert a["epoch"] == b["epoch"] == 2 and a["pool_size"] == 2

    run(scenario())
