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
  they joined with, whether each still trains or was evicted, and each one's `Request` (its
  pending step, when it was last heard from, its calls in flight). A round starts as an
  immutable `RoundPlan`: exactly the trials that asked, with their validated `TrainConfig` and,
  for a trial not on the device yet, the state it joined with.
- `DeviceTrainers` (the device thread: the actor's one-thread executor): the `BatchedTrainer`s
  and the slot states they hold. It runs a plan and returns a result for exactly the planned
  trials: metrics, or a `Failure` that concerns that trial alone (a state that does not load, a
  trainer whose step raised). It never sees the membership; a plan's `keep` says which other
  slot states to keep.
- torch's global random generator (the device thread): building a trainer seeds it and draws the
  initial weights from it, so nothing else in the pool's process may draw from it meanwhile
  (a Trainer built on another thread changes the weights a build draws).

Out of memory: a trainer that runs out of device memory, in its build or in its step, is
replaced by smaller ones, built from the states its slots had before (a step changes its
trainer's weights in place, so the slot states are copied to host memory before each step; the
first step after a build has the states it was built from), and the round runs again for them:
each trial still trains each epoch once, as it would alone. The size that fitted is kept per
group key, also after the group is gone: a group built again starts at that size.

What the pool keeps of trials that stop answering, and for how long (`PoolActor`): an evicted
trial's state (of the last epoch it completed) until it joins again, leaves or is forgotten; a
trial not heard from for `forget_s` is forgotten, its state dropped; a group none of whose
members trains (all stopped or evicted) holds its states in host memory, not in trainers.

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
import gc
import itertools
import logging
import os
import time
from collections import deque
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
# A member not heard from for this long while others wait for it is evicted (its process died,
# or Tune stopped it without `leave`). A step's own waits (its MLflow outbox) stay well below it.
EVICT_WAIT_S = 120.0
FORGET_AFTER_WAITS = 10  # default forget_s in units of wait_s: long past an eviction, a trial is dead

log = logging.getLogger(__name__)

SlotId = tuple[str, int]          # (trial id, token of the incarnation that owns the slot)


def group_key(config: TrainConfig) -> tuple:
    """Trials with equal keys can share one BatchedTrainer (see batched.SHARED_FIELDS); the device
    is the pool's own (one pool per device), so it is not part of the key."""
    return tuple(getattr(config, name) for name in SHARED_FIELDS if name != "device")


def _to(value: Any, device: torch.device | str) -> Any:
    """A state dict's tensors moved (CPU for transport and for states outside a trainer)."""
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
    that do not train now: stopped ones that are being finalized, evicted ones). Anything else goes."""

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
class Request:
    """One member's dealings with the pool actor: its step call, when it was last heard from, its
    calls in flight. One per incarnation (a join starts a new one), and the rules between its
    fields are these methods; nothing else interprets them.

    A step call that is cancelled (e.g. `ray.cancel`) is done: it neither waits nor asks any
    more, and the member is heard from again only when it calls again.
    """

    last_seen: float
    calls: int = 0                                  # device calls in flight (state, pseudo_inputs)
    step: asyncio.Future | None = None              # its latest step call (answered, cancelled or pending)
    in_round: bool = False                          # a round on the device trains its next epoch
    unclaimed: dict[str, Any] | None = None         # that epoch's metrics, whose step call was cancelled

    @property
    def waiting(self) -> bool:
        """Its step call waits for an answer."""
        return self.step is not None and not self.step.done()

    @property
    def asking(self) -> bool:
        """It waits for a round that has not started yet: the group's next round can count it."""
        return self.waiting and not self.in_round

    def silent_for(self, now: float) -> float:
        """How long it has not been heard from: never while its step waits, a round trains it, or
        a call of it is in flight."""
        if self.waiting or self.in_round or self.calls:
            return 0.0
        return now - self.last_seen

    def fail(self, error: PoolError) -> None:
        """Answer its waiting step call (if any) with an error."""
        if self.waiting:
            self.step.set_exception(error)


@dataclass
class Member:
    config: TrainConfig
    key: tuple
    token: int
    state: Mapping[str, Any] | None     # the state it joined with, until a round places it
    epoch: int = 0                      # the last epoch it completed (its state's "epoch")
    placed: bool = False                # its slot state is on the device
    training: bool = True               # False once its training stopped (it is being finalized)
    evicted: bool = False               # out of the rounds (it stopped answering); its state stays
    request: Request = field(default_factory=lambda: Request(0.0))


