"""Batched training of M runs (trainables/vae/batched.py) against the single trainer.

The single model and `train.Trainer` are the reference, and there is no other implementation:
a slot of a BatchedTrainer must train exactly as the same configuration alone (per-epoch losses
equal up to float reduction order), whoever shares the batch and in whichever slot.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from trainables.vae.batched import BatchedTrainer
from trainables.vae.config import TrainConfig
from trainables.vae.data import DatasetInfo, Splits
from trainables.vae.errors import ConfigError
from trainables.vae.model import REF_PARTS
from trainables.vae.train import STOP_COMPLETED, STOP_EARLY, STOP_NAN, Trainer, unit_norm_gradients_

SHAPE = (1, 4, 5)
D = 20
Z = 4
H = 16
# float64 runs: a slot and its single run differ only in the order of float reductions.
EXACT = dict(rel=1e-9, abs=1e-9)


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


class Alone:
    """The single trainer in float64 (as the batched trainer with dtype=float64)."""

    def __init__(self, cfg: TrainConfig, splits: Splits, state: dict | None = None):
        self.t = Trainer(cfg, splits, "cpu", dtype=torch.float64)
        if state is not None:
            self.t.load_state_dict(copy.deepcopy(state))

    def step(self) -> dict:
        return self.t.step()


def losses(metrics: dict) -> tuple[float, ...]:
    return tuple(metrics[k] for k in ("train_loss", "train_kl", "val_loss", "val_kl"))


def assert_same(got: dict, want: dict, where) -> None:
    assert got["epoch"] == want["epoch"], where
    assert got["stop_reason"] == want["stop_reason"], where
    for a, b in zip(losses(got), losses(want)):
        assert a == pytest.approx(b, **EXACT), (where, losses(got), losses(want))


# -- (1) every slot is its single run -----------------------------------------------------------
@pytest.mark.parametrize("model", ["vae", "hvae"])
@pytest.mark.parametrize("prior,likelihood,binarization", [
    ("vamp", "bernoulli", "dynamic"), ("mog", "bernoulli", "static"), ("standard", "logistic256", None),
    ("vamp_data", "bernoulli", "static")])
def test_every_slot_trains_exactly_as_its_configuration_alone(model, prior, likelihood, binarization):
    splits = synthetic(210, binarization, likelihood)     # 8 full batches and a partial one
    cfgs = [config(model=model, prior=prior, K=3, seed=1, lr=2e-3, warmup=2),
            config(model=model, prior=prior, K=7, seed=2, optimizer="adam_normgrad", prob_clamp=0.0),
            config(model=model, prior=prior, K=5, seed=3, lr=1e-3, early_stopping=1)]
    batched = BatchedTrainer(cfgs, splits, "cpu", dtype=torch.float64)
    alone = [Alone(c, splits) for c in cfgs]
    for epoch in range(3):
        got = batched.step()
        for m, run in enumerate(alone):
            if run.t.done:
                assert got[m] is None
                continue
            assert_same(got[m], run.step(), (model, prior, epoch, m))
    # The weights too: each slot as a single model equals its single run's.
    for m, run in enumerate(alone):
        slot = batched.extract(m).state_dict()
        for k, v in run.t.model.state_dict().items():
            assert torch.allclose(slot[k], v, rtol=1e-8, atol=1e-10), (m, k)


def test_a_pooled_run_is_reproducible_from_its_configuration_whoever_shares_the_batch():
    """The same configuration alone, and as one slot of batches of other sizes and positions,
    with other runs joining and leaving between epochs: the same per-epoch losses (float64; the
    tolerance is float reduction order only)."""
    splits = synthetic(150, "dynamic")
    mine = config(K=4, seed=11, lr=3e-3, warmup=2)
    others = [config(K=k, seed=s, lr=lr) for k, s, lr in ((6, 1, 1e-3), (2, 2, 2e-3), (5, 3, 5e-4), (3, 4, 1e-3))]
    alone = Alone(mine, splits)
    want = [losses(alone.step()) for _ in range(4)]

    # Epoch by epoch the company changes: the run's state moves from batch to batch.
    companies = [[others[0], mine], [mine], [others[1], others[2], mine, others[3]], [others[3], mine]]
    state, carried = None, {}
    for epoch, company in enumerate(companies):
        slot = company.index(mine)
        states = [state if c is mine else carried.get(id(c)) for c in company]
        batched = BatchedTrainer(company, splits, "cpu", dtype=torch.float64, states=states)
        got = batched.step()
        assert got[slot]["epoch"] == epoch + 1
        assert losses(got[slot]) == pytest.approx(want[epoch], **EXACT), (epoch, company.index(mine))
        state = batched.model_state(slot)
        carried = {id(c): batched.model_state(i) for i, c in enumerate(company) if c is not mine}


# -- (2) mixtures of different K: padding -------------------------------------------------------
def test_padded_components_get_no_gradient_and_never_change():
    splits = synthetic(100)
    trainer = BatchedTrainer([config(K=2, seed=0), config(K=6, seed=1, lr=1e-2)], splits, "cpu")
    pseudo = trainer.stacked["prior.pseudo_params"]
    padding = pseudo[0, 2:].clone()
    assert trainer.buffers["prior.mixture_logits"][0, 2:].eq(-math.inf).all()
    noise = torch.randn(2, 25, 1, Z)
    trainer.train_batch(torch.stack([torch.arange(25), torch.arange(25, 50)]), [1.0, 1.0], noise)
    assert torch.count_nonzero(pseudo.grad[0, 2:]) == 0
    assert torch.count_nonzero(pseudo.grad[0, :2]) > 0
    trainer.step()
    assert torch.equal(pseudo[0, 2:], padding)
    assert trainer.extract(0).prior.pseudo_params.shape == (2, D)     # a slot is its own K


def test_unit_norm_gradients_normalise_each_of_refs_tensors():
    """Our GatedDense concatenates REF's h and g Linears: AdamNormGrad scales each half on its own."""
    from trainables.vae.model import GatedDense

    layer = GatedDense(3, 2)
    assert getattr(layer.linear.weight, REF_PARTS) == 2
    grad = torch.cat([torch.full((2, 3), 2.0), torch.full((2, 3), 5.0)])           # [2*out, in]
    unit_norm_gradients_([grad], [2])
    assert torch.linalg.vector_norm(grad[:2]) == pytest.approx(1.0, rel=1e-6)
    assert torch.linalg.vector_norm(grad[2:]) == pytest.approx(1.0, rel=1e-6)
    stacked = torch.stack([torch.full((4, 3), 3.0), torch.full((4, 3), 3.0)])       # [M=2, 4, 3]
    unit_norm_gradients_([stacked], [2], lead=1, mask=torch.tensor([True, False]))
    assert torch.linalg.vector_norm(stacked[0, :2]) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(stacked[1], torch.full((4, 3), 3.0))                          # slot 1: plain Adam


