"""The importance-sampled log-likelihood against exact integration, the ELBO and S."""

import math

import numpy as np
import pytest
import torch

from trainables.vae.evaluate import active_units, image_grid, log_likelihood
from trainables.vae.model import build_model
from trainables.vae.priors import log_standard_normal


def exact_log_p_x(model, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log int p(x|z) p(z) dz by the trapezoid rule over a 1-D latent, float64."""
    z = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64).unsqueeze(1)      # [G, 1]
    with torch.no_grad():
        log_prior = model.prior.log_prob(z)                                        # [G]
        params = model.p_x_params(z)
        log_lik = torch.stack([model.p_x.log_prob(xi.expand(z.shape[0], -1), params) for xi in x])  # [N, G]
    log_f = log_lik + log_prior                                                    # [N, G]
    dz = float(z[1] - z[0])
    weights = torch.full((z.shape[0],), dz, dtype=torch.float64)
    weights[[0, -1]] = dz / 2
    return torch.logsumexp(log_f + torch.log(weights), dim=1)


def widen_proposals(model, logvar: float = 1.0) -> None:
    """Make every q a broad Gaussian: the estimator stays unbiased for any q, and a q wider than
    the posterior keeps the importance weights bounded, so 0.05 nats is a fair tolerance."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("_head") and name.startswith("q_"):
                Z = module.linear.out_features // 2
                module.linear.weight[Z:].zero_()
                module.linear.bias[Z:].fill_(logvar)


@pytest.mark.parametrize("prior,likelihood", [("standard", "bernoulli"), ("vamp", "bernoulli"),
                                              ("mog", "logistic256")])
def test_importance_sampled_ll_equals_numerical_integration_for_1d_latent(prior, likelihood):
    torch.manual_seed(0)
    model = build_model("vae", prior, input_shape=(1, 2, 3), likelihood=likelihood, latent_dim=1,
                        hidden_dim=8, K=3, pseudo_init=(0.5, 0.3)).double()
    widen_proposals(model)
    if likelihood == "bernoulli":
        x = torch.bernoulli(torch.full((6, 6), 0.4, dtype=torch.float64))
    else:
        x = (torch.randint(0, 256, (6, 6)).double() + 0.5) / 256
    torch.manual_seed(1)
    estimate = log_likelihood(model, x, samples=20000)
    exact = exact_log_p_x(model, x)
    assert torch.all((estimate - exact).abs() < 0.05), (estimate, exact)


def test_ll_is_above_the_elbo_and_grows_with_the_number_of_samples():
    torch.manual_seed(0)
    model = build_model("vae", "vamp", input_shape=(1, 28, 28), latent_dim=8, hidden_dim=64, K=20)
    x = torch.bernoulli(torch.full((200, 784), 0.2))
    with torch.no_grad():
        elbo = model.elbo(x)["elbo"].mean()
    lls = [float(log_likelihood(model, x, samples=s).mean()) for s in (1, 10, 100, 1000)]
    assert lls[0] == pytest.approx(float(elbo), abs=max(1.0, 0.01 * abs(float(elbo))))
    assert lls[1] > float(elbo)
    assert lls[0] < lls[1] < lls[2] < lls[3], lls


def test_hvae_importance_sampled_ll_equals_2d_numerical_integration():
    """Two 1-D latents: log p(x) = log int int p(x|z1,z2) p(z1|z2) p(z2) dz1 dz2 on a grid."""
    torch.manual_seed(0)
    model = build_model("hvae", "standard", input_shape=(1, 2, 2), latent_dim=1, hidden_dim=8).double()
    widen_proposals(model)
    x = torch.bernoulli(torch.full((4, 4), 0.5, dtype=torch.float64))
    g = torch.linspace(-9.0, 9.0, 1201, dtype=torch.float64)
    dz = float(g[1] - g[0])
    z1, z2 = torch.meshgrid(g, g, indexing="ij")
    z1, z2 = z1.reshape(-1, 1), z2.reshape(-1, 1)                                   # [G*G, 1]
    with torch.no_grad():
        p_mean, p_logvar = model.p_z1(z2)
        log_joint_z = (log_standard_normal(z2)
                       - 0.5 * (math.log(2 * math.pi) + p_logvar + (z1 - p_mean) ** 2 / p_logvar.exp()).sum(-1))
        params = model.p_x_params(z1, z2)
        log_lik = torch.stack([model.p_x.log_prob(xi.expand(z1.shape[0], -1), params) for xi in x])
    exact = torch.logsumexp(log_lik + log_joint_z, dim=1) + 2 * math.log(dz)
    torch.manual_seed(1)
    estimate = log_likelihood(model, x, samples=50000)
    assert torch.all((estimate - exact).abs() < 0.05), (estimate, exact)


def test_ll_chunking_does_not_change_the_estimate():
    torch.manual_seed(0)
    model = build_model("vae", "vamp", input_shape=(1, 2, 3), latent_dim=1, hidden_dim=8, K=3).double()
    widen_proposals(model)
    x = torch.bernoulli(torch.full((9, 6), 0.4, dtype=torch.float64))
    torch.manual_seed(1)
    one_pass = log_likelihood(model, x, samples=20000)
    many_passes = log_likelihood(model, x, samples=20000, memory_mb=1)   # ~20 rows a pass
    assert torch.allclose(one_pass, many_passes, atol=0.03)
    assert torch.allclose(many_passes, exact_log_p_x(model, x), atol=0.05)


def test_active_units_counts_dimensions_with_varying_posterior_means():
    torch.manual_seed(0)
    model = build_model("vae", "standard", input_shape=(1, 4, 4), latent_dim=6, hidden_dim=16)
    with torch.no_grad():
        model.q_z_head.linear.weight[3:6].zero_()   # mean units 3..5 ignore the input: inactive
        model.q_z_head.linear.bias[3:6].fill_(0.7)
    x = torch.bernoulli(torch.full((500, 16), 0.5))
    assert active_units(model, x) == {"z": 3}


def test_image_grid_layout():
    images = torch.stack([torch.full((6,), float(k) / 4) for k in range(5)])   # 5 images of 2x3
    grid = image_grid(images, (1, 2, 3), ncol=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    assert grid[1, 1] == 0 and grid[1, 5] == 64 and grid[4, 5] == 255
    assert grid[4, 9] == 0   # the empty sixth cell
