"""Observation models p(x|z): decoder heads that turn a hidden state into log p(x|z).

A likelihood is a small module: `forward(h)` gives its parameters, `log_prob(x, params)` sums
log p(x_d | params_d) over the D pixels, `mean(params)` is the image shown in grids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.vae.catalog import bits_per_dim  # noqa: F401 (the library's name for it too)
from trainables.vae.registry import registrar

LIKELIHOODS: dict[str, type["Likelihood"]] = {}

# Pixel bins of the discretized logistic: x = (v + 0.5) / 256 for v in 0..255.
N_BINS = 256
BIN_WIDTH = 1.0 / N_BINS


register_likelihood = registrar(LIKELIHOODS)


def log_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dim, stable for any logits."""
    # x*log(s) + (1-x)*log(1-s) = x*l - softplus(l): PyTorch's fused, stable BCE-with-logits
    # kernel computes exactly this (one kernel instead of three); x broadcasts over samples.
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def log_discretized_logistic(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) under a logistic(mean, exp(log_scale)) discretized into 256 bins, summed over D.

    Bin v covers [v/256, (v+1)/256]; the edge bins take the tails (v=0 gets (-inf, 1/256],
    v=255 gets [255/256, inf)), so the 256 probabilities of a pixel sum to exactly 1.
    """
    inv_scale = torch.exp(-log_scale)
    v = torch.floor(x * N_BINS).clamp(0, N_BINS - 1)     # bin index of each pixel
    lower = (v * BIN_WIDTH - mean) * inv_scale            # b: standardised lower edge
    upper = lower + BIN_WIDTH * inv_scale                 # a: standardised upper edge
    # log(sigmoid(a) - sigmoid(b)) = a + log(1 - e^(b-a)) - softplus(a) - softplus(b),
    # stable for any a > b (no cancellation between two probabilities near 0 or 1).
    log_mid = upper + torch.log(-torch.expm1(lower - upper)) - F.softplus(upper) - F.softplus(lower)
    log_first = -F.softplus(-upper)   # log sigmoid(a): mass of (-inf, 1/256]
    log_last = -F.softplus(lower)     # log(1 - sigmoid(b)): mass of [255/256, inf)
    log_p = torch.where(v == 0, log_first, torch.where(v == N_BINS - 1, log_last, log_mid))
    return log_p.sum(-1)


def clamp_logits(logits: Tensor, eps: float) -> Tensor:
    """REF's clamp of Bernoulli probabilities to [eps, 1 - eps], applied to the logits.

    sigmoid is monotone, so clamp(sigmoid(l), eps, 1 - eps) = sigmoid(clamp(l, -L, L)) with
    L = log((1 - eps) / eps): the same values and the same zero gradient past the clamp, while
    the log-probability stays in BCE-with-logits' stable form. eps = 0 leaves the logits alone.
    """
    if eps <= 0.0:
        return logits
    bound = math.log((1.0 - eps) / eps)
    return logits.clamp(-bound, bound)


class Likelihood(nn.Module):
    """A decoder head: hidden state [.., H] -> distribution parameters over D pixels.

    `prob_clamp` is REF's guard for binary data (Bernoulli probabilities kept in [eps, 1 - eps]);
    likelihoods with clamps of their own (the discretized logistic) ignore it.
    """

    name = "likelihood"

    def __init__(self, hidden_dim: int, input_dim: int, prob_clamp: float = 0.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.input_dim = input_dim
        self.prob_clamp = prob_clamp

    def forward(self, h: Tensor) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def mean(self, params: tuple[Tensor, ...]) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@register_likelihood("bernoulli")
class Bernoulli(Likelihood):
    """Binary pixels; the head outputs logits (REF: Linear + sigmoid, computed here in log space)."""

    def __init__(self, hidden_dim: int, input_dim: int, prob_clamp: float = 0.0):
        super().__init__(hidden_dim, input_dim, prob_clamp)
        self.logits = nn.Linear(hidden_dim, input_dim)

    def forward(self, h: Tensor) -> tuple[Tensor]:
        return (clamp_logits(self.logits(h), self.prob_clamp),)

    def log_prob(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return log_bernoulli(x, params[0])

    def mean(self, params: tuple[Tensor, ...]) -> Tensor:
        return torch.sigmoid(params[0])


@register_likelihood("logistic256")
class DiscretizedLogistic256(Likelihood):
    """8-bit gray pixels (Frey Faces): 256-bin discretized logistic, REF's heads and clamps."""

    def __init__(self, hidden_dim: int, input_dim: int, prob_clamp: float = 0.0):
        super().__init__(hidden_dim, input_dim, prob_clamp)
        self.mean_head = nn.Linear(hidden_dim, input_dim)
        self.log_scale_head = nn.Linear(hidden_dim, input_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        # REF clamps the mean inside the first/last bin centres and the log-scale to [-4.5, 0].
        mean = torch.sigmoid(self.mean_head(h)).clamp(1.0 / 512.0, 1.0 - 1.0 / 512.0)
        log_scale = F.hardtanh(self.log_scale_head(h), -4.5, 0.0)
        return mean, log_scale

    def log_prob(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return log_discretized_logistic(x, params[0], params[1])

    def mean(self, params: tuple[Tensor, ...]) -> Tensor:
        return params[0]
