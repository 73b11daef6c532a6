"""Training on real static MNIST subsets: learning, early stopping, determinism, NaN, checkpoints."""

import math

import pytest
import torch

from trainables.vae.config import TrainConfig
from trainables.vae.data import load_dataset
from trainables.vae.train import STOP_EARLY, STOP_NAN, Trainer, kl_weight, train


@pytest.fixture(scope="module")
def mnist(shared_datasets):
    return load_dataset("static_mnist", shared_datasets)


def small(**kw) -> TrainConfig:
    base = dict(dataset="static_mnist", prior="vamp", K=20, latent_dim=8, hidden_dim=64, max_epochs=4,
                warmup=2, early_stopping=0, train_subset=1000, val_subset=300, test_subset=50,
                test_samples=50, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_kl_warmup_is_linear_then_one():
    assert [kl_weight(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert kl_weight(1, 0) == 1.0


@pytest.mark.parametrize("model,prior", [("vae", "vamp"), ("vae", "standard"), ("hvae", "vamp_data"),
                                         ("vae", "mog")])
def test_a_few_epochs_lower_the_loss(mnist, model, prior):
    losses = []
    trainer = train(small(model=model, prior=prior, warmup=0), mnist, on_epoch=lambda m: losses.append(m["val_loss"]))
    assert trainer.stop_reason == "completed" and len(losses) == 4
    assert losses[-1] < losses[0] - 5, losses


def test_same_seed_same_losses_and_other_seed_differs(mnist):
    runs = []
    for seed in (3, 3, 4):
        history = []
        train(small(seed=seed, max_epochs=2), mnist, on_epoch=lambda m: history.append((m["train_loss"], m["val_loss"])))
        runs.append(history)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_absurd_learning_rate_stops_with_the_nan_reason(mnist):
    trainer = train(small(lr=1e8, max_epochs=5, warmup=0), mnist)
    assert trainer.stop_reason == STOP_NAN
    assert trainer.epoch == 1
    assert "nan" in trainer.stop_detail and "learning rate" in trainer.stop_detail


def test_early_stopping_counts_after_warmup_and_restores_the_best_epoch(mnist, monkeypatch):
    """Scripted validation losses: the best is epoch 3 (the first at beta = 1 is epoch 2)."""
    scripted = iter([100.0, 50.0, 60.0, 40.0, 45.0, 47.0, 41.0])  # epochs 1..7
    trainer = Trainer(small(warmup=2, early_stopping=3, max_epochs=50), mnist)
    def fake_val(x, noise=None):
        loss = next(scripted)
        return {"loss": loss, "elbo": -loss, "rec": 0.0, "kl": 0.0}

    monkeypatch.setattr(trainer, "evaluate_elbo", fake_val)
    snapshots = {}
    while not trainer.done:
        trainer.step()
        snapshots[trainer.epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # epoch 1 (beta 0.5) is never "best" even though nothing came before it; epoch 4 is the best
    # (40.0); epochs 5, 6, 7 are 3 bad epochs in a row -> stop after epoch 7.
    assert trainer.stop_reason == STOP_EARLY and trainer.epoch == 7
    assert trainer.best_epoch == 4
    trainer.finish()
    restored = trainer.model.state_dict()
    assert all(torch.equal(restored[k], snapshots[4][k]) for k in restored)
    assert not all(torch.equal(restored[k], snapshots[7][k]) for k in restored)


def test_checkpoint_resume_continues_exactly(mnist):
    cfg = small(max_epochs=4, dataset="static_mnist")
    straight = Trainer(cfg, mnist)
    full = [straight.step()["train_loss"] for _ in range(4)]

    first = Trainer(cfg, mnist)
    part = [first.step()["train_loss"] for _ in range(2)]
    state = first.state_dict()
    torch.manual_seed(12345)  # a fresh process would have other RNG state
    second = Trainer(cfg, mnist)
    second.load_state_dict(state)
    part += [second.step()["train_loss"] for _ in range(2)]
    assert part == full


def test_dynamic_binarization_resamples_every_batch(shared_datasets):
    splits = load_dataset("dynamic_mnist", shared_datasets)
    trainer = Trainer(small(dataset="dynamic_mnist", max_epochs=1, train_subset=200), splits)
    assert trainer.dynamic
    assert not torch.all((trainer.x_train == 0) | (trainer.x_train == 1))   # gray training images
    seen = []
    original = trainer.model.elbo
    trainer.model.elbo = lambda x, beta=1.0, noise=None: (seen.append(x.clone()), original(x, beta, noise))[1]
    trainer.step()
    assert all(torch.all((x == 0) | (x == 1)) for x in seen)


def test_config_rejects_unknown_keys_and_bad_values():
    from trainables.vae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trial.max_epoch: unknown key; did you mean 'max_epochs'"):
        TrainConfig.from_dict({"max_epoch": 3})
    with pytest.raises(ConfigError, match=r"prior: unknown prior 'vampp'; did you mean 'vamp'"):
        TrainConfig.from_dict({"prior": "vampp"})
    with pytest.raises(ConfigError, match=r"K: expected an integer"):
        TrainConfig.from_dict({"K": 2.5})
    assert math.isclose(TrainConfig.from_dict({"lr": "1e-3"}).lr, 1e-3)
