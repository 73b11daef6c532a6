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


# -- the standard error of a test LL ------------------------------------------------------------
def test_the_standard_error_is_the_per_image_std_over_sqrt_n(mnist):
    import numpy as np

    from trainables.vae.catalog import standard_error
    from trainables.vae.train import final_evaluation

    values = [-90.0, -85.5, -120.25, -70.0, -101.0]
    assert standard_error(values) == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)), rel=1e-12)
    assert math.isnan(standard_error([-90.0]))                   # one image: no spread to measure
    final = final_evaluation(train(small(max_epochs=1, warmup=0), mnist), samples=20)
    per_image = final["per_image_ll"].double().numpy()
    assert final["test_ll_se"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(per_image.size), rel=1e-9)


# -- both choices of epoch from one run ----------------------------------------------------------
def feed(losses, val_lls=None, **kw) -> Progress:
    """Our Progress fed validation losses (and validation LLs, taken at the epochs that compute one)."""
    from trainables.vae.train import val_ll_due

    config = TrainConfig.from_dict({"max_epochs": len(losses), **kw})
    progress = Progress()
    for i, loss in enumerate(losses):
        progress.epoch += 1
        metrics = {"beta": kl_weight(progress.epoch, config.warmup), "train_loss": 1.0, "val_loss": loss}
        if val_lls is not None and val_ll_due(config, progress.epoch):
            metrics["val_ll"] = val_lls[i]
        progress.update(metrics, config)
        if progress.stop_reason is not None:
            break
    return progress


def test_a_run_keeps_refs_best_epoch_and_the_best_at_full_kl_weight():
    losses = [10, 5, 6, 7, 6.5, 6.8, 6.9, 7, 7.1]
    # REF's rule: epoch 2 (beta 0.5) is best; the counter starts at epoch 4 and passes 3 at epoch 7.
    # The best epoch at full KL weight among epochs 4..7 is epoch 5.
    p = feed(losses, warmup=4, early_stopping=3)
    assert (p.best_epoch, p.epoch, p.other_epoch) == (2, 7, 5)
    assert p.best_val_elbo == -5 and p.other_val_loss == 6.5
    # best_after_warmup: its own best is epoch 5 (it runs to epoch 9); the other choice is REF's, epoch 2.
    p = feed(losses, warmup=4, early_stopping=3, best_after_warmup=True)
    assert (p.best_epoch, p.epoch, p.other_epoch) == (5, 9, 2)


def scripted_validation(trainer, losses, monkeypatch):
    """The trainer's validation ELBO follows `losses` (epoch 1, 2, ...); the test ELBO is real."""
    script = iter(losses)
    real = trainer.evaluate_elbo

    def fake(x, noise=None):
        if x is not trainer.x_val:
            return real(x, noise)
        loss = next(script)
        return {"loss": loss, "elbo": -loss, "rec": 0.0, "kl": 0.0}

    monkeypatch.setattr(trainer, "evaluate_elbo", fake)


