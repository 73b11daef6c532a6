"""Training: epochs over tensors resident on the device, KL warm-up, early stopping, NaN guard.

`Trainer` owns one run: `step()` trains one epoch and validates (the Ray Tune trainable calls it
once per Tune iteration), `finish()` restores the best weights, `state_dict()` checkpoints
everything needed to continue exactly (model, optimizer, RNGs, early-stopping state).

Everything random in a run comes from two generators of its own, seeded from its seed: one
for the order of the training images, one for the reparameterisation noise and the dynamic
binarisation (`EpochDraws`). So a run is reproducible from its configuration alone, also when
it trains as one slot of a batched pool (trainables/vae/batched.py draws the same way per slot).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from trainables.vae.catalog import (CHOICE_REF_RULE, CHOICE_WORDS, METRIC_BEST_EPOCH, METRIC_BEST_VAL_ELBO,
                                    METRIC_BEST_VAL_LL, METRIC_TEST_BPD, METRIC_TEST_IMAGES, METRIC_TEST_LL,
                                    METRIC_TEST_LL_SE, METRIC_TEST_SAMPLES, METRIC_VAL_LL, SELECT_VAL_LL,
                                    STOP_COMPLETED, STOP_EARLY, STOP_NAN, other_choice, other_choice_metrics,
                                    standard_error)
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits, load_dataset
from trainables.vae.errors import ConfigError, TrainingDiverged
from trainables.vae.model import REF_PARTS, LatentVariableModel, build_model

SUBSET_SEED = 1234   # train/val/test_subset draw the same images in every trial
NOISE_SEED_OFFSET = 0x5EED   # the noise generator's seed is the trial's seed + this (the order's is the seed)
EVAL_SEED_OFFSET = 0xE7A1    # the final evaluation's generator: the trial's seed + this
VAL_LL_SEED_OFFSET = 0x7A11  # the validation LL's generator: the trial's seed + this


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here; use device: cpu or auto")
    return device


def kl_weight(epoch: int, warmup: int) -> float:
    """beta = min(1, epoch / warmup) for epoch = 1, 2, ... (REF's linear KL warm-up)."""
    return 1.0 if warmup == 0 else min(1.0, epoch / warmup)


def ref_parts(named_params: Sequence[tuple[str, torch.nn.Parameter]]) -> list[int]:
    """Per parameter, how many of REF's tensors it concatenates (model.REF_PARTS; 1 if none)."""
    return [getattr(p, REF_PARTS, 1) for _, p in named_params]


@torch.no_grad()
def unit_norm_gradients_(grads: Sequence[Tensor], parts: Sequence[int], lead: int = 0,
                         mask: Tensor | None = None) -> None:
    """REF's AdamNormGrad, in place: each of REF's parameter tensors gets a unit-L2-norm gradient.

    A gradient concatenating `parts` REF tensors along its first dim (after `lead` leading
    batch dims: 1 for the [M, ...] stacked gradients of batched training) is normalised part by
    part. `mask` [M] (batched only): which models use AdamNormGrad; the others keep their gradient.
    """
    for g, n in zip(grads, parts):
        if g is None:
            continue
        pieces = g.reshape(*g.shape[:lead], n, -1)                             # [..., n, rest]
        norm = torch.linalg.vector_norm(pieces, dim=-1, keepdim=True) + 1e-7   # [..., n, 1]
        if mask is not None:
            norm = torch.where(mask.view(-1, *([1] * (norm.dim() - 1))), norm, torch.ones_like(norm))
        pieces.div_(norm)


def fixed_subset(x: Tensor, n: int | None, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """x [N, D], or n of its images, on `device`: a fixed random subset, the same for every trial.

    The first n images are not a fair sample (the static MNIST test file is ordered by digit).
    """
    if n is not None and n < x.shape[0]:
        g = torch.Generator().manual_seed(SUBSET_SEED)
        x = x[torch.randperm(x.shape[0], generator=g)[:n].sort().values]
    return x.to(device, dtype).contiguous()


@dataclass
class DeviceData:
    """A run's data, resident on its device: an epoch is index arithmetic, no loader, no copies.
    Subsets are fixed random ones, the same in every run (`fixed_subset`)."""

    info: Any                   # DatasetInfo
    train: Tensor               # [N, D]
    val: Tensor
    test: Tensor

    @property
    def dynamic(self) -> bool:
        """Training images are re-binarised every epoch (`EpochDraws`)."""
        return self.info.binarization == "dynamic"

    @classmethod
    def load(cls, config: TrainConfig, splits: Splits | None, device: torch.device,
             dtype: torch.dtype = torch.float32) -> "DeviceData":
        splits = splits if splits is not None else load_dataset(config.dataset, config.data_root)
        return cls(splits.info, fixed_subset(splits.train, config.train_subset, device, dtype),
                   fixed_subset(splits.val, config.val_subset, device, dtype),
                   fixed_subset(splits.test, config.test_subset, device, dtype))


def run_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(image order, noise) generators of a run with this seed, on `device`."""
    order = torch.Generator(device=device)
    order.manual_seed(seed)
    noise = torch.Generator(device=device)
    noise.manual_seed(seed + NOISE_SEED_OFFSET)
    return order, noise


@dataclass
class EpochDraws:
    """Everything random in one training epoch of one run, drawn up front from its generators:
    the image order, the binarised images (dynamic binarisation) and the noise of each step."""

    order: Tensor              # [N] the epoch's order of the training images
    images: Tensor | None      # [N, D] bool: this epoch's binary images (dynamic binarisation), else None
    noise: Tensor              # [N, 1, noise_dim]: step i uses noise[i*B : (i+1)*B]

    @staticmethod
    def draw(x_train: Tensor, dynamic: bool, noise_dim: int, order: torch.Generator,
             noise: torch.Generator) -> "EpochDraws":
        n = x_train.shape[0]
        perm = torch.randperm(n, device=x_train.device, generator=order)
        images = None
        if dynamic:
            # A Bernoulli draw per pixel: u < p.
            u = torch.rand(x_train.shape, device=x_train.device, dtype=x_train.dtype, generator=noise)
            images = u < x_train           # bool: a quarter of float32's memory until a batch is taken
        return EpochDraws(perm, images, draw_noise(n, noise_dim, x_train, noise))


def draw_noise(n: int, noise_dim: int, like: Tensor, generator: torch.Generator) -> Tensor:
    """[n, 1, noise_dim] standard normal noise (an epoch's reparameterisation, the validation ELBO's)."""
    return torch.randn(n, 1, noise_dim, device=like.device, dtype=like.dtype, generator=generator)


@dataclass
class Progress:
    """A run's epoch count and how it stops: the NaN guard, REF's early stopping, max epochs; and
    the best epoch of its own rule and of one other choice (`other_choice`).

    REF's rule (utils/perform_experiment.py), after every epoch: an epoch whose validation loss
    (the full negative ELBO, beta = 1 also during the warm-up) is the lowest so far is the new
    best, warm-up epochs included, and resets the patience counter; any other epoch adds one to
    the counter, which is held at 0 while epoch < warmup; the run stops when the counter exceeds
    `early_stopping` (the 51st epoch in a row without a new best, for 50). `best_after_warmup`
    (not REF) lets only epochs at full KL weight be best. The single trainer and every slot of a
    batched trainer keep one each; `update` is the whole rule.

    `select_on: val_ll` (not REF) puts the importance-sampled validation LL in the validation
    loss's place; it exists only at the epochs that compute it (every `val_ll_every` and the
    last). Patience is still counted in epochs, as REF counts it: every epoch without a new best
    adds one (held at 0 during the warm-up), but the run only stops at an epoch that has a
    validation LL, where more than `early_stopping` epochs have passed since its best (so at
    most val_ll_every - 1 epochs after the epoch REF's counting would name). With
    val_ll_every = 1 this is REF's rule on the validation LL.

    The other choice is always on the validation ELBO, over the epochs this run trained: REF's
    rule, or, for a run whose own rule is REF's, the best epoch at full KL weight.
    `best_val_loss` is the own rule's criterion as a loss (the negative validation ELBO, or LL);
    `best_val_elbo` the validation ELBO at `best_epoch` either way.
    """

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    stop_reason: str | None = None
    stop_detail: str = ""
    best_val_elbo: float = math.nan
    other_val_loss: float = math.inf       # the other choice: the negative validation ELBO at other_epoch
    other_epoch: int | None = None
    other_tracked: bool = True             # False: resumed from a checkpoint that did not keep it

    def update(self, metrics: dict[str, Any], config: TrainConfig) -> tuple[bool, bool]:
        """After an epoch's metrics (epoch, beta, train_loss, val_loss; val_ll where computed): set
        `stop_reason` when the run ends. (new best of the own rule, new best of the other choice):
        whose weights should be kept."""
        improved = other_improved = False
        val_ll = metrics.get(METRIC_VAL_LL)
        evaluated = config.select_on != SELECT_VAL_LL or val_ll is not None   # has its rule's criterion
        checked = ("train_loss", "val_loss") + ((METRIC_VAL_LL,) if val_ll is not None else ())
        bad = [k for k in checked if not math.isfinite(metrics[k])]
        full_kl = metrics["beta"] >= 1.0
        if bad:
            self.stop_reason = STOP_NAN
            self.stop_detail = (f"{' and '.join(bad)} became {metrics[bad[0]]} at epoch {self.epoch} "
                                f"(lr={config.lr}); lower the learning rate")
        else:
            if self.other_tracked and metrics["val_loss"] < self.other_val_loss and (
                    full_kl or other_choice(config.select_on, config.best_after_warmup) == CHOICE_REF_RULE):
                self.other_val_loss, self.other_epoch, other_improved = metrics["val_loss"], self.epoch, True
            loss = -val_ll if config.select_on == SELECT_VAL_LL and evaluated else metrics["val_loss"]
            candidate = evaluated and (not config.best_after_warmup or full_kl)
            if candidate and loss < self.best_val_loss:
                self.best_val_loss, self.best_epoch, self.bad_epochs = loss, self.epoch, 0
                self.best_val_elbo = -metrics["val_loss"]
                improved = True
            elif self.epoch < config.warmup:
                self.bad_epochs = 0               # REF: the counter is held at 0 during the warm-up
            else:
                self.bad_epochs += 1
                if config.early_stopping and self.bad_epochs > config.early_stopping and evaluated:
                    on_ll = config.select_on == SELECT_VAL_LL
                    what = f"validation LL (S={config.val_ll_samples})" if on_ll else "validation loss"
                    best = f"{-self.best_val_loss if on_ll else self.best_val_loss:.3f}"
                    self.stop_reason = STOP_EARLY
                    self.stop_detail = (f"no better {what} for {self.bad_epochs} epochs; "
                                        f"best {best} at epoch {self.best_epoch}")
        if self.stop_reason is None and self.epoch >= config.max_epochs:
            self.stop_reason = STOP_COMPLETED
        return improved, other_improved

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stop_reason": self.stop_reason, "stop_detail": self.stop_detail,
                "best_val_elbo": self.best_val_elbo, "other_val_loss": self.other_val_loss,
                "other_epoch": self.other_epoch, "other_tracked": self.other_tracked}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Progress":
        # A checkpoint older than the other choice did not keep it: it is not tested then (its
        # best over the epochs before the checkpoint is unknown). Older checkpoints chose on the
        # validation ELBO alone, so their best_val_elbo is -best_val_loss.
        tracked = "other_epoch" in state and bool(state.get("other_tracked", True))
        best_val_loss = float(state["best_val_loss"])
        return cls(int(state["epoch"]), best_val_loss, state["best_epoch"],
                   int(state["bad_epochs"]), state["stop_reason"], state.get("stop_detail", ""),
                   float(state.get("best_val_elbo", -best_val_loss)),
                   float(state.get("other_val_loss", math.inf)) if tracked else math.inf,
                   state.get("other_epoch") if tracked else None, tracked)


def val_ll_due(config: TrainConfig, epoch: int) -> bool:
    """Does epoch `epoch` compute the validation LL (select_on: val_ll: every val_ll_every epochs and the last)?"""
    return config.select_on == SELECT_VAL_LL and (epoch % config.val_ll_every == 0 or epoch >= config.max_epochs)


def validation_ll(model: LatentVariableModel, x_val: Tensor, config: TrainConfig) -> float:
    """The importance-sampled log-likelihood of the validation images (nats, mean), S = val_ll_samples.

    A fresh generator seeded from the run's seed every time: every epoch is scored with the same
    draws (common random numbers: epochs differ by their weights, not by their samples), the value
    is a function of the weights and the configuration (a resumed or pooled run gets the same), and
    there is no generator state to checkpoint.
    """
    from trainables.vae.evaluate import log_likelihood

    generator = torch.Generator(device=x_val.device)
    generator.manual_seed(config.seed + VAL_LL_SEED_OFFSET)
    return float(log_likelihood(model, x_val, config.val_ll_samples, generator=generator).mean())


def epoch_metrics(epoch: int, beta: float, train: Sequence[float], val: Sequence[float], seconds: float) -> dict[str, Any]:
    """Trainer.step's metrics from the mean (elbo, rec, kl) of the training and validation images."""
    (t_elbo, t_rec, t_kl), (v_elbo, v_rec, v_kl) = train, val
    return {"epoch": epoch, "beta": beta, "train_elbo": t_elbo, "train_rec": t_rec, "train_kl": t_kl,
            "train_loss": -(t_rec - beta * t_kl), "val_elbo": v_elbo, "val_rec": v_rec, "val_kl": v_kl,
            "val_loss": -v_elbo, "epoch_seconds": seconds}


class Trainer:
    """One training run of one configuration on one device."""

    def __init__(self, config: TrainConfig, splits: Splits | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.config = config
        self.device = torch.device(device) if device is not None else resolve_device(config.device)
        data = DeviceData.load(config, splits, self.device, dtype)
        self.info, self.dynamic = data.info, data.dynamic
        self.x_train, self.x_val, self.x_test = data.train, data.val, data.test   # [N, D] each

        torch.manual_seed(config.seed)          # the weights' initialisation
        self.generator, self.noise_generator = run_generators(config.seed, self.device)
        self.model: LatentVariableModel = build_trial_model(config, self.info, self.x_train).to(self.device, dtype)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.parts = ref_parts(named)
        # On CUDA: one fused kernel for the whole update, and capturable for the CUDA graph.
        self.optimizer = torch.optim.Adam(
            self.params, lr=config.lr,
            **({"fused": True, "capturable": True} if self.device.type == "cuda" else {"foreach": True}))
        # This epoch's binary images (dynamic binarisation); a fixed buffer, so a graph can read it.
        self.x_epoch = (torch.empty(self.x_train.shape, dtype=torch.bool, device=self.device) if self.dynamic
                        else self.x_train)
        self._graph: _GraphedStep | None = None   # built at the first epoch on CUDA
        self.progress = Progress()
        self.best_state: dict[str, Tensor] | None = None    # the weights at progress.best_epoch
        self.other_state: dict[str, Tensor] | None = None   # ... at progress.other_epoch (may be best_state)

    # The run's counters (Progress) under Trainer's old names.
    epoch = property(lambda self: self.progress.epoch)
    best_epoch = property(lambda self: self.progress.best_epoch)

    @property
    def stop_reason(self) -> str | None:
        return self.progress.stop_reason

    @property
    def stop_detail(self) -> str:
        return self.progress.stop_detail

    @stop_detail.setter
    def stop_detail(self, value: str) -> None:
        self.progress.stop_detail = value

    # -- one epoch -------------------------------------------------------------------------
    def _batch_step(self, idx: Tensor, beta: float | Tensor, noise: Tensor) -> Tensor:
        """Forward, backward and update on x_epoch[idx] (grads must be None or zero); [3] sums."""
        x = self.x_epoch[idx].to(self.x_train.dtype)                       # [B, D]
        terms = self.model.elbo(x, beta, noise)
        terms["loss"].backward()
        if self.config.optimizer == "adam_normgrad":
            unit_norm_gradients_([p.grad for p in self.params], self.parts)
        self.optimizer.step()
        return torch.stack([terms["elbo"].detach().sum(), terms["rec"].detach().sum(),
                            terms["kl"].detach().sum()])

    def _train_epoch(self, beta: float) -> list[float]:
        """One epoch; the mean (elbo, rec, kl) per training image."""
        self.model.train()
        n = self.x_train.shape[0]
        B = self.config.batch_size
        draws = EpochDraws.draw(self.x_train, self.dynamic, self.model.noise_dim, self.generator,
                                self.noise_generator)
        if draws.images is not None:
            self.x_epoch.copy_(draws.images)
        totals = torch.zeros(3, device=self.device, dtype=self.x_train.dtype)   # sums of elbo, rec, kl
        graphed = self._graphed_step() if n >= B else None
        for start in range(0, n, B):
            idx, noise = draws.order[start:start + B], draws.noise[start:start + B]
            if graphed is not None and idx.shape[0] == B:
                totals += graphed(idx, beta, noise)
                continue
            if graphed is not None:   # the last, smaller batch runs eagerly on the same tensors
                torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
            else:
                self.optimizer.zero_grad(set_to_none=True)
            totals += self._batch_step(idx, beta, noise)
        return (totals / n).tolist()

    def _graphed_step(self) -> "_GraphedStep | None":
        if not (self.config.cuda_graphs and self.device.type == "cuda"):
            return None
        if self._graph is None:
            self._graph = _GraphedStep(self)
        return self._graph

    @torch.no_grad()
    def evaluate_elbo(self, x: Tensor, noise: Tensor | None = None) -> dict[str, float]:
        """Mean ELBO terms at beta = 1 (the validation loss of early stopping); `noise` [N, 1,
        noise_dim] fixes the samples (default: drawn from the global generator)."""
        from trainables.vae.evaluate import elbo

        terms = elbo(self.model, x, noise=noise)
        out = {k: float(v.mean()) for k, v in terms.items()}
        out["loss"] = -out["elbo"]
        return out

    def step(self) -> dict[str, Any]:
        """Train one epoch, validate, update early stopping. Sets `stop_reason` when done."""
        if self.stop_reason is not None:
            raise RuntimeError(f"training already stopped ({self.stop_reason})")
        self.progress.epoch += 1
        beta = kl_weight(self.epoch, self.config.warmup)
        t0 = time.perf_counter()
        train = self._train_epoch(beta)
        val_noise = draw_noise(self.x_val.shape[0], self.model.noise_dim, self.x_val, self.noise_generator)
        val = self.evaluate_elbo(self.x_val, val_noise)
        val_ll = validation_ll(self.model, self.x_val, self.config) if val_ll_due(self.config, self.epoch) else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics = epoch_metrics(self.epoch, beta, train, (val["elbo"], val["rec"], val["kl"]),
                                time.perf_counter() - t0)
        if val_ll is not None:
            metrics[METRIC_VAL_LL] = val_ll
        best, other = self.progress.update(metrics, self.config)
        if best:
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if other:   # one copy when both rules take this epoch
            self.other_state = self.best_state if best else {k: v.detach().clone()
                                                             for k, v in self.model.state_dict().items()}
        metrics["stop_reason"] = self.stop_reason
        return metrics

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def finish(self) -> None:
        """Restore the weights of the best validation epoch (if there is one)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.progress.state(),
            "best_state": self.best_state,
            "other_state": self.other_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "generator": self.generator.get_state(),
                "noise": self.noise_generator.get_state(),
            },
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._graph = None   # the optimizer gets new state tensors: a captured graph would miss them
        self.model.load_state_dict(state["model"])
        own_flags = [{k: g.get(k) for k in ("foreach", "fused", "capturable")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        # A state saved on another device (a CPU run, a pooled trial) would bring its update
        # kernels along; keep this device's (fused and capturable on CUDA, its step on the device).
        for group, flags in zip(self.optimizer.param_groups, own_flags):
            group.update(flags)
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st and "step" in st and (flags["fused"] or flags["capturable"]):
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
        self.progress = Progress.from_state(state)
        self.best_state = ({k: v.to(self.device) for k, v in state["best_state"].items()}
                           if state["best_state"] is not None else None)
        other = state.get("other_state") if self.progress.other_tracked else None
        self.other_state = (None if other is None else self.best_state if other is state["best_state"]
                            else {k: v.to(self.device) for k, v in other.items()})
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        restore_generators(state["rng"], self.generator, self.noise_generator, self.config.seed, self.epoch)


def restore_generators(rng: dict[str, Any], order: torch.Generator, noise: torch.Generator, seed: int,
                       epoch: int) -> None:
    """A checkpoint's generator states into a run's generators. Saved on another device type
    (CPU and CUDA generators keep different states), or before the noise had a generator of its
    own: the streams go on from seeds derived from the run's seed and epoch instead."""
    for generator, key, offset in ((order, "generator", 0), (noise, "noise", NOISE_SEED_OFFSET)):
        saved = rng.get(key)
        try:
            if saved is None:
                raise RuntimeError("not saved")
            generator.set_state(saved.cpu())
        except RuntimeError:
            generator.manual_seed(seed + offset + 7919 * epoch)


def build_trial_model(config: TrainConfig, info, x_train: Tensor) -> LatentVariableModel:
    """The model of a run, as its configuration says (on the CPU; the caller moves it)."""
    return build_model(
        model=config.model, prior=config.prior, input_shape=info.image_shape,
        likelihood=info.likelihood, latent_dim=config.latent_dim,
        hidden_dim=config.hidden_dim, K=config.K, pseudo_init=info.pseudo_init,
        init_data=x_train.cpu() if config.prior == "vamp_data" else None,
        fixed_pseudo_inputs=config.fixed_pseudo_inputs, prob_clamp=config.prob_clamp)


def capture_cuda_graph(step: Callable[[], Tensor], params: Sequence[torch.nn.Parameter], device: torch.device,
                       state: Callable[[], list[Tensor]]) -> tuple["torch.cuda.CUDAGraph", Tensor]:
    """Capture `step()` (forward, backward, optimizer update) as a CUDA graph; return it and its output.

    Capturing needs a few warm-up steps on a side stream (allocations, cuBLAS handles, optimizer
    state). They are undone: every tensor in `state()` taken before the warm-up is restored in
    place (addresses stay, the graph uses them), tensors the warm-up created are zeroed (a fresh
    Adam's moments and step), and the CUDA RNG is rewound, so replays compute what eager steps would.
    """
    def clear_grads() -> None:
        for p in params:
            p.grad = None

    before = {id(t): t.detach().clone() for t in state()}
    rng = torch.cuda.get_rng_state(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            clear_grads()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.no_grad():
        for t in state():
            if id(t) in before:
                t.copy_(before[id(t)])
            else:
                t.zero_()
    torch.cuda.set_rng_state(rng, device)
    clear_grads()                                   # grads are allocated inside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


class _GraphedStep:
    """The whole training step (forward, backward, Adam) replayed as one CUDA graph.

    At batch 100 an eager step is bound by kernel launches, not arithmetic; a replay launches
    the ~hundreds of kernels at once. Each replay reads the batch through a static index buffer
    into the resident training data (this epoch's binarised copy for dynamic data), its noise
    from a static buffer, and returns its ELBO sums in a static output.
    """

    def __init__(self, trainer: Trainer):
        dev = trainer.device
        B = trainer.config.batch_size
        self.idx = torch.arange(B, device=dev)                            # static: which images
        self.noise = torch.zeros(B, 1, trainer.model.noise_dim, device=dev,
                                 dtype=trainer.x_train.dtype)             # static: the step's noise
        self.beta = torch.ones((), device=dev)                            # static: the KL weight
        self._beta_value = 1.0

        def state() -> list[Tensor]:
            opt = [v for p in trainer.params for v in trainer.optimizer.state.get(p, {}).values()
                   if torch.is_tensor(v)]
            # keep_vars: the Parameter objects themselves (stable ids), not fresh detached views
            return list(trainer.model.state_dict(keep_vars=True).values()) + opt

        self.graph, self.sums = capture_cuda_graph(lambda: trainer._batch_step(self.idx, self.beta, self.noise),
                                                   trainer.params, dev, state)   # sums: static [3]

    def __call__(self, idx: Tensor, beta: float, noise: Tensor) -> Tensor:
        self.idx.copy_(idx)
        self.noise.copy_(noise)
        if self._beta_value != beta:
            self.beta.fill_(beta)
            self._beta_value = beta
        self.graph.replay()
        return self.sums


def train(config: TrainConfig, splits: Splits | None = None, device: torch.device | str | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Trainer:
    """Train until max epochs, early stopping or NaN; restore the best weights; return the trainer."""
    trainer = Trainer(config, splits, device)
    while not trainer.done:
        metrics = trainer.step()
        if on_epoch is not None:
            on_epoch(metrics)
    trainer.finish()
    return trainer


def evaluation_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator a run's final evaluation draws from (importance samples, test ELBO noise)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + EVAL_SEED_OFFSET)
    return generator


def evaluate_test_ll(trainer: Trainer, samples: int, x_test: Tensor) -> tuple[Tensor, float, torch.Generator]:
    """The per-image test LL [N] of the trainer's current weights on `x_test`, its seconds, and the generator
    it drew from (the test ELBO's noise comes next from it). The generator is the run's own,
    seeded from its seed: the LL is a function of the weights and the trial's configuration,
    whichever process (a pooled trial's, a Ray task's) evaluates it, and whichever choice of epoch."""
    from trainables.vae.evaluate import log_likelihood

    generator = evaluation_generator(trainer.config.seed, trainer.device)
    t0 = time.perf_counter()
    # On a GPU the fused (compiled) passes are ~1.5x faster: 1.6 s for 10,000 images x 5000 on an H200.
    ll = log_likelihood(trainer.model, x_test, samples, compile=trainer.device.type == "cuda",
                        generator=generator)                                           # [N]
    return ll, time.perf_counter() - t0, generator


def ll_metrics(ll: Tensor, input_dim: int, gray: bool) -> dict[str, float]:
    """A per-image test LL [N] as its metrics: the mean, its standard error (the per-image LL's
    std, ddof=1, / sqrt(N)), and bits/dim for gray data."""
    from trainables.vae.likelihoods import bits_per_dim

    out = {METRIC_TEST_LL: float(ll.mean()), METRIC_TEST_LL_SE: standard_error(ll.double().cpu().tolist())}
    if gray:
        out[METRIC_TEST_BPD] = float(bits_per_dim(ll.mean(), input_dim))
    return out


def final_evaluation(trainer: Trainer, samples: int | None = None, images: int | None = None) -> dict[str, Any]:
    """Test log-likelihood (nats, with its standard error; bits/dim for gray data), test ELBO,
    active units, per-image LL, and the validation LL of the tested weights; the same for the
    run's other choice of epoch (`Progress`), under `other_choice_metrics` names, when the run kept it.
    With `samples` importance samples (default: the config's test_samples) on the first `images`
    test images (default: all); both are returned with the figures they made.

    Tests the trainer's current weights (`Trainer.finish` restored its own rule's best) as its
    own choice; the other choice's weights are loaded for their test and the current ones put
    back. Where both choices are one epoch, the other's figures are copies, not a second test.
    """
    from trainables.vae.evaluate import active_units

    S = samples or trainer.config.test_samples
    x_test = trainer.x_test if images is None else trainer.x_test[:images]
    gray = trainer.info.likelihood == "logistic256"
    dim = trainer.model.input_dim
    ll, seconds, generator = evaluate_test_ll(trainer, S, x_test)
    test = trainer.evaluate_elbo(x_test, draw_noise(x_test.shape[0], trainer.model.noise_dim, x_test, generator))
    units = active_units(trainer.model, x_test)
    best = trainer.progress
    tested = best.best_epoch or trainer.epoch
    out: dict[str, Any] = {
        METRIC_BEST_EPOCH: tested,
        # The validation ELBO of the tested (restored) weights: what a sweep chooses on.
        METRIC_BEST_VAL_ELBO: best.best_val_elbo if best.best_epoch is not None else float("nan"),
        METRIC_BEST_VAL_LL: validation_ll(trainer.model, trainer.x_val, trainer.config),
        **ll_metrics(ll, dim, gray),
        "test_elbo": test["elbo"],
        "test_rec": test["rec"],
        "test_kl": test["kl"],
        "active_units": sum(units.values()),
        **{f"active_units_{k}": v for k, v in units.items()},
        "test_ll_seconds": seconds,
        METRIC_TEST_SAMPLES: S,
        METRIC_TEST_IMAGES: int(x_test.shape[0]),
        "per_image_ll": ll.cpu(),
    }
    if best.other_tracked and best.other_epoch is not None and (best.other_epoch == tested
                                                                 or trainer.other_state is not None):
        choice = other_choice(trainer.config.select_on, trainer.config.best_after_warmup)
        keys = [METRIC_TEST_LL, METRIC_TEST_LL_SE, METRIC_BEST_VAL_LL] + ([METRIC_TEST_BPD] if gray else [])
        if best.other_epoch == tested:
            other = {k: out[k] for k in keys}
        else:
            current = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            trainer.model.load_state_dict(trainer.other_state)
            try:
                other_ll, _, _ = evaluate_test_ll(trainer, S, x_test)
                other = {**ll_metrics(other_ll, dim, gray),
                         METRIC_BEST_VAL_LL: validation_ll(trainer.model, trainer.x_val, trainer.config)}
            finally:
                trainer.model.load_state_dict(current)
        other[METRIC_BEST_EPOCH], other[METRIC_BEST_VAL_ELBO] = best.other_epoch, -best.other_val_loss
        names = other_choice_metrics(choice)
        out.update({names[k]: v for k, v in other.items()})
    return out


def run_training(config: TrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`sweeper train`: one run without a sweep, with a line per epoch and the final test LL."""
    trainer = Trainer(config)
    echo(f"{config.dataset} / {config.model} / {config.prior}: {trainer.x_train.shape[0]} training images "
         f"on {trainer.device}")
    while not trainer.done:
        m = trainer.step()
        val_ll = f"  val LL {m[METRIC_VAL_LL]:9.3f}" if METRIC_VAL_LL in m else ""
        echo(f"epoch {m['epoch']:4d}  beta {m['beta']:.2f}  train loss {m['train_loss']:9.3f}  "
             f"val loss {m['val_loss']:9.3f}{val_ll}  ({m['epoch_seconds']:.1f} s)")
    echo(f"stopped: {trainer.stop_reason}" + (f" ({trainer.stop_detail})" if trainer.stop_detail else ""))
    if trainer.stop_reason == STOP_NAN:
        raise TrainingDiverged(trainer.stop_detail)
    trainer.finish()
    final = final_evaluation(trainer)
    line = (f"test log-likelihood {final[METRIC_TEST_LL]:.2f} ± {final[METRIC_TEST_LL_SE]:.2f} (SE) nats "
            f"(S={final['test_samples']}, {trainer.x_test.shape[0]} images) at epoch {final[METRIC_BEST_EPOCH]}")
    if METRIC_TEST_BPD in final:
        line += f" = {final[METRIC_TEST_BPD]:.4f} bits/dim"
    echo(line + f"; test ELBO {final['test_elbo']:.2f}; active units {final['active_units']}")
    choice = other_choice(config.select_on, config.best_after_warmup)
    names = other_choice_metrics(choice)
    if names[METRIC_TEST_LL] in final:
        echo(f"other choice, {CHOICE_WORDS[choice]}: epoch {final[names[METRIC_BEST_EPOCH]]}, test log-likelihood "
             f"{final[names[METRIC_TEST_LL]]:.2f} ± {final[names[METRIC_TEST_LL_SE]]:.2f} (SE) nats")
    return final
