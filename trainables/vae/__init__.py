"""The VAE library behind the trainables: datasets, models, priors, likelihoods, training, evaluation.

    from trainables.vae import build_model, load_dataset

The names below load on first use, so `trainables.vae.catalog` (shared names, no torch) can be
imported without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Splits": "trainables.vae.data", "load_dataset": "trainables.vae.data",
         "build_model": "trainables.vae.model"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainables.vae' has no attribute {name!r}")
