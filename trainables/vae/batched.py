"""Many VAEs trained at once in one process: stacked weights [M, ...], batched matmuls, one CUDA graph.

At batch 100 one VAE's training step is bound by kernel launches, and separate processes on one
GPU only time-slice it. Stacking M configurations of the same architecture along a leading model
dimension turns every Linear into one `baddbmm` over M models, so one launch does M models' work;
on CUDA the whole batched step (forward, backward, Adam) is then replayed as one CUDA graph.

    trainer = BatchedTrainer([TrainConfig(K=250, lr=3e-4), TrainConfig(K=500, lr=5e-4, seed=1)])
    while not trainer.done:
        per_model = trainer.step()          # list of Trainer.step-like dicts (None: already stopped)
    trainer.finish()                         # each model's best validation weights
    vae = trainer.extract(1)                 # model 1 as a plain `VAE` for evaluate.log_likelihood

Models never mix: the loss is the sum of the models' own batch losses (so each model's gradient
is exactly its single-model gradient), and Adam, the gradient normalisation, early stopping and
the NaN guard all act per model. Each model is built by `build_model` under its own seed, exactly
as `Trainer` builds it, and sees its own data order (a generator seeded like `Trainer`'s), so a
batch of one reproduces `Trainer`. Mixture priors may have a different K per model: components
are padded to K_max and the padding gets log-weight -inf (no density, no gradient).
Only the 1-level model (`vae`) is batched.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweeper.errors import ConfigError
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits, load_dataset
from trainables.vae.likelihoods import clamp_logits, log_bernoulli, log_discretized_logistic
from trainables.vae.model import VAE, LatentVariableModel, LogDensities, build_model
from trainables.vae.priors import (
    LOG_2PI,
    MixtureOfGaussians,
    StandardNormal,
    VampPrior,
    log_standard_normal,
)
from trainables.vae.train import (
    STOP_COMPLETED,
    STOP_EARLY,
    STOP_NAN,
    capture_cuda_graph,
    fixed_subset,
    kl_weight,
    resolve_device,
)

# Batched Linear layers and the single-model Linears they stack. Several Linears in one entry are
# concatenated along the output dimension (one matmul), in this order.
_BODY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("enc1", ("q_z_net.0.linear",)),       # GatedDense(D, H): one Linear D -> 2H, split [h, g] by glu
    ("enc2", ("q_z_net.1.linear",)),       # GatedDense(H, H)
    ("enc_head", ("q_z_head.linear",)),    # GaussianHead: H -> 2Z, split [mean, logvar]
    ("dec1", ("p_x_net.0.linear",)),       # GatedDense(Z, H)
    ("dec2", ("p_x_net.1.linear",)),       # GatedDense(H, H)
)
_HEADS: dict[str, tuple[str, ...]] = {
    "bernoulli": ("p_x.logits",),                             # H -> D logits
    "logistic256": ("p_x.mean_head", "p_x.log_scale_head"),   # H -> 2D, split [mean, log_scale]
}
# Prior parameters [K, .] of the single model, stacked and padded to [M, K_max, .].
_PRIOR_PARAMS: dict[str, tuple[str, ...]] = {
    "vamp": ("pseudo_params",),
    "mog": ("means", "logvars"),
    "standard": (),
}
# Fields every batched configuration must share: one architecture, one dataset, one device.
SHARED_FIELDS = ("dataset", "model", "prior", "latent_dim", "hidden_dim", "batch_size",
                 "fixed_pseudo_inputs", "train_subset", "val_subset", "test_subset", "device",
                 "cuda_graphs", "data_root", "prob_clamp")


def _prior_family(prior: nn.Module) -> str:
    """'vamp' (vamp, vamp_data), 'mog' or 'standard': which parameters the prior has."""
    if isinstance(prior, VampPrior):
        return "vamp"
    if isinstance(prior, MixtureOfGaussians):
        return "mog"
    if isinstance(prior, StandardNormal):
        return "standard"
    raise ValueError(f"prior {prior.name!r} cannot be batched; batched priors: vamp, vamp_data, mog, standard")


def batched_mixture_log_prob(z: Tensor, mean: Tensor, logvar: Tensor, log_weight: Tensor) -> Tensor:
    """log sum_k w_mk N(z; mean_mk, diag(exp(logvar_mk))) per model m: z [M, N, Z] -> [M, N].

    Components are [M, K, Z]; log_weight [M, 1, K] holds -log K_m for a model's own components
    and -inf for padding. As `priors.mixture_log_prob`, the quadratic form is expanded, here into
    one bmm over [z^2, z] . [1/v, -2 m/v], so no [M, N, K, Z] tensor is ever built.
    """
    Z = z.shape[-1]
    precision = torch.exp(-logvar)                                              # [M, K, Z]
    const = Z * LOG_2PI + logvar.sum(-1) + (mean.pow(2) * precision).sum(-1)   # [M, K]
    lhs = torch.cat((z.pow(2), z), dim=-1)                                      # [M, N, 2Z]
    rhs = torch.cat((precision, -2.0 * mean * precision), dim=-1)               # [M, K, 2Z]
    # log_comp + log w = -0.5 (quad + const) + log w, with the constant as baddbmm's input.
    log_comp = torch.baddbmm(log_weight - 0.5 * const.unsqueeze(1), lhs, rhs.transpose(1, 2),
                             alpha=-0.5)                                        # [M, N, K]
    return torch.logsumexp(log_comp, dim=-1)                                    # [M, N]


class BatchedVAE(nn.Module):
    """M 1-level VAEs of one architecture with stacked weights: Linear weights [M, in, out], biases [M, 1, out].

    Built from M single `VAE`s (`build_model(...)`), whose weights it copies; `extract(m)` gives
    model m back as a `VAE`. Every method takes and returns tensors with a leading model dim M.
    """

    def __init__(self, models: Sequence[LatentVariableModel]):
        super().__init__()
        if not models:
            raise ValueError("BatchedVAE needs at least one model")
        first = models[0]
        for i, net in enumerate(models):
            if not isinstance(net, VAE):
                raise TypeError(f"models[{i}]: only 1-level VAEs ('vae') can be batched, got {net.name!r}")
            for attr in ("input_dim", "latent_dim", "hidden_dim", "likelihood_name"):
                if getattr(net, attr) != getattr(first, attr):
                    raise ValueError(f"models[{i}].{attr} = {getattr(net, attr)!r} differs from "
                                     f"models[0].{attr} = {getattr(first, attr)!r}; batched models share one architecture")
            if net.prior.name != first.prior.name:
                raise ValueError(f"models[{i}].prior is {net.prior.name!r}, models[0].prior is {first.prior.name!r}")
        self.M = len(models)
        self.input_dim, self.latent_dim, self.hidden_dim = first.input_dim, first.latent_dim, first.hidden_dim
        self.input_shape: tuple[int, ...] = tuple(getattr(first, "input_shape", (first.input_dim,)))
        self.likelihood_name = first.likelihood_name
        self.prob_clamp = first.p_x.prob_clamp
        if self.likelihood_name not in _HEADS:
            raise ValueError(f"likelihood {self.likelihood_name!r} cannot be batched; choose one of {sorted(_HEADS)}")
        self.prior_name = first.prior.name
        self.prior_family = _prior_family(first.prior)
        self.Ks: list[int] = [int(getattr(net.prior, "K", 0)) for net in models]   # 0: no components
        self.fixed_pseudo_inputs = (self.prior_family == "vamp"
                                    and not first.prior.pseudo_params.requires_grad)

        # Stacked parameter -> how many single-model tensors it concatenates along its last dim.
        self.concatenated: dict[str, int] = {}
        with torch.no_grad():
            for name, paths in self._layout():
                self.concatenated[f"{name}_w"] = self.concatenated[f"{name}_b"] = len(paths)
                linears = [[net.get_submodule(p) for p in paths] for net in models]
                w = torch.stack([torch.cat([lin.weight.T for lin in lins], 1) for lins in linears])  # [M, in, out]
                b = torch.stack([torch.cat([lin.bias for lin in lins])[None] for lins in linears])   # [M, 1, out]
                self.register_parameter(f"{name}_w", nn.Parameter(w.contiguous()))
                self.register_parameter(f"{name}_b", nn.Parameter(b.contiguous()))
            K_max = max(self.Ks)
            for name in _PRIOR_PARAMS[self.prior_family]:
                values = [getattr(net.prior, name).detach() for net in models]       # each [K_m, .]
                # Padding stays at zero: it never gets a gradient (its mixture weight is 0).
                stacked = values[0].new_zeros(self.M, K_max, values[0].shape[1])    # [M, K_max, .]
                for m, v in enumerate(values):
                    stacked[m, : v.shape[0]] = v
                self.register_parameter(name, nn.Parameter(stacked, requires_grad=not self.fixed_pseudo_inputs))
            self.register_buffer("log_weight", self._log_weight(self.enc1_w))          # [M, 1, K_max]
            self.register_buffer("num_components", torch.tensor(self.Ks))            # [M]

    def _log_weight(self, like: Tensor) -> Tensor:
        """log w_mk: -log K_m for model m's own components, -inf for the padding; [M, 1, K_max]."""
        log_weight = torch.full((self.M, 1, max(max(self.Ks), 1)), -math.inf, dtype=torch.float64)
        for m, K in enumerate(self.Ks):
            log_weight[m, :, :K] = -math.log(K) if K else 0.0
        return log_weight.to(like.device, like.dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # After .to()/.double(): recompute -log K_m at the new precision (a cast of the float32
        # values would keep float32's rounding).
        self.log_weight = self._log_weight(self.enc1_w)
        return self

    def _layout(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return _BODY + (("dec_out", _HEADS[self.likelihood_name]),)

    # -- networks --------------------------------------------------------------------------
    def _linear(self, name: str, x: Tensor) -> Tensor:
        """x [M, N, in] -> [M, N, out], one batched matmul with the bias fused in."""
        return torch.baddbmm(getattr(self, f"{name}_b"), x, getattr(self, f"{name}_w"))

    def _gated(self, name: str, x: Tensor) -> Tensor:
        return F.glu(self._linear(name, x), dim=-1)   # h * sigmoid(g), as model.GatedDense

    def q_z(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z|x): x [M, N, D] -> each [M, N, Z]."""
        mean, logvar = self._linear("enc_head", self._gated("enc2", self._gated("enc1", x))).chunk(2, dim=-1)
        # The clamp keeps q's variance from collapsing or exploding early in training (REF).
        return mean, F.hardtanh(logvar, -6.0, 2.0)

    def p_x_params(self, z: Tensor) -> tuple[Tensor, ...]:
        """Decoder: z [M, N, Z] -> likelihood parameters, each [M, N, D]."""
        out = self._linear("dec_out", self._gated("dec2", self._gated("dec1", z)))
        if self.likelihood_name == "bernoulli":
            return (clamp_logits(out, self.prob_clamp),)                     # logits
        mean, log_scale = out.chunk(2, dim=-1)
        # REF's clamps, as likelihoods.DiscretizedLogistic256.forward.
        return (torch.sigmoid(mean).clamp(1.0 / 512.0, 1.0 - 1.0 / 512.0),
                F.hardtanh(log_scale, -4.5, 0.0))

    def log_p_x(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z): x [M, N, D], z [M, N, Z] -> [M, N]."""
        params = self.p_x_params(z)
        if self.likelihood_name == "bernoulli":
            return log_bernoulli(x, params[0])
        return log_discretized_logistic(x, params[0], params[1])

    # -- prior -----------------------------------------------------------------------------
    def pseudo_inputs_all(self) -> Tensor:
        """u in [0, 1]^D, [M, K_max, D] (REF: Hardtanh(0, 1) over a free matrix), padding included."""
        return F.hardtanh(self.pseudo_params, 0.0, 1.0)

    def pseudo_inputs(self, m: int) -> Tensor:
        """Model m's own K_m pseudo-inputs, [K_m, D] (for grids: no padding)."""
        return self.pseudo_inputs_all()[m, : self.Ks[m]]

    def prior_components(self) -> tuple[Tensor, Tensor] | None:
        """(mean, logvar) of every model's mixture components, each [M, K_max, Z]; None for N(0, I)."""
        if self.prior_family == "vamp":
            return self.q_z(self.pseudo_inputs_all())
        if self.prior_family == "mog":
            return self.means, F.hardtanh(self.logvars, -6.0, 2.0)   # as priors.MixtureOfGaussians
        return None

    def log_p_z(self, z: Tensor, components: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """log p(z): z [M, N, Z] -> [M, N]; `components` as from `prior_components()` (else computed)."""
        if self.prior_family == "standard":
            return log_standard_normal(z)
        mean, logvar = components if components is not None else self.prior_components()
        return batched_mixture_log_prob(z, mean, logvar, self.log_weight)

    # -- densities -------------------------------------------------------------------------
    def log_densities(self, x: Tensor, eps: Tensor | None = None,
                      components: tuple[Tensor, Tensor] | None = None) -> LogDensities:
        """One sample z ~ q(z|x) per image: log p(x|z), log p(z), log q(z|x), each [M, N].

        x [M, N, D]; eps [M, N, Z] fixes the noise of z = mean + sigma * eps (default: randn).
        """
        N = x.shape[1]
        if components is None and self.prior_family == "vamp":
            # Images and pseudo-inputs go through the encoder together: one set of bigger matmuls.
            mean, logvar = self.q_z(torch.cat((x, self.pseudo_inputs_all()), dim=1))   # [M, N+K, Z]
            components = (mean[:, N:], logvar[:, N:])
            mean, logvar = mean[:, :N], logvar[:, :N]
        else:
            mean, logvar = self.q_z(x)                                                # [M, N, Z]
        if eps is None:
            eps = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * eps                                      # [M, N, Z]
        log_q_z = -0.5 * (LOG_2PI + logvar + eps.pow(2)).sum(-1)   # log N(z; q), via eps as model.reparameterize
        return LogDensities(self.log_p_x(x, z), self.log_p_z(z, components), log_q_z)

    def elbo(self, x: Tensor, beta: Tensor | float = 1.0, eps: Tensor | None = None,
             components: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """One-sample ELBO terms per model and example (elbo, rec, kl: [M, N]); loss [M] per model."""
        d = self.log_densities(x, eps, components)
        rec = d.log_p_x
        kl = d.log_q_z - d.log_p_z            # REF: single-sample estimate log q - log p
        beta = beta.unsqueeze(1) if torch.is_tensor(beta) else beta
        return {"elbo": rec - kl, "rec": rec, "kl": kl, "loss": -(rec - beta * kl).mean(1)}

    @torch.no_grad()
    def sample_prior(self, n: int) -> Tensor:
        """n draws from each model's own prior, [M, n, Z]; padded components are never drawn."""
        ref = self.enc1_w
        comps = self.prior_components()
        if comps is None:
            return torch.randn(self.M, n, self.latent_dim, device=ref.device, dtype=ref.dtype)
        mean, logvar = comps                                                          # [M, K_max, Z]
        K = self.num_components.unsqueeze(1)                                          # [M, 1]
        k = (torch.rand(self.M, n, device=ref.device) * K).long().clamp_max(K - 1)   # [M, n], < K_m
        k = k.unsqueeze(-1).expand(-1, -1, self.latent_dim)
        mean, logvar = mean.gather(1, k), logvar.gather(1, k)                         # [M, n, Z]
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Mean images of p(x|z), z from each model's own prior: [M, n, D]."""
        params = self.p_x_params(self.sample_prior(n))
        return torch.sigmoid(params[0]) if self.likelihood_name == "bernoulli" else params[0]

    # -- single models ---------------------------------------------------------------------
    def single_state(self, m: int, tensors: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Model m's slice of stacked tensors under the single `VAE`'s state_dict names.

        `tensors` maps this module's parameter names to stacked tensors of the same shapes (e.g.
        gradients); default: the parameters themselves.
        """
        tensors = tensors if tensors is not None else dict(self.named_parameters())
        out: dict[str, Tensor] = {}
        for name, paths in self._layout():
            w, b = tensors[f"{name}_w"][m], tensors[f"{name}_b"][m, 0]               # [in, out], [out]
            widths = [w.shape[1] // len(paths)] * len(paths)    # concatenated heads are equally wide
            for path, w_part, b_part in zip(paths, w.split(widths, 1), b.split(widths)):
                out[f"{path}.weight"] = w_part.T
                out[f"{path}.bias"] = b_part
        for name in _PRIOR_PARAMS[self.prior_family]:
            if name in tensors:    # fixed pseudo-inputs have no gradient or moments
                out[f"prior.{name}"] = tensors[name][m, : self.Ks[m]]
        return out

    @torch.no_grad()
    def load_single_state(self, m: int, single: Mapping[str, Tensor],
                          tensors: Mapping[str, Tensor] | None = None) -> None:
        """The inverse of `single_state`: write a single `VAE`'s tensors into slot m of stacked ones."""
        tensors = tensors if tensors is not None else dict(self.named_parameters())
        for name, paths in self._layout():
            tensors[f"{name}_w"][m] = torch.cat([single[f"{p}.weight"].T for p in paths], 1)
            tensors[f"{name}_b"][m, 0] = torch.cat([single[f"{p}.bias"] for p in paths])
        for name in _PRIOR_PARAMS[self.prior_family]:
            if name in tensors:
                value = single[f"prior.{name}"]                                      # [K_m, .]
                if value.shape[0] != self.Ks[m]:
                    raise ValueError(f"prior.{name} has {value.shape[0]} components, model {m} has K={self.Ks[m]}")
                tensors[name][m].zero_()                                             # padding stays 0
                tensors[name][m, : value.shape[0]] = value

    @torch.no_grad()
    def extract(self, m: int, pseudo_init: tuple[float, float] = (0.05, 0.01)) -> LatentVariableModel:
        """Model m as a plain `VAE` (own device and dtype) for evaluate.log_likelihood, grids, logging."""
        if not 0 <= m < self.M:
            raise IndexError(f"model index {m} out of range for {self.M} batched models")
        ref = self.enc1_w
        K = self.Ks[m] or 1
        # Building consumes the global RNG (init); the weights are overwritten, so keep the RNG as it was.
        with torch.random.fork_rng(devices=[]):
            net = build_model(
                "vae", self.prior_name, input_shape=self.input_shape, likelihood=self.likelihood_name,
                latent_dim=self.latent_dim, hidden_dim=self.hidden_dim, K=K, pseudo_init=pseudo_init,
                init_data=torch.zeros(K, self.input_dim) if self.prior_name == "vamp_data" else None,
                fixed_pseudo_inputs=self.fixed_pseudo_inputs, prob_clamp=self.prob_clamp)
        net = net.to(device=ref.device, dtype=ref.dtype)
        params = dict(net.named_parameters())
        for key, value in self.single_state(m).items():
            params[key].copy_(value)
        return net


class BatchedAdam:
    """Adam (PyTorch's defaults: betas (0.9, 0.999), eps 1e-8) over stacked parameters [M, ...].

    The learning rate and the step count are per model ([M] tensors on the device): models that
    joined a pool later start at step 0 with their own bias correction, and the whole update can
    be captured in a CUDA graph. `normgrad` [M] marks models that use REF's AdamNormGrad: each
    model's slice of each gradient is scaled to unit L2 norm first.
    """

    def __init__(self, params: Sequence[nn.Parameter], lr: Tensor, normgrad: Tensor | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 segments: Sequence[int] | None = None):
        self.params = list(params)
        # Per parameter: how many single-model tensors are concatenated along its last dim
        # (each is normalised on its own, as AdamNormGrad does for the single model's tensors).
        self.segments = list(segments) if segments is not None else [1] * len(self.params)
        self.M = M = lr.shape[0]
        for p in self.params:
            if p.dim() != 3 or p.shape[0] != M:
                raise ValueError(f"BatchedAdam needs [M={M}, a, b] parameters, got {tuple(p.shape)}")
        self.betas, self.eps = betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # float64: 1 - beta2^t as accurate as PyTorch's Python-float bias correction.
        self.step_count = torch.zeros(M, device=lr.device, dtype=torch.float64)       # [M]
        # Static tensors (a captured graph reads them): change them in place only.
        self.lr = lr.detach().clone()                                                  # [M]
        self.normgrad = (normgrad.view(M, 1, 1).to(lr.device)
                         if normgrad is not None and bool(normgrad.any()) else None)

    @torch.no_grad()
    def set_lr(self, m: int, value: float) -> None:
        self.lr[m] = value

    @torch.no_grad()
    def reset(self, m: int) -> None:
        """Forget model m's moments (a diverged model's are NaN)."""
        for t in self.exp_avg + self.exp_avg_sq:
            t[m].zero_()

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("BatchedAdam.step: a parameter has no gradient; run backward first")
        if self.normgrad is not None:
            for g, n in zip(grads, self.segments):
                M, a, b = g.shape
                parts = g.view(M, a, n, b // n)                                     # [M, a, n, b/n]
                norm = torch.linalg.vector_norm(parts, dim=(1, 3), keepdim=True)     # [M, 1, n, 1]
                scale = torch.where(self.normgrad.view(M, 1, 1, 1), norm + 1e-7, torch.ones_like(norm))
                parts.div_(scale)
        beta1, beta2 = self.betas
        self.step_count += 1
        dtype = self.params[0].dtype
        # Per model: step size lr / (1 - beta1^t) and 1 / sqrt(1 - beta2^t), each [M, 1, 1].
        step_size = (self.lr / (1.0 - torch.pow(beta1, self.step_count))).to(dtype).view(self.M, 1, 1)
        inv_bc2_sqrt = torch.rsqrt(1.0 - torch.pow(beta2, self.step_count)).to(dtype).view(self.M, 1, 1)
        n = len(self.params)
        torch._foreach_lerp_(self.exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_mul_(denom, [inv_bc2_sqrt] * n)      # broadcast over each model's slice
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_mul(self.exp_avg, [step_size] * n)
        torch._foreach_div_(update, denom)
        torch._foreach_sub_(self.params, update)

    def tensors(self) -> list[Tensor]:
        """Every state tensor (for snapshots around a CUDA-graph warm-up)."""
        return self.exp_avg + self.exp_avg_sq + [self.step_count]


def _as_config(value: TrainConfig | Mapping[str, Any], i: int) -> TrainConfig:
    if isinstance(value, TrainConfig):
        value.check(where=f"configs[{i}]")
        return value
    return TrainConfig.from_dict(value, where=f"configs[{i}]")


def check_batchable(configs: Sequence[TrainConfig]) -> None:
    """Raise `ConfigError` unless the configurations can train as one batch (see SHARED_FIELDS)."""
    if not configs:
        raise ConfigError("batched training needs at least one configuration")
    problems = []
    for i, c in enumerate(configs):
        if c.model != "vae":
            problems.append(f"configs[{i}].model: batched training supports 'vae' only, got {c.model!r}")
        for name in SHARED_FIELDS:
            if getattr(c, name) != getattr(configs[0], name):
                problems.append(f"configs[{i}].{name} = {getattr(c, name)!r} differs from configs[0].{name} = "
                                f"{getattr(configs[0], name)!r}; batched models share architecture, data and device")
    if problems:
        raise ConfigError("cannot train these configurations as one batch:\n  - " + "\n  - ".join(problems))


class BatchedTrainer:
    """M training runs of one architecture on one device, stepped together; each keeps its own state.

    Per model: seed (init and data order), K, lr, warmup (beta), optimizer (adam / adam_normgrad),
    early_stopping, max_epochs. A model that stops (completed, early stopping, NaN) is frozen:
    its learning rate and loss weight become 0 while the others go on.
    """

    def __init__(self, configs: Sequence[TrainConfig | Mapping[str, Any]], splits: Splits | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 states: Sequence[Mapping[str, Any] | None] | None = None):
        self.configs = [_as_config(c, i) for i, c in enumerate(configs)]
        check_batchable(self.configs)
        c0 = self.configs[0]
        self.M = M = len(self.configs)
        self.device = torch.device(device) if device is not None else resolve_device(c0.device)
        splits = splits if splits is not None else load_dataset(c0.dataset, c0.data_root)
        self.info = splits.info

        # All data lives on the device: an epoch is index arithmetic, no loader, no copies.
        # The same fixed subsets as Trainer's.
        self.x_train = fixed_subset(splits.train, c0.train_subset, self.device, dtype)   # [N, D]
        self.x_val = fixed_subset(splits.val, c0.val_subset, self.device, dtype)
        self.x_test = fixed_subset(splits.test, c0.test_subset, self.device, dtype)
        self.dynamic = self.info.binarization == "dynamic"

        # vamp_data's pseudo-inputs start as training images (kept: a diverged model is rebuilt).
        self._init_data = self.x_train.cpu().float() if c0.prior == "vamp_data" else None
        # Each model as Trainer builds it: global seed, then build_model, on the CPU.
        models, self.generators = [], []
        for c in self.configs:
            torch.manual_seed(c.seed)
            g = torch.Generator(device=self.device)
            g.manual_seed(c.seed)
            self.generators.append(g)       # model m's data order, as Trainer's generator
            models.append(self._build_single(c))
        # The global RNG (noise, binarization) continues from the last build: M = 1 is Trainer's stream.
        self.model = BatchedVAE(models).to(self.device, dtype)
        del models
        self.param_names = [n for n, _ in self.model.named_parameters()]     # the order of best_params
        self.trainable_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]   # BatchedAdam's order
        self.lr = torch.tensor([c.lr for c in self.configs], device=self.device, dtype=dtype)   # [M]
        self.optimizer = BatchedAdam(self.params, self.lr, torch.tensor(
            [c.optimizer == "adam_normgrad" for c in self.configs], device=self.device),
            segments=[self.model.concatenated.get(n, 1) for n in self.trainable_names])
        self.loss_weight = torch.ones(M, device=self.device, dtype=dtype)   # 0: frozen model (static)
        self._graph: _GraphedBatchedStep | None = None
        self.epochs = [0] * M            # per model: pooled models join at different times
        self.best_val_loss = [math.inf] * M
        self.best_epoch: list[int | None] = [None] * M
        self.bad_epochs = [0] * M
        self.best_params: list[Tensor] | None = None     # stacked, allocated at the first best epoch
        self.stop_reason: list[str | None] = [None] * M
        self.stop_detail = [""] * M
        self.stopped_epoch: list[int | None] = [None] * M
        for m, state in enumerate(states or ()):
            if state is not None:
                self.load_model_state(m, state)

    def _build_single(self, c: TrainConfig) -> LatentVariableModel:
        return build_model(
            model="vae", prior=c.prior, input_shape=self.info.image_shape, likelihood=self.info.likelihood,
            latent_dim=c.latent_dim, hidden_dim=c.hidden_dim, K=c.K, pseudo_init=self.info.pseudo_init,
            init_data=self._init_data,
            fixed_pseudo_inputs=c.fixed_pseudo_inputs, prob_clamp=c.prob_clamp)

    # -- one batch -------------------------------------------------------------------------
    def batch(self, idx: Tensor) -> Tensor:
        """The training images of every model, x_train[idx] for idx [M, B] -> [M, B, D].

        Dynamic binarization draws a Bernoulli as rand < p with the default generator, so a
        CUDA graph can capture it; every model gets its own draw.
        """
        x = self.x_train[idx]                                              # [M, B, D]
        if self.dynamic:
            x = (torch.rand_like(x) < x).to(x.dtype)
        return x

    def _batch_step(self, idx: Tensor, beta: Tensor, eps: Tensor | None = None) -> Tensor:
        """Forward, backward and update for every model (grads must be None or zero); [M, 3] sums."""
        terms = self.model.elbo(self.batch(idx), beta, eps)
        # Sum, not mean, over models: each model's gradient is exactly its own loss's gradient.
        (terms["loss"] * self.loss_weight).sum().backward()
        self.optimizer.step()
        return torch.stack([terms["elbo"].detach().sum(1), terms["rec"].detach().sum(1),
                            terms["kl"].detach().sum(1)], dim=1)

    def train_batch(self, idx: Tensor, beta: Tensor | Sequence[float], eps: Tensor | None = None) -> Tensor:
        """One eager step on x_train[idx] (idx [M, B], beta [M], optional noise eps [M, B, Z]); [M, 3] sums."""
        beta = torch.as_tensor(beta, device=self.device, dtype=self.x_train.dtype)
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()     # in place: a captured graph owns these tensors
        return self._batch_step(idx.to(self.device), beta, eps)

    # -- one epoch -------------------------------------------------------------------------
    def permutations(self) -> Tensor:
        """Each model's own shuffled order of the training images, [M, N]."""
        n = self.x_train.shape[0]
        return torch.stack([torch.randperm(n, device=self.device, generator=g) for g in self.generators])

    def _train_epoch(self, betas: Sequence[float]) -> Tensor:
        """One epoch for every model; the mean elbo, rec, kl per training image, [M, 3]."""
        n = self.x_train.shape[0]
        B = self.configs[0].batch_size
        beta = torch.tensor(list(betas), device=self.device, dtype=self.x_train.dtype)
        perm = self.permutations()                                           # [M, N]
        totals = torch.zeros(self.M, 3, device=self.device, dtype=self.x_train.dtype)
        graphed = self._graphed_step() if n >= B else None
        for start in range(0, n, B):
            idx = perm[:, start:start + B]                                   # [M, B]
            if graphed is not None and idx.shape[1] == B:
                totals += graphed(idx, beta, tuple(betas))
                continue
            totals += self.train_batch(idx, beta)   # the last, smaller batch runs eagerly
        return totals / n

    def _graphed_step(self) -> _GraphedBatchedStep | None:
        if not (self.configs[0].cuda_graphs and self.device.type == "cuda"):
            return None
        if self._graph is None:
            self._graph = _GraphedBatchedStep(self)
        return self._graph

    @torch.no_grad()
    def evaluate_elbo(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Mean ELBO terms (elbo, rec, kl) at beta = 1 per model on the shared images x [N, D]: [M, 3]."""
        comps = self.model.prior_components()           # once: the parameters are fixed here
        totals = torch.zeros(self.M, 3, device=self.device, dtype=x.dtype)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].expand(self.M, -1, -1)                 # [M, b, D], no copy
            terms = self.model.elbo(xb, 1.0, components=comps)
            totals += torch.stack([terms["elbo"].sum(1), terms["rec"].sum(1), terms["kl"].sum(1)], 1)
        return totals / x.shape[0]

    def step(self) -> list[dict[str, Any] | None]:
        """Train one epoch, validate, update each model's early stopping and NaN guard.

        Returns one dict per model with Trainer.step's keys, or None for a model that had
        already stopped before this epoch (it is frozen and reports nothing new).
        """
        if self.done:
            raise RuntimeError(f"training already stopped for every model ({self.stop_reason})")
        for m in range(self.M):
            if self.stop_reason[m] is None:
                self.epochs[m] += 1
        betas = [kl_weight(max(e, 1), c.warmup) for e, c in zip(self.epochs, self.configs)]
        t0 = time.perf_counter()
        train = self._train_epoch(betas).tolist()
        val = self.evaluate_elbo(self.x_val).tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        out: list[dict[str, Any] | None] = []
        improved: list[int] = []
        for m, c in enumerate(self.configs):
            if self.stop_reason[m] is not None:
                out.append(None)
                continue
            (t_elbo, t_rec, t_kl), (v_elbo, v_rec, v_kl) = train[m], val[m]
            epoch = self.epochs[m]
            metrics: dict[str, Any] = {
                "epoch": epoch, "beta": betas[m], "train_elbo": t_elbo, "train_rec": t_rec,
                "train_kl": t_kl, "train_loss": -(t_rec - betas[m] * t_kl), "val_elbo": v_elbo,
                "val_rec": v_rec, "val_kl": v_kl, "val_loss": -v_elbo, "epoch_seconds": seconds}
            bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])]
            if bad:
                self.stop_reason[m] = STOP_NAN
                self.stop_detail[m] = (f"{' and '.join(bad)} became {metrics[bad[0]]} at epoch {epoch} "
                                       f"(lr={c.lr}); lower the learning rate")
            elif self._early_stopping(m, metrics["val_loss"], betas[m]):
                improved.append(m)
            if self.stop_reason[m] is None and epoch >= c.max_epochs:
                self.stop_reason[m] = STOP_COMPLETED
            metrics["stop_reason"] = self.stop_reason[m]
            out.append(metrics)
        self._save_best(improved)
        for m, metrics in enumerate(out):
            if metrics is not None and metrics["stop_reason"] is not None:
                self._freeze(m, diverged=metrics["stop_reason"] == STOP_NAN)
        return out

    def _early_stopping(self, m: int, val_loss: float, beta: float) -> bool:
        """Trainer's rule for model m; True when this epoch is its new best."""
        if beta < 1.0:   # REF: only epochs at full KL weight count
            return False
        if val_loss < self.best_val_loss[m]:
            self.best_val_loss[m], self.best_epoch[m], self.bad_epochs[m] = val_loss, self.epochs[m], 0
            return True
        self.bad_epochs[m] += 1
        patience = self.configs[m].early_stopping
        if patience and self.bad_epochs[m] >= patience:
            self.stop_reason[m] = STOP_EARLY
            self.stop_detail[m] = (f"no better validation loss for {self.bad_epochs[m]} epochs; "
                                   f"best {self.best_val_loss[m]:.3f} at epoch {self.best_epoch[m]}")
        return False

    @torch.no_grad()
    def _save_best(self, models: list[int]) -> None:
        if not models:
            return
        params = list(self.model.parameters())
        idx = torch.tensor(models, device=self.device)
        for best, p in zip(self._best_params(), params):
            best[idx] = p.detach()[idx]

    def _best_params(self) -> list[Tensor]:
        """Every model's best weights, stacked as the parameters (allocated at first use)."""
        if self.best_params is None:
            self.best_params = [p.detach().clone() for p in self.model.parameters()]
        return self.best_params

    @torch.no_grad()
    def _freeze(self, m: int, diverged: bool) -> None:
        """Stop updating model m: lr 0 and loss weight 0, so its gradient is exactly 0."""
        self.stopped_epoch[m] = self.epochs[m]
        self.optimizer.set_lr(m, 0.0)
        self.loss_weight[m] = 0.0
        if diverged:
            # NaN weights would give NaN gradients even at loss weight 0 (0 * NaN), and NaN
            # moments would make even an lr-0 update NaN: restore finite weights, drop the moments.
            self._restore(m)
            self.optimizer.reset(m)

    @torch.no_grad()
    def _restore(self, m: int) -> None:
        """Model m's best weights, or (no best epoch yet) its initial weights, rebuilt from its seed."""
        params = list(self.model.parameters())
        if self.best_epoch[m] is not None and self.best_params is not None:
            for p, best in zip(params, self.best_params):
                p[m] = best[m]
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.configs[m].seed)
            single = BatchedVAE([self._build_single(self.configs[m])]).to(self.device, self.x_train.dtype)
        for p, q in zip(params, single.parameters()):
            p[m].zero_()
            p[m, : q.shape[1]] = q[0]

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.stop_reason)

    @property
    def epoch(self) -> int:
        """The most epochs any model has trained."""
        return max(self.epochs)

    # -- one model's state, in Trainer.state_dict's format ---------------------------------
    @functools.cached_property
    def _single_layout(self) -> tuple[list[str], dict[str, Any]]:
        """The single VAE's trainable parameter names (torch Adam's order in Trainer) and the
        param group its Adam saves (the lr set per model)."""
        net = self.model.extract(0, pseudo_init=self.info.pseudo_init)
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        group = torch.optim.Adam([p for _, p in trainable], lr=1e-3).state_dict()["param_groups"][0]
        return [n for n, _ in trainable], group

    @torch.no_grad()
    def model_state(self, m: int) -> dict[str, Any]:
        """Model m's training state in `Trainer.state_dict()`'s format (tensors on this device).

        A plain `Trainer` loads it (to evaluate the model, or to train on alone), and so does
        `load_model_state` of any BatchedTrainer with the same configuration in any slot.
        """
        net = self.extract(m)
        model = net.state_dict()
        single, group = self._single_layout
        exp_avg = self.model.single_state(m, dict(zip(self.trainable_names, self.optimizer.exp_avg)))
        exp_avg_sq = self.model.single_state(m, dict(zip(self.trainable_names, self.optimizer.exp_avg_sq)))
        step = self.optimizer.step_count[m].to(torch.float32).cpu()    # as torch.optim.Adam keeps it
        optimizer = {"state": ({i: {"step": step.clone(), "exp_avg": exp_avg[name].clone(),
                                    "exp_avg_sq": exp_avg_sq[name].clone()} for i, name in enumerate(single)}
                               if float(step) > 0 else {}),
                     "param_groups": [{**group, "lr": self.configs[m].lr}]}
        best_state = None
        if self.best_epoch[m] is not None and self.best_params is not None:
            best = self.model.single_state(m, dict(zip(self.param_names, self.best_params)))
            best_state = {**model, **{k: v.clone() for k, v in best.items()}}
        return {
            "model": model,
            "optimizer": optimizer,
            "epoch": self.epochs[m],
            "best_val_loss": self.best_val_loss[m],
            "best_epoch": self.best_epoch[m],
            "best_state": best_state,
            "bad_epochs": self.bad_epochs[m],
            "stop_reason": self.stop_reason[m],
            "stop_detail": self.stop_detail[m],
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "generator": self.generators[m].get_state()},
            "config": self.configs[m].to_dict(),
        }

    @torch.no_grad()
    def load_model_state(self, m: int, state: Mapping[str, Any]) -> None:
        """Put a `Trainer.state_dict()` (or `model_state`) into slot m; the slot's config must match it.

        The shared noise generator is not restored (it belongs to every slot), so a resumed model
        continues exactly in its weights, moments, counters and data order, not in its noise draws.
        """
        c = self.configs[m]
        saved = state.get("config") or {}
        for key in ("K", "prior", "latent_dim", "hidden_dim", "dataset"):
            if key in saved and saved[key] != getattr(c, key):
                raise ConfigError(f"state for model {m} was saved with {key}={saved[key]!r}, "
                                  f"the slot's config has {key}={getattr(c, key)!r}")
        self.model.load_single_state(m, state["model"])
        single, _ = self._single_layout
        moments = state["optimizer"]["state"]
        if moments:
            for key, tensors in (("exp_avg", self.optimizer.exp_avg), ("exp_avg_sq", self.optimizer.exp_avg_sq)):
                self.model.load_single_state(m, {single[int(i)]: s[key] for i, s in moments.items()},
                                             dict(zip(self.trainable_names, tensors)))
        else:
            self.optimizer.reset(m)
        steps = [float(s["step"]) for s in moments.values()]
        self.optimizer.step_count[m] = steps[0] if steps else 0.0
        self.epochs[m] = int(state["epoch"])
        self.best_val_loss[m] = float(state["best_val_loss"])
        self.best_epoch[m] = state["best_epoch"]
        if state.get("best_state") is not None:
            self.model.load_single_state(m, state["best_state"], dict(zip(self.param_names, self._best_params())))
        self.bad_epochs[m] = int(state["bad_epochs"])
        self.stop_reason[m] = state["stop_reason"]
        self.stop_detail[m] = state.get("stop_detail", "")
        self.generators[m].set_state(state["rng"]["generator"].cpu())
        if self.stop_reason[m] is not None:
            self._freeze(m, diverged=False)
        else:
            self.optimizer.set_lr(m, c.lr)
            self.loss_weight[m] = 1.0

    def finish(self) -> None:
        """Restore each model's best validation weights (models without a beta = 1 epoch keep theirs)."""
        for m in range(self.M):
            if self.best_epoch[m] is not None:
                self._restore(m)

    def extract(self, m: int) -> LatentVariableModel:
        """Model m as a plain `VAE` (for evaluate.log_likelihood, active units, grids, logging)."""
        return self.model.extract(m, pseudo_init=self.info.pseudo_init)


class _GraphedBatchedStep:
    """The whole batched step (forward, backward, Adam) captured once as a CUDA graph.

    As train._GraphedStep: a replay reads the batch through a static index buffer [M, B] into
    the resident data, with a static beta [M]; the loss weights and learning rates are static
    tensors changed in place. `train.capture_cuda_graph` undoes the warm-up steps that capturing
    needs (weights, Adam state, CUDA RNG), so the graphed path computes what the eager path computes.
    """

    def __init__(self, trainer: BatchedTrainer):
        dev = trainer.device
        B = trainer.configs[0].batch_size
        self.idx = torch.arange(B, device=dev).repeat(trainer.M, 1)           # static [M, B]
        self.beta = torch.ones(trainer.M, device=dev, dtype=trainer.x_train.dtype)   # static [M]
        self._beta_values: tuple[float, ...] = (1.0,) * trainer.M
        self.graph, self.sums = capture_cuda_graph(          # sums: static [M, 3]
            lambda: trainer._batch_step(self.idx, self.beta), trainer.params, dev,
            lambda: list(trainer.model.parameters()) + trainer.optimizer.tensors())

    def __call__(self, idx: Tensor, beta: Tensor, beta_values: tuple[float, ...]) -> Tensor:
        self.idx.copy_(idx)
        if beta_values != self._beta_values:
            self.beta.copy_(beta)
            self._beta_values = beta_values
        self.graph.replay()
        return self.sums