class Membership:
    """Who is in the pool, in which group and incarnation, and what the next round trains.

    Plain bookkeeping, no device work and no locks: its one owner calls it (the actor's event
    loop); the device side only ever sees the immutable plans it makes. An evicted member stays
    (its state is still answered for) but is in no group's rounds; a join replaces it.
    """

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self._tokens = itertools.count(1)

    def join(self, trial_id: str, config: TrainConfig, state: Mapping[str, Any] | None = None,
             now: float = 0.0) -> tuple[int, Member | None]:
        """Add a trial, or replace its earlier incarnation, evicted or not (a retry or a restore
        brings its checkpoint state). It trains from the next plan on. Returns (its token, the
        replaced member)."""
        old = self.members.get(trial_id)
        training = state is None or state.get("stop_reason") is None
        epoch = int(state["epoch"]) if state is not None else 0
        member = Member(config, group_key(config), next(self._tokens), state, epoch, training=training,
                        request=Request(now))
        self.members[trial_id] = member
        return member.token, old

    def leave(self, trial_id: str, token: int | None = None) -> Member | None:
        """Forget a trial (idempotent); a `token` other than its latest join's is ignored (a late
        leave of an earlier incarnation). Returns the member that left, if any."""
        member = self.members.get(trial_id)
        if member is None or (token is not None and token != member.token):
            return None
        return self.members.pop(trial_id)

    def evict(self, trial_id: str) -> Member | None:
        """Take a member out of its group's rounds, keeping its state. Returns it, unless it was not
        a (current) member."""
        member = self.members.get(trial_id)
        if member is None or member.evicted:
            return None
        member.evicted = True
        return member

    def holder(self, trial_id: str) -> Member:
        """The member whose state the pool holds for the trial: a current or an evicted one."""
        try:
            return self.members[trial_id]
        except KeyError:
            raise NotAMember(f"trial {trial_id} is not in this pool (it left, was forgotten, or the pool was "
                             f"restarted); it must join again") from None

    def get(self, trial_id: str) -> Member:
        """A current member: one that trains, or is being finalized, in its group."""
        member = self.holder(trial_id)
        if member.evicted:
            raise NotAMember(f"trial {trial_id} was evicted from the pool (not heard from while its group waited "
                             f"for it); its state of epoch {member.epoch} is still there (state()), and it must "
                             f"join again to train")
        return member

    def in_group(self, key: tuple) -> list[str]:
        return [t for t, m in self.members.items() if m.key == key and not m.evicted]

    def training(self, key: tuple) -> list[str]:
        """Members of the group that train in its next round (their training has not stopped)."""
        return [t for t, m in self.members.items() if m.key == key and m.training and not m.evicted]

    def training_slots(self, key: tuple) -> frozenset[SlotId]:
        return frozenset((t, self.members[t].token) for t in self.training(key))

    def keep(self, key: tuple) -> frozenset[SlotId]:
        """The slots whose states the device keeps: every member's of the group, evicted ones'
        included. Members not placed yet count too: a round in flight may be placing them."""
        return frozenset((t, m.token) for t, m in self.members.items() if m.key == key)

    def plan(self, key: tuple, trial_ids: Collection[str]) -> RoundPlan:
        """The round of `trial_ids` (members of `key` that asked), in join order."""
        ordered = sorted(trial_ids, key=lambda t: self.members[t].token)
        entries = []
        for trial_id in ordered:
            m = self.members[trial_id]
            entries.append(PlanEntry(trial_id, m.token, m.config, m.placed, None if m.placed else m.state))
        return RoundPlan(key, tuple(entries), self.keep(key))

    def apply(self, plan: RoundPlan, outcome: RoundResult) -> dict[str, Member]:
        """Record a finished round: trained trials are placed (their join state is dropped), those
        whose training stopped no longer train, and failed ones leave (they join again from their
        checkpoints). Results of incarnations that left or joined again meanwhile are dropped.
        Returns the planned members whose incarnation is still current (failed ones included)."""
        current = {}
        for entry in plan.train:
            member = self.members.get(entry.trial_id)
            if member is None or member.token != entry.token:
                continue
            current[entry.trial_id] = member
            result = outcome.results[entry.trial_id]
            if isinstance(result, Failure):
                del self.members[entry.trial_id]
                continue
            member.placed, member.state, member.epoch = True, None, result["epoch"]
            if result.get("stop_reason") is not None:
                member.training = False
        return current