# -- (3) a diverging slot is frozen, the others are unaffected ----------------------------------
def test_a_nan_slot_is_frozen_and_the_others_train_as_if_it_were_not_there():
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
    initial = Trainer(config(seed=1, lr=1e8), splits, "cpu").model.state_dict()
    for k, v in bad.extract(1).state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, initial[k]), k
    # The others: exactly the run without the diverging slot's NaNs, and still learning.
    for m in (0, 2):
        assert [h[m]["train_loss"] for h in bad.history] == [h[m]["train_loss"] for h in good.history]
        for k, v in bad.extract(m).state_dict().items():
            assert torch.equal(v, good.extract(m).state_dict()[k]), (m, k)
        assert bad.stop_reason[m] is None and bad.loss_weight[m] == 1       # still training
        start = Trainer(bad.configs[m], splits, "cpu").model.state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in bad.extract(m).state_dict().items())


# -- (4) data ---------------------------------------------------------------------------------
def test_dynamic_binarization_gives_each_slot_its_own_binary_images_per_epoch():
    trainer = BatchedTrainer([config(seed=0), config(seed=1)], synthetic(200, "dynamic"), "cpu")
    gray = trainer.x_train
    assert ((gray > 0) & (gray < 1)).float().mean() > 0.5    # the source is not binary
    order, _ = trainer._draws()
    first = trainer.x_epoch.clone()                          # [M, N, D] bool
    assert first.dtype == torch.bool and set(first.unique().tolist()) == {False, True}
    first = first.float()
    assert abs(first.mean().item() - gray.mean().item()) < 0.03   # Bernoulli(p): E[x] = p
    assert (first[0] != first[1]).float().mean() > 0.1       # independent draws per slot
    trainer._draws()
    assert not torch.equal(trainer.x_epoch.float(), first)   # a new draw every epoch
    static = BatchedTrainer([config(seed=0)], synthetic(200), "cpu")
    assert static.x_epoch is None                            # static data: the images themselves


