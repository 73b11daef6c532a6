"""The VAE library behind the trainables: datasets, models, priors, likelihoods, training, evaluation.

    from trainables.vae import build_model, load_dataset
"""

from trainables.vae.data import Splits, load_dataset
from trainables.vae.model import build_model

__all__ = ["Splits", "build_model", "load_dataset"]