# -- the device: one owner (the device thread) ---------------------------------------------------
@dataclass
class _Shard:
    """One BatchedTrainer and which incarnation owns each of its slots."""

    trainer: BatchedTrainer
    slots: list[SlotId]


@dataclass(frozen=True)
class _Seat:
    """A slot to build a trainer with: its config and the state it starts from (in host memory;
    None: as its seed starts it)."""

    slot: SlotId
    config: TrainConfig
    state: Mapping[str, Any] | None

    @property
    def trial_id(self) -> str:
        return self.slot[0]


@dataclass(frozen=True)
class _Error:
    """What a build or a step raised, without the exception itself: its traceback holds the
    failed trainer's frames, and with them its device memory."""

    text: str
    out_of_memory: bool

    @classmethod
    def of(cls, exc: Exception) -> _Error:
        return cls(f"{type(exc).__name__}: {exc}", isinstance(exc, torch.OutOfMemoryError))


@dataclass
class _DeviceGroup:
    shards: list[_Shard] = field(default_factory=list)
    parked: dict[SlotId, dict[str, Any]] = field(default_factory=dict)   # states outside any trainer (host)
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
        # Per group key, the most slots a trainer may hold (lowered by each out-of-memory). Not in
        # the group: a group whose members all failed is freed, and its retries must not build
        # the trainer that did not fit again.
        self.max_slots: dict[tuple, int] = {}
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
        # A BatchedTrainer is in reference cycles (its vmapped bound methods, its CUDA graph's
        # closure): one that is dropped is freed only by the cyclic collector. Then its memory goes
        # back to the GPU, not only to this process's cache: smaller trainers are built in it after
        # an out-of-memory, and the trials on this GPU need memory for their final evaluation.
        gc.collect()
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

    @staticmethod
    def _take_states(group: _DeviceGroup, slots: Collection[SlotId]) -> dict[SlotId, dict[str, Any]]:
        """Host copies of the states of `slots` that the group's trainers hold."""
        return {slot: _to(shard.trainer.model_state(m), "cpu")
                for shard in group.shards for m, slot in enumerate(shard.slots) if slot in slots}

    def retain(self, key: tuple, keep: Collection[SlotId], training: Collection[SlotId]) -> None:
        """Drop the group's states that belong to no current member (left, forgotten, replaced);
        trainers holding such slots are rebuilt by the next round. A group with no `training` slot
        holds no trainer: the states to keep are parked in host memory and the trainers freed. An
        empty group is freed."""
        group = self.groups.get(key)
        if group is None:
            return
        keep = set(keep)
        if not keep:
            group.shards.clear()
            del self.groups[key]
            self._free_device_memory()
            return
        for slot in [s for s in group.parked if s not in keep]:
            del group.parked[slot]
        if group.shards and not training:
            group.parked.update(self._take_states(group, keep))
            group.shards = []
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
        results: dict[str, dict[str, Any] | Failure] = {}
        current = sorted(s for shard in group.shards for s in shard.slots)
        rebuilt = current != sorted(e.slot for e in plan.train) or not all(e.placed for e in plan.train)
        work: deque[_Shard | list[_Seat]] = deque()
        if rebuilt:
            seats = self._rebuild(group, plan, results)
            size = self.max_slots.get(plan.key) or max(1, len(seats))
            work.extend(seats[i:i + size] for i in range(0, len(seats), size))
        else:
            work.extend(group.shards)
        self._run(plan.key, group, work, results)
        self.rounds += 1
        self.model_epochs += sum(1 for r in results.values() if not isinstance(r, Failure))
        for entry in plan.train:
            results.setdefault(entry.trial_id, Failure("no result in the pool's round (its trainer failed)"))
        return RoundResult(results, len(group.shards), rebuilt)

    def _rebuild(self, group: _DeviceGroup, plan: RoundPlan, results: dict[str, Any]) -> list[_Seat]:
        """The seats of new trainers for exactly the planned slots; states of kept slots are
        parked. The old trainers go first (device memory)."""
        planned = {e.slot for e in plan.train}
        states = self._take_states(group, planned | plan.keep)
        group.shards = []
        self._free_device_memory()
        for slot, state in states.items():
            if slot not in planned:
                group.parked[slot] = state       # a member's that does not train now
        seats = []
        for entry in plan.train:
            state = states.get(entry.slot, group.parked.get(entry.slot)) if entry.placed else entry.state
            if entry.placed and state is None:
                results[entry.trial_id] = Failure("its state is no longer in the pool (its trainer failed); "
                                                  "it must join again from its checkpoint")
                continue
            group.parked.pop(entry.slot, None)
            seats.append(_Seat(entry.slot, entry.config, _to(state, "cpu")))
        group.rebuilds += 1
        return seats

    def _run(self, key: tuple, group: _DeviceGroup, work: deque, results: dict[str, Any]) -> None:
        """Step each trainer in `work` (built ones, or seats to build one from) once.

        A trainer that runs out of memory, in its build or its step, is replaced by smaller ones
        (`_split`) built from the states its slots had before, which step in this round; other
        failures concern only their own slots. Failures are handled after their `except` blocks
        (`_Error`): the failed trainer must be gone before anything else is built.
        """
        while work:
            item = work.popleft()
            if isinstance(item, _Shard):
                shard, seats = item, self._seats_of(item)      # the states before its step, in host memory
            else:
                seats = item
                shard, error = self._try_build(seats)
                if shard is None:
                    self._free_device_memory()
                    self._split(key, seats, error, work, results, "its slot could not be built")
                    continue
                group.shards.append(shard)
            item = None
            per_slot, error = self._try_step(shard.trainer)
            if error is not None:
                group.shards.remove(shard)
                shard = None
                self._free_device_memory()
                if error.out_of_memory:
                    self._split(key, seats, error, work, results, "its batched epoch failed")
                else:                            # its weights are in an unknown state, maybe its device too
                    for seat in seats:
                        results[seat.trial_id] = Failure(f"its batched epoch failed: {error.text}")
                continue
            for seat, metrics in zip(seats, per_slot):
                results[seat.trial_id] = (Failure("its training had already stopped") if metrics is None
                                          else {**metrics, "pool_size": shard.trainer.M})

    @staticmethod
    def _seats_of(shard: _Shard) -> list[_Seat]:
        trainer = shard.trainer
        return [_Seat(slot, trainer.configs[m], _to(trainer.model_state(m), "cpu"))
                for m, slot in enumerate(shard.slots)]

    def _try_build(self, seats: list[_Seat]) -> tuple[_Shard | None, _Error | None]:
        try:
            trainer = self._build([s.config for s in seats], self._splits_for(seats[0].config), self.device,
                                  states=[s.state for s in seats])
        except Exception as exc:
            return None, _Error.of(exc)
        return _Shard(trainer, [s.slot for s in seats]), None

    @staticmethod
    def _try_step(trainer: BatchedTrainer) -> tuple[list[dict[str, Any] | None] | None, _Error | None]:
        try:
            return trainer.step(), None
        except Exception as exc:
            return None, _Error.of(exc)

    def _split(self, key: tuple, seats: list[_Seat], error: _Error, work: deque, results: dict[str, Any],
               what: str) -> None:
        """Smaller trainers for `seats`, next in `work`: after an out-of-memory of at most half as
        many slots (rounded up), the group key's size from then on; after another build failure,
        halves, down to the single trial whose own state or config fails. A single seat fails."""
        size = max(1, (len(seats) + 1) // 2)
        if error.out_of_memory:
            size = self.max_slots[key] = min(self.max_slots.get(key, size), size)
        if len(seats) == 1:
            results[seats[0].trial_id] = Failure(f"{what}: {error.text}")
            return
        log.warning("pool: a trainer for %d trials failed (%s); trying trainers of %d", len(seats), error.text, size)
        work.extendleft(reversed([seats[i:i + size] for i in range(0, len(seats), size)]))

    def snapshot(self) -> dict[str, Any]:
        return {"device": str(self.device), "rounds": self.rounds, "model_epochs": self.model_epochs,
                "trainers": {str(key): [len(s.slots) for s in g.shards] for key, g in self.groups.items()},
                "parked": {str(key): len(g.parked) for key, g in self.groups.items()},
                "rebuilds": {str(key): g.rebuilds for key, g in self.groups.items()},
                "max_slots": {str(key): n for key, n in self.max_slots.items()}}


def _as_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """A trial's config: a TrainConfig was validated where it was built (TrainConfig.from_dict, in
    the trial), a mapping is validated here, once."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)


class TrialPool:
    """Both halves of a pool driven from one thread (tests, benchmarks): `join`, `run_round`, ...
    Nobody is evicted or forgotten here: the caller says who leaves."""

    def __init__(self, device: torch.device | str | None = None, splits: Splits | None = None, **kw):
        self.membership = Membership()
        self.device_trainers = DeviceTrainers(device, splits, **kw)
        self.device = self.device_trainers.device

    def _retain(self, key: tuple) -> None:
        self.device_trainers.retain(key, self.membership.keep(key), self.membership.training_slots(key))

    def join(self, trial_id: str, config: TrainConfig | Mapping[str, Any],
             state: Mapping[str, Any] | None = None) -> int:
        token, old = self.membership.join(trial_id, _as_config(config), state)
        if old is not None:
            self._retain(old.key)
        return token

    def leave(self, trial_id: str, token: int | None = None) -> None:
        member = self.membership.leave(trial_id, token)
        if member is not None:
            self._retain(member.key)

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
        self._retain(key)
        return dict(outcome.results)

    def state(self, trial_id: str) -> dict[str, Any]:
        member = self.membership.holder(trial_id)
        if not member.placed:
            return (_to(dict(member.state), "cpu") if member.state is not None
                    else self.device_trainers.initial_state(member.config))
        return self.device_trainers.state_of(member.key, (trial_id, member.token))

    def pseudo_inputs(self, trial_id: str, n: int = N_PSEUDO_INPUTS) -> torch.Tensor | None:
        member = self.membership.holder(trial_id)
        slot = (trial_id, member.token) if member.placed else None
        return self.device_trainers.pseudo_inputs(member.key, slot, member.config, member.state, n)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("pool: device work failed", exc_info=future.exception())


class PoolActor:
    """The Ray actor around a pool (async: trials wait for their round without blocking it).

    The event loop owns the `Membership` (each member's `Request` included); the device thread (a
    one-thread executor) owns the `DeviceTrainers` and does its work in the order the event loop
    submits it. A group's round starts, as an immutable plan, once every training member asks
    (`step`); a trial that joins meanwhile is in the next plan, never in a running one. A round's
    epoch answers the trial's waiting step call; if that call was cancelled meanwhile, the
    trial's next step call gets it, so a trial sees each of its epochs once, in order.

    Trials that stop answering ("heard from": any call; a waiting step, a round that trains it
    and a call in flight count as heard from all along), checked every wait_s / 4 (`reap`):

    - A training member that others of its group wait for and that has not been heard from for
      `wait_s` (its process died, is too slow, or Tune stopped it without `leave`) is evicted,
      so the others never wait forever. It is out of the rounds, but the state of the last epoch
      it completed stays: `state` and `pseudo_inputs` answer for it (the state's "epoch" says
      which epoch), its `step` raises `NotAMember`, and it can join again with that state (or
      its checkpoint's; the join replaces it).
    - A trial not heard from for `forget_s` (default 10 x wait_s) is forgotten, whatever it was:
      evicted, stopped and never left, or training with nobody waiting for it (alone in its
      group). Its state goes; a group left without members frees its trainers.
    - A group none of whose members trains (all stopped or evicted) holds no trainer on the
      device: their states wait in host memory.
    """

    def __init__(self, device: str = "auto", wait_s: float = EVICT_WAIT_S, splits: Splits | None = None,
                 clock: Callable[[], float] = time.monotonic, forget_s: float | None = None, **device_kw):
        self._device = DeviceTrainers(device, splits, **device_kw)
        if self._device.device.type == "cpu":
            # Ray starts a 0-CPU actor with one thread; a CPU pool does the compute of all its
            # trials (whose processes only wait for it), so it uses the node's cores.
            torch.set_num_threads(os.cpu_count() or 1)
        self.wait_s = wait_s
        self.forget_s = FORGET_AFTER_WAITS * wait_s if forget_s is None else forget_s
        if self.forget_s < wait_s:
            raise ValueError(f"forget_s={forget_s} is shorter than wait_s={wait_s}: an evicted trial's state "
                             f"must be kept at least until it could be evicted")
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-device")
        # Owned by the event loop:
        self._membership = Membership()
        self._running: set[tuple] = set()                  # groups with a round on the device
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self.evicted: list[str] = []
        self.forgotten: list[str] = []
        self.rounds = 0
        self.model_epochs = 0

    # -- helpers (event loop) ----------------------------------------------------------------
    def _submit(self, fn, *args) -> asyncio.Future:
        """Queue work for the device thread now: it runs in the order it was submitted."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)            # keep a reference: the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    def _retain(self, key: tuple) -> None:
        """Let the device drop the states of members that are gone and free the trainers of a group
        none of whose members trains (after the work queued before)."""
        done = self._submit(self._device.retain, key, self._membership.keep(key),
                            self._membership.training_slots(key))
        done.add_done_callback(_log_failure)

    # -- the trials' calls ---------------------------------------------------------------------
    async def join(self, trial_id: str, config: TrainConfig | Mapping[str, Any],
                   state: Mapping[str, Any] | None = None) -> int:
        """Join (or join again: a retry or a restore brings its checkpoint state). Returns a token for `leave`."""
        config = _as_config(config)
        token, old = self._membership.join(trial_id, config, state, self._clock())
        if old is not None:
            # A step of an earlier incarnation (its process died while waiting) is not this one's.
            old.request.fail(PoolError(f"trial {trial_id} joined the pool again"))
            self._retain(old.key)
            if old.key != self._membership.get(trial_id).key:
                self._maybe_start(old.key)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_while_members())
        return token

    async def leave(self, trial_id: str, token: int | None = None) -> None:
        self._remove([trial_id], token)

    def _remove(self, trial_ids: list[str], token: int | None = None, why: str = "left the pool") -> None:
        """Take members out (a leave, or forgetting them) and start the rounds that waited only for them."""
        keys = set()
        for trial_id in trial_ids:
            member = self._membership.leave(trial_id, token)
            if member is None:
                continue                  # unknown, or a newer incarnation's membership
            keys.add(member.key)
            member.request.fail(PoolError(f"trial {trial_id} {why} while waiting for a round"))
        for key in keys:
            self._retain(key)
            self._maybe_start(key)

    async def step(self, trial_id: str) -> dict[str, Any]:
        """Wait for the next round of the trial's group; its metrics for that epoch."""
        member = self._membership.get(trial_id)
        request = member.request
        request.last_seen = self._clock()
        if request.unclaimed is not None:
            result, request.unclaimed = request.unclaimed, None
            return result
        if not member.training:
            raise PoolError(f"trial {trial_id}: its training has already stopped")
        request.fail(PoolError(f"trial {trial_id} asked again for a round"))
        future = request.step = asyncio.get_running_loop().create_future()
        self._maybe_start(member.key)
        try:
            return await future
        finally:
            request.last_seen = self._clock()          # answered, or given up (cancelled) just now

    def _maybe_start(self, key: tuple) -> None:
        """Start the group's round if every training member asks for it (and none is running)."""
        if key in self._running:
            return                      # the running round checks again when it ends
        training = self._membership.training(key)
        requests = [self._membership.members[t].request for t in training]
        if not requests or not all(r.asking for r in requests):
            return
        for request in requests:
            request.in_round = True
        plan = self._membership.plan(key, training)
        self._running.add(key)
        self._spawn(self._round(plan, self._submit(self._device.run_round, plan)))

    async def _round(self, plan: RoundPlan, on_device: asyncio.Future) -> None:
        try:
            outcome = await on_device
        except Exception as exc:        # a bug, not a trial's failure: the planned trials fail, no one else
            log.exception("pool round failed")
            outcome = RoundResult({e.trial_id: Failure(f"the pool's round failed: {type(exc).__name__}: {exc}")
                                   for e in plan.train}, 0, False)
        finally:
            self._running.discard(plan.key)
        self.rounds += 1
        now = self._clock()
        # Incarnations that left or joined again meanwhile are not in `current`: their step calls
        # were answered when they went, and their results are no one's.
        current = self._membership.apply(plan, outcome)
        for trial_id, member in current.items():
            request = member.request
            request.in_round, request.last_seen = False, now
            result = outcome.results[trial_id]
            if isinstance(result, Failure):
                request.fail(PoolError(f"trial {trial_id} failed in its pool round: {result.message}"))
                continue
            self.model_epochs += 1
            if request.waiting:
                request.step.set_result(result)
            else:
                # Its step call was cancelled after the round started: the epoch is trained and
                # the trial has not seen it, so its next step call gets it.
                request.unclaimed = result
        self._retain(plan.key)
        self._maybe_start(plan.key)      # requests that came in during the round

    def stale_members(self, key: tuple) -> list[str]:
        """Training members of the group that others wait for and that have not been heard from
        for more than wait_s."""
        requests = {t: self._membership.members[t].request for t in self._membership.training(key)}
        if not any(r.asking for r in requests.values()):
            return []
        now = self._clock()
        return [t for t, r in requests.items() if r.silent_for(now) > self.wait_s]

    def reap(self) -> None:
        """Forget the trials not heard from for forget_s; evict every group's stale members."""
        now = self._clock()
        forgotten = [t for t, m in self._membership.members.items() if m.request.silent_for(now) > self.forget_s]
        if forgotten:
            self.forgotten.extend(forgotten)
            self._remove(forgotten, why="was forgotten")
        groups = {m.key for m in self._membership.members.values() if not m.evicted}
        self._evict([t for key in groups for t in self.stale_members(key)])

    def _evict(self, trial_ids: list[str]) -> None:
        """Take members out of their groups' rounds and start the rounds that waited only for them.
        Their states stay (kept); the next round rebuilds their trainers without them."""
        keys = set()
        for trial_id in trial_ids:
            member = self._membership.evict(trial_id)
            if member is not None:
                keys.add(member.key)
                self.evicted.append(trial_id)
        for key in keys:
            self._retain(key)
            self._maybe_start(key)

    async def _reap_while_members(self) -> None:
        while self._membership.members:
            await asyncio.sleep(min(self.wait_s, max(self.wait_s / 4, 0.05)))
            try:
                self.reap()
            except Exception:            # a bug: log it, and keep the pool from waiting forever
                log.exception("pool: evicting or forgetting members failed")

    async def _call(self, member: Member, fn, *args):
        """A member's call that needs the device: it is heard from while the call lasts."""
        request = member.request
        request.calls += 1
        request.last_seen = self._clock()
        try:
            return await self._submit(fn, *args)
        finally:
            request.calls -= 1
            request.last_seen = self._clock()

    async def state(self, trial_id: str) -> dict[str, Any]:
        """The trial's training state in `Trainer.state_dict()` format, on the CPU (checkpoints,
        finalizing): of the last epoch it completed (its "epoch"), also once it was evicted."""
        member = self._membership.holder(trial_id)
        member.request.last_seen = self._clock()
        if not member.placed:
            if member.state is not None:
                return _to(dict(member.state), "cpu")
            return await self._call(member, self._device.initial_state, member.config)
        return await self._call(member, self._device.state_of, member.key, (trial_id, member.token))

    async def pseudo_inputs(self, trial_id: str, n: int = N_PSEUDO_INPUTS) -> torch.Tensor | None:
        member = self._membership.holder(trial_id)
        slot = (trial_id, member.token) if member.placed else None
        return await self._call(member, self._device.pseudo_inputs, member.key, slot, member.config,
                                member.state, n)

    async def stats(self) -> dict[str, Any]:
        """The membership as the event loop sees it, and the device's counters (after queued work)."""
        device = await self._submit(self._device.snapshot)
        groups = {}
        for member in self._membership.members.values():
            if not member.evicted:
                groups.setdefault(member.key, []).append(member)
        return {**device, "rounds": self.rounds, "model_epochs": self.model_epochs,
                "groups": [{"members": len(ms), "training": sum(m.training for m in ms)} for ms in groups.values()],
                "evicted": list(self.evicted), "forgotten": list(self.forgotten), "time": time.time()}


def pool_name(sweep_id: str, node_id: str, gpu: str | None) -> str:
    return f"{sweep_id}/{node_id}/{'gpu' + gpu if gpu is not None else 'cpu'}"


def get_pool(sweep_id: str, wait_s: float = EVICT_WAIT_S):
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
