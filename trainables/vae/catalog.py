"""Names every layer shares: why a trial stopped, what a trial reports, and the study's catalog.

One place for each, importable without torch (the report, the searcher and the CLI read it): the
library, the trainable, the driver, the searcher and the report all use these constants, never
their string values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

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
# The importance-sampled validation log-likelihood (nats, S = val_ll_samples): per epoch where
# `select_on: val_ll` computes it, and at the end for the tested weights (best_val_ll).
METRIC_VAL_LL = "val_ll"
METRIC_BEST_VAL_LL = "best_val_ll"


def se_metric(ll_metric: str) -> str:
    """The standard error beside a mean log-likelihood metric: test_ll -> test_ll_se."""
    return f"{ll_metric}_se"


METRIC_TEST_LL_SE = se_metric(METRIC_TEST_LL)   # the per-image LL's std (ddof=1) / sqrt(N test images)


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of `values`: their std (ddof=1) / sqrt(n); NaN for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def rescored_metric(samples: int) -> str:
    """The metric of a test LL re-scored later with S samples (`sweeper evaluate`)."""
    return f"{METRIC_TEST_LL}_S{samples}"


# -- which epoch's weights are tested --------------------------------------------------------
# What the tested epoch and early stopping are chosen on (TrainConfig.select_on).
SELECT_ELBO = "elbo"        # REF: the validation ELBO (beta = 1) after every epoch
SELECT_VAL_LL = "val_ll"    # the importance-sampled validation LL, every val_ll_every epochs
SELECT_ON = (SELECT_ELBO, SELECT_VAL_LL)
# Every run also tests one other choice of epoch from the same training, on the validation ELBO:
# REF's rule (the best at any epoch, warm-up included) or, when the run's own rule is REF's,
# the best epoch at full KL weight (beta = 1: what `best_after_warmup: true` restores).
CHOICE_REF_RULE = "ref_rule"
CHOICE_AFTER_WARMUP = "after_warmup"
CHOICE_WORDS: Mapping[str, str] = MappingProxyType({
    CHOICE_REF_RULE: "REF's rule (the best validation ELBO at any epoch, warm-up included)",
    CHOICE_AFTER_WARMUP: "the best validation ELBO at full KL weight (beta = 1, as best_after_warmup: true)",
})
# The same in a few words: a run's description keeps its first line short.
CHOICE_LABELS: Mapping[str, str] = MappingProxyType({
    CHOICE_REF_RULE: "REF's rule",
    CHOICE_AFTER_WARMUP: "best at full KL weight",
})


def other_choice(select_on: str, best_after_warmup: bool) -> str:
    """The other choice of epoch a run with this rule also tests (CHOICE_*)."""
    return CHOICE_AFTER_WARMUP if select_on == SELECT_ELBO and not best_after_warmup else CHOICE_REF_RULE


def choice_metric(metric: str, choice: str) -> str:
    """A final metric of the other choice of epoch: test_ll -> test_ll_after_warmup,
    best_epoch -> best_epoch_ref_rule; its SE is se_metric of it (test_ll_after_warmup_se)."""
    return f"{metric}_{choice}"


def other_choice_metrics(choice: str) -> dict[str, str]:
    """The final metrics a run logs for its other choice of epoch, by the own choice's name:
    {test_ll: test_ll_after_warmup, test_ll_se: test_ll_after_warmup_se, best_epoch: ..., ...}."""
    names = {m: choice_metric(m, choice) for m in (METRIC_TEST_LL, METRIC_TEST_BPD, METRIC_BEST_EPOCH,
                                                   METRIC_BEST_VAL_ELBO, METRIC_BEST_VAL_LL)}
    names[METRIC_TEST_LL_SE] = se_metric(names[METRIC_TEST_LL])
    return names


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
