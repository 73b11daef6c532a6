"""Batched training of M VAEs (trainables/vae/batched.py) against M separate single models.

The single-model code (model.VAE, train.Trainer) is the reference: the batched forward, one
batched training step and `extract` must reproduce it per model. Noise is shared by the "seed
trick": a single model draws eps = randn(B, 1, Z) right after torch.manual_seed(s); the batched
model is handed the same draw for that model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from sweeper.errors import ConfigError
from trainables.vae.batched import BatchedTrainer, BatchedVAE, batched_mixture_log_prob
from trainables.vae.config import TrainConfig
from trainables.vae.data import DatasetInfo, Splits
from trainables.vae.model import build_model
from trainables.vae.train import STOP_COMPLETED, STOP_EARLY, STOP_NAN, Trainer

SHAPE = (1, 4, 5)
D = 20
Z = 4
H = 16


def synthetic(n_train: int, binarization: str | None = "static", likelihood: str = "bernoulli") -> Splits:
    """Small images with per-pixel structure: binary (static), gray in [0, 1] (dynamic) or 8-bit."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, D, generator=g) * 0.8 + 0.1

    def draw(n: int) -> torch.Tensor:
        gray = (probs * (0.5 + torch.rand(n, 1, generator=g))).clamp(0, 1)
        if likelihood == "logistic256":
            return ((gray * 256).floor().clamp(max=255) + 0.5) / 256
        return gray if binarization == "dynamic" else torch.bernoulli(gray, generator=g)

    info = DatasetInfo("synthetic", likelihood, SHAPE, D, binarization, (0.5, 0.3), (n_train, 60, 60))
    return Splits(draw(n_train), draw(60), draw(60), info)


def config(**kw) -> TrainConfig:
    base = {"prior": "vamp", "K": 5, "latent_dim": Z, "hidden_dim": H, "batch_size": 25, "warmup": 0,
            "max_epochs": 10, "early_stopping": 0, "device": "cpu"}
    base.update(kw)
    return TrainConfig(**base)


def singles(prior: str, Ks: list[int], likelihood: str = "bernoulli") -> list:
    """One `VAE` per K, each built under its own seed, in float64."""
    out = []
    for m, K in enumerate(Ks):
        torch.manual_seed(m)
        out.append(build_model("vae", prior, SHAPE, likelihood, Z, H, K, pseudo_init=(0.5, 0.3)).double())
    return out


def shared_eps(seeds: list[int], n: int) -> torch.Tensor:
    """The noise each single model draws after torch.manual_seed(seed), stacked: [M, n, Z]."""
    eps = []
    for s in seeds:
        torch.manual_seed(s)
        eps.append(torch.randn(n, 1, Z, dtype=torch.float64)[:, 0])
    return torch.stack(eps)


# -- (1) the batched forward is M single forwards ----------------------------------------------
@pytest.mark.parametrize("prior,likelihood", [("vamp", "bernoulli"), ("mog", "bernoulli"),
                                              ("standard", "bernoulli"), ("vamp", "logistic256")])
def test_batched_log_densities_equal_the_single_models(prior, likelihood):
    Ks = [3, 7, 5]                                   # different K per model: padding to 7
    models = singles(prior, Ks, likelihood)
    batched = BatchedVAE(models)
    with torch.no_grad():   # padding must not matter, whatever its values
        for name in ("pseudo_params", "means"):
            if hasattr(batched, name):
                p = getattr(batched, name)
                for m, K in enumerate(Ks):
                    p[m, K:] = torch.rand_like(p[m, K:])
    splits = synthetic(30, likelihood=likelihood)
    x = splits.train.double().reshape(3, 10, D)     # each model its own images
    seeds = [100, 101, 102]
    got = batched.log_densities(x, shared_eps(seeds, 10))
    for m, net in enumerate(models):
        torch.manual_seed(seeds[m])
        want = net.log_densities(x[m], 1)          # draws the same eps
        for name in ("log_p_x", "log_p_z", "log_q_z"):
            a, b = getattr(got, name)[m], getattr(want, name)[:, 0]
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (name, m, (a - b).abs().max())
    # The check is sharp: another model's weights give other densities.
    assert not torch.allclose(got.log_p_x[0], models[1].log_densities(x[0], 1).log_p_x[:, 0], atol=1e-3)


