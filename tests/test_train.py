"""Training on real static MNIST subsets: learning, early stopping, determinism, NaN, checkpoints."""

import math
import random

import pytest
import torch

from trainables.vae.config import TrainConfig
from trainables.vae.data import load_dataset
from trainables.vae.train import STOP_EARLY, STOP_NAN, Progress, Trainer, kl_weight, train


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


def ref_early_stopping(losses, warmup, patience):
    """REF's loop (utils/perform_experiment.py), transcribed: (best epoch, last epoch trained)."""
    best_loss, e, best_epoch, epoch = 100000.0, 0, None, 0
    for epoch, val_loss in enumerate(losses, start=1):
        if val_loss < best_loss:
            e, best_loss, best_epoch = 0, val_loss, epoch
        else:
            e += 1
            if epoch < warmup:
                e = 0
            if e > patience:
                break
    return best_epoch, epoch


def run_progress(losses, **kw):
    """Our Progress fed a sequence of validation losses: (best epoch, last epoch, stop reason)."""
    config = TrainConfig.from_dict({"max_epochs": len(losses), **kw})
    progress = Progress()
    for loss in losses:
        progress.epoch += 1
        beta = kl_weight(progress.epoch, config.warmup)
        progress.update({"beta": beta, "train_loss": 1.0, "val_loss": loss}, config)
        if progress.stop_reason is not None:
            break
    return progress.best_epoch, progress.epoch, progress.stop_reason


@pytest.mark.parametrize("losses,warmup,patience,best,last", [
    # The best epoch lies inside the warm-up: it stays the best; the counter is held at 0 until
    # epoch 5 (= warmup), then grows 1, 2, 3 > 2: stop after epoch 7.
    ([10, 5, 6, 7, 8, 9, 9, 9, 9, 9], 5, 2, 2, 7),
    # The off-by-one: patience 2 stops at the 3rd epoch in a row without a new best, not the 2nd.
    ([5, 6, 6, 6, 6, 6], 0, 2, 1, 4),
    # Without a warm-up the first epoch is best; an equal loss is not a new best.
    ([5, 5, 5, 4, 4, 4, 4, 4], 0, 2, 4, 7),
    # A new best resets the counter; the last epochs count from it.
    ([9, 8, 9, 9, 7, 8, 8, 8, 8], 1, 2, 5, 8),
])
def test_early_stopping_follows_ref_on_hand_written_losses(losses, warmup, patience, best, last):
    assert ref_early_stopping(losses, warmup, patience) == (best, last)
    reason = STOP_EARLY if last < len(losses) else "completed"
    assert run_progress(losses, warmup=warmup, early_stopping=patience) == (best, last, reason)


def test_early_stopping_equals_ref_on_random_losses():
    rng = random.Random(0)
    for _ in range(500):
        warmup, patience = rng.randint(0, 8), rng.randint(1, 5)
        losses = [rng.choice([1.0, 2.0, 3.0]) * rng.random() + 10 for _ in range(rng.randint(1, 30))]
        best, last = ref_early_stopping(losses, warmup, patience)
        assert run_progress(losses, warmup=warmup, early_stopping=patience)[:2] == (best, last), losses


def test_best_after_warmup_lets_only_full_kl_epochs_be_best():
    losses = [1, 2, 3, 4, 5, 6, 7, 8]
    # REF: epoch 1 is best; the counter starts at epoch 3 (= warmup) and passes 2 at epoch 5.
    assert run_progress(losses, warmup=3, early_stopping=2) == (1, 5, STOP_EARLY)
    # Not REF (the option): epochs 1 and 2 (beta < 1) cannot be best; epoch 3 is, the run stops at 6.
    assert run_progress(losses, warmup=3, early_stopping=2, best_after_warmup=True) == (3, 6, STOP_EARLY)


def test_early_stopping_zero_turns_it_off():
    assert run_progress([1, 2, 3, 4, 5, 6], warmup=0, early_stopping=0) == (1, 6, "completed")


