"""Priors p(z) over the top latent: a registry of small modules with `log_prob` and `sample`.

The model only calls `prior.log_prob(z) -> [...]` and `prior.sample(n) -> [n, Z]`. A new prior is
one decorated class (and its test). Mixture priors are torch.distributions' `MixtureSameFamily`
structure: mixture weights as logits (uniform for the paper's priors) over K diagonal Gaussians;
they share one matmul form of the [N, K] component log-densities, so no [N, K, Z] tensor is built.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.vae.registry import registrar

PRIORS: dict[str, type["Prior"]] = {}

LOG_2PI = math.log(2.0 * math.pi)

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


register_prior = registrar(PRIORS)


@dataclass(frozen=True)
class PriorContext:
    """What a prior may need from the model and the data; each prior takes what it uses."""

    latent_dim: int
    input_dim: int
    K: int = 500
    encoder: Encoder | None = None              # q(z|x) -> (mean, logvar), for VampPriors
    pseudo_init: tuple[float, float] = (0.05, 0.01)  # N(mean, std) init of the pseudo-inputs
    init_data: Tensor | None = None             # training images [N, D] for vamp_data
    fixed_pseudo_inputs: bool = False


def log_normal_diag(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(logvar))) with its full constant, summed over the last dim."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: Tensor) -> Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def mixture_log_prob(z: Tensor, mean: Tensor, logvar: Tensor, logits: Tensor | None = None) -> Tensor:
    """log sum_k w_k N(z; mean_k, diag(exp(logvar_k))) for z [..., Z], components [K, Z].

    w = softmax(logits) [K] (None: uniform, log w_k = -log K); a component with logit -inf has
    no density and gets no gradient (padding). The quadratic form sum_d (z_d - m_kd)^2 / v_kd is
    expanded into three matmuls, so the [N, K] component densities cost O(N K Z) flops but only
    O(N K) memory.
    """
    K, Z = mean.shape
    flat = z.reshape(-1, Z)                                    # [N, Z]
    precision = torch.exp(-logvar)                             # [K, Z]
    const = Z * LOG_2PI + logvar.sum(1) + (mean.pow(2) * precision).sum(1)  # [K]
    quad = flat.pow(2) @ precision.T - 2.0 * (flat @ (mean * precision).T)  # [N, K]
    log_weight = (torch.log_softmax(logits, dim=-1) if logits is not None
                  else torch.full((K,), -math.log(K), dtype=z.dtype, device=z.device))   # [K]
    log_comp = -0.5 * (quad + const) + log_weight              # [N, K]
    log_p = torch.logsumexp(log_comp, dim=1)                   # [N]
    return log_p.reshape(z.shape[:-1])


class Prior(nn.Module):
    """p(z): `log_prob(z [..., Z]) -> [...]` with full normalising constants, `sample(n) -> [n, Z]`."""

    name = "prior"

    def __init__(self, ctx: PriorContext):
        super().__init__()
        self.latent_dim = ctx.latent_dim

    def log_prob(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Within this block parameters are fixed (evaluation): priors may precompute."""
        yield


@register_prior("standard")
class StandardNormal(Prior):
    """N(0, I)."""

    def __init__(self, ctx: PriorContext):
        super().__init__(ctx)
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        return torch.randn(n, self.latent_dim, device=self._device_anchor.device)


