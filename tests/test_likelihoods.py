"""Observation models: normalisation and numerical stability."""

import math

import torch
from torch.distributions import Bernoulli

from trainables.vae.likelihoods import (LIKELIHOODS, Bernoulli as BernoulliHead, bits_per_dim, clamp_logits,
                                        log_bernoulli, log_discretized_logistic)


def test_registry():
    assert set(LIKELIHOODS) >= {"bernoulli", "logistic256"}


def test_bernoulli_matches_torch_and_is_finite_for_extreme_logits():
    logits = torch.tensor([[-200.0, -20.0, 0.0, 20.0, 200.0]], dtype=torch.float64)
    for bit in (0.0, 1.0):
        x = torch.full_like(logits, bit)
        got = log_bernoulli(x, logits)
        expected = Bernoulli(logits=logits).log_prob(x).sum(-1)
        torch.testing.assert_close(got, expected)
        assert torch.isfinite(got).all()


def test_prob_clamp_equals_refs_clamped_sigmoid_values_and_gradients():
    # REF: p = clamp(sigmoid(l), eps, 1 - eps); log p(x) = x log p + (1 - x) log(1 - p).
    eps = 1e-5
    logits = torch.tensor([[-40.0, -11.6, -11.4, -3.0, 0.0, 2.5, 11.4, 11.6, 40.0]], dtype=torch.float64)
    for bit in (0.0, 1.0):
        x = torch.full_like(logits, bit)
        ours_l = logits.clone().requires_grad_(True)
        ref_l = logits.clone().requires_grad_(True)
        ours = log_bernoulli(x, clamp_logits(ours_l, eps))
        p = torch.sigmoid(ref_l).clamp(eps, 1 - eps)
        ref = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(-1)
        torch.testing.assert_close(ours, ref)
        ours.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(ours_l.grad, ref_l.grad)
        # Past the clamp no pixel costs more than -log(eps) nats and the gradient stops.
        assert ours_l.grad[0, 0] == 0 and ours_l.grad[0, -1] == 0
    worst = log_bernoulli(torch.ones(1, 1), clamp_logits(torch.full((1, 1), -1e4), eps))
    assert abs(float(worst) - math.log(eps)) < 1e-4
    # eps = 0 is the exact likelihood, and the head applies the clamp it was built with.
    assert torch.equal(clamp_logits(logits, 0.0), logits)
    head = BernoulliHead(4, 3, prob_clamp=eps)
    with torch.no_grad():
        head.logits.bias.fill_(100.0)
    assert float(head(torch.zeros(1, 4))[0].max()) == torch.tensor(math.log((1 - eps) / eps)).item()  # float32


def test_discretized_logistic_sums_to_one_over_the_256_values_of_a_pixel():
    g = torch.Generator().manual_seed(0)
    values = (torch.arange(256, dtype=torch.float64) + 0.5) / 256           # every pixel value
    mean = torch.rand(50, 1, generator=g, dtype=torch.float64).clamp(1 / 512, 1 - 1 / 512)
    log_scale = -4.5 * torch.rand(50, 1, generator=g, dtype=torch.float64)
    # one "image" per (mean, scale) with D = 1, evaluated at all 256 values
    log_p = log_discretized_logistic(values.view(1, 256, 1), mean.view(50, 1, 1), log_scale.view(50, 1, 1))
    total = torch.logsumexp(log_p, dim=1)                                     # [50]
    torch.testing.assert_close(total, torch.zeros(50, dtype=torch.float64), atol=1e-10, rtol=0)


def test_discretized_logistic_interior_bin_is_difference_of_cdfs_and_stable():
    mean = torch.tensor([0.3], dtype=torch.float64)
    log_scale = torch.tensor([-2.0], dtype=torch.float64)
    x = torch.tensor([(77 + 0.5) / 256], dtype=torch.float64)
    s = math.exp(-2.0)
    def sigmoid(t: float) -> float:
        return 1.0 / (1.0 + math.exp(-t))

    expected = math.log(sigmoid((78 / 256 - 0.3) / s) - sigmoid((77 / 256 - 0.3) / s))
    assert abs(float(log_discretized_logistic(x, mean, log_scale)) - expected) < 1e-10
    # far in the tail, the naive difference of two sigmoids underflows; ours stays finite
    x_far, mean_far, log_scale_far = torch.tensor([1.5 / 256]), torch.tensor([1 - 1 / 512]), torch.tensor([-4.5])
    naive = torch.log(torch.sigmoid((x_far + 0.5 / 256 - mean_far) / math.exp(-4.5))
                      - torch.sigmoid((x_far - 0.5 / 256 - mean_far) / math.exp(-4.5)))
    far = log_discretized_logistic(x_far, mean_far, log_scale_far)
    assert not torch.isfinite(naive).all()
    assert torch.isfinite(far).all() and -100 < float(far) < -80


def test_bits_per_dim():
    assert abs(bits_per_dim(-560 * math.log(2.0) * 4.5, 560) - 4.5) < 1e-12