def test_padded_mixture_is_the_torch_distributions_mixture_of_its_own_components():
    torch.manual_seed(0)
    M, K_max, N = 2, 6, 9
    mean, logvar = torch.randn(M, K_max, Z, dtype=torch.float64), torch.randn(M, K_max, Z, dtype=torch.float64)
    Ks = [6, 2]
    log_weight = torch.full((M, 1, K_max), -math.inf, dtype=torch.float64)
    for m, K in enumerate(Ks):
        log_weight[m, :, :K] = -math.log(K)
    z = torch.randn(M, N, Z, dtype=torch.float64) * 2
    got = batched_mixture_log_prob(z, mean, logvar, log_weight)               # [M, N]
    for m, K in enumerate(Ks):
        mix = MixtureSameFamily(Categorical(logits=torch.zeros(K, dtype=torch.float64)),
                                Independent(Normal(mean[m, :K], torch.exp(0.5 * logvar[m, :K])), 1))
        assert torch.allclose(got[m], mix.log_prob(z[m]), rtol=1e-12, atol=1e-12)


def test_prior_samples_never_come_from_padded_components():
    models = singles("mog", [1, 4])
    batched = BatchedVAE(models)
    with torch.no_grad():
        batched.means[0, 1:] = 1e4                  # padding of model 0: far away if ever drawn
        batched.logvars.fill_(-4.0)
    z = batched.sample_prior(500)                   # [M, n, Z]
    assert z.shape == (2, 500, Z)
    assert z[0].abs().max() < 100
    assert batched.sample(3).shape == (2, 3, D)


# -- (2) one batched training step is M single Trainer steps ----------------------------------
def test_a_batched_training_step_equals_single_trainer_steps_per_model():
    splits = synthetic(200)
    cfgs = [config(K=4, lr=1e-3, seed=0), config(K=6, lr=3e-3, seed=1),
            config(K=5, lr=5e-4, seed=2, optimizer="adam_normgrad")]
    batched = BatchedTrainer(cfgs, splits, "cpu", dtype=torch.float64)
    trainers = []
    for c in cfgs:
        t = Trainer(c, splits, "cpu")
        t.model.double()                           # the optimizer has no state yet: same Parameters
        t.x_train = t.x_train.double()
        trainers.append(t)
    for m, t in enumerate(trainers):               # same seed: same initial weights
        single = dict(t.model.named_parameters())
        for k, v in batched.model.single_state(m).items():
            assert torch.equal(v, single[k]), k
    before = [{k: v.detach().clone() for k, v in batched.model.single_state(m).items()} for m in range(3)]
    g = torch.Generator().manual_seed(5)
    betas = [0.25, 0.5, 1.0]                       # per-model KL weight
    for step in range(3):
        idx = torch.stack([torch.randperm(200, generator=g)[:25] for _ in range(3)])   # [M, B]
        seeds = [1000 * step + m for m in range(3)]
        sums = batched.train_batch(idx, betas, shared_eps(seeds, 25))                   # [M, 3]
        grads = {n: p.grad for n, p in batched.model.named_parameters()}
        for m, t in enumerate(trainers):
            t.optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(seeds[m])
            want_sums = t._batch_step(idx[m], betas[m])
            assert torch.allclose(sums[m], want_sums, rtol=1e-10), (step, m)
            got_grads = batched.model.single_state(m, grads)
            got_params = batched.model.single_state(m)
            for k, p in t.model.named_parameters():
                assert torch.allclose(got_grads[k], p.grad, rtol=1e-8, atol=1e-12), (step, m, k)
                assert torch.allclose(got_params[k], p, rtol=1e-10, atol=1e-12), (step, m, k)
        if step == 0:
            # Adam's first step moves each weight by ~lr: the models' own rates were used, and the
            # 2e-3 gap between them is far above the tolerance above (a shared lr would fail it).
            for m in (0, 1):
                moved = batched.model.single_state(m)["q_z_net.0.linear.weight"] - before[m]["q_z_net.0.linear.weight"]
                assert moved.abs().max().item() == pytest.approx(cfgs[m].lr, rel=1e-3)