def test_every_slot_sees_every_image_once_per_epoch_in_its_own_order():
    trainer = BatchedTrainer([config(seed=0), config(seed=1), config(seed=0)], synthetic(120), "cpu")
    order, noise = trainer._draws()                          # [M, N], [M, N, 1, Z]
    for row in order:
        assert torch.equal(row.sort().values, torch.arange(120))
    assert not torch.equal(order[0], order[1])
    assert torch.equal(order[0], order[2]) and torch.equal(noise[0], noise[2])   # the seed decides
    assert torch.equal(order[1], torch.randperm(120, generator=torch.Generator().manual_seed(1)))


# -- bookkeeping ------------------------------------------------------------------------------
def test_early_stopping_is_per_slot_and_finish_restores_each_best_epoch(monkeypatch):
    trainer = BatchedTrainer([config(seed=0, early_stopping=2), config(seed=1, max_epochs=6)],
                             synthetic(100), "cpu")
    # slot 0 (patience 2, REF: stops at the 3rd epoch without a new best): best 2, stops after 5
    scripted = iter([(10.0, 10.0), (9.0, 11.0), (11.0, 8.0), (12.0, 9.0), (9.5, 7.0), (5.0, 7.5)])

    def fake_val(x, noise, batch_size=1000):
        return torch.tensor([[-v, 0.0, 0.0] for v in next(scripted)])

    monkeypatch.setattr(trainer, "evaluate_elbo", fake_val)
    snapshots = {}
    history = []
    while not trainer.done:
        history.append(trainer.step())
        snapshots[trainer.epoch] = [trainer.extract(m).state_dict() for m in range(2)]
    assert trainer.stop_reason == [STOP_EARLY, STOP_COMPLETED]
    assert history[4][0]["stop_reason"] == STOP_EARLY and history[5][0] is None
    assert [p.best_epoch for p in trainer.progress] == [2, 5]
    assert torch.equal(snapshots[5][0]["prior.pseudo_params"], snapshots[6][0]["prior.pseudo_params"])  # frozen
    trainer.finish()
    for m, p in enumerate(trainer.progress):
        for k, v in trainer.extract(m).state_dict().items():
            assert torch.equal(v, snapshots[p.best_epoch][m][k]), (m, k)


def test_configurations_that_cannot_share_a_batch_are_rejected_with_the_field():
    splits = synthetic(50)
    with pytest.raises(ConfigError, match="hidden_dim"):
        BatchedTrainer([config(), config(hidden_dim=32)], splits, "cpu")
    with pytest.raises(ConfigError, match=r"configs\[1\]\.model"):
        BatchedTrainer([config(), config(model="hvae")], splits, "cpu")
    with pytest.raises(ConfigError, match=r"configs\[1\]\.lr"):
        BatchedTrainer([{"prior": "vamp"}, {"lr": -1.0}], splits, "cpu")


# -- CUDA: the graphed batched step computes what the eager one does ----------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_batched_training_gives_the_same_losses_as_eager_on_cuda():
    splits = synthetic(1050, "dynamic")            # 10 full batches and a partial one

    def run(graphs: bool) -> list:
        cfgs = [config(seed=m, K=3 + 2 * m, lr=(m + 1) * 1e-3, warmup=2, batch_size=100, device="cuda",
                       cuda_graphs=graphs, optimizer="adam_normgrad" if m == 2 else "adam",
                       model="hvae" if m == 1 else "vae") for m in range(3)]
        groups = [[c for c in cfgs if c.model == model] for model in ("vae", "hvae")]
        out = []
        for group in groups:
            trainer = BatchedTrainer(group, splits, "cuda")
            out += [[losses(d) for d in trainer.step()] for _ in range(3)]
        return out

    fast, plain = run(True), run(False)
    for f, p in zip(fast, plain):
        for a, b in zip(f, p):
            for x, y in zip(a, b):
                assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-3), (fast, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_slot_on_cuda_with_the_graph_trains_as_its_configuration_alone():
    splits = synthetic(1050, "dynamic")
    mine = config(K=4, seed=7, lr=2e-3, batch_size=100, device="cuda")
    alone = Trainer(mine, splits, "cuda")
    want = [losses(alone.step()) for _ in range(3)]
    batched = BatchedTrainer([config(K=6, seed=1, batch_size=100, device="cuda"), mine], splits, "cuda")
    got = [losses(batched.step()[1]) for _ in range(3)]
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)


