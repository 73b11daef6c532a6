"""A pool under churn: many trials on one device, in three groups, joining, asking for rounds at
random moments, checkpointing, being stopped by the scheduler, dying (with and without leaving),
retrying from their checkpoints (sometimes with a checkpoint that does not load), being evicted.

Each trial is driven as Tune drives it (one `step` per iteration, a checkpoint after each, a
retry restores the last checkpoint and counts iterations from its epoch), from a seeded random
stream. Whatever the interleaving, every trial must see each of its epochs 1..n exactly once,
Tune's iteration must equal the epoch (no epoch is trained that the trial did not ask for), and
every epoch's metrics must be those of the same configuration trained alone.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from test_batched import config, synthetic
from trainables.pool import PoolActor, PoolError
from trainables.vae.train import Trainer

WAIT_S = 0.2                 # eviction after this long without a call (dead trials)


def trial_configs(rng: random.Random) -> dict:
    """Eight trials in three groups (vamp, mog, standard), each with its own K, lr, seed, budget."""
    out = {}
    for i in range(8):
        prior = ("vamp", "vamp", "vamp", "mog", "mog", "standard", "standard", "vamp")[i]
        out[f"t{i}"] = config(prior=prior, K=rng.randint(2, 6), seed=i, lr=rng.choice([1e-3, 3e-3]),
                              warmup=rng.randint(0, 2), max_epochs=rng.randint(3, 6))
    return out


async def drive(actor: PoolActor, trial_id: str, cfg, rng: random.Random, wrong: dict, log: dict) -> str:
    """One trial, as Tune runs it, with random pauses, deaths, retries and scheduler stops; `wrong`
    is a checkpoint that does not load into its slot."""
    seen = log[trial_id] = {}                # epoch -> metrics, over all incarnations
    checkpoint = None                        # the state saved after the last reported epoch
    for _ in range(40):                      # incarnations (Tune's retries)
        poisoned = checkpoint is not None and rng.random() < 0.2
        token = await actor.join(trial_id, cfg, wrong if poisoned else checkpoint)
        iteration = checkpoint["epoch"] if checkpoint is not None else 0
        try:
            while True:
                for _ in range(rng.randint(0, 3)):
                    await asyncio.sleep(rng.random() * 0.01)
                event = rng.random()
                if event < 0.04:                                     # the scheduler stops it
                    await actor.leave(trial_id, token)
                    return "scheduler"
                if event < 0.08:                                     # it dies, and Tune's cleanup leaves
                    await actor.leave(trial_id, token)
                    break
                if event < 0.12:                                     # it dies silently (evicted, or replaced)
                    await asyncio.sleep(rng.random() * 3 * WAIT_S)
                    break
                if event < 0.16:                                     # it dies while waiting for its round
                    asyncio.ensure_future(actor.step(trial_id)).add_done_callback(lambda f: f.exception())
                    await asyncio.sleep(rng.random() * 2 * WAIT_S)
                    break
                metrics = await actor.step(trial_id)
                iteration += 1
                assert not poisoned, f"{trial_id}: trained from a checkpoint that cannot load"
                assert metrics["epoch"] == iteration, (trial_id, metrics["epoch"], iteration)
                assert metrics["epoch"] not in seen, f"{trial_id}: epoch {metrics['epoch']} reported twice"
                seen[metrics["epoch"]] = metrics
                checkpoint = await actor.state(trial_id)             # Tune's save_checkpoint
                assert checkpoint["epoch"] == iteration
                if metrics["stop_reason"] is not None:
                    await actor.leave(trial_id, token)
                    return metrics["stop_reason"]
        except PoolError as exc:                                     # evicted, or its slot failed
            assert poisoned or "must join again" in str(exc) or "failed" in str(exc), exc
    raise AssertionError(f"{trial_id} never finished")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_trial_sees_each_epoch_once_and_trains_as_it_would_alone(seed):
    rng = random.Random(seed)
    splits = synthetic(100)
    configs = trial_configs(rng)
    solo = {}
    for trial_id, cfg in configs.items():
        trainer = Trainer(cfg, splits, "cpu")
        solo[trial_id] = [trainer.step() for _ in range(cfg.max_epochs)]
    # Built here, before the pool's device thread exists: building a Trainer seeds torch's global
    # generator, and a build on the event loop while the device thread builds a trainer changes
    # the initial weights the device draws (only the device thread may draw from it).
    wrong = {t: Trainer(config(prior=c.prior, hidden_dim=8, seed=c.seed), splits, "cpu").state_dict()
             for t, c in configs.items()}
    log: dict = {}

    async def scenario():
        actor = PoolActor("cpu", WAIT_S, splits)
        ends = await asyncio.gather(*(drive(actor, t, c, random.Random(f"{seed}-{t}"), wrong[t], log)
                                      for t, c in configs.items()))
        await actor.stats()                                   # the device has done all queued work
        return dict(zip(configs, ends)), actor

    ends, actor = asyncio.run(asyncio.wait_for(scenario(), 300))
    for trial_id, end in ends.items():
        epochs = sorted(log[trial_id])
        assert epochs == list(range(1, len(epochs) + 1)), (trial_id, epochs)
        if end != "scheduler":
            assert end == "completed" and len(epochs) == configs[trial_id].max_epochs
        for epoch in epochs:
            got, want = log[trial_id][epoch], solo[trial_id][epoch - 1]
            for key in ("train_loss", "val_loss", "val_elbo"):
                assert got[key] == pytest.approx(want[key], rel=1e-4), (trial_id, epoch, key)
    assert actor._membership.members == {}
    assert actor._device.groups == {}                           # every trainer and state freed
    assert sum(ends[t] == "scheduler" for t in ends) < len(ends)  # the scenario did train trials to the end