def test_padded_pseudo_inputs_get_no_gradient_and_never_change():
    splits = synthetic(100)
    trainer = BatchedTrainer([config(K=2, seed=0), config(K=6, seed=1, lr=1e-2)], splits, "cpu")
    padding = trainer.model.pseudo_params[0, 2:].clone()
    trainer.train_batch(torch.stack([torch.arange(25), torch.arange(25, 50)]), [1.0, 1.0])
    assert torch.count_nonzero(trainer.model.pseudo_params.grad[0, 2:]) == 0
    assert torch.count_nonzero(trainer.model.pseudo_params.grad[0, :2]) > 0
    trainer.step()
    assert torch.equal(trainer.model.pseudo_params[0, 2:], padding)


def test_one_batched_model_reproduces_trainer_for_whole_epochs():
    for binarization in ("static", "dynamic"):
        splits = synthetic(210, binarization)      # 8 full batches and a partial one
        cfg = config(K=5, seed=3, warmup=2, optimizer="adam_normgrad")
        plain = Trainer(cfg, splits, "cpu")
        want = [plain.step() for _ in range(2)]
        batched = BatchedTrainer([cfg], splits, "cpu")
        got = [batched.step()[0] for _ in range(2)]
        for a, b in zip(got, want):
            for key in ("train_loss", "train_kl", "val_loss", "val_rec", "beta"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (binarization, key, a[key], b[key])


def test_normalised_gradients_of_a_concatenated_head_are_normalised_per_single_tensor():
    """The logistic decoder's mean and log-scale heads are one batched Linear; REF's AdamNormGrad
    normalises each of the single model's tensors on its own, and so must the batched optimizer."""
    splits = synthetic(210, binarization=None, likelihood="logistic256")
    # A large lr: the two normalisations differ in every step's scale, which Adam mostly absorbs.
    cfg = config(K=5, seed=3, warmup=0, optimizer="adam_normgrad", lr=1e-2)
    plain = Trainer(cfg, splits, "cpu")
    want = [plain.step() for _ in range(2)]
    batched = BatchedTrainer([cfg], splits, "cpu")
    got = [batched.step()[0] for _ in range(2)]
    for a, b in zip(got, want):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a[key], b[key])


# -- (3) extract ------------------------------------------------------------------------------
def test_extract_gives_a_vae_with_the_batched_models_elbo():
    splits = synthetic(100, likelihood="logistic256", binarization=None)
    cfgs = [config(K=3, seed=0), config(K=5, seed=1, lr=2e-3)]
    trainer = BatchedTrainer(cfgs, splits, "cpu", dtype=torch.float64)
    trainer.step()                                # trained weights, not the initial ones
    x = trainer.x_val[:12]
    seeds = [7, 8]
    rng = torch.get_rng_state()
    nets = [trainer.extract(m) for m in range(2)]
    assert torch.equal(torch.get_rng_state(), rng)        # extracting does not move the RNG
    got = trainer.model.elbo(x.expand(2, -1, -1), 1.0, shared_eps(seeds, 12))
    for m, net in enumerate(nets):
        assert net.prior.K == cfgs[m].K and net.prior.pseudo_params.shape == (cfgs[m].K, D)
        assert net.likelihood_name == "logistic256"
        torch.manual_seed(seeds[m])
        want = net.elbo(x)
        assert torch.allclose(got["elbo"][m], want["elbo"], rtol=1e-10), m
        assert torch.allclose(got["kl"][m], want["kl"], rtol=1e-10), m
    other = nets[1]
    torch.manual_seed(seeds[0])
    assert not torch.allclose(got["elbo"][0], other.elbo(x)["elbo"], rtol=1e-3)
    # Round trip: stacking the extracted models again gives the same weights.
    again = BatchedVAE(nets)
    for (name, a), b in zip(trainer.model.named_parameters(), again.parameters()):
        if name == "pseudo_params":
            assert torch.equal(a[0, :3], b[0, :3]) and torch.equal(a[1], b[1])
        else:
            assert torch.equal(a, b), name