def snapshot(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_both_choices_are_tested_from_one_run_each_under_its_own_names(mnist, monkeypatch):
    from trainables.vae import train as train_module
    from trainables.vae.train import final_evaluation

    trainer = Trainer(small(warmup=4, early_stopping=3, max_epochs=50), mnist)
    scripted_validation(trainer, [100.0, 30.0, 60.0, 50.0, 45.0, 47.0, 48.0, 49.0], monkeypatch)
    weights = {}
    while not trainer.done:
        trainer.step()
        weights[trainer.epoch] = snapshot(trainer)
    assert (trainer.best_epoch, trainer.epoch, trainer.progress.other_epoch) == (2, 7, 5)
    trainer.finish()
    tests = []
    real = train_module.evaluate_test_ll
    monkeypatch.setattr(train_module, "evaluate_test_ll", lambda t, s, x: tests.append(1) or real(t, s, x))
    final = final_evaluation(trainer, samples=20)
    assert len(tests) == 2
    assert (final["best_epoch"], final["best_epoch_after_warmup"]) == (2, 5)
    assert (final["best_val_elbo"], final["best_val_elbo_after_warmup"]) == (-30.0, -45.0)
    # Each choice's figures are those of its epoch's weights tested alone, with the run's own draws.
    for epoch, suffix in ((2, ""), (5, "_after_warmup")):
        alone = Trainer(trainer.config, mnist)
        alone.model.load_state_dict(weights[epoch])
        ll, _, _ = real(alone, 20, alone.x_test)
        assert final[f"test_ll{suffix}"] == float(ll.mean())
        assert final[f"test_ll{suffix}_se"] == pytest.approx(float(ll.double().std()) / math.sqrt(ll.numel()))
    assert final["test_ll"] != final["test_ll_after_warmup"]
    # The tested weights are back: what the trial logs as its model is its own choice's.
    assert all(torch.equal(v, weights[2][k]) for k, v in trainer.model.state_dict().items())


def test_when_both_rules_pick_one_epoch_it_is_tested_once(mnist, monkeypatch):
    from trainables.vae import train as train_module
    from trainables.vae.train import final_evaluation

    trainer = Trainer(small(warmup=2, early_stopping=2, max_epochs=50), mnist)
    scripted_validation(trainer, [100.0, 60.0, 50.0, 55.0, 56.0, 57.0], monkeypatch)
    while not trainer.done:
        trainer.step()
    assert (trainer.best_epoch, trainer.progress.other_epoch) == (3, 3)
    assert trainer.other_state is trainer.best_state               # one copy of the weights
    trainer.finish()
    tests = []
    real = train_module.evaluate_test_ll
    monkeypatch.setattr(train_module, "evaluate_test_ll", lambda t, s, x: tests.append(1) or real(t, s, x))
    final = final_evaluation(trainer, samples=20)
    assert len(tests) == 1
    assert final["best_epoch_after_warmup"] == 3
    assert (final["test_ll_after_warmup"], final["test_ll_after_warmup_se"]) == (final["test_ll"], final["test_ll_se"])


def test_a_run_resumed_from_a_checkpoint_tests_both_choices_exactly_as_the_straight_run(mnist, monkeypatch):
    from trainables.vae.train import final_evaluation

    losses = [100.0, 30.0, 60.0, 50.0, 45.0, 47.0, 48.0, 49.0]
    cfg = small(warmup=4, early_stopping=3, max_epochs=50)
    straight = Trainer(cfg, mnist)
    scripted_validation(straight, losses, monkeypatch)
    while not straight.done:
        straight.step()
    straight.finish()
    want = final_evaluation(straight, samples=20)

    first = Trainer(cfg, mnist)
    scripted_validation(first, losses[:5], monkeypatch)
    for _ in range(5):                           # both bests (2 and 5) lie before the checkpoint
        first.step()
    state = first.state_dict()
    torch.manual_seed(12345)                     # a fresh process
    second = Trainer(cfg, mnist)
    second.load_state_dict(state)
    scripted_validation(second, losses[5:], monkeypatch)
    while not second.done:
        second.step()
    second.finish()
    got = final_evaluation(second, samples=20)
    keys = ["best_epoch", "test_ll", "test_ll_se", "best_epoch_after_warmup", "test_ll_after_warmup",
            "test_ll_after_warmup_se", "best_val_elbo_after_warmup"]
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert want["best_epoch_after_warmup"] == 5

    # A checkpoint from before the other choice was kept: it is not tested (its best is unknown).
    old = {k: v for k, v in state.items() if k not in ("other_state", "other_epoch", "other_val_loss",
                                                      "other_tracked", "best_val_elbo")}
    third = Trainer(cfg, mnist)
    third.load_state_dict(old)
    assert not third.progress.other_tracked and third.progress.best_val_elbo == -30.0
    scripted_validation(third, losses[5:], monkeypatch)
    while not third.done:
        third.step()
    third.finish()
    assert "test_ll_after_warmup" not in final_evaluation(third, samples=5)


# -- selection on the validation log-likelihood ---------------------------------------------------
def val_ll_oracle(val_lls, warmup, patience, every):
    """The documented rule, transcribed: the best validation LL among the epochs that compute one;
    the run stops at the first such epoch where more than `patience` epochs have passed since the
    best (counted from the warm-up's end, as REF counts). (best epoch, last epoch)."""
    n, best, best_epoch = len(val_lls), -math.inf, None
    for t in range(1, n + 1):
        if not (t % every == 0 or t == n):
            continue
        if val_lls[t - 1] > best:
            best, best_epoch = val_lls[t - 1], t
        elif patience and t - max(best_epoch or 0, warmup - 1) > patience:
            return best_epoch, t
    return best_epoch, n


def test_selection_on_the_validation_ll_follows_its_rule_on_random_values():
    rng = random.Random(1)
    for _ in range(400):
        warmup, patience = rng.randint(0, 8), rng.randint(1, 6)
        every = rng.randint(1, patience)
        n = rng.randint(1, 30)
        losses = [rng.random() + 10 for _ in range(n)]
        val_lls = [-rng.choice([1.0, 2.0]) * rng.random() - 10 for _ in range(n)]
        p = feed(losses, val_lls, warmup=warmup, early_stopping=patience, select_on="val_ll", val_ll_every=every)
        assert (p.best_epoch, p.epoch) == val_ll_oracle(val_lls, warmup, patience, every), (every, val_lls)
        # The other choice: REF's rule on the validation ELBO over the epochs trained.
        trained = losses[:p.epoch]
        assert p.other_epoch == trained.index(min(trained)) + 1
        if every == 1:     # every epoch: REF's own rule, on the validation LL
            assert (p.best_epoch, p.epoch) == ref_early_stopping([-v for v in val_lls], warmup, patience)


def test_selection_on_the_validation_ll_picks_its_best_epoch_and_stops_on_it(mnist, monkeypatch):
    from trainables.vae import train as train_module
    from trainables.vae.train import final_evaluation

    cfg = small(warmup=0, early_stopping=4, max_epochs=50, select_on="val_ll", val_ll_every=2, val_ll_samples=10)
    trainer = Trainer(cfg, mnist)
    # The validation ELBO is best at epoch 2, the validation LL at epoch 4.
    scripted_validation(trainer, [50.0, 40.0, 45.0, 46.0, 47.0, 48.0, 49.0, 50.0, 51.0, 52.0], monkeypatch)
    val_lls = iter([-60.0, -55.0, -57.0, -58.0, -59.0])
    real = train_module.validation_ll
    monkeypatch.setattr(train_module, "validation_ll",
                        lambda model, x, config: next(val_lls) if not trainer.done else real(model, x, config))
    logged, weights = {}, {}
    while not trainer.done:
        m = trainer.step()
        logged[m["epoch"]] = m.get("val_ll")
        weights[trainer.epoch] = snapshot(trainer)
    # Computed every 2 epochs; patience counts epochs: 4 < 6 = 10 - 4 at the next validation LL.
    assert {e: v for e, v in logged.items() if v is not None} == {2: -60.0, 4: -55.0, 6: -57.0, 8: -58.0, 10: -59.0}
    assert (trainer.best_epoch, trainer.epoch, trainer.stop_reason) == (4, 10, STOP_EARLY)
    assert "validation LL" in trainer.stop_detail
    assert trainer.progress.best_val_elbo == -46.0                 # the validation ELBO at epoch 4
    trainer.finish()
    assert all(torch.equal(v, weights[4][k]) for k, v in trainer.model.state_dict().items())
    final = final_evaluation(trainer, samples=10)
    assert (final["best_epoch"], final["best_epoch_ref_rule"]) == (4, 2)
    assert final["best_val_elbo"] == -46.0 and final["best_val_elbo_ref_rule"] == -40.0
    assert math.isfinite(final["best_val_ll"]) and math.isfinite(final["best_val_ll_ref_rule"])


def test_the_validation_ll_is_a_function_of_the_run_and_is_logged_at_the_last_epoch_too(mnist):
    from trainables.vae.evaluate import log_likelihood
    from trainables.vae.train import VAL_LL_SEED_OFFSET, final_evaluation, validation_ll

    cfg = small(warmup=0, max_epochs=3, select_on="val_ll", val_ll_every=2, val_ll_samples=10)
    history = []
    trainer = train(cfg, mnist, on_epoch=history.append)
    assert [("val_ll" in m) for m in history] == [False, True, True]          # every 2 epochs and the last
    values = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        values.append(validation_ll(trainer.model, trainer.x_val, cfg))
    generator = torch.Generator().manual_seed(cfg.seed + VAL_LL_SEED_OFFSET)
    want = float(log_likelihood(trainer.model, trainer.x_val, 10, generator=generator).mean())
    assert values == [want, want]
    # At the end, the tested weights' validation LL is the one the run chose them on.
    best = history[trainer.best_epoch - 1]["val_ll"]
    assert final_evaluation(trainer, samples=10)["best_val_ll"] == best


def test_the_selection_settings_are_checked_with_their_fix():
    from trainables.vae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trial.select_on: unknown choice 'val_lls'; choose one of \['elbo', 'val_ll'\]"):
        TrainConfig.from_dict({"select_on": "val_lls"})
    with pytest.raises(ConfigError, match=r"val_ll_every: 60 epochs is more than early_stopping \(50\).*"
                                          r"set val_ll_every <= 50"):
        TrainConfig.from_dict({"select_on": "val_ll", "val_ll_every": 60})
    with pytest.raises(ConfigError, match=r"val_ll_samples: must be >= 1, got 0"):
        TrainConfig.from_dict({"val_ll_samples": 0})
    assert TrainConfig().select_on == "elbo"                       # REF's rule is the default
