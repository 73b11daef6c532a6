"""Many Tune trials on one device, trained in lock-step as batched models (`BatchedTrainer`).

At batch 100 one VAE's training step is bound by kernel launches: trials that share a GPU as
separate processes only time-slice it (benchmarks/RESULTS.md). A `TrialPool` instead holds the
trials of one device as slots of one `BatchedTrainer` per architecture group (same dataset,
prior, sizes; K, lr, seed, warm-up, optimizer and early stopping may differ), so one
batched step trains every slot. A slot trains exactly as its trial would alone: its data order,
noise and binarisation come from generators of its own (trainables/vae/batched.py). Each Tune trial stays a trial - its own searcher suggestion,
its own ASHA decisions, its own MLflow run and checkpoints - and only sends "train my next
epoch" to the pool; an epoch ("round") runs once every trial of the group has asked for it.

    pool = TrialPool("cuda")
    pool.join("a", config_a); pool.join("b", config_b)        # same group: one BatchedTrainer
    metrics = pool.run_round(pool.group_of("a"))              # {"a": {...}, "b": {...}}
    state = pool.state("a")                                   # Trainer.state_dict() format
    pool.leave("a")                                           # the next round rebuilds without it

`PoolActor` is the Ray actor around it: one per device (named after the sweep, the node and the
GPU), created by the first trial that needs it, shared by every trial on that GPU.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from trainables.vae.batched import SHARED_FIELDS, BatchedTrainer
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits, load_dataset
from trainables.vae.train import resolve_device

# Ray namespace of the pool actors: fixed, so a resumed sweep (a new driver) finds its pools.
POOL_NAMESPACE = "sweeper-pools"
N_PSEUDO_INPUTS = 100   # pseudo-inputs returned for a trial's image grid


def group_key(config: TrainConfig) -> tuple:
    """Trials with equal keys can share one BatchedTrainer (see batched.SHARED_FIELDS)."""
    return tuple(getattr(config, name) for name in SHARED_FIELDS if name != "device")


def _to(value: Any, device: torch.device | str) -> Any:
    """A state dict's tensors moved (CPU for transport, the pool's device for loading)."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


@dataclass
class _Group:
    """One architecture's trials: their configs, and the BatchedTrainer of their slots."""

    configs: dict[str, TrainConfig] = field(default_factory=dict)       # trial id -> config
    trainer: BatchedTrainer | None = None
    slots: list[str] = field(default_factory=list)                     # trainer slot -> trial id
    pending: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)   # joined, not in a slot yet
    rebuilds: int = 0

    @property
    def stale(self) -> bool:
        """Whether the trainer must be (re)built before it serves the current members."""
        return self.trainer is None or bool(self.pending) or set(self.slots) != set(self.configs)