# -- (4) a diverging model is masked, the others are unaffected ---------------------------------
def test_a_nan_model_is_frozen_and_the_others_train_as_if_it_were_not_there():
    splits = synthetic(150)
    def run(lr_1: float) -> BatchedTrainer:
        t = BatchedTrainer([config(seed=0, lr=1e-3), config(seed=1, lr=lr_1), config(seed=2, lr=2e-3, K=3)],
                           splits, "cpu")
        t.history = [t.step() for _ in range(3)]
        return t

    bad, good = run(1e8), run(1e-3)
    first, second, third = bad.history
    assert first[1]["stop_reason"] == STOP_NAN and "learning rate" in bad.stop_detail[1]
    assert second[1] is None and third[1] is None
    assert bad.optimizer.lr[1] == 0 and bad.loss_weight[1] == 0
    # Frozen at its initial weights (it never had a best epoch), finite, and no longer moving.
    torch.manual_seed(1)
    init = BatchedVAE([bad._build_single(bad.configs[1])])
    for p, q in zip(bad.model.parameters(), init.parameters()):
        assert torch.isfinite(p[1]).all()
        assert torch.equal(p[1, : q.shape[1]], q[0])
    # The others: exactly the run without the diverging model's NaNs, and still learning.
    for m in (0, 2):
        assert [h[m]["train_loss"] for h in bad.history] == [h[m]["train_loss"] for h in good.history]
        for p, q in zip(bad.model.parameters(), good.model.parameters()):
            assert torch.equal(p[m], q[m])
        assert bad.history[-1][m]["val_loss"] < bad.history[0][m]["val_loss"]
        assert bad.stop_reason[m] is None


# -- (5) data ---------------------------------------------------------------------------------
def test_dynamic_binarization_draws_binary_batches_per_model():
    trainer = BatchedTrainer([config(seed=0), config(seed=1)], synthetic(200, "dynamic"), "cpu")
    idx = torch.arange(100).repeat(2, 1)                     # the same images for both models
    gray = trainer.x_train[idx]
    assert ((gray > 0) & (gray < 1)).float().mean() > 0.5    # the source is not binary
    x = trainer.batch(idx)                                   # [M, B, D]
    assert x.shape == (2, 100, D)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert abs(x.mean().item() - gray.mean().item()) < 0.03  # Bernoulli(p): E[x] = p
    assert (x[0] != x[1]).float().mean() > 0.1               # independent draws per model
    assert not torch.equal(trainer.batch(idx), x)            # a new draw every batch
    static = BatchedTrainer([config(seed=0)], synthetic(200), "cpu")
    assert torch.equal(static.batch(idx[:1]), static.x_train[idx[:1]])


def test_every_model_sees_every_image_once_per_epoch_in_its_own_order():
    trainer = BatchedTrainer([config(seed=0), config(seed=1), config(seed=0)], synthetic(120), "cpu")
    perm = trainer.permutations()                            # [M, N]
    for row in perm:
        assert torch.equal(row.sort().values, torch.arange(120))
    assert not torch.equal(perm[0], perm[1])
    assert torch.equal(perm[0], perm[2])                     # seed decides the order, as in Trainer
    assert torch.equal(perm[1], torch.randperm(120, generator=torch.Generator().manual_seed(1)))


