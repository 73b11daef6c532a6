"""The VAEs of "VAE with a VampPrior": 1 level (`vae`) and 2 levels (`hvae`), REF's architecture.

Every model computes, for x [B, D] and S samples from q, the three log-densities
log p(x|z), log p(z) and log q(z|x) as [B, S]; the ELBO (S = 1) and the importance-sampled
log-likelihood (S large) are both built from them, so they cannot drift apart.

The reparameterisation noise may be passed in (`noise`, [B, S, noise_dim]); trainers draw it
from a generator of their own, so a run is reproducible from its seed alone, and many copies of
a model can train as one (`torch.func.vmap` in trainables/vae/batched.py) without sharing a
random stream. Without it the models draw from torch's global generator (evaluation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.vae.likelihoods import LIKELIHOODS, Likelihood
from trainables.vae.priors import LOG_2PI, PRIORS, Prior, PriorContext, log_normal_diag
from trainables.vae.registry import registrar

MODELS: dict[str, type["LatentVariableModel"]] = {}


register_model = registrar(MODELS)


# REF's Linear layers that ours concatenate along their output dim (one matmul for both): a
# parameter's `ref_parts` says how many. REF's AdamNormGrad scales each of REF's tensors to unit
# norm on its own (train.unit_norm_gradients_ reads this).
REF_PARTS = "ref_parts"


def concatenated(linear: nn.Linear, parts: int) -> nn.Linear:
    for p in linear.parameters():
        setattr(p, REF_PARTS, parts)
    return linear


class GatedDense(nn.Module):
    """h(x) * sigmoid(g(x)); h and g share one Linear of width 2*out (one matmul, same math).

    `F.glu` computes first_half * sigmoid(second_half) in one kernel (and one for its gradient).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = concatenated(nn.Linear(in_dim, 2 * out_dim), 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.glu(self.linear(x), dim=-1)


def gated_mlp(in_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(GatedDense(in_dim, hidden_dim), GatedDense(hidden_dim, hidden_dim))


class GaussianHead(nn.Module):
    """Mean and log-variance of a diagonal Gaussian; REF clamps the log-variance to [-6, 2].

    REF's two Linear heads share one Linear of width 2*Z (same init and math, one matmul).
    """

    def __init__(self, hidden_dim: int, latent_dim: int):
        super().__init__()
        self.linear = concatenated(nn.Linear(hidden_dim, 2 * latent_dim), 2)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.linear(h).chunk(2, dim=-1)
        # The clamp keeps q's variance from collapsing or exploding early in training.
        return mean, F.hardtanh(logvar, -6.0, 2.0)


def he_init(module: nn.Module) -> None:
    """REF: every Linear weight ~ N(0, sqrt(2 / fan_in)); biases keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_features))


def reparameterize(mean: Tensor, logvar: Tensor, samples: int, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """z = mean + sigma * eps for `samples` draws: [B, Z] -> ([B, S, Z], log q(z|x) [B, S]).

    eps [B, S, Z] ~ N(0, I) (default: drawn here). log q is computed from eps:
    (z - mean)^2 / sigma^2 = eps^2 exactly, with fewer operations.
    """
    if eps is None:
        eps = torch.randn(mean.shape[0], samples, mean.shape[1], device=mean.device, dtype=mean.dtype)
    z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    log_q = -0.5 * (LOG_2PI + logvar.unsqueeze(1) + eps.pow(2)).sum(-1)
    return z, log_q


class LogDensities(NamedTuple):
    """Per image and sample, [B, S]."""

    log_p_x: Tensor   # log p(x | z)
    log_p_z: Tensor   # log p(z)  (for hvae: log p(z1|z2) + log p(z2))
    log_q_z: Tensor   # log q(z | x)  (for hvae: log q(z1|x,z2) + log q(z2|x))


class LatentVariableModel(nn.Module):
    """Shared interface: `log_densities`, `elbo`, `importance_log_weights`, `sample`, ..."""

    name = "model"
    prior: Prior

    def __init__(self, input_dim: int, likelihood: str, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.hidden_dim = hidden_dim
        self.likelihood_name = likelihood

    @property
    def noise_dim(self) -> int:
        """Standard-normal draws per image and sample (the width of `noise`)."""
        return self.latent_dim

    def log_densities(self, x: Tensor, samples: int = 1, noise: Tensor | None = None) -> LogDensities:  # pragma: no cover
        raise NotImplementedError

    def elbo(self, x: Tensor, beta: float | Tensor = 1.0, noise: Tensor | None = None) -> dict[str, Tensor]:
        """One-sample ELBO per example: dict(elbo, rec, kl), each [B]; `loss` is the beta-weighted
        batch mean. `noise` [B, 1, noise_dim] fixes the sample (default: drawn)."""
        d = self.log_densities(x, 1, noise)
        rec = d.log_p_x[:, 0]
        kl = (d.log_q_z - d.log_p_z)[:, 0]  # REF: single-sample estimate log q - log p
        return {"elbo": rec - kl, "rec": rec, "kl": kl, "loss": -(rec - beta * kl).mean()}

    def forward(self, x: Tensor, beta: float | Tensor = 1.0, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The ELBO terms (`elbo`): what `torch.func.functional_call` runs for batched training."""
        return self.elbo(x, beta, noise)

    def importance_log_weights(self, x: Tensor, samples: int, noise: Tensor | None = None) -> Tensor:
        """log p(x, z_s) - log q(z_s | x) for S samples z_s ~ q(z|x): [B, S]. `noise`
        [B, S, noise_dim] fixes the samples (default: drawn from the global generator)."""
        d = self.log_densities(x, samples, noise)
        return d.log_p_x + d.log_p_z - d.log_q_z

    def latent_means(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """E_q[z] per latent layer, each [B, Z] (for active units)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:  # pragma: no cover - abstract
        """Mean images of p(x|z), z from the prior: [n, D]."""
        raise NotImplementedError


@register_model("vae")
class VAE(LatentVariableModel):
    """q(z|x), p(x|z), prior p(z)."""

    def __init__(self, input_dim: int, likelihood: str, latent_dim: int, hidden_dim: int,
                 prior: str, prior_context: dict, prob_clamp: float = 0.0):
        super().__init__(input_dim, likelihood, latent_dim, hidden_dim)
        self.q_z_net = gated_mlp(input_dim, hidden_dim)
        self.q_z_head = GaussianHead(hidden_dim, latent_dim)
        self.p_x_net = gated_mlp(latent_dim, hidden_dim)
        self.p_x: Likelihood = LIKELIHOODS[likelihood](hidden_dim, input_dim, prob_clamp)
        he_init(self)
        # After the init, as REF: the pseudo-inputs keep their own N(mean, std) init.
        self.prior = PRIORS[prior](PriorContext(latent_dim=latent_dim, input_dim=input_dim,
                                                encoder=self.q_z, **prior_context))

    def q_z(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z|x), each [B, Z]."""
        return self.q_z_head(self.q_z_net(x))

    def p_x_params(self, z: Tensor) -> tuple[Tensor, ...]:
        return self.p_x(self.p_x_net(z))

    def log_p_x(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z): x [B, D], z [B, Z] -> [B]; or z [B, S, Z] -> [B, S]."""
        if z.dim() == 3:
            x = x.unsqueeze(1)
        return self.p_x.log_prob(x, self.p_x_params(z))

    def log_densities(self, x: Tensor, samples: int = 1, noise: Tensor | None = None) -> LogDensities:
        mean, logvar = self.q_z(x)                                     # [B, Z]
        z, log_q_z = reparameterize(mean, logvar, samples, noise)      # [B, S, Z], [B, S]
        return LogDensities(self.log_p_x(x, z), self.prior.log_prob(z), log_q_z)

    def latent_means(self, x: Tensor) -> dict[str, Tensor]:
        return {"z": self.q_z(x)[0]}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.p_x.mean(self.p_x_params(self.q_z(x)[0]))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        return self.p_x.mean(self.p_x_params(self.prior.sample(n)))


@register_model("hvae")
class HierarchicalVAE(LatentVariableModel):
    """Two latent levels (REF's HVAE_2level): q(z2|x) q(z1|x,z2), p(z2) p(z1|z2) p(x|z1,z2).

    The prior (standard, VampPrior, ...) is on the top latent z2.
    """

    def __init__(self, input_dim: int, likelihood: str, latent_dim: int, hidden_dim: int,
                 prior: str, prior_context: dict, prob_clamp: float = 0.0):
        super().__init__(input_dim, likelihood, latent_dim, hidden_dim)
        H, Z = hidden_dim, latent_dim
        self.q_z2_net = gated_mlp(input_dim, H)
        self.q_z2_head = GaussianHead(H, Z)
        self.q_z1_x = GatedDense(input_dim, H)
        self.q_z1_z2 = GatedDense(Z, H)
        self.q_z1_joint = GatedDense(2 * H, H)
        self.q_z1_head = GaussianHead(H, Z)
        self.p_z1_net = gated_mlp(Z, H)
        self.p_z1_head = GaussianHead(H, Z)
        self.p_x_z1 = GatedDense(Z, H)
        self.p_x_z2 = GatedDense(Z, H)
        self.p_x_joint = GatedDense(2 * H, H)
        self.p_x: Likelihood = LIKELIHOODS[likelihood](H, input_dim, prob_clamp)
        he_init(self)
        self.prior = PRIORS[prior](PriorContext(latent_dim=Z, input_dim=input_dim,
                                                encoder=self.q_z2, **prior_context))

    def q_z2(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z2|x), each [B, Z]."""
        return self.q_z2_head(self.q_z2_net(x))

    def q_z1(self, h_x: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        """q(z1|x,z2) from h_x = q_z1_x(x) (computed once per image) and z2 [..., Z]."""
        h_x = h_x.expand(*z2.shape[:-1], h_x.shape[-1])
        return self.q_z1_head(self.q_z1_joint(torch.cat((h_x, self.q_z1_z2(z2)), dim=-1)))

    def p_z1(self, z2: Tensor) -> tuple[Tensor, Tensor]:
        return self.p_z1_head(self.p_z1_net(z2))

    def p_x_params(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, ...]:
        h = torch.cat((self.p_x_z1(z1), self.p_x_z2(z2)), dim=-1)
        return self.p_x(self.p_x_joint(h))

    @property
    def noise_dim(self) -> int:
        return 2 * self.latent_dim          # z2, then z1

    def log_densities(self, x: Tensor, samples: int = 1, noise: Tensor | None = None) -> LogDensities:
        eps2, eps1 = noise.chunk(2, dim=-1) if noise is not None else (None, None)   # each [B, S, Z]
        z2_mean, z2_logvar = self.q_z2(x)                                       # [B, Z]
        z2, log_q_z2 = reparameterize(z2_mean, z2_logvar, samples, eps2)        # [B, S, Z], [B, S]
        z1_mean, z1_logvar = self.q_z1(self.q_z1_x(x).unsqueeze(1), z2)         # [B, S, Z]
        if eps1 is None:
            eps1 = torch.randn_like(z1_mean)
        z1 = z1_mean + torch.exp(0.5 * z1_logvar) * eps1
        log_q_z1 = -0.5 * (LOG_2PI + z1_logvar + eps1.pow(2)).sum(-1)           # log N(z1; q), via eps
        p_z1_mean, p_z1_logvar = self.p_z1(z2)
        log_p_z1 = log_normal_diag(z1, p_z1_mean, p_z1_logvar)
        log_p_x = self.p_x.log_prob(x.unsqueeze(1), self.p_x_params(z1, z2))
        return LogDensities(log_p_x, log_p_z1 + self.prior.log_prob(z2), log_q_z1 + log_q_z2)

    def latent_means(self, x: Tensor) -> dict[str, Tensor]:
        z2_mean, _ = self.q_z2(x)
        z1_mean, _ = self.q_z1(self.q_z1_x(x), z2_mean)
        return {"z1": z1_mean, "z2": z2_mean}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        means = self.latent_means(x)
        return self.p_x.mean(self.p_x_params(means["z1"], means["z2"]))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        z2 = self.prior.sample(n)
        z1_mean, z1_logvar = self.p_z1(z2)
        z1 = z1_mean + torch.exp(0.5 * z1_logvar) * torch.randn_like(z1_mean)
        return self.p_x.mean(self.p_x_params(z1, z2))


def build_model(model: str = "vae", prior: str = "vamp", input_shape: tuple[int, ...] = (1, 28, 28),
                likelihood: str = "bernoulli", latent_dim: int = 40, hidden_dim: int = 300,
                K: int = 500, *, pseudo_init: tuple[float, float] = (0.05, 0.01),
                init_data: Tensor | None = None, fixed_pseudo_inputs: bool = False,
                prob_clamp: float = 0.0) -> LatentVariableModel:
    """Build a 1- or 2-level VAE with the named prior and likelihood (REF architecture)."""
    for kind, value, registry in (("model", model, MODELS), ("prior", prior, PRIORS),
                                  ("likelihood", likelihood, LIKELIHOODS)):
        if value not in registry:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(registry)}")
    input_dim = math.prod(input_shape)
    ctx = dict(K=K, pseudo_init=tuple(pseudo_init), init_data=init_data,
               fixed_pseudo_inputs=fixed_pseudo_inputs)
    net = MODELS[model](input_dim, likelihood, latent_dim, hidden_dim, prior, ctx, prob_clamp)
    net.input_shape = tuple(input_shape)
    return net