class TrialPool:
    """The trials of one device, as slots of one BatchedTrainer per group (see module doc)."""

    def __init__(self, device: torch.device | str | None = None, splits: Splits | None = None):
        self.device = resolve_device(str(device)) if device is not None else resolve_device("auto")
        self.groups: dict[tuple, _Group] = {}
        self._member_group: dict[str, tuple] = {}
        self._splits: dict[tuple[str, str | None], Splits] = {}
        self._given_splits = splits      # tests: every group trains on these
        self._tokens: dict[str, int] = {}
        self._joins = 0
        self.rounds = 0
        self.model_epochs = 0

    # -- membership ------------------------------------------------------------------------
    def join(self, trial_id: str, config: TrainConfig | Mapping[str, Any],
             state: Mapping[str, Any] | None = None) -> int:
        """Add a trial (or replace its slot: a retry or a restore brings its checkpoint state).

        The trial trains from the next round on. Returns a token for `leave`: a late leave of an
        earlier incarnation of the same trial (a retried actor's cleanup) must not remove this one.
        """
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        key = group_key(cfg)
        old = self._member_group.get(trial_id)
        if old is not None and old != key:
            self.leave(trial_id)
        group = self.groups.setdefault(key, _Group())
        group.configs[trial_id] = cfg
        group.pending[trial_id] = state
        self._member_group[trial_id] = key
        self._joins += 1
        self._tokens[trial_id] = self._joins
        return self._joins

    def leave(self, trial_id: str, token: int | None = None) -> None:
        """Forget a trial; its slot goes at the next rebuild. Unknown ids are ignored (idempotent),
        and so is a `token` other than the one of the trial's latest join."""
        if token is not None and self._tokens.get(trial_id) != token:
            return
        key = self._member_group.pop(trial_id, None)
        self._tokens.pop(trial_id, None)
        if key is None:
            return
        group = self.groups[key]
        group.configs.pop(trial_id, None)
        group.pending.pop(trial_id, None)
        if not group.configs:
            del self.groups[key]      # frees the trainer and its device memory
            self._free_device_memory()

    def group_of(self, trial_id: str) -> tuple:
        try:
            return self._member_group[trial_id]
        except KeyError:
            raise KeyError(f"trial {trial_id} is not in this pool (it left, or the pool was restarted); "
                           f"it must join again") from None

    def member_group(self, trial_id: str) -> tuple | None:
        """The trial's group key, None if it is not a member."""
        return self._member_group.get(trial_id)

    def members(self, key: tuple) -> list[str]:
        return list(self.groups[key].configs) if key in self.groups else []

    def training_members(self, key: tuple) -> list[str]:
        """Members that train in the next round: all but those whose training has already stopped."""
        group = self.groups.get(key)
        if group is None:
            return []
        out = []
        for trial_id in group.configs:
            if trial_id in group.pending or group.trainer is None or trial_id not in group.slots:
                out.append(trial_id)       # not built yet: it trains
            elif group.trainer.stop_reason[group.slots.index(trial_id)] is None:
                out.append(trial_id)
        return out

    # -- training --------------------------------------------------------------------------
    def _splits_for(self, cfg: TrainConfig) -> Splits:
        if self._given_splits is not None:
            return self._given_splits
        key = (cfg.dataset, cfg.data_root)
        if key not in self._splits:
            self._splits[key] = load_dataset(cfg.dataset, cfg.data_root)
        return self._splits[key]

    def _rebuild(self, group: _Group) -> None:
        """A new BatchedTrainer for the group's current members; every member keeps its state."""
        states: dict[str, Mapping[str, Any] | None] = {}
        if group.trainer is not None:
            for m, trial_id in enumerate(group.slots):
                if trial_id in group.configs and trial_id not in group.pending:
                    states[trial_id] = group.trainer.model_state(m)
        states.update(group.pending)
        slots = list(group.configs)
        configs = [group.configs[t] for t in slots]
        # The old trainer goes first (device memory); until the new one stands, the states are
        # the members' only copy, so they wait as pending states (a failed build loses nothing).
        group.trainer, group.slots = None, []
        group.pending = dict(states)
        self._free_device_memory()
        trainer = BatchedTrainer(configs, self._splits_for(configs[0]), self.device,
                                 states=[_to(states.get(t), self.device) if states.get(t) is not None else None
                                         for t in slots])
        group.trainer, group.slots = trainer, slots
        group.pending.clear()
        group.rebuilds += 1

    def _trainer(self, group: _Group) -> BatchedTrainer:
        """The group's trainer for its current members, rebuilt first if they changed."""
        if group.stale:
            self._rebuild(group)
        assert group.trainer is not None
        return group.trainer

    def _free_device_memory(self) -> None:
        # Freed trainers (and their CUDA graphs) go back to the GPU, not only to this process's
        # cache: the trials on this GPU need memory for their final evaluation.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_round(self, key: tuple) -> dict[str, dict[str, Any]]:
        """One epoch for every training member of the group: {trial id: Trainer.step-like metrics}."""
        group = self.groups[key]
        trainer = self._trainer(group)
        if trainer.done:
            return {}
        per_model = trainer.step()
        self.rounds += 1
        out = {}
        for trial_id, metrics in zip(group.slots, per_model):
            if metrics is not None:
                metrics["pool_size"] = trainer.M
                out[trial_id] = metrics
        self.model_epochs += len(out)
        return out

    def state(self, trial_id: str, device: str = "cpu") -> dict[str, Any]:
        """The trial's training state in `Trainer.state_dict()` format (for checkpoints, finalizing)."""
        group = self.groups[self.group_of(trial_id)]
        if group.pending.get(trial_id) is not None:
            return _to(dict(group.pending[trial_id]), device)     # joined with it, not trained since
        return _to(self._trainer(group).model_state(group.slots.index(trial_id)), device)

    def pseudo_inputs(self, trial_id: str, n: int = N_PSEUDO_INPUTS) -> torch.Tensor | None:
        """The trial's first n pseudo-inputs, [n, D] on the CPU (None without a VampPrior)."""
        group = self.groups[self.group_of(trial_id)]
        u = self._trainer(group).pseudo_inputs(group.slots.index(trial_id))
        return None if u is None else u[:n].detach().cpu()

    def stats(self) -> dict[str, Any]:
        return {"device": str(self.device), "rounds": self.rounds, "model_epochs": self.model_epochs,
                "groups": [{"members": len(g.configs), "slots": len(g.slots), "rebuilds": g.rebuilds}
                           for g in self.groups.values()]}