# -- bookkeeping ------------------------------------------------------------------------------
def test_early_stopping_is_per_model_and_finish_restores_each_best_epoch(monkeypatch):
    trainer = BatchedTrainer([config(seed=0, early_stopping=2), config(seed=1, max_epochs=6)],
                             synthetic(100), "cpu")
    scripted = iter([(10.0, 10.0), (9.0, 11.0), (11.0, 8.0), (12.0, 9.0), (5.0, 7.0), (5.0, 7.5)])

    def fake_val(x, batch_size=1000):
        losses = next(scripted)
        return torch.tensor([[-v, 0.0, 0.0] for v in losses])

    monkeypatch.setattr(trainer, "evaluate_elbo", fake_val)
    snapshots = {}
    history = []
    while not trainer.done:
        history.append(trainer.step())
        snapshots[trainer.epoch] = [trainer.extract(m).state_dict() for m in range(2)]
    assert trainer.stop_reason == [STOP_EARLY, STOP_COMPLETED]
    assert history[3][0]["stop_reason"] == STOP_EARLY and history[4][0] is None
    assert trainer.best_epoch == [2, 5]
    assert torch.equal(snapshots[4][0]["prior.pseudo_params"], snapshots[6][0]["prior.pseudo_params"])  # frozen
    trainer.finish()
    for m, epoch in enumerate(trainer.best_epoch):
        for k, v in trainer.extract(m).state_dict().items():
            assert torch.equal(v, snapshots[epoch][m][k]), (m, k)


def test_configurations_that_cannot_share_a_batch_are_rejected_with_the_field():
    splits = synthetic(50)
    with pytest.raises(ConfigError, match="hidden_dim"):
        BatchedTrainer([config(), config(hidden_dim=32)], splits, "cpu")
    with pytest.raises(ConfigError, match="'vae' only"):
        BatchedTrainer([config(model="hvae")], splits, "cpu")
    with pytest.raises(ConfigError, match=r"configs\[1\]\.lr"):
        BatchedTrainer([{"prior": "vamp"}, {"lr": -1.0}], splits, "cpu")


# -- CUDA: the graphed batched step computes what the eager one does ----------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_batched_training_gives_the_same_losses_as_eager_on_cuda():
    splits = synthetic(1050, "dynamic")            # 10 full batches and a partial one
    def losses(graphs: bool) -> list:
        cfgs = [config(seed=m, K=3 + 2 * m, lr=(m + 1) * 1e-3, warmup=2, batch_size=100, device="cuda",
                       cuda_graphs=graphs, optimizer="adam_normgrad" if m == 2 else "adam") for m in range(3)]
        trainer = BatchedTrainer(cfgs, splits, "cuda")
        return [[(d["train_loss"], d["val_loss"]) for d in trainer.step()] for _ in range(3)]

    fast, plain = losses(True), losses(False)
    for f, p in zip(fast, plain):
        for (ft, fv), (pt, pv) in zip(f, p):
            assert math.isclose(ft, pt, rel_tol=1e-4, abs_tol=1e-3), (fast, plain)
            assert math.isclose(fv, pv, rel_tol=1e-4, abs_tol=1e-3), (fast, plain)
    assert all(fast[-1][m][0] < fast[0][m][0] for m in range(3))


