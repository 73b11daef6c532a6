"""Names every layer shares: why a trial stopped, what a trial reports, and the study's catalog.

One place for each, importable without torch (the report, the searcher and the CLI read it): the
library, the trainable, the driver, the searcher and the report all use these constants, never
their string values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

# -- why a trial stopped: the MLflow tag `stop_reason` and the trial's last Tune result ----------
STOP_COMPLETED = "completed"        # trained max_epochs
STOP_EARLY = "early_stopping"       # no better validation loss for `early_stopping` epochs
STOP_NAN = "nan"                    # the loss became NaN or infinite
STOP_SCHEDULER = "scheduler"        # a trial scheduler (ASHA, ...) stopped it; its name is a tag
STOP_ERROR = "error"                # the trial raised

ENDED_BY_ITSELF = frozenset({STOP_COMPLETED, STOP_EARLY})     # trained to its own end
FAILED = frozenset({STOP_NAN, STOP_ERROR})
# Older runs called every scheduler stop "asha".
LEGACY_STOP_REASONS = MappingProxyType({"asha": STOP_SCHEDULER})


def stop_reason(tag: str | None) -> str:
    """A run's `stop_reason` tag in today's names ('' when it has none)."""
    return LEGACY_STOP_REASONS.get(tag or "", tag or "")


# -- what a trial reports -------------------------------------------------------------------
# Every epoch, with the direction that means "better" (an ELBO is a log-likelihood bound, a loss
# is its negative): what a sweep may optimise.
EPOCH_METRICS: Mapping[str, str] = MappingProxyType({
    "val_elbo": "max",
    "val_loss": "min",
    "train_elbo": "max",
    "train_loss": "min",
})
METRIC_VAL_ELBO = "val_elbo"
METRIC_EPOCH = "epoch"
METRIC_EPOCH_SECONDS = "epoch_seconds"
# At the end of a trial.
METRIC_TEST_LL = "test_ll"                  # nats, importance sampling with test_samples
METRIC_TEST_BPD = "test_bits_per_dim"       # gray data
METRIC_BEST_EPOCH = "best_epoch"            # the epoch whose weights were tested
METRIC_BEST_VAL_ELBO = "best_val_elbo"      # the validation ELBO at best_epoch: what the tool chooses on
METRIC_TEST_SAMPLES = "test_samples"        # the importance samples S behind test_ll ...
METRIC_TEST_IMAGES = "test_images"          # ... and the test images it is the mean over (a declared estimate: fewer)
# A trial's Tune results also carry its MLflow run id (the searcher links its study trial to it).
RESULT_RUN_ID = "mlflow_run_id"


def rescored_metric(samples: int) -> str:
    """The metric of a test LL re-scored later with S samples (`sweeper evaluate`)."""
    return f"{METRIC_TEST_LL}_S{samples}"


# -- the study's catalog --------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetFacts:
    """What the report and the UI need to know of a dataset without loading it."""

    name: str
    likelihood: str                      # "bernoulli" or "logistic256"
    image_shape: tuple[int, int, int]    # (C, H, W)
    binarization: str | None             # "static", "dynamic" or None (gray)

    @property
    def input_dim(self) -> int:
        c, h, w = self.image_shape
        return c * h * w


# In the paper's order; trainables/vae/data.py registers a loader for each and takes these facts from here.
DATASETS: Mapping[str, DatasetFacts] = MappingProxyType({f.name: f for f in (
    DatasetFacts("static_mnist", "bernoulli", (1, 28, 28), "static"),
    DatasetFacts("dynamic_mnist", "bernoulli", (1, 28, 28), "dynamic"),
    DatasetFacts("fashion_mnist", "bernoulli", (1, 28, 28), "dynamic"),
    DatasetFacts("omniglot", "bernoulli", (1, 28, 28), "dynamic"),
    DatasetFacts("caltech101", "bernoulli", (1, 28, 28), "static"),
    DatasetFacts("frey_faces", "logistic256", (1, 28, 20), None),
)})
DATASET_ORDER = tuple(DATASETS)
MODEL_ORDER = ("vae", "hvae")
PRIOR_ORDER = ("standard", "vamp", "vamp_data", "mog")
# Priors that are mixtures of K components (pseudo-inputs for the VampPriors): K matters for these.
K_PRIORS = frozenset({"vamp", "vamp_data", "mog"})
# Likelihoods reported in bits/dim as well as nats.
BITS_PER_DIM_LIKELIHOODS = frozenset({"logistic256"})


def bits_per_dim(log_likelihood: Any, input_dim: int) -> Any:
    """Negative log-likelihood in nats -> bits per dimension (floats, arrays, tensors)."""
    return -log_likelihood / (input_dim * math.log(2.0))


def bits_per_dim_dim(dataset: str) -> int | None:
    """The D of bits/dim = -LL / (D ln 2) for datasets reported that way, else None."""
    facts = DATASETS.get(dataset)
    return facts.input_dim if facts and facts.likelihood in BITS_PER_DIM_LIKELIHOODS else None


# -- how values are shown (run names, tables, reports) ----------------------------------------
def short(value: Any, digits: int = 3) -> str:
    """A value as a person reads it: `digits` significant digits, no float noise.

    0.0023382678 -> '2.34e-3', 0.0005 -> '5e-4', 500 -> '500', 0.05 -> '0.05', 12.345 -> '12.3'.
    """
    if value is None or isinstance(value, (bool, str)):
        return "" if value is None else str(value)
    number = float(value)
    if not math.isfinite(number):
        return str(number)
    if number == int(number) and abs(number) < 1e6:
        return str(int(number))
    if 10**digits <= abs(number) < 1e6:
        return f"{number:.0f}"
    text = f"{number:.{digits - 1}e}" if abs(number) < 1e-2 else f"{number:.{digits}g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
