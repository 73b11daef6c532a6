"""The CUDA fast path (the training step replayed as a CUDA graph) against the plain path.

Runs where CUDA is present; skipped with a reason elsewhere (CI has no GPU).
"""

import math

import pytest
import torch

from trainables.vae.config import TrainConfig
from trainables.vae.data import DatasetInfo, Splits
from trainables.vae.evaluate import log_likelihood
from trainables.vae.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def synthetic(n_train: int, binarization: str = "static") -> Splits:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 784, generator=g) * 0.5

    def draw(n):
        gray = probs.expand(n, 784) * torch.rand(n, 1, generator=g) * 2
        return gray.clamp(0, 1) if binarization == "dynamic" else torch.bernoulli(gray.clamp(0, 1), generator=g)

    info = DatasetInfo("synthetic", "bernoulli", (1, 28, 28), 784, binarization, (0.05, 0.01), (n_train, 300, 300))
    return Splits(draw(n_train), draw(300), draw(300), info)


def losses(cfg: TrainConfig, splits: Splits, epochs: int) -> list[tuple[float, float]]:
    trainer = Trainer(cfg, splits, "cuda")
    return [(m["train_loss"], m["val_loss"]) for m in (trainer.step() for _ in range(epochs))]


@pytest.mark.parametrize("model,prior,binarization,optimizer", [
    ("vae", "vamp", "static", "adam"),
    ("vae", "standard", "dynamic", "adam"),
    ("hvae", "vamp", "dynamic", "adam_normgrad"),
    ("vae", "mog", "static", "adam"),
])
def test_graphed_training_gives_the_same_losses_as_the_plain_path(model, prior, binarization, optimizer):
    splits = synthetic(1050, binarization)    # 10 full batches and a partial one
    base = dict(model=model, prior=prior, K=50, latent_dim=16, hidden_dim=128, warmup=2, max_epochs=10,
                early_stopping=0, optimizer=optimizer, seed=7, device="cuda")
    fast = losses(TrainConfig(**base, cuda_graphs=True), splits, 3)
    plain = losses(TrainConfig(**base, cuda_graphs=False), splits, 3)
    for (ft, fv), (pt, pv) in zip(fast, plain):
        assert math.isclose(ft, pt, rel_tol=1e-4, abs_tol=1e-3), (fast, plain)
        assert math.isclose(fv, pv, rel_tol=1e-4, abs_tol=1e-3), (fast, plain)
    assert fast[-1][0] < fast[0][0]


def test_graphed_training_resumes_from_a_checkpoint_exactly():
    splits = synthetic(1000)
    cfg = TrainConfig(prior="vamp", K=50, latent_dim=16, hidden_dim=128, warmup=0, max_epochs=10, seed=3)
    straight = Trainer(cfg, splits, "cuda")
    full = [straight.step()["train_loss"] for _ in range(4)]
    first = Trainer(cfg, splits, "cuda")
    part = [first.step()["train_loss"] for _ in range(2)]
    state = first.state_dict()            # before the next Trainer reseeds the global RNGs
    second = Trainer(cfg, splits, "cuda")
    second.load_state_dict(state)
    part += [second.step()["train_loss"] for _ in range(2)]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(part, full)), (part, full)


@pytest.mark.parametrize("compile", [False, True])
def test_log_likelihood_on_the_gpu_equals_numerical_integration(compile):
    from test_evaluate import exact_log_p_x, widen_proposals

    from trainables.vae.model import build_model

    torch.manual_seed(0)
    model = build_model("vae", "vamp", input_shape=(1, 2, 3), latent_dim=1, hidden_dim=8, K=3,
                        pseudo_init=(0.5, 0.3))
    widen_proposals(model)
    x = torch.bernoulli(torch.full((7, 6), 0.4))
    exact = exact_log_p_x(model.double(), x.double()).float()
    gpu = log_likelihood(model.float().cuda(), x.cuda(), 20000, memory_mb=1, compile=compile).cpu()
    assert torch.allclose(gpu, exact, atol=0.05), (gpu - exact).abs().max()


def test_a_trial_pool_on_cuda_batches_rebuilds_and_hands_states_to_trainers():
    """The pooled sweep path on a GPU: graphed rounds, a joiner (rebuild and a new graph), and a
    slot state that a CUDA Trainer loads and evaluates (how pooled trials are finalized)."""
    from trainables.pool import TrialPool

    splits = synthetic(400)
    cfg = {"prior": "vamp", "K": 20, "batch_size": 100, "warmup": 2, "max_epochs": 10, "early_stopping": 0}
    pool = TrialPool("cuda", splits=splits)
    pool.join("a", TrainConfig(**cfg, lr=1e-3, seed=0))
    pool.join("b", TrainConfig(**{**cfg, "K": 30}, lr=2e-3, seed=1))
    key = pool.group_of("a")
    for _ in range(2):
        out = pool.run_round(key)
    assert {t: m["epoch"] for t, m in out.items()} == {"a": 2, "b": 2}
    assert pool.groups[key].trainer._graph is not None            # the rounds were graph replays
    pool.join("c", TrainConfig(**cfg, lr=5e-4, seed=2))
    out = pool.run_round(key)
    assert {t: m["epoch"] for t, m in out.items()} == {"a": 3, "b": 3, "c": 1}
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) for m in out.values())
    state = pool.state("b")
    trainer = Trainer(TrainConfig(**{**cfg, "K": 30}, lr=2e-3, seed=1), splits, "cuda")
    trainer.load_state_dict(state)
    group = pool.groups[key]
    slot = group.trainer.extract(group.slots.index("b")).state_dict()
    for name, p in trainer.model.named_parameters():                # the slot's weights, on CUDA
        assert torch.equal(p, slot[name]), name
    assert trainer.step()["epoch"] == 4                              # and it trains on alone
