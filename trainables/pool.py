"""Many Tune trials on one device, trained in lock-step as batched models (`BatchedTrainer`).

At batch 100 one VAE's training step is bound by kernel launches: trials that share a GPU as
separate processes only time-slice it (benchmarks/RESULTS.md). A pool instead holds the trials
of one device as slots of `BatchedTrainer`s, one per architecture group (same dataset, prior,
sizes; K, lr, seed, warm-up, optimizer and early stopping may differ), so one batched step
trains every slot. A slot trains exactly as its trial would alone: its data order, noise and
binarisation come from generators of its own (trainables/vae/batched.py). Each Tune trial stays a
trial - its own searcher suggestion, its own scheduler decisions, its own MLflow run and
checkpoints - and only asks the pool "train my next epoch"; an epoch of a group ("round") runs
once every training member of the group has asked for it.

Who owns what (one owner each; nothing mutable is read by two threads):

- `Membership` (the actor's event loop): the members, their incarnations (tokens), the states
  they joined with, whether each still trains, and who asked for the next round. A round
  starts as an immutable `RoundPlan`: exactly the trials that asked, with their validated
  `TrainConfig` and, for a trial not on the device yet, the state it joined with.
- `DeviceTrainers` (the device thread: the actor's one-thread executor): the `BatchedTrainer`s
  and the slot states they hold. It runs a plan and returns a result for exactly the planned
  trials: metrics, or a `Failure` that concerns that trial alone (a state that does not load, a
  batch that ran out of memory: the group is split into smaller trainers and retried). It never
  sees the membership; a plan's `keep` says which other slot states to keep.

    pool = TrialPool("cuda")                                   # both halves, in the caller's thread
    pool.join("a", config_a); pool.join("b", config_b)        # same group: one BatchedTrainer
    metrics = pool.run_round(pool.group_of("a"))              # {"a": {...}, "b": {...}}
    state = pool.state("a")                                   # Trainer.state_dict() format
    pool.leave("a")                                           # the next round rebuilds without it

`PoolActor` is the Ray actor around the two halves: one per device (named after the sweep, the
node and the GPU), created by the first trial that needs it, shared by every trial on that GPU.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from trainables.vae.batched import SHARED_FIELDS, BatchedTrainer
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits, load_dataset
from trainables.vae.model import LatentVariableModel
from trainables.vae.train import Trainer, build_trial_model, fixed_subset, resolve_device

# Ray namespace of the pool actors: fixed, so a resumed sweep (a new driver) finds its pools.
POOL_NAMESPACE = "sweeper-pools"
N_PSEUDO_INPUTS = 100   # pseudo-inputs returned for a trial's image grid

log = logging.getLogger(__name__)

SlotId = tuple[str, int]          # (trial id, token of the incarnation that owns the slot)


def group_key(config: TrainConfig) -> tuple:
    """Trials with equal keys can share one BatchedTrainer (see batched.SHARED_FIELDS); the device
    is the pool's own (one pool per device), so it is not part of the key."""
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


class PoolError(RuntimeError):
    """A pool request that failed for one trial (it must join again, from its checkpoint)."""


class NotAMember(PoolError):
    """The trial is not (or no longer) in the pool: it left, was evicted, or the pool restarted."""


# -- the plan and its results: immutable messages between the two owners ----------------------
@dataclass(frozen=True)
class PlanEntry:
    """One trial that asked for this round."""

    trial_id: str
    token: int                                   # its incarnation (latest join)
    config: TrainConfig                          # validated once, when the trial was built
    placed: bool                                 # its slot state is on the device (it trained here)
    state: Mapping[str, Any] | None = None       # not placed: the state it joined with (None: fresh)

    @property
    def slot(self) -> SlotId:
        return (self.trial_id, self.token)


@dataclass(frozen=True)
class RoundPlan:
    """One epoch for exactly `train` (in slot order); `keep`: other slot states to keep (members
    that do not train now, e.g. stopped ones that are being finalized). Anything else goes."""

    key: tuple
    train: tuple[PlanEntry, ...]
    keep: frozenset[SlotId] = frozenset()