class PoolActor:
    """The Ray actor around a TrialPool (async: trials wait for their round without blocking it).

    A round of a group runs once every training member has called `step`. Rounds run in a worker
    thread, one at a time (one device), so the actor keeps answering while a round trains. A
    member that has not called anything for `wait_s` while others wait for it (its process died,
    or Tune stopped it without `leave`) is evicted, so the others never wait forever; an evicted
    trial that comes back gets an error, and Tune retries it from its checkpoint (it joins again
    with that state).
    """

    def __init__(self, device: str = "auto", wait_s: float = 120.0, splits: Splits | None = None):
        self.pool = TrialPool(device, splits)
        if self.pool.device.type == "cpu":
            # Ray starts a 0-CPU actor with one thread; a CPU pool does the compute of all its
            # trials (whose processes only wait for it), so it uses the node's cores.
            torch.set_num_threads(os.cpu_count() or 1)
        self.wait_s = wait_s
        self._waiting: dict[tuple, dict[str, asyncio.Future]] = {}
        self._timers: dict[tuple, asyncio.Task] = {}
        self._running: set[tuple] = set()
        self._last_seen: dict[str, float] = {}
        self._in_call: collections.Counter[str] = collections.Counter()
        self._lock = asyncio.Lock()           # the TrialPool is used by one coroutine at a time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-round")   # the device's work
        self.evicted: list[str] = []

    def _seen(self, trial_id: str) -> None:
        self._last_seen[trial_id] = time.monotonic()

    @contextlib.asynccontextmanager
    async def _call(self, trial_id: str):
        """A call of a member: it is alive while the call lasts (even if it waits for the lock)."""
        self._in_call[trial_id] += 1
        self._seen(trial_id)
        try:
            yield
        finally:
            self._in_call[trial_id] -= 1
            self._seen(trial_id)

    async def _on_device(self, fn, *args):
        """Run fn(*args) on the pool's one device thread, under the pool's lock."""
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def join(self, trial_id: str, config: dict[str, Any], state: dict[str, Any] | None = None) -> int:
        self._seen(trial_id)
        # A future of an earlier incarnation (its process died while waiting) must not count as
        # this one asking for a round.
        for waiting in self._waiting.values():
            future = waiting.pop(trial_id, None)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"trial {trial_id} joined the pool again"))
        async with self._call(trial_id):
            token = await self._on_device(self.pool.join, trial_id, config, state)
        self._maybe_start(self.pool.group_of(trial_id))
        return token

    async def leave(self, trial_id: str, token: int | None = None) -> None:
        await self._remove([trial_id], token)

    async def _remove(self, trial_ids: list[str], token: int | None = None) -> None:
        """Take members out (a leave, or an eviction) and start the rounds that waited only for them."""
        keys = set()
        async with self._lock:
            for trial_id in trial_ids:
                key = self.pool.member_group(trial_id)
                self.pool.leave(trial_id, token)
                if key is None or self.pool.member_group(trial_id) is not None:
                    continue                  # unknown, or a newer incarnation's membership
                keys.add(key)
                self._last_seen.pop(trial_id, None)
                future = self._waiting.get(key, {}).pop(trial_id, None)
                if future is not None and not future.done():
                    future.set_exception(RuntimeError(f"trial {trial_id} left the pool while waiting for a round"))
        for key in keys:
            self._maybe_start(key)

    async def step(self, trial_id: str) -> dict[str, Any]:
        """Wait for the next round of the trial's group; its metrics for that epoch."""
        self._seen(trial_id)
        key = self.pool.group_of(trial_id)
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, {})[trial_id] = future
        if key not in self._timers or self._timers[key].done():
            self._timers[key] = asyncio.ensure_future(self._evict_stale(key))
        self._maybe_start(key)
        return await future

    def _maybe_start(self, key: tuple) -> None:
        """Start the group's round if every training member waits for it (and none is running)."""
        if key in self._running:
            return                      # the running round checks again when it ends
        waiting = self._waiting.get(key, {})
        if not waiting or not set(self.pool.training_members(key)).issubset(waiting):
            return
        futures = self._waiting.pop(key)
        self._running.add(key)
        asyncio.ensure_future(self._round(key, futures))

    async def _round(self, key: tuple, futures: dict[str, asyncio.Future]) -> None:
        try:
            results = await self._on_device(self.pool.run_round, key)
        except Exception as exc:        # e.g. out of memory: every waiter fails, Tune retries them
            await self._remove(self.pool.members(key))
            for future in futures.values():
                if not future.done():
                    future.set_exception(RuntimeError(f"pool round failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._running.discard(key)
        for trial_id, future in futures.items():
            self._seen(trial_id)
            if future.done():
                continue
            if trial_id in results:
                future.set_result(results[trial_id])
            else:
                future.set_exception(RuntimeError(f"trial {trial_id}: no result in the pool's round "
                                                  f"(its training had already stopped)"))
        self._maybe_start(key)          # requests that came in during the round

    async def _evict_stale(self, key: tuple) -> None:
        """While members of the group wait: evict those not heard from for wait_s, then go on."""
        while self._waiting.get(key):
            await asyncio.sleep(min(self.wait_s, max(self.wait_s / 4, 0.05)))
            if key in self._running or not self._waiting.get(key):
                continue
            now = time.monotonic()
            stale = [t for t in self.pool.training_members(key)
                     if t not in self._waiting[key] and not self._in_call[t]
                     and now - self._last_seen.get(t, now) > self.wait_s]
            if stale:
                self.evicted.extend(stale)
                await self._remove(stale)

    async def state(self, trial_id: str) -> dict[str, Any]:
        async with self._call(trial_id):
            return await self._on_device(self.pool.state, trial_id)

    async def pseudo_inputs(self, trial_id: str, n: int = N_PSEUDO_INPUTS) -> torch.Tensor | None:
        async with self._call(trial_id):
            return await self._on_device(self.pool.pseudo_inputs, trial_id, n)

    async def stats(self) -> dict[str, Any]:
        return {**self.pool.stats(), "evicted": list(self.evicted), "time": time.time()}


def pool_name(sweep_id: str, node_id: str, gpu: str | None) -> str:
    return f"{sweep_id}/{node_id}/{'gpu' + gpu if gpu is not None else 'cpu'}"


def get_pool(sweep_id: str, wait_s: float = 120.0):
    """The pool actor of this process's device, created on first use (call inside a trial).

    A trial with a (fractional) GPU uses the pool of that GPU on its node; a CPU trial the
    node's CPU pool. The actor reserves nothing (the trials' fractions account for the GPU),
    is pinned to the trial's node and sees exactly the trial's GPU. It is detached, so it
    outlives the trial that created it; the driver removes the sweep's pools when it ends.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = ray.get_gpu_ids()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if gpu_ids else None
    gpu = visible.split(",")[0] if visible else (str(gpu_ids[0]) if gpu_ids else None)
    env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    actor = ray.remote(PoolActor).options(
        name=pool_name(sweep_id, node_id, gpu), namespace=POOL_NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, num_gpus=0, max_concurrency=1000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        runtime_env={"env_vars": env} if env else None,
    )
    return actor.remote("cuda" if gpu is not None else "cpu", wait_s)


def sweep_pools(sweep_id: str) -> list:
    """Handles of the sweep's pool actors (driver side)."""
    import ray

    handles = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == POOL_NAMESPACE and entry["name"].startswith(f"{sweep_id}/"):
            try:
                handles.append(ray.get_actor(entry["name"], namespace=POOL_NAMESPACE))
            except ValueError:
                pass     # gone meanwhile
    return handles


def remove_pools(sweep_id: str) -> int:
    """Kill the sweep's pool actors (driver side, at the end or the start of a resumed sweep)."""
    import ray

    handles = sweep_pools(sweep_id)
    for handle in handles:
        try:
            ray.kill(handle)
        except Exception:   # its node died with it
            pass
    return len(handles)