# -- (5) one slot's state, in Trainer's checkpoint format ---------------------------------------
def _assert_states_equal(a: dict, b: dict, where: str) -> None:
    for key in ("epoch", "best_epoch", "bad_epochs", "stop_reason"):
        assert a[key] == b[key], (where, key)
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-6), where
    assert set(a["model"]) == set(b["model"]), where
    for k, v in b["model"].items():
        assert torch.allclose(a["model"][k], v, rtol=1e-6, atol=1e-7), (where, k)
    for key in ("other_epoch", "other_tracked"):
        assert a[key] == b[key], (where, key)
    for key in ("best_val_elbo", "other_val_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), (where, key)
    for state in ("best_state", "other_state"):
        assert (a[state] is None) == (b[state] is None), (where, state)
        for k, v in (b[state] or {}).items():
            assert torch.allclose(a[state][k], v, rtol=1e-6, atol=1e-7), (where, state, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb), where
    for i in sb:
        assert float(sa[i]["step"]) == float(sb[i]["step"]), (where, i)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[i][key], sb[i][key], rtol=1e-5, atol=1e-9), (where, i, key)
    for key in ("generator", "noise"):
        assert torch.equal(a["rng"][key], b["rng"][key]), (where, key)


@pytest.mark.parametrize("model,prior", [("vae", "vamp"), ("vae", "mog"), ("vae", "standard"), ("hvae", "vamp")])
def test_a_trainer_checkpoint_goes_into_a_batch_slot_and_comes_back_unchanged(model, prior):
    splits = synthetic(120)
    cfg = config(model=model, prior=prior, K=4, seed=5, lr=2e-3, warmup=2, early_stopping=3)
    plain = Trainer(cfg, splits, "cpu")
    for _ in range(3):
        plain.step()
    state = plain.state_dict()
    assert state["other_state"] is not None                       # epoch 2 or 3: at full KL weight
    # Slot 1 of two; slot 0 is another configuration (a different K pads the prior).
    batched = BatchedTrainer([config(model=model, prior=prior, K=6, seed=1), cfg], splits, "cpu",
                             states=[None, state])
    _assert_states_equal(batched.model_state(1), state, prior)


def test_a_batch_slot_state_resumes_in_a_plain_trainer_exactly():
    """model_state -> Trainer.load_state_dict: the next epoch is the one the slot would train."""
    splits = synthetic(150, "dynamic")
    cfgs = [config(K=3, seed=0, lr=1e-3), config(K=5, seed=1, lr=3e-3, warmup=2, optimizer="adam_normgrad")]
    batched = BatchedTrainer(cfgs, splits, "cpu", dtype=torch.float64)
    for _ in range(3):
        batched.step()
    state = batched.model_state(1)
    want = batched.step()[1]
    plain = Alone(cfgs[1], splits, state)
    assert_same(plain.step(), want, "resumed alone")


def test_a_slot_joining_a_trained_batch_starts_its_own_adam_from_step_one():
    splits = synthetic(100)
    veteran = BatchedTrainer([config(K=4, seed=0, lr=1e-3)], splits, "cpu")
    for _ in range(2):
        veteran.step()
    state = veteran.model_state(0)
    newcomer = config(K=4, seed=9, lr=2e-3)
    batched = BatchedTrainer([config(K=4, seed=0, lr=1e-3), newcomer], splits, "cpu", states=[state, None])
    assert batched.optimizer.step_count.tolist() == [8.0, 0.0] and batched.epochs == [2, 0]
    name = "q_z_net.0.linear.weight"
    before = batched.stacked[name][1].detach().clone()
    batched.train_batch(torch.stack([torch.arange(25), torch.arange(25, 50)]), [1.0, 1.0], torch.randn(2, 25, 1, Z))
    moved = batched.stacked[name][1].detach() - before
    # Bias-corrected Adam's first step moves a weight by ~lr; a shared step count of 9 would not.
    assert moved.abs().max().item() == pytest.approx(newcomer.lr, rel=1e-3)
    metrics = batched.step()
    assert [m["epoch"] for m in metrics] == [3, 1]