# -- (5) one model's state, in Trainer's checkpoint format ------------------------------------
def _assert_states_equal(a: dict, b: dict, where: str) -> None:
    for key in ("epoch", "best_epoch", "bad_epochs", "stop_reason"):
        assert a[key] == b[key], (where, key)
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-6), where
    for k, v in b["model"].items():
        assert torch.allclose(a["model"][k], v, rtol=1e-6, atol=1e-7), (where, k)
    assert (a["best_state"] is None) == (b["best_state"] is None), where
    for k, v in (b["best_state"] or {}).items():
        assert torch.allclose(a["best_state"][k], v, rtol=1e-6, atol=1e-7), (where, "best", k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb), where
    for i in sb:
        assert float(sa[i]["step"]) == float(sb[i]["step"]), (where, i)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[i][key], sb[i][key], rtol=1e-5, atol=1e-9), (where, i, key)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"]), where


@pytest.mark.parametrize("prior", ["vamp", "mog", "standard"])
def test_a_trainer_checkpoint_goes_into_a_batch_slot_and_comes_back_unchanged(prior):
    splits = synthetic(120)
    cfg = config(prior=prior, K=4, seed=5, lr=2e-3, warmup=1, early_stopping=3)
    plain = Trainer(cfg, splits, "cpu")
    for _ in range(3):
        plain.step()
    state = plain.state_dict()
    # Slot 1 of two; slot 0 is another configuration (a different K pads the prior).
    batched = BatchedTrainer([config(prior=prior, K=6, seed=1), cfg], splits, "cpu", states=[None, state])
    _assert_states_equal(batched.model_state(1), state, prior)


def test_a_batch_slot_state_resumes_in_a_plain_trainer_exactly():
    """model_state -> Trainer.load_state_dict: the next epoch is the one the slot would train."""
    splits = synthetic(150)
    cfgs = [config(K=3, seed=0, lr=1e-3), config(K=5, seed=1, lr=3e-3, warmup=2, optimizer="adam_normgrad")]
    batched = BatchedTrainer(cfgs, splits, "cpu")
    for _ in range(3):
        batched.step()
    state = batched.model_state(1)
    plain = Trainer(cfgs[1], splits, "cpu")
    # A copy each: torch's Adam.load_state_dict keeps the given moment tensors and trains them in place.
    plain.load_state_dict(copy.deepcopy(state))   # also sets the global RNG to the state's
    want = plain.step()
    alone = BatchedTrainer([cfgs[1]], splits, "cpu", states=[copy.deepcopy(state)])
    torch.set_rng_state(state["rng"]["torch"])    # the shared noise stream, as Trainer restored it
    got = alone.step()[0]
    assert got["epoch"] == want["epoch"] == 4
    for key in ("train_loss", "train_kl", "val_loss", "beta"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_a_model_joining_a_trained_batch_starts_its_own_adam_from_step_one():
    splits = synthetic(100)
    veteran = BatchedTrainer([config(K=4, seed=0, lr=1e-3)], splits, "cpu")
    for _ in range(2):
        veteran.step()
    state = veteran.model_state(0)
    newcomer = config(K=4, seed=9, lr=2e-3)
    batched = BatchedTrainer([config(K=4, seed=0, lr=1e-3), newcomer], splits, "cpu", states=[state, None])
    assert batched.optimizer.step_count.tolist() == [8.0, 0.0] and batched.epochs == [2, 0]
    before = batched.model.single_state(1)["q_z_net.0.linear.weight"].clone()
    batched.train_batch(torch.stack([torch.arange(25), torch.arange(25, 50)]), [1.0, 1.0])
    moved = batched.model.single_state(1)["q_z_net.0.linear.weight"] - before
    # Bias-corrected Adam's first step moves a weight by ~lr; a shared step count of 9 would not.
    assert moved.abs().max().item() == pytest.approx(newcomer.lr, rel=1e-3)
    metrics = batched.step()
    assert [m["epoch"] for m in metrics] == [3, 1]


def test_a_state_of_another_configuration_is_refused_with_the_field():
    splits = synthetic(100)
    state = Trainer(config(K=4, seed=0), splits, "cpu").state_dict()
    with pytest.raises(ConfigError, match=r"K=4.*K=6"):
        BatchedTrainer([config(K=6, seed=0)], splits, "cpu", states=[state])
