"""Many runs of one architecture trained at once: M copies of the single model, through `torch.func`.

At batch 100 one VAE's training step is bound by kernel launches, and separate processes on one
GPU only time-slice it. Here M runs share one step: their single models (trainables/vae/model.py,
any registered model, prior and likelihood, each built exactly as `Trainer` builds it) are
stacked with `torch.func.stack_module_state`, and `vmap(functional_call(model, ...))` evaluates
every slot's ELBO at once, so every Linear becomes one batched matmul over the M slots. On CUDA
the whole step (forward, backward, Adam) is then replayed as one CUDA graph.

    trainer = BatchedTrainer([TrainConfig(K=250, lr=3e-4), TrainConfig(K=500, lr=5e-4, seed=1)])
    while not trainer.done:
        per_slot = trainer.step()          # list of Trainer.step-like dicts (None: already stopped)
    trainer.finish()                       # each slot's best validation weights
    model = trainer.extract(1)             # slot 1 as its single model (evaluation, images)

Nothing here restates the model: the slots' losses are summed (each slot's gradient is exactly
its single run's gradient), and everything else is the single trainer's own code, per slot:
the epoch's random draws from the slot's own generators (`train.EpochDraws`, so a slot trains
exactly as the same configuration alone, whoever shares the batch), early stopping and the NaN
guard (`train.Progress`), AdamNormGrad (`train.unit_norm_gradients_`) and the checkpoint format
(`Trainer.state_dict`). Adam itself is a small batched optimizer (`BatchedAdam`): one set of
foreach kernels for every slot, with a learning rate and a step count per slot, capturable in a
CUDA graph; PyTorch's Adam with a parameter group per slot could not update stacked tensors.
Mixture priors with a different K per slot are padded to the largest K with components of
mixture logit -inf (no density, no gradient: `MixturePrior.pad_components_`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits
from trainables.vae.errors import ConfigError
from trainables.vae.model import LatentVariableModel
from trainables.vae.priors import MixturePrior
from trainables.vae.train import (
    DeviceData,
    EpochDraws,
    Progress,
    build_trial_model,
    capture_cuda_graph,
    draw_noise,
    epoch_metrics,
    kl_weight,
    ref_parts,
    resolve_device,
    restore_generators,
    run_generators,
    unit_norm_gradients_,
    val_ll_due,
    validation_ll,
)
from trainables.vae.catalog import METRIC_VAL_LL, STOP_NAN

# Fields every batched configuration must share: one architecture, one dataset, one device.
SHARED_FIELDS = ("dataset", "model", "prior", "latent_dim", "hidden_dim", "batch_size",
                 "fixed_pseudo_inputs", "train_subset", "val_subset", "test_subset", "device",
                 "cuda_graphs", "data_root", "prob_clamp")
PRIOR_PREFIX = "prior."


def _as_config(value: TrainConfig | Mapping[str, Any], i: int) -> TrainConfig:
    """A TrainConfig was validated where it was built (`TrainConfig.from_dict`): a pool rebuilds
    its trainers often and does not validate its trials' configs again; a mapping is validated."""
    if isinstance(value, TrainConfig):
        return value
    return TrainConfig.from_dict(value, where=f"configs[{i}]")


def check_batchable(configs: Sequence[TrainConfig]) -> None:
    """Raise `ConfigError` unless the configurations can train as one batch (see SHARED_FIELDS)."""
    if not configs:
        raise ConfigError("batched training needs at least one configuration")
    problems = []
    for i, c in enumerate(configs):
        for name in SHARED_FIELDS:
            if getattr(c, name) != getattr(configs[0], name):
                problems.append(f"configs[{i}].{name} = {getattr(c, name)!r} differs from configs[0].{name} = "
                                f"{getattr(configs[0], name)!r}; batched models share architecture, data and device")
    if problems:
        raise ConfigError("cannot train these configurations as one batch:\n  - " + "\n  - ".join(problems))


def _slot_shape(t: Tensor) -> tuple[int, ...]:
    """[M, 1, 1, ...]: a per-slot value broadcast over one stacked tensor."""
    return (t.shape[0],) + (1,) * (t.dim() - 1)