def test_a_state_of_another_configuration_is_refused_with_the_field():
    splits = synthetic(100)
    state = Trainer(config(K=4, seed=0), splits, "cpu").state_dict()
    with pytest.raises(ConfigError, match=r"K=4.*K=6"):
        BatchedTrainer([config(K=6, seed=0)], splits, "cpu", states=[state])


def test_a_frozen_slot_never_changes_even_with_a_non_finite_gradient():
    from trainables.vae.batched import BatchedAdam

    w = torch.ones(2, 3, requires_grad=True)
    opt = BatchedAdam([w], torch.tensor([1e-2, 1e-2]))
    opt.freeze(1)
    w.grad = torch.tensor([[1.0, 1.0, 1.0], [float("nan"), float("inf"), 1.0]])   # 0 * inf in slot 1
    opt.step()
    assert torch.equal(w[1].detach(), torch.ones(3)) and torch.isfinite(opt.exp_avg[0]).all()
    assert (w[0].detach() < 1).all()                                                 # slot 0 moved



# -- both choices of epoch and selection on the validation LL, slot by slot ----------------------
def test_every_slot_keeps_both_choices_and_selects_on_its_validation_ll_exactly_as_alone(monkeypatch):
    """Scripted validation ELBOs (REF's best inside the warm-up, another at full KL weight) and
    real validation LLs: each slot's per-epoch metrics, both best epochs and both kept weights
    are its single run's (float64)."""
    splits = synthetic(100)
    cfgs = [config(seed=1, K=3, warmup=3, early_stopping=3, max_epochs=12),
            config(seed=2, K=5, warmup=0, early_stopping=4, max_epochs=12, select_on="val_ll", val_ll_every=2,
                   val_ll_samples=8),
            config(seed=3, K=4, warmup=3, early_stopping=3, max_epochs=12, best_after_warmup=True)]
    scripts = [[90.0, 60.0, 70.0, 65.0, 62.0, 66.0, 67.0, 68.0, 69.0, 70.0, 71.0, 72.0],
               [90.0, 60.0, 70.0, 65.0, 62.0, 66.0, 67.0, 68.0, 69.0, 70.0, 71.0, 72.0],
               [90.0, 60.0, 61.0, 64.0, 63.0, 66.0, 67.0, 68.0, 69.0, 70.0, 71.0, 72.0]]
    alone = [Alone(c, splits) for c in cfgs]
    for run, script in zip(alone, scripts):
        losses = iter(script)
        monkeypatch.setattr(run.t, "evaluate_elbo",
                            lambda x, noise=None, losses=losses: (lambda v: {"loss": v, "elbo": -v, "rec": 0.0,
                                                                             "kl": 0.0})(next(losses)))
    batched = BatchedTrainer(cfgs, splits, "cpu", dtype=torch.float64)
    epoch = iter(range(12))
    monkeypatch.setattr(batched, "evaluate_elbo", lambda x, noise, batch_size=1000: (
        lambda e: torch.tensor([[-s[e], 0.0, 0.0] for s in scripts], dtype=torch.float64))(next(epoch)))
    while not batched.done:
        got = batched.step()
        for m, run in enumerate(alone):
            if run.t.done:
                assert got[m] is None
                continue
            want = run.step()
            assert_same(got[m], want, m)
            assert ("val_ll" in got[m]) == ("val_ll" in want), (m, want["epoch"])
            if "val_ll" in want:
                assert got[m]["val_ll"] == pytest.approx(want["val_ll"], **EXACT)
            if want["stop_reason"] is not None:     # its final state (a frozen slot's Adam steps run on)
                _assert_states_equal(batched.model_state(m), run.t.state_dict(), f"slot {m}")
    progress = [(p.best_epoch, p.other_epoch, p.epoch) for p in batched.progress]
    # REF: epoch 2 (warm-up), at full KL weight 5; val_ll: its own best; best_after_warmup: 3, REF's 2.
    assert progress[0] == (2, 5, 6) and progress[2][:2] == (3, 2)
    assert progress[1][1] == 2 and progress[1][0] % 2 == 0           # a val_ll epoch
