"""Layers point one way: the VAE library imports nothing from `sweeper` or the rest of
`trainables`; the trainable layer imports nothing from `sweeper`; the shared names import
without torch. Each check runs in a fresh interpreter in which the forbidden packages cannot be
imported at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_blocking(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    """Run `code` with every import of a `blocked` package (or its submodules) failing."""
    prelude = textwrap.dedent(f"""
        import sys
        BLOCKED = {blocked!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_vae_library_stands_on_its_own_and_trains_without_sweeper_or_the_trainables():
    result = run_blocking(["sweeper", "trainables.pool", "trainables.vae_trainable", "trainables.tracking",
                           "ray", "mlflow", "optuna"], """
        import pkgutil, importlib, torch
        import trainables.vae as lib
        names = [m.name for m in pkgutil.iter_modules(lib.__path__)]
        for name in names:
            importlib.import_module(f"trainables.vae.{name}")
        from trainables.vae.batched import BatchedTrainer
        from trainables.vae.config import TrainConfig
        from trainables.vae.data import DatasetInfo, Splits
        from trainables.vae.train import Trainer
        x = (torch.rand(60, 6) > 0.5).float()
        info = DatasetInfo("toy", "bernoulli", (1, 2, 3), 6, "static", (0.5, 0.1), (60, 60, 60))
        splits = Splits(x, x, x, info)
        cfg = TrainConfig(prior="vamp", K=3, latent_dim=2, hidden_dim=8, batch_size=20, max_epochs=1, device="cpu")
        assert Trainer(cfg, splits, "cpu").step()["epoch"] == 1
        assert BatchedTrainer([cfg, cfg], splits, "cpu").step()[1]["epoch"] == 1
        print("ok", sorted(names))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout and "batched" in result.stdout and "catalog" in result.stdout


def test_the_trainable_layer_imports_nothing_from_sweeper():
    result = run_blocking(["sweeper"], """
        import trainables.tracking, trainables.pool, trainables.vae_trainable
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_shared_names_the_searcher_the_spec_and_the_report_import_without_torch():
    result = run_blocking(["torch"], """
        import trainables.vae.catalog as catalog
        import sweeper.spec, sweeper.search, sweeper.report, sweeper.errors
        assert catalog.STOP_SCHEDULER == "scheduler" and "val_elbo" in catalog.EPOCH_METRICS
        assert sweeper.spec.REPORTED_METRICS is catalog.EPOCH_METRICS
        assert catalog.bits_per_dim_dim("frey_faces") == 560
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