class BatchedAdam:
    """Adam (PyTorch's defaults: betas (0.9, 0.999), eps 1e-8) over stacked parameters [M, ...].

    The learning rate and the step count are per slot ([M] tensors on the device): a slot that
    joined later starts at step 0 with its own bias correction, and the whole update can be
    captured in a CUDA graph. `normgrad` [M] marks slots that use REF's AdamNormGrad
    (`train.unit_norm_gradients_`, with `parts` as the single trainer's).
    """

    def __init__(self, params: Sequence[Tensor], lr: Tensor, normgrad: Tensor | None = None,
                 parts: Sequence[int] | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.parts = list(parts) if parts is not None else [1] * len(self.params)
        self.M = M = lr.shape[0]
        for p in self.params:
            if p.shape[0] != M:
                raise ValueError(f"BatchedAdam needs [M={M}, ...] parameters, got {tuple(p.shape)}")
        self.betas, self.eps = betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # float64: 1 - beta2^t as accurate as PyTorch's Python-float bias correction.
        self.step_count = torch.zeros(M, device=lr.device, dtype=torch.float64)       # [M]
        # Static tensors (a captured graph reads them): change them in place only.
        self.lr = lr.detach().clone()                                                  # [M]
        self.live = torch.ones(M, dtype=torch.bool, device=lr.device)                  # [M] False: frozen
        self.normgrad = normgrad.to(lr.device) if normgrad is not None and bool(normgrad.any()) else None

    @torch.no_grad()
    def set_lr(self, m: int, value: float) -> None:
        self.lr[m] = value

    @torch.no_grad()
    def freeze(self, m: int, frozen: bool = True) -> None:
        """A frozen slot's weights never change: lr 0, and its gradient is zeroed first (a
        non-finite one, 0 * inf from a loss weight of 0, would otherwise reach them as NaN)."""
        self.live[m] = not frozen

    @torch.no_grad()
    def reset(self, m: int) -> None:
        """Forget slot m's moments (a diverged slot's are NaN)."""
        for t in self.exp_avg + self.exp_avg_sq:
            t[m].zero_()

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("BatchedAdam.step: a parameter has no gradient; run backward first")
        for g in grads:
            g.masked_fill_(~self.live.view(_slot_shape(g)), 0.0)
        if self.normgrad is not None:
            unit_norm_gradients_(grads, self.parts, lead=1, mask=self.normgrad)
        beta1, beta2 = self.betas
        self.step_count += 1
        dtype = self.params[0].dtype
        # Per slot: step size lr / (1 - beta1^t) and 1 / sqrt(1 - beta2^t), each [M].
        step_size = (self.lr / (1.0 - torch.pow(beta1, self.step_count))).to(dtype)
        inv_bc2_sqrt = torch.rsqrt(1.0 - torch.pow(beta2, self.step_count)).to(dtype)
        torch._foreach_lerp_(self.exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_mul_(denom, [inv_bc2_sqrt.view(_slot_shape(p)) for p in self.params])
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_mul(self.exp_avg, [step_size.view(_slot_shape(p)) for p in self.params])
        torch._foreach_div_(update, denom)
        torch._foreach_sub_(self.params, update)

    def tensors(self) -> list[Tensor]:
        """Every state tensor (for snapshots around a CUDA-graph warm-up)."""
        return self.exp_avg + self.exp_avg_sq + [self.step_count]


class BatchedTrainer:
    """M training runs of one architecture on one device, stepped together; each keeps its own state.

    Per slot: seed (init, data order, noise), K, lr, warmup (beta), optimizer (adam / adam_normgrad),
    early_stopping, max_epochs. A slot that stops (completed, early stopping, NaN) is frozen: its
    learning rate and loss weight become 0 while the others go on.
    """

    def __init__(self, configs: Sequence[TrainConfig | Mapping[str, Any]], splits: Splits | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 states: Sequence[Mapping[str, Any] | None] | None = None):
        self.configs = [_as_config(c, i) for i, c in enumerate(configs)]
        check_batchable(self.configs)
        c0 = self.configs[0]
        self.M = M = len(self.configs)
        self.device = torch.device(device) if device is not None else resolve_device(c0.device)
        data = DeviceData.load(c0, splits, self.device, dtype)     # shared by the slots (SHARED_FIELDS)
        self.info, self.dynamic = data.info, data.dynamic
        self.x_train, self.x_val, self.x_test = data.train, data.val, data.test   # [N, D] each
        # vamp_data models are built from training images on the CPU (slots, rebuilds, extracts
        # for every logged image): one host copy, not one per build.
        self._init_x = self.x_train.cpu() if self.configs[0].prior == "vamp_data" else self.x_train

        # Each slot's model and generators exactly as Trainer makes them (global seed, build).
        models, self.generators = [], []
        with torch.random.fork_rng(devices=[]):
            for c in self.configs:
                torch.manual_seed(c.seed)
                models.append(build_trial_model(c, self.info, self._init_x))
                self.generators.append(run_generators(c.seed, self.device))
        self.Ks = [int(getattr(m.prior, "K", 0)) for m in models]
        for model in models:
            if isinstance(model.prior, MixturePrior):
                model.prior.pad_components_(max(self.Ks))
        models = [m.to(self.device, dtype) for m in models]
        # The structure every slot shares; its own tensors are never used (functional_call swaps them in).
        self.template: LatentVariableModel = copy.deepcopy(models[0]).to("meta")
        self.noise_dim = self.template.noise_dim
        named = list(models[0].named_parameters())
        params, self.buffers = stack_module_state(models)
        trainable = {n for n, p in named if p.requires_grad}
        self.stacked: dict[str, Tensor] = {n: p.detach().requires_grad_(n in trainable) for n, p in params.items()}
        self.trainable_names = [n for n, _ in named if n in trainable]     # torch Adam's order in Trainer
        self.params = [self.stacked[n] for n in self.trainable_names]
        self.persistent = list(models[0].state_dict())                     # a single checkpoint's keys
        del models
        self._terms = vmap(self._slot_terms, in_dims=(0, 0, 0, 0, 0))      # train: per-slot x, beta, noise
        self._eval_terms = vmap(self._slot_terms, in_dims=(0, 0, None, None, 0))   # validation: shared x
        lr = torch.tensor([c.lr for c in self.configs], device=self.device, dtype=dtype)   # [M]; the optimizer's
        self.optimizer = BatchedAdam(
            self.params, lr, torch.tensor([c.optimizer == "adam_normgrad" for c in self.configs], device=self.device),
            parts=ref_parts([(n, p) for n, p in named if n in trainable]))
        self.loss_weight = torch.ones(M, device=self.device, dtype=dtype)   # 0: a frozen slot (static)
        self._slot = torch.arange(M, device=self.device).unsqueeze(1)       # [M, 1]: x_epoch[slot, idx]
        # Each slot's binary images of the epoch (dynamic binarisation); fixed, so a graph can read it.
        # (bool: for 32 slots of MNIST-sized data 1.25 GB instead of 5 GB of float32)
        self.x_epoch = (torch.empty(M, *self.x_train.shape, device=self.device, dtype=torch.bool)
                        if self.dynamic else None)
        self._graph: _GraphedBatchedStep | None = None
        self.progress = [Progress() for _ in range(M)]
        self.best: dict[str, Tensor] | None = None        # stacked best weights, at the first best epoch
        self.other: dict[str, Tensor] | None = None       # stacked weights of each slot's other choice (Progress)
        for m, state in enumerate(states or ()):
            if state is not None:
                self.load_model_state(m, state)

    # -- the model, M times ----------------------------------------------------------------
    def _slot_terms(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, beta: Tensor | float,
                    noise: Tensor) -> dict[str, Tensor]:
        return functional_call(self.template, (params, buffers), (x, beta, noise))

    def _batch_step(self, idx: Tensor, beta: Tensor, noise: Tensor) -> Tensor:
        """Forward, backward and update for every slot (grads None or zero); [M, 3] sums.

        idx [M, B] indexes each slot's training images, noise [M, B, 1, noise_dim], beta [M]."""
        x = (self.x_epoch[self._slot, idx].to(self.x_train.dtype) if self.dynamic
             else self.x_train[idx])                                                  # [M, B, D]
        terms = self._terms(self.stacked, self.buffers, x, beta, noise)
        # Sum, not mean, over slots: each slot's gradient is exactly its own loss's gradient.
        (terms["loss"] * self.loss_weight).sum().backward()
        self.optimizer.step()
        return torch.stack([terms["elbo"].detach().sum(1), terms["rec"].detach().sum(1),
                            terms["kl"].detach().sum(1)], dim=1)

    def train_batch(self, idx: Tensor, beta: Tensor | Sequence[float], noise: Tensor) -> Tensor:
        """One eager step (idx [M, B], beta [M], noise [M, B, 1, noise_dim]); [M, 3] sums."""
        beta = torch.as_tensor(beta, device=self.device, dtype=self.x_train.dtype)
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()     # in place: a captured graph owns these tensors
        return self._batch_step(idx.to(self.device), beta, noise)

    # -- one epoch -------------------------------------------------------------------------
    def _draws(self) -> tuple[Tensor, Tensor]:
        """Each training slot's epoch draws from its own generators (`EpochDraws`, as Trainer's);
        stopped slots draw nothing (as a run that stopped). (order [M, N], noise [M, N, 1, Z'])."""
        n = self.x_train.shape[0]
        orders, noises = [], []
        for m, (order_gen, noise_gen) in enumerate(self.generators):
            if self.progress[m].stop_reason is not None:
                orders.append(torch.arange(n, device=self.device))
                noises.append(torch.zeros(n, 1, self.noise_dim, device=self.device, dtype=self.x_train.dtype))
                continue
            draws = EpochDraws.draw(self.x_train, self.dynamic, self.noise_dim, order_gen, noise_gen)
            if draws.images is not None:
                self.x_epoch[m].copy_(draws.images)
            orders.append(draws.order)
            noises.append(draws.noise)
        return torch.stack(orders), torch.stack(noises)

    def _train_epoch(self, betas: Sequence[float]) -> Tensor:
        """One epoch for every slot; the mean elbo, rec, kl per training image, [M, 3]."""
        n = self.x_train.shape[0]
        B = self.configs[0].batch_size
        beta = torch.tensor(list(betas), device=self.device, dtype=self.x_train.dtype)
        order, noise = self._draws()                                         # [M, N], [M, N, 1, Z']
        totals = torch.zeros(self.M, 3, device=self.device, dtype=self.x_train.dtype)
        graphed = self._graphed_step() if n >= B else None
        for start in range(0, n, B):
            idx, eps = order[:, start:start + B], noise[:, start:start + B]   # [M, B], [M, B, 1, Z']
            if graphed is not None and idx.shape[1] == B:
                totals += graphed(idx, beta, tuple(betas), eps)
                continue
            totals += self.train_batch(idx, beta, eps)   # the last, smaller batch runs eagerly
        return totals / n

    def _graphed_step(self) -> _GraphedBatchedStep | None:
        if not (self.configs[0].cuda_graphs and self.device.type == "cuda"):
            return None
        if self._graph is None:
            self._graph = _GraphedBatchedStep(self)
        return self._graph

    @torch.no_grad()
    def evaluate_elbo(self, x: Tensor, noise: Tensor, batch_size: int = 1000) -> Tensor:
        """Mean ELBO terms (elbo, rec, kl) at beta = 1 per slot on the shared images x [N, D], with
        each slot's noise [M, N, 1, noise_dim]: [M, 3]."""
        totals = torch.zeros(self.M, 3, device=self.device, dtype=x.dtype)
        for i in range(0, x.shape[0], batch_size):
            terms = self._eval_terms(self.stacked, self.buffers, x[i:i + batch_size], 1.0,
                                     noise[:, i:i + batch_size])
            totals += torch.stack([terms["elbo"].sum(1), terms["rec"].sum(1), terms["kl"].sum(1)], 1)
        return totals / x.shape[0]

    def _validation_noise(self) -> Tensor:
        n = self.x_val.shape[0]
        return torch.stack([
            draw_noise(n, self.noise_dim, self.x_val, noise_gen) if self.progress[m].stop_reason is None
            else torch.zeros(n, 1, self.noise_dim, device=self.device, dtype=self.x_val.dtype)
            for m, (_, noise_gen) in enumerate(self.generators)])

    def step(self) -> list[dict[str, Any] | None]:
        """Train one epoch, validate, update each slot's early stopping and NaN guard.

        Returns one dict per slot with Trainer.step's keys, or None for a slot that had already
        stopped before this epoch (it is frozen and reports nothing new).
        """
        if self.done:
            raise RuntimeError(f"training already stopped for every slot ({self.stop_reason})")
        training = [p.stop_reason is None for p in self.progress]
        for p, live in zip(self.progress, training):
            p.epoch += live
        betas = [kl_weight(max(p.epoch, 1), c.warmup) for p, c in zip(self.progress, self.configs)]
        t0 = time.perf_counter()
        train = self._train_epoch(betas).tolist()
        val = self.evaluate_elbo(self.x_val, self._validation_noise()).tolist()
        # select_on: val_ll: each due slot's validation LL from its single model, as Trainer computes it.
        val_ll = {m: validation_ll(self.extract(m), self.x_val, c) for m, (p, c) in enumerate(zip(self.progress,
                                                                                                 self.configs))
                  if training[m] and val_ll_due(c, p.epoch)}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        out: list[dict[str, Any] | None] = []
        improved, other = [], []
        for m, (progress, c) in enumerate(zip(self.progress, self.configs)):
            if not training[m]:
                out.append(None)
                continue
            metrics = epoch_metrics(progress.epoch, betas[m], train[m], val[m], seconds)
            if m in val_ll:
                metrics[METRIC_VAL_LL] = val_ll[m]
            best, other_best = progress.update(metrics, c)
            if best:
                improved.append(m)
            if other_best:
                other.append(m)
            metrics["stop_reason"] = progress.stop_reason
            out.append(metrics)
        self.best = self._keep(self.best, improved)
        self.other = self._keep(self.other, other)
        for m, metrics in enumerate(out):
            if metrics is not None and metrics["stop_reason"] is not None:
                self._freeze(m, diverged=metrics["stop_reason"] == STOP_NAN)
        return out

    @torch.no_grad()
    def _keep(self, kept: dict[str, Tensor] | None, slots: list[int]) -> dict[str, Tensor] | None:
        """`kept` (stacked weights, made at the first need) with these slots' current weights."""
        if not slots:
            return kept
        if kept is None:
            kept = {n: t.detach().clone() for n, t in self.stacked.items()}
        idx = torch.tensor(slots, device=self.device)
        for name, t in self.stacked.items():
            kept[name][idx] = t.detach()[idx]
        return kept

    @torch.no_grad()
    def _freeze(self, m: int, diverged: bool) -> None:
        """Stop updating slot m: lr 0 and loss weight 0, so its gradient is exactly 0."""
        self.optimizer.set_lr(m, 0.0)
        self.optimizer.freeze(m)
        self.loss_weight[m] = 0.0
        if diverged:
            # NaN weights would give NaN gradients even at loss weight 0 (0 * NaN), and NaN
            # moments would make even an lr-0 update NaN: restore finite weights, drop the moments.
            self._restore(m)
            self.optimizer.reset(m)

    @torch.no_grad()
    def _restore(self, m: int) -> None:
        """Slot m's best weights, or (no best epoch yet) its initial weights, rebuilt from its seed."""
        if self.progress[m].best_epoch is not None and self.best is not None:
            for name, t in self.stacked.items():
                t[m] = self.best[name][m]
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.configs[m].seed)
            initial = build_trial_model(self.configs[m], self.info, self._init_x)
        self._write_slot(m, initial.state_dict(), self.stacked)

    @property
    def stop_reason(self) -> list[str | None]:
        return [p.stop_reason for p in self.progress]

    @property
    def stop_detail(self) -> list[str]:
        return [p.stop_detail for p in self.progress]

    @property
    def epochs(self) -> list[int]:
        return [p.epoch for p in self.progress]

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.stop_reason)

    @property
    def epoch(self) -> int:
        """The most epochs any slot has trained."""
        return max(self.epochs)

    def finish(self) -> None:
        """Restore each slot's best validation weights (a slot with no best epoch yet keeps its own)."""
        for m in range(self.M):
            if self.progress[m].best_epoch is not None:
                self._restore(m)

    # -- one slot as a single model, and its state in Trainer.state_dict's format ----------
    def _slot_tensors(self, m: int, stacked: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Slot m's slice of stacked tensors (named as the single model's), padding cut off."""
        prior = self.template.prior
        out = {}
        for name, t in stacked.items():
            value = t[m]
            if name.startswith(PRIOR_PREFIX) and isinstance(prior, MixturePrior):
                value = value[: self.Ks[m]] if name[len(PRIOR_PREFIX):] in prior.COMPONENT_TENSORS else value
            out[name] = value
        return out

    @torch.no_grad()
    def _write_slot(self, m: int, single: Mapping[str, Tensor], stacked: Mapping[str, Tensor]) -> None:
        """The inverse of `_slot_tensors`: a single model's tensors into slot m (padding zeroed)."""
        for name, value in single.items():
            if name not in stacked:
                continue
            target = stacked[name][m]
            if value.shape != target.shape:            # fewer components than the padded slot
                if value.shape[1:] != target.shape[1:] or value.shape[0] != self.Ks[m]:
                    raise ConfigError(f"{name} has shape {tuple(value.shape)}, slot {m} (K={self.Ks[m]}) needs "
                                      f"{(self.Ks[m], *target.shape[1:])}")
                target.zero_()
                target = target[: value.shape[0]]
            target.copy_(value)

    @torch.no_grad()
    def extract(self, m: int) -> LatentVariableModel:
        """Slot m as its single model (own device and dtype): evaluation, grids, logging."""
        if not 0 <= m < self.M:
            raise IndexError(f"slot index {m} out of range for {self.M} slots")
        with torch.random.fork_rng(devices=[]):   # building draws an initialisation: not from our streams
            model = build_trial_model(self.configs[m], self.info, self._init_x)
        model = model.to(self.device, self.x_train.dtype)
        model.load_state_dict({k: v for k, v in self._slot_tensors(m, self.stacked).items()
                               if k in self.persistent}, strict=True)
        return model

    def pseudo_inputs(self, m: int) -> Tensor | None:
        """Slot m's pseudo-inputs [K, D] (None without a VampPrior)."""
        return getattr(self.extract(m).prior, "pseudo_inputs", None)

    @torch.no_grad()
    def model_state(self, m: int) -> dict[str, Any]:
        """Slot m's training state in `Trainer.state_dict()`'s format (tensors on this device).

        A plain `Trainer` loads it (to evaluate the model, or to train on alone), and so does
        `load_model_state` of any BatchedTrainer with the same configuration in any slot.
        """
        model = {k: v.clone() for k, v in self._slot_tensors(m, self.stacked).items() if k in self.persistent}
        exp_avg = self._slot_tensors(m, dict(zip(self.trainable_names, self.optimizer.exp_avg)))
        exp_avg_sq = self._slot_tensors(m, dict(zip(self.trainable_names, self.optimizer.exp_avg_sq)))
        step = self.optimizer.step_count[m].to(torch.float32).cpu()    # as torch.optim.Adam keeps it
        # The param group torch's Adam saves (its defaults, this slot's lr), as Trainer's checkpoint has it.
        group = {**torch.optim.Adam([torch.zeros(1)], lr=1.0).state_dict()["param_groups"][0],
                 "lr": self.configs[m].lr, "params": list(range(len(self.trainable_names)))}
        optimizer = {"state": ({i: {"step": step.clone(), "exp_avg": exp_avg[n].clone(),
                                    "exp_avg_sq": exp_avg_sq[n].clone()}
                                for i, n in enumerate(self.trainable_names)} if float(step) > 0 else {}),
                     "param_groups": [group]}
        best_state = other_state = None
        if self.progress[m].best_epoch is not None and self.best is not None:
            best_state = {k: v.clone() for k, v in self._slot_tensors(m, self.best).items() if k in self.persistent}
        if self.progress[m].other_epoch is not None and self.other is not None:
            other_state = {k: v.clone() for k, v in self._slot_tensors(m, self.other).items() if k in self.persistent}
        order_gen, noise_gen = self.generators[m]
        return {
            "model": model,
            "optimizer": optimizer,
            **self.progress[m].state(),
            "best_state": best_state,
            "other_state": other_state,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "generator": order_gen.get_state(), "noise": noise_gen.get_state()},
            "config": self.configs[m].to_dict(),
        }

    @torch.no_grad()
    def load_model_state(self, m: int, state: Mapping[str, Any]) -> None:
        """Put a `Trainer.state_dict()` (or `model_state`) into slot m; the slot's config must match it."""
        c = self.configs[m]
        saved = state.get("config") or {}
        for key in ("K", "prior", "model", "latent_dim", "hidden_dim", "dataset"):
            if key in saved and saved[key] != getattr(c, key):
                raise ConfigError(f"state for slot {m} was saved with {key}={saved[key]!r}, "
                                  f"the slot's config has {key}={getattr(c, key)!r}")
        self._write_slot(m, state["model"], self.stacked)
        moments = state["optimizer"]["state"]
        if moments:
            for key, tensors in (("exp_avg", self.optimizer.exp_avg), ("exp_avg_sq", self.optimizer.exp_avg_sq)):
                self._write_slot(m, {self.trainable_names[int(i)]: s[key] for i, s in moments.items()},
                                 dict(zip(self.trainable_names, tensors)))
        else:
            self.optimizer.reset(m)
        steps = [float(s["step"]) for s in moments.values()]
        self.optimizer.step_count[m] = steps[0] if steps else 0.0
        self.progress[m] = Progress.from_state(state)
        if state.get("best_state") is not None:
            if self.best is None:
                self.best = {n: t.detach().clone() for n, t in self.stacked.items()}
            self._write_slot(m, state["best_state"], self.best)
        if state.get("other_state") is not None and self.progress[m].other_tracked:
            if self.other is None:
                self.other = {n: t.detach().clone() for n, t in self.stacked.items()}
            self._write_slot(m, state["other_state"], self.other)
        restore_generators(state["rng"], *self.generators[m], c.seed, self.progress[m].epoch)
        if self.progress[m].stop_reason is not None:
            self._freeze(m, diverged=False)
        else:
            self.optimizer.set_lr(m, c.lr)
            self.optimizer.freeze(m, False)
            self.loss_weight[m] = 1.0