def test_early_stopping_restores_a_best_epoch_inside_the_warmup(mnist, monkeypatch):
    """Scripted validation losses: the best is epoch 2 (beta 0.5), inside the warm-up (REF)."""
    scripted = iter([100.0, 30.0, 60.0, 50.0, 45.0, 47.0, 41.0, 42.0])  # epochs 1..8
    trainer = Trainer(small(warmup=4, early_stopping=3, max_epochs=50), mnist)

    def fake_val(x, noise=None):
        loss = next(scripted)
        return {"loss": loss, "elbo": -loss, "rec": 0.0, "kl": 0.0}

    monkeypatch.setattr(trainer, "evaluate_elbo", fake_val)
    snapshots = {}
    while not trainer.done:
        trainer.step()
        snapshots[trainer.epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # Epoch 3 is held at 0 (3 < warmup); epochs 4, 5, 6, 7 count 1..4 > 3: stop after epoch 7.
    assert trainer.stop_reason == STOP_EARLY and trainer.epoch == 7
    assert trainer.best_epoch == 2
    trainer.finish()
    restored = trainer.model.state_dict()
    assert all(torch.equal(restored[k], snapshots[2][k]) for k in restored)
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


def test_dynamic_binarization_draws_fresh_binary_images_every_epoch(shared_datasets):
    """Each epoch the model trains on one fresh Bernoulli draw of the gray images (each image a new
    draw each time it is seen, as REF's per-batch torch.bernoulli), drawn from the run's own
    generator, with the gray values as their mean."""
    import dataclasses

    def image_set(x: torch.Tensor) -> list[bytes]:
        return sorted(bytes(row) for row in x.to(torch.uint8).numpy())   # the rows, in any order

    splits = load_dataset("dynamic_mnist", shared_datasets)
    config = small(dataset="dynamic_mnist", max_epochs=2, train_subset=200, val_subset=100, batch_size=50)
    trainer = Trainer(config, splits)
    assert trainer.dynamic
    gray = trainer.x_train                                                # [200, 784]
    assert not torch.all((gray == 0) | (gray == 1))
    seen = []                                   # the training batches (validation runs in eval mode)
    model, original = trainer.model, trainer.model.elbo
    model.elbo = lambda x, beta=1.0, noise=None: (model.training and seen.append(x.clone()),
                                                  original(x, beta, noise))[1]
    epochs = []
    for epoch in range(2):
        seen.clear()
        torch.manual_seed(100 + epoch)          # the global generator: must not matter
        trainer.step()
        images = trainer.x_epoch.to(gray.dtype).clone()                  # this epoch's draw
        # The 4 batches hold exactly the epoch's binary images, each once: one draw per epoch.
        assert len(seen) == 4 and image_set(torch.cat(seen)) == image_set(images)
        # Image i is a draw of gray image i: black stays black, white stays white.
        assert torch.all(images[gray == 0] == 0) and torch.all(images[gray == 1] == 1)
        epochs.append(images)
    assert not torch.equal(epochs[0], epochs[1])                          # a fresh draw
    # E[x] = gray: in each band of gray values, the draws' mean within 5 standard errors of it.
    draws = torch.stack(epochs)                                           # [2, 200, 784]
    for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
        band = (gray > lo) & (gray < hi)
        p = gray[band].double()
        assert p.numel() > 1000
        error = math.sqrt(float((p * (1 - p)).sum()) * len(epochs)) / (len(epochs) * p.numel())
        assert abs(float(draws[:, band].double().mean()) - float(p.mean())) < 5 * error, (lo, hi)
    # From the run's generator: the same seed draws the same images, another seed others.
    for seed, same in ((config.seed, True), (config.seed + 1, False)):
        other = Trainer(dataclasses.replace(config, seed=seed), splits)
        torch.manual_seed(12345)
        other.step()
        assert torch.equal(other.x_epoch.to(gray.dtype), epochs[0]) is same


def test_config_rejects_unknown_keys_and_bad_values():
    from trainables.vae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trial.max_epoch: unknown key; did you mean 'max_epochs'"):
        TrainConfig.from_dict({"max_epoch": 3})
    with pytest.raises(ConfigError, match=r"prior: unknown prior 'vampp'; did you mean 'vamp'"):
        TrainConfig.from_dict({"prior": "vampp"})
    with pytest.raises(ConfigError, match=r"K: expected an integer"):
        TrainConfig.from_dict({"K": 2.5})
    assert math.isclose(TrainConfig.from_dict({"lr": "1e-3"}).lr, 1e-3)


def test_final_evaluation_is_a_function_of_the_run_not_of_the_global_generator(mnist):
    from trainables.vae.train import final_evaluation

    trainer = train(small(max_epochs=1, warmup=0), mnist)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)          # another process's state: must not matter
        results.append(final_evaluation(trainer, samples=20))
    a, b = results
    assert a["test_ll"] == b["test_ll"] and a["test_elbo"] == b["test_elbo"]
    assert torch.equal(a["per_image_ll"], b["per_image_ll"])
    assert a["best_epoch"] == 1 and a["best_val_elbo"] == -trainer.progress.best_val_loss
    # The samples do come from the run's seed: another seed's generator gives another estimate.
    other = Trainer(small(max_epochs=1, warmup=0, seed=1), mnist)
    other.model.load_state_dict(trainer.model.state_dict())
    other.progress = trainer.progress
    assert final_evaluation(other, samples=20)["test_ll"] != a["test_ll"]