@dataclass(frozen=True)
class Failure:
    """Why a planned trial got no epoch; it concerns that trial alone."""

    message: str


@dataclass(frozen=True)
class RoundResult:
    """A plan's outcome: per planned trial id, its epoch's metrics (Trainer.step's) or a Failure."""

    results: Mapping[str, dict[str, Any] | Failure]
    trainers: int                               # BatchedTrainers the group trained in
    rebuilt: bool


# -- the membership: one owner (the actor's event loop, or TrialPool's caller) ------------------
@dataclass
class Member:
    config: TrainConfig
    key: tuple
    token: int
    state: Mapping[str, Any] | None     # the state it joined with, until a round places it
    placed: bool = False                # its slot state is on the device
    training: bool = True               # False once its training stopped (it is being finalized)


class Membership:
    """Who is in the pool, in which group and incarnation, and what the next round trains.

    Plain bookkeeping, no device work and no locks: its one owner calls it (the actor's event
    loop); the device side only ever sees the immutable plans it makes.
    """

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self._tokens = itertools.count(1)

    def join(self, trial_id: str, config: TrainConfig, state: Mapping[str, Any] | None = None) -> tuple[int, Member | None]:
        """Add a trial, or replace its earlier incarnation (a retry or a restore brings its
        checkpoint state). It trains from the next plan on. Returns (its token, the replaced member)."""
        old = self.members.get(trial_id)
        training = state is None or state.get("stop_reason") is None
        member = Member(config, group_key(config), next(self._tokens), state, training=training)
        self.members[trial_id] = member
        return member.token, old

    def leave(self, trial_id: str, token: int | None = None) -> Member | None:
        """Forget a trial (idempotent); a `token` other than its latest join's is ignored (a late
        leave of an earlier incarnation). Returns the member that left, if any."""
        member = self.members.get(trial_id)
        if member is None or (token is not None and token != member.token):
            return None
        return self.members.pop(trial_id)

    def get(self, trial_id: str) -> Member:
        try:
            return self.members[trial_id]
        except KeyError:
            raise NotAMember(f"trial {trial_id} is not in this pool (it left, was evicted, or the pool was "
                             f"restarted); it must join again") from None

    def in_group(self, key: tuple) -> list[str]:
        return [t for t, m in self.members.items() if m.key == key]

    def training(self, key: tuple) -> list[str]:
        """Members of the group that train in its next round (their training has not stopped)."""
        return [t for t, m in self.members.items() if m.key == key and m.training]

    def keep(self, key: tuple) -> frozenset[SlotId]:
        """The slots of this group's current members: the device keeps their states. Members not
        placed yet count too: a round in flight may be placing them."""
        return frozenset((t, m.token) for t, m in self.members.items() if m.key == key)

    def plan(self, key: tuple, trial_ids: Collection[str]) -> RoundPlan:
        """The round of `trial_ids` (members of `key` that asked), in join order."""
        ordered = sorted(trial_ids, key=lambda t: self.members[t].token)
        entries = []
        for trial_id in ordered:
            m = self.members[trial_id]
            entries.append(PlanEntry(trial_id, m.token, m.config, m.placed, None if m.placed else m.state))
        return RoundPlan(key, tuple(entries), self.keep(key))

    def apply(self, plan: RoundPlan, outcome: RoundResult) -> list[str]:
        """Record a finished round: trained trials are placed (their join state is dropped), those
        whose training stopped no longer train, and failed ones leave (they join again from their
        checkpoints). Results of incarnations that left or joined again meanwhile are dropped.
        Returns the trial ids whose incarnation is still current."""
        current = []
        for entry in plan.train:
            member = self.members.get(entry.trial_id)
            if member is None or member.token != entry.token:
                continue
            current.append(entry.trial_id)
            result = outcome.results[entry.trial_id]
            if isinstance(result, Failure):
                del self.members[entry.trial_id]
                continue
            member.placed, member.state = True, None
            if result.get("stop_reason") is not None:
                member.training = False
        return current