class _GraphedBatchedStep:
    """The whole batched step (forward, backward, Adam) captured once as a CUDA graph.

    As train._GraphedStep: a replay reads the batch through a static index buffer [M, B] into
    the resident data, its noise from a static buffer, with a static beta [M]; the loss weights
    and learning rates are static tensors changed in place. `train.capture_cuda_graph` undoes the
    warm-up steps that capturing needs (weights, Adam state), so the graphed path computes what
    the eager path computes.
    """

    def __init__(self, trainer: BatchedTrainer):
        dev = trainer.device
        B = trainer.configs[0].batch_size
        dtype = trainer.x_train.dtype
        self.idx = torch.arange(B, device=dev).repeat(trainer.M, 1)                       # static [M, B]
        self.noise = torch.zeros(trainer.M, B, 1, trainer.noise_dim, device=dev, dtype=dtype)   # static
        self.beta = torch.ones(trainer.M, device=dev, dtype=dtype)                        # static [M]
        self._beta_values: tuple[float, ...] = (1.0,) * trainer.M
        self.graph, self.sums = capture_cuda_graph(          # sums: static [M, 3]
            lambda: trainer._batch_step(self.idx, self.beta, self.noise), trainer.params, dev,
            lambda: list(trainer.stacked.values()) + trainer.optimizer.tensors())

    def __call__(self, idx: Tensor, beta: Tensor, beta_values: tuple[float, ...], noise: Tensor) -> Tensor:
        self.idx.copy_(idx)
        self.noise.copy_(noise)
        if beta_values != self._beta_values:
            self.beta.copy_(beta)
            self._beta_values = beta_values
        self.graph.replay()
        return self.sums
