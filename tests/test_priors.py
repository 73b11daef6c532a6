"""Priors against their textbook definitions (float64), sampling, and the registry."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from trainables.vae.priors import PRIORS, PriorContext, mixture_log_prob

Z, D, K = 5, 12, 7


def reference_mixture(mean: torch.Tensor, logvar: torch.Tensor) -> MixtureSameFamily:
    comp = Independent(Normal(mean, torch.exp(0.5 * logvar)), 1)
    return MixtureSameFamily(Categorical(logits=torch.zeros(mean.shape[0], dtype=mean.dtype)), comp)


def toy_encoder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, non-trivial q(z|x): enough to check the VampPrior's algebra."""
    w = torch.linspace(-2.0, 2.0, D * Z, dtype=x.dtype).reshape(D, Z)
    return x @ w, torch.tanh(x @ w.flip(0)) * 2.0 - 1.0


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    ctx = PriorContext(latent_dim=Z, input_dim=D, K=K, encoder=toy_encoder,
                       pseudo_init=(0.5, 0.3), init_data=torch.rand(20, D), **kw)
    return PRIORS[name](ctx).double()


def test_registry_has_the_papers_priors():
    assert {"standard", "vamp", "vamp_data", "mog"} <= set(PRIORS)


def test_standard_normal_log_prob_matches_torch():
    prior = make("standard")
    z = torch.randn(30, Z, dtype=torch.float64) * 3
    expected = Independent(Normal(torch.zeros(Z, dtype=torch.float64), 1.0), 1).log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), expected)


@pytest.mark.parametrize("name", ["vamp", "vamp_data", "mog"])
def test_mixture_log_prob_equals_brute_force_mean_of_component_densities(name):
    prior = make(name)
    with torch.no_grad():
        if name == "mog":  # spread the components so the test is not trivially dominated by one
            prior.means.mul_(2.0)
            prior.logvars.uniform_(-2.0, 1.0)
    z = torch.randn(40, Z, dtype=torch.float64) * 2
    mean, logvar = prior.components()
    # brute force: (1/K) sum_k prod_d N(z_d; m_kd, v_kd), in a Python loop over k
    dens = torch.stack([Independent(Normal(mean[k], torch.exp(0.5 * logvar[k])), 1).log_prob(z).exp()
                        for k in range(K)], dim=1)
    expected = torch.log(dens.mean(dim=1))
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(prior.log_prob(z), reference_mixture(mean, logvar).log_prob(z))


def test_mixture_log_prob_keeps_leading_dims_and_float32_is_close():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(K, Z, generator=g) * 3, torch.rand(K, Z, generator=g) * 8 - 6
    z = torch.randn(4, 6, Z, generator=g) * 3
    out32 = mixture_log_prob(z, mean, logvar)
    out64 = reference_mixture(mean.double(), logvar.double()).log_prob(z.double())
    assert out32.shape == (4, 6)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=2e-2)


def test_vamp_components_are_the_encoded_pseudo_inputs_clipped_to_unit_box():
    prior = make("vamp")
    u = prior.pseudo_inputs.detach()
    assert u.shape == (K, D) and float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    mean, logvar = prior.components()
    torch.testing.assert_close(mean, toy_encoder(u)[0])
    torch.testing.assert_close(logvar, toy_encoder(u)[1])


def test_vamp_data_starts_from_training_images_and_can_stay_fixed():
    data = torch.rand(20, D)
    torch.manual_seed(0)
    ctx = PriorContext(latent_dim=Z, input_dim=D, K=K, encoder=toy_encoder, init_data=data,
                       fixed_pseudo_inputs=True)
    prior = PRIORS["vamp_data"](ctx)
    # every pseudo-input is within the 0.01-noise of a distinct training image
    dist = torch.cdist(prior.pseudo_params.detach(), data)     # [K, N]
    nearest = dist.argmin(1)
    assert float(dist.min(1).values.max()) < 0.01 * 6 * math.sqrt(D)
    assert len(set(nearest.tolist())) == K
    assert not prior.pseudo_params.requires_grad
    assert make("vamp_data").pseudo_params.requires_grad


@pytest.mark.parametrize("name", ["vamp", "mog"])
def test_sampling_picks_components_uniformly(name):
    """Many samples spread evenly over all K components (not the first n of them)."""
    n_comp = 40
    torch.manual_seed(0)
    far = torch.arange(n_comp, dtype=torch.float32).unsqueeze(1) * 10.0  # well separated means

    def encoder(x):  # component k of the VampPrior sits at z = 10 k (pseudo-input k is one-hot)
        return x @ far.expand(n_comp, Z), torch.full((x.shape[0], Z), -6.0)

    ctx = PriorContext(latent_dim=Z, input_dim=n_comp, K=n_comp, encoder=encoder)
    prior = PRIORS[name](ctx)
    with torch.no_grad():
        if name == "vamp":
            prior.pseudo_params.copy_(torch.eye(n_comp))
        else:
            prior.means.copy_(far.expand(n_comp, Z))
            prior.logvars.fill_(-6.0)
    few = prior.sample(10)
    assert few.shape == (10, Z)
    assert int(torch.round(few[:, 0] / 10).max()) >= 10, "10 samples all came from the first 10 components"
    z = prior.sample(8000)
    k = torch.round(z[:, 0] / 10).long().clamp(0, n_comp - 1)
    counts = torch.bincount(k, minlength=n_comp).double()
    expected = 8000 / n_comp
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90, f"component counts far from uniform (chi2={chi2:.1f}, df={n_comp - 1})"


def test_sample_shape_and_distribution_of_standard_prior():
    prior = make("standard").float()
    z = prior.sample(20000)
    assert z.shape == (20000, Z)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.03


def test_cached_components_equal_live_ones_and_are_dropped_after():
    prior = make("vamp")
    live = prior.log_prob(torch.ones(3, Z, dtype=torch.float64))
    with prior.cached():
        assert prior._cache is not None
        torch.testing.assert_close(prior.log_prob(torch.ones(3, Z, dtype=torch.float64)), live)
    assert prior._cache is None