class MixturePrior(Prior):
    """A mixture of K diagonal Gaussians with weights softmax(mixture_logits) (uniform: zeros);
    subclasses say where the components come from.

    COMPONENT_TENSORS: the parameters and buffers indexed by component (first dim K). Padding a
    prior to more components (`pad_components_`) adds components with logit -inf: the same
    density, and models with different K then have equal shapes (batched training stacks them).
    """

    COMPONENT_TENSORS: tuple[str, ...] = ("mixture_logits",)

    def __init__(self, ctx: PriorContext):
        super().__init__(ctx)
        self.K = ctx.K
        # Not persistent: uniform weights are not learned, and checkpoints stay as they were.
        self.register_buffer("mixture_logits", torch.zeros(ctx.K), persistent=False)   # [K]
        self._cache: tuple[Tensor, Tensor] | None = None

    def components(self) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each [K, Z]."""
        if self._cache is not None:
            return self._cache
        return self._components()

    def _components(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        mean, logvar = self.components()
        return mixture_log_prob(z, mean, logvar, self.mixture_logits)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        mean, logvar = self.components()
        k = torch.distributions.Categorical(logits=self.mixture_logits).sample((n,))   # [n]
        return mean[k] + torch.exp(0.5 * logvar[k]) * torch.randn_like(mean[k])

    @torch.no_grad()
    def pad_components_(self, K: int) -> None:
        """Grow to K components in place: the new ones are zeros with mixture logit -inf (no
        density, no gradient), so log_prob and sample are unchanged."""
        extra = K - self.mixture_logits.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad {self.mixture_logits.shape[0]} components down to {K}")
        if extra == 0:
            return
        for name in self.COMPONENT_TENSORS:
            old = getattr(self, name)
            fill = -math.inf if name == "mixture_logits" else 0.0
            new = torch.cat([old.detach(), old.new_full((extra, *old.shape[1:]), fill)])
            if isinstance(old, nn.Parameter):
                setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                setattr(self, name, new)

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        # Evaluation calls log_prob thousands of times with the same pseudo-inputs: encode once.
        with torch.no_grad():
            self._cache = tuple(t.detach() for t in self._components())  # type: ignore[assignment]
        try:
            yield
        finally:
            self._cache = None


@register_prior("mog")
class MixtureOfGaussians(MixturePrior):
    """K learned means and log-variances, uniform weights."""

    COMPONENT_TENSORS = ("means", "logvars", "mixture_logits")

    def __init__(self, ctx: PriorContext):
        super().__init__(ctx)
        self.means = nn.Parameter(torch.randn(ctx.K, ctx.latent_dim))
        self.logvars = nn.Parameter(torch.zeros(ctx.K, ctx.latent_dim))

    def _components(self) -> tuple[Tensor, Tensor]:
        # Same clamp as q's log-variance: a component cannot collapse onto a point.
        return self.means, F.hardtanh(self.logvars, -6.0, 2.0)


@register_prior("vamp")
class VampPrior(MixturePrior):
    """p(z) = 1/K sum_k q(z | u_k): the aggregated posterior of K learned pseudo-inputs."""

    COMPONENT_TENSORS = ("pseudo_params", "mixture_logits")

    def __init__(self, ctx: PriorContext):
        super().__init__(ctx)
        if ctx.encoder is None:
            raise ValueError("VampPrior needs the model's encoder q(z|x) in PriorContext.encoder")
        # A plain attribute, not a submodule: the encoder's weights belong to the model.
        self._encoder = ctx.encoder
        self.pseudo_params = nn.Parameter(self._initial_pseudo_inputs(ctx))  # [K, D]
        if ctx.fixed_pseudo_inputs:
            self.pseudo_params.requires_grad_(False)

    def _initial_pseudo_inputs(self, ctx: PriorContext) -> Tensor:
        mean, std = ctx.pseudo_init
        return mean + std * torch.randn(ctx.K, ctx.input_dim)

    @property
    def pseudo_inputs(self) -> Tensor:
        """u_k in [0, 1]^D, [K, D] (REF: Hardtanh(0, 1) over a free matrix)."""
        return F.hardtanh(self.pseudo_params, 0.0, 1.0)

    def _components(self) -> tuple[Tensor, Tensor]:
        return self._encoder(self.pseudo_inputs)


@register_prior("vamp_data")
class VampPriorData(VampPrior):
    """VampPrior whose pseudo-inputs start as K random training images (+ N(0, 0.01) noise)."""

    def _initial_pseudo_inputs(self, ctx: PriorContext) -> Tensor:
        if ctx.init_data is None:
            raise ValueError("vamp_data needs training images in PriorContext.init_data")
        data = ctx.init_data
        n = data.shape[0]
        # Without replacement when there are enough images (REF takes K distinct images).
        idx = torch.randperm(n)[: ctx.K] if ctx.K <= n else torch.randint(0, n, (ctx.K,))
        images = data[idx.to(data.device)].detach().float().cpu()
        return images + 0.01 * torch.randn_like(images)