# -- the device: one owner (the device thread) ---------------------------------------------------
@dataclass
class _Shard:
    """One BatchedTrainer and which incarnation owns each of its slots."""

    trainer: BatchedTrainer
    slots: list[SlotId]


@dataclass
class _DeviceGroup:
    shards: list[_Shard] = field(default_factory=list)
    parked: dict[SlotId, dict[str, Any]] = field(default_factory=dict)   # states outside any trainer
    max_slots: int | None = None          # after an out-of-memory: at most this many slots per trainer
    rebuilds: int = 0


class DeviceTrainers:
    """The device's half of a pool: the groups' BatchedTrainers and the slot states they hold.

    Only one thread calls it (the pool's device thread). It runs `RoundPlan`s and answers state
    requests for (trial id, token) slots; it knows nothing of the membership.
    """

    def __init__(self, device: torch.device | str | None = None, splits: Splits | None = None,
                 build: Callable[..., BatchedTrainer] = BatchedTrainer):
        self.device = resolve_device(str(device)) if device is not None else resolve_device("auto")
        self.groups: dict[tuple, _DeviceGroup] = {}
        self._splits: dict[tuple[str, str | None], Splits] = {}
        self._given_splits = splits      # tests: every group trains on these
        self._build = build              # tests inject failures here
        self.rounds = 0
        self.model_epochs = 0

    def _splits_for(self, cfg: TrainConfig) -> Splits:
        if self._given_splits is not None:
            return self._given_splits
        key = (cfg.dataset, cfg.data_root)
        if key not in self._splits:
            self._splits[key] = load_dataset(cfg.dataset, cfg.data_root)
        return self._splits[key]

    def _free_device_memory(self) -> None:
        # Freed trainers (and their CUDA graphs) go back to the GPU, not only to this process's
        # cache: the trials on this GPU need memory for their final evaluation.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- states ------------------------------------------------------------------------------
    def _find(self, group: _DeviceGroup, slot: SlotId) -> tuple[_Shard, int] | None:
        for shard in group.shards:
            if slot in shard.slots:
                return shard, shard.slots.index(slot)
        return None

    def _slot_state(self, group: _DeviceGroup, slot: SlotId) -> dict[str, Any] | None:
        found = self._find(group, slot)
        if found is not None:
            shard, m = found
            return shard.trainer.model_state(m)
        return group.parked.get(slot)

    def retain(self, key: tuple, keep: Collection[SlotId]) -> None:
        """Drop the group's states that belong to no current member (left, evicted, replaced).
        Trainers holding such slots are rebuilt by the next round; an empty group is freed."""
        group = self.groups.get(key)
        if group is None:
            return
        keep = set(keep)
        for slot in [s for s in group.parked if s not in keep]:
            del group.parked[slot]
        if not keep:
            del self.groups[key]
            self._free_device_memory()

    def state_of(self, key: tuple, slot: SlotId) -> dict[str, Any]:
        """A placed slot's state in `Trainer.state_dict()` format, on the CPU."""
        group = self.groups.get(key)
        state = self._slot_state(group, slot) if group is not None else None
        if state is None:
            raise PoolError(f"trial {slot[0]}: its state is no longer in the pool (its trainer failed); "
                            f"it must join again from its checkpoint")
        return _to(state, "cpu")

    def initial_state(self, config: TrainConfig) -> dict[str, Any]:
        """The state of a trial that has not trained yet: its run as its seed starts it (on the
        CPU: no device memory for a state nobody trains)."""
        with torch.random.fork_rng(devices=[]):      # Trainer seeds torch's global generator
            return Trainer(config, self._splits_for(config), "cpu").state_dict()

    def _single_model(self, config: TrainConfig, state: Mapping[str, Any] | None) -> LatentVariableModel:
        """The trial's single model on the CPU: as its seed builds it, or with `state`'s weights."""
        splits = self._splits_for(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)            # as Trainer builds it
            model = build_trial_model(config, splits.info, fixed_subset(splits.train, config.train_subset, "cpu"))
        if state is not None:
            model.load_state_dict(_to(dict(state["model"]), "cpu"))
        return model

    def pseudo_inputs(self, key: tuple | None, slot: SlotId | None, config: TrainConfig,
                      state: Mapping[str, Any] | None, n: int) -> torch.Tensor | None:
        """The first n pseudo-inputs [n, D] on the CPU of a placed slot, else of `state` (None:
        the trial's initial model); None without a VampPrior."""
        group = self.groups.get(key) if key is not None else None
        found = self._find(group, slot) if group is not None and slot is not None else None
        if found is not None:
            shard, m = found
            u = shard.trainer.pseudo_inputs(m)
        else:
            if slot is not None and group is not None and slot in group.parked:
                state = group.parked[slot]
            elif slot is not None:
                raise PoolError(f"trial {slot[0]}: its state is no longer in the pool; it must join again")
            u = getattr(self._single_model(config, state).prior, "pseudo_inputs", None)
        return None if u is None else u[:n].detach().cpu()

    # -- rounds ------------------------------------------------------------------------------
    def run_round(self, plan: RoundPlan) -> RoundResult:
        """One epoch for exactly the planned trials; a result (metrics or Failure) for each."""
        group = self.groups.setdefault(plan.key, _DeviceGroup())
        wanted = [e.slot for e in plan.train]
        results: dict[str, dict[str, Any] | Failure] = {}
        rebuilt = False
        current = [s for shard in group.shards for s in shard.slots]
        if sorted(current) != sorted(wanted) or not all(e.placed for e in plan.train):
            self._rebuild(group, plan, results)
            rebuilt = True
        for shard in group.shards:
            self._train(group, shard, results)
        self.rounds += 1
        self.model_epochs += sum(1 for r in results.values() if not isinstance(r, Failure))
        for entry in plan.train:
            results.setdefault(entry.trial_id, Failure("no result in the pool's round (its trainer failed)"))
        return RoundResult(results, len(group.shards), rebuilt)

    def _rebuild(self, group: _DeviceGroup, plan: RoundPlan, results: dict[str, Any]) -> None:
        """New trainers for exactly the planned slots; states of kept slots are parked."""
        planned = {e.slot for e in plan.train}
        states: dict[SlotId, dict[str, Any]] = {}
        for shard in group.shards:
            for m, slot in enumerate(shard.slots):
                if slot in planned or slot in plan.keep:
                    states[slot] = shard.trainer.model_state(m)
        group.shards = []                        # the old trainers go first (device memory)
        self._free_device_memory()
        for slot, state in states.items():
            if slot not in planned:
                group.parked[slot] = state       # a stopped member's, until it leaves
        entries = []
        for entry in plan.train:
            if entry.placed:
                state = states.get(entry.slot, group.parked.get(entry.slot))
                if state is None:
                    results[entry.trial_id] = Failure("its state is no longer in the pool (its trainer failed); "
                                                      "it must join again from its checkpoint")
                    continue
            else:
                state = _to(entry.state, self.device) if entry.state is not None else None
            group.parked.pop(entry.slot, None)
            entries.append((entry, state))
        size = group.max_slots or max(1, len(entries))
        for i in range(0, len(entries), size):
            self._build_shards(group, entries[i:i + size], results)
        group.rebuilds += 1

    def _build_shards(self, group: _DeviceGroup, entries: list, results: dict[str, Any]) -> None:
        """One trainer for `entries`; if that fails, halves (an out-of-memory also lowers the
        group's trainer size), down to the single trials whose own state or config fails."""
        if not entries:
            return
        try:
            trainer = self._build([e.config for e, _ in entries], self._splits_for(entries[0][0].config),
                                  self.device, states=[s for _, s in entries])
        except Exception as exc:
            self._free_device_memory()
            if len(entries) == 1:
                results[entries[0][0].trial_id] = Failure(f"its slot could not be built: {type(exc).__name__}: {exc}")
                return
            if isinstance(exc, torch.OutOfMemoryError):
                group.max_slots = max(1, len(entries) // 2)
            log.warning("pool: a trainer for %d trials failed (%s: %s); building smaller ones",
                        len(entries), type(exc).__name__, exc)
            half = len(entries) // 2
            self._build_shards(group, entries[:half], results)
            self._build_shards(group, entries[half:], results)
            return
        group.shards.append(_Shard(trainer, [e.slot for e, _ in entries]))

    def _train(self, group: _DeviceGroup, shard: _Shard, results: dict[str, Any]) -> None:
        """One epoch of one trainer. If it raises, its trials fail (their weights are in an
        unknown state) and the trainer goes; the group's other trainers are not affected."""
        trainer = shard.trainer
        try:
            per_slot = trainer.step()
        except Exception as exc:
            group.shards.remove(shard)
            self._free_device_memory()
            if isinstance(exc, torch.OutOfMemoryError):
                group.max_slots = max(1, trainer.M // 2)
            for trial_id, _ in shard.slots:
                results[trial_id] = Failure(f"its batched epoch failed: {type(exc).__name__}: {exc}")
            return
        for (trial_id, _), metrics in zip(shard.slots, per_slot):
            if metrics is None:
                results[trial_id] = Failure("its training had already stopped")
            else:
                results[trial_id] = {**metrics, "pool_size": trainer.M}

    def snapshot(self) -> dict[str, Any]:
        return {"device": str(self.device), "rounds": self.rounds, "model_epochs": self.model_epochs,
                "trainers": {str(key): [len(s.slots) for s in g.shards] for key, g in self.groups.items()},
                "rebuilds": {str(key): g.rebuilds for key, g in self.groups.items()}}


def _as_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """A trial's config: a TrainConfig was validated where it was built (TrainConfig.from_dict, in
    the trial), a mapping is validated here, once."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)


class TrialPool:
    """Both halves of a pool driven from one thread (tests, benchmarks): `join`, `run_round`, ..."""

    def __init__(self, device: torch.device | str | None = None, splits: Splits | None = None, **kw):
        self.membership = Membership()
        self.device_trainers = DeviceTrainers(device, splits, **kw)
        self.device = self.device_trainers.device

    def join(self, trial_id: str, config: TrainConfig | Mapping[str, Any],
             state: Mapping[str, Any] | None = None) -> int:
        token, _ = self.membership.join(trial_id, _as_config(config), state)
        return token

    def leave(self, trial_id: str, token: int | None = None) -> None:
        member = self.membership.leave(trial_id, token)
        if member is not None:
            self.device_trainers.retain(member.key, self.membership.keep(member.key))

    def group_of(self, trial_id: str) -> tuple:
        return self.membership.get(trial_id).key

    def members(self, key: tuple) -> list[str]:
        return self.membership.in_group(key)

    def training_members(self, key: tuple) -> list[str]:
        return self.membership.training(key)

    def run_round(self, key: tuple, trial_ids: Collection[str] | None = None) -> dict[str, dict[str, Any] | Failure]:
        """One epoch of the group's training members (or of `trial_ids`): {trial id: metrics or Failure}."""
        ids = self.membership.training(key) if trial_ids is None else list(trial_ids)
        if not ids:
            return {}
        plan = self.membership.plan(key, ids)
        outcome = self.device_trainers.run_round(plan)
        self.membership.apply(plan, outcome)
        return dict(outcome.results)

    def state(self, trial_id: str) -> dict[str, Any]:
        member = self.membership.get(trial_id)
        if not member.placed:
            return (_to(dict(member.state), "cpu") if member.state is not None
                    else self.device_trainers.initial_state(member.config))
        return self.device_trainers.state_of(member.key, (trial_id, member.token))

    def pseudo_inputs(self, trial_id: str, n: int = N_PSEUDO_INPUTS) -> torch.Tensor | None:
        member = self.membership.get(trial_id)
        slot = (trial_id, member.token) if member.placed else None
        return self.device_trainers.pseudo_inputs(member.key, slot, member.config, member.state, n)


class PoolActor:
    """The Ray actor around a pool (async: trials wait for their round without blocking it).

    The event loop owns the `Membership` and the trials' waiting requests; the device thread (a
    one-thread executor) owns the `DeviceTrainers`. A group's round starts, as an immutable plan,
    once every training member has asked (`step`); a trial that joins meanwhile is in the next
    plan, never in a running one. A member that has not called anything for `wait_s` while others
    wait for it (its process died, or Tune stopped it without `leave`) is evicted, so the others
    never wait forever; an evicted trial that comes back gets an error, and Tune retries it from
    its checkpoint (it joins again with that state).
    """

    def __init__(self, device: str = "auto", wait_s: float = 120.0, splits: Splits | None = None,
                 clock: Callable[[], float] = time.monotonic, **device_kw):
        self._device = DeviceTrainers(device, splits, **device_kw)
        if self._device.device.type == "cpu":
            # Ray starts a 0-CPU actor with one thread; a CPU pool does the compute of all its
            # trials (whose processes only wait for it), so it uses the node's cores.
            torch.set_num_threads(os.cpu_count() or 1)
        self.wait_s = wait_s
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-device")
        # Owned by the event loop:
        self._membership = Membership()
        self._waiting: dict[str, asyncio.Future] = {}     # trial id -> its request for the next round
        self._running: set[tuple] = set()                  # groups with a round on the device
        self._timers: dict[tuple, asyncio.Task] = {}
        self._last_seen: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self.evicted: list[str] = []
        self.rounds = 0
        self.model_epochs = 0

    # -- helpers (event loop) ----------------------------------------------------------------
    async def _on_device(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)            # keep a reference: the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    def _seen(self, trial_id: str) -> None:
        self._last_seen[trial_id] = self._clock()

    def _fail_waiting(self, trial_id: str, message: str) -> None:
        future = self._waiting.pop(trial_id, None)
        if future is not None and not future.done():
            future.set_exception(PoolError(message))

    def _retain(self, key: tuple) -> None:
        """Let the device drop the states of members that are gone (in order, after queued rounds)."""
        self._spawn(self._on_device(self._device.retain, key, self._membership.keep(key)))

    # -- the trials' calls ---------------------------------------------------------------------
    async def join(self, trial_id: str, config: TrainConfig | Mapping[str, Any],
                   state: Mapping[str, Any] | None = None) -> int:
        """Join (or join again: a retry or a restore brings its checkpoint state). Returns a token for `leave`."""
        self._seen(trial_id)
        # A request of an earlier incarnation (its process died while waiting) must not count
        # as this one asking for a round.
        self._fail_waiting(trial_id, f"trial {trial_id} joined the pool again")
        token, old = self._membership.join(trial_id, _as_config(config), state)
        if old is not None:
            self._retain(old.key)
            if old.key != self._membership.get(trial_id).key:
                self._maybe_start(old.key)
        return token

    async def leave(self, trial_id: str, token: int | None = None) -> None:
        self._remove([trial_id], token)

    def _remove(self, trial_ids: list[str], token: int | None = None) -> None:
        """Take members out (a leave, or an eviction) and start the rounds that waited only for them."""
        keys = set()
        for trial_id in trial_ids:
            member = self._membership.leave(trial_id, token)
            if member is None:
                continue                  # unknown, or a newer incarnation's membership
            keys.add(member.key)
            self._last_seen.pop(trial_id, None)
            self._fail_waiting(trial_id, f"trial {trial_id} left the pool while waiting for a round")
        for key in keys:
            self._retain(key)
            self._maybe_start(key)

    async def step(self, trial_id: str) -> dict[str, Any]:
        """Wait for the next round of the trial's group; its metrics for that epoch."""
        self._seen(trial_id)
        member = self._membership.get(trial_id)
        if not member.training:
            raise PoolError(f"trial {trial_id}: its training has already stopped")
        self._fail_waiting(trial_id, f"trial {trial_id} asked again for a round")
        future = asyncio.get_running_loop().create_future()
        self._waiting[trial_id] = future
        if member.key not in self._timers or self._timers[member.key].done():
            self._timers[member.key] = asyncio.ensure_future(self._evict_stale(member.key))
        self._maybe_start(member.key)
        return await future

    def _maybe_start(self, key: tuple) -> None:
        """Start the group's round if every training member waits for it (and none is running)."""
        if key in self._running:
            return                      # the running round checks again when it ends
        training = self._membership.training(key)
        if not training or any(t not in self._waiting or self._waiting[t].done() for t in training):
            return
        futures = {t: self._waiting.pop(t) for t in training}
        plan = self._membership.plan(key, training)
        self._running.add(key)
        self._spawn(self._round(plan, futures))

    async def _round(self, plan: RoundPlan, futures: dict[str, asyncio.Future]) -> None:
        try:
            outcome = await self._on_device(self._device.run_round, plan)
        except Exception as exc:        # a bug, not a trial's failure: the planned trials fail, no one else
            log.exception("pool round failed")
            outcome = RoundResult({e.trial_id: Failure(f"the pool's round failed: {type(exc).__name__}: {exc}")
                                   for e in plan.train}, 0, False)
        finally:
            self._running.discard(plan.key)
        self._membership.apply(plan, outcome)
        self.rounds += 1
        for entry in plan.train:
            result = outcome.results[entry.trial_id]
            future = futures[entry.trial_id]
            self._seen(entry.trial_id)
            if future.done():
                continue                 # it joined again or left meanwhile: told so then
            if isinstance(result, Failure):
                future.set_exception(PoolError(f"trial {entry.trial_id} failed in its pool round: {result.message}"))
            else:
                self.model_epochs += 1
                future.set_result(result)
        if any(isinstance(r, Failure) for r in outcome.results.values()):
            self._retain(plan.key)
        self._maybe_start(plan.key)      # requests that came in during the round

    def stale_members(self, key: tuple) -> list[str]:
        """Training members of the group that others wait for and that have not been heard from
        (no request, no call in progress) for more than wait_s."""
        now = self._clock()
        return [t for t in self._membership.training(key)
                if t not in self._waiting and not self._calls.get(t)
                and now - self._last_seen.get(t, now) > self.wait_s]

    async def _evict_stale(self, key: tuple) -> None:
        """While members of the group wait: evict those not heard from for wait_s, then go on."""
        while any(t in self._waiting for t in self._membership.training(key)):
            await asyncio.sleep(min(self.wait_s, max(self.wait_s / 4, 0.05)))
            if key in self._running:
                continue
            stale = self.stale_members(key)
            if stale:
                self.evicted.extend(stale)
                self._remove(stale)

    async def _request(self, trial_id: str, fn, *args):
        """A member's request that needs the device: it counts as alive while it lasts."""
        self._calls[trial_id] = self._calls.get(trial_id, 0) + 1
        self._seen(trial_id)
        try:
            return await self._on_device(fn, *args)
        finally:
            self._calls[trial_id] -= 1
            self._seen(trial_id)

    async def state(self, trial_id: str) -> dict[str, Any]:
        """The trial's training state in `Trainer.state_dict()` format, on the CPU (checkpoints, finalizing)."""
        member = self._membership.get(trial_id)
        if not member.placed:
            if member.state is not None:
                return _to(dict(member.state), "cpu")
            return await self._request(trial_id, self._device.initial_state, member.config)
        return await self._request(trial_id, self._device.state_of, member.key, (trial_id, member.token))

    async def pseudo_inputs(self, trial_id: str, n: int = N_PSEUDO_INPUTS) -> torch.Tensor | None:
        member = self._membership.get(trial_id)
        slot = (trial_id, member.token) if member.placed else None
        return await self._request(trial_id, self._device.pseudo_inputs, member.key, slot, member.config,
                                   member.state, n)

    async def stats(self) -> dict[str, Any]:
        """The membership as the event loop sees it, and the device's counters (after queued work)."""
        device = await self._on_device(self._device.snapshot)
        groups = {}
        for member in self._membership.members.values():
            groups.setdefault(member.key, []).append(member)
        return {**device, "rounds": self.rounds, "model_epochs": self.model_epochs,
                "groups": [{"members": len(ms), "training": sum(m.training for m in ms)} for ms in groups.values()],
                "evicted": list(self.evicted), "time": time.time()}


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
