"""Published test log-likelihoods of the VampPrior study, with their sources: what reports compare with.

Nats, higher is better. Sources are cited in full in ../shared/REFERENCE.md and
results/*/report.md; "(unverified)" marks a number that could not be read in its source here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Ours and a reference are "consistent" when they differ by at most this many combined standard errors.
CONSISTENT_SE = 2.0
# Why REF's Frey Faces numbers were measured on other test images than ours (data.FreyFaces: a
# seeded shuffle, SPLIT_SEED).
FREY_REF_SPLIT = ("REF shuffles Frey Faces with an unseeded generator before splitting, so its 200 test images "
                  "are another random 200 of the 1965 than ours (a seeded shuffle)")


@dataclass(frozen=True)
class PublishedLL:
    dataset: str
    model: str
    prior: str
    ll: float          # nats
    source: str        # "paper", "REF re-run", "Exemplar VAE re-runs", "SEED", ...
    split: str = ""    # how its test images differ from ours; "" where they are the same as far as known


PUBLISHED: tuple[PublishedLL, ...] = (
    # static MNIST: the paper, re-runs of its reference code (REF), pythae, the SEED study.
    PublishedLL("static_mnist", "vae", "standard", -88.56, "paper (unverified)"),
    PublishedLL("static_mnist", "vae", "standard", -88.48, "REF re-run"),
    PublishedLL("static_mnist", "vae", "standard", -93.08, "SEED (1000 epochs)"),
    PublishedLL("static_mnist", "vae", "vamp", -85.57, "paper"),
    PublishedLL("static_mnist", "vae", "vamp", -85.81, "REF re-run (K=500)"),
    PublishedLL("static_mnist", "vae", "vamp", -85.79, "pythae re-run"),
    PublishedLL("static_mnist", "vae", "vamp", -88.72, "SEED (1000 epochs)"),
    PublishedLL("static_mnist", "vae", "vamp_data", -90.85, "SEED (1000 epochs)"),
    PublishedLL("static_mnist", "hvae", "standard", -86.02, "REF re-run"),
    PublishedLL("static_mnist", "hvae", "vamp", -83.19, "paper (unverified)"),
    PublishedLL("static_mnist", "hvae", "vamp", -84.95, "REF re-run"),
    # dynamic MNIST, Fashion-MNIST, OMNIGLOT: re-runs published with the Exemplar VAE.
    PublishedLL("dynamic_mnist", "vae", "standard", -84.45, "Exemplar VAE re-runs"),
    PublishedLL("dynamic_mnist", "hvae", "standard", -82.39, "Exemplar VAE re-runs"),
    PublishedLL("dynamic_mnist", "vae", "vamp", -82.43, "Exemplar VAE re-runs"),
    PublishedLL("dynamic_mnist", "hvae", "vamp", -81.56, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "vae", "standard", -228.70, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "hvae", "standard", -227.37, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "vae", "vamp", -227.35, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "hvae", "vamp", -226.72, "Exemplar VAE re-runs"),
    PublishedLL("fashion_mnist", "vae", "standard", -235.32, "SEED (1000 epochs)"),
    PublishedLL("fashion_mnist", "vae", "vamp", -231.94, "SEED (1000 epochs)"),
    PublishedLL("fashion_mnist", "vae", "vamp_data", -232.79, "SEED (1000 epochs)"),
    PublishedLL("omniglot", "vae", "standard", -108.34, "Exemplar VAE re-runs"),
    PublishedLL("omniglot", "hvae", "standard", -104.92, "Exemplar VAE re-runs"),
    PublishedLL("omniglot", "vae", "vamp", -106.78, "Exemplar VAE re-runs"),
    PublishedLL("omniglot", "hvae", "vamp", -103.30, "Exemplar VAE re-runs"),
    # Frey Faces: the SEED study, and a public re-run of REF (RobertYCXu/vae_vampprior, metric.txt,
    # which prints -LL in nats: 1799.27 = 4.64 bits/dim, the scale of the paper's bits/dim column).
    PublishedLL("frey_faces", "vae", "standard", -1799.27, "REF re-run (RobertYCXu/vae_vampprior)", FREY_REF_SPLIT),
    PublishedLL("frey_faces", "vae", "vamp", -1760.84, "REF re-run (RobertYCXu/vae_vampprior)", FREY_REF_SPLIT),
    PublishedLL("frey_faces", "hvae", "standard", -1795.56, "REF re-run (RobertYCXu/vae_vampprior)", FREY_REF_SPLIT),
    PublishedLL("frey_faces", "vae", "standard", -2281.16, "SEED (1000 epochs)"),
    PublishedLL("frey_faces", "vae", "vamp", -2257.76, "SEED (1000 epochs)"),
    PublishedLL("frey_faces", "vae", "vamp_data", -2286.52, "SEED (1000 epochs)"),
    # Caltech 101 Silhouettes: the SEED study; the paper's 2-level VampPrior (Table 2, quoted
    # second-hand: the table itself could not be read here).
    PublishedLL("caltech101", "vae", "standard", -137.32, "SEED (1000 epochs)"),
    PublishedLL("caltech101", "vae", "vamp", -135.15, "SEED (1000 epochs)"),
    PublishedLL("caltech101", "vae", "vamp_data", -142.02, "SEED (1000 epochs)"),
    PublishedLL("caltech101", "hvae", "vamp", -108.28, "paper Table 2 (quoted second-hand)"),
)


def published_for(dataset: str, model: str, prior: str) -> list[PublishedLL]:
    return [p for p in PUBLISHED if (p.dataset, p.model, p.prior) == (dataset, model, prior)]


def published_ll(dataset: str, model: str, prior: str) -> PublishedLL | None:
    """The number to compare with: the paper's where it has one, else the first listed; or None."""
    found = published_for(dataset, model, prior)
    papers = [p for p in found if p.source.startswith("paper")]
    return (papers or found or [None])[0]


def best_reference(dataset: str, model: str, prior: str) -> PublishedLL | None:
    """The highest sourced log-likelihood for (dataset, model, prior), or None."""
    found = published_for(dataset, model, prior)
    return max(found, key=lambda p: p.ll) if found else None


# -- comparing ours with a reference -----------------------------------------------------------
CONSISTENT = "consistent"
ABOVE = "above"
BELOW = "below"
SE_UNKNOWN = "SE unknown"

COMPARISON_RULE = (
    f"'{CONSISTENT}' where |ours − reference| is at most {CONSISTENT_SE:g} combined standard errors, "
    "sqrt(SE_ours² + SE_ref²), else 'above' or '⚠ below' with the difference in combined SEs. SE_ours is the "
    "standard error of our number: a run's SE is the per-image test LL's std (ddof=1) / sqrt(N test images); "
    "a row of several seeds combines its typical per-run SE with the seeds' spread (std / sqrt(n seeds)). "
    "SE_ref: references publish none; a mean over a test set of the same size from the same data has about our "
    "per-run SE, which stands in for it (the reference's own seed-to-seed spread, unknown, is left out; where both "
    "were tested on the same images part of the difference's noise is shared, so the rule errs towards "
    f"'{CONSISTENT}'). Without an SE (an older run without per_image_ll.csv) no verdict is given")


@dataclass(frozen=True)
class Comparison:
    """Ours against one reference: the difference (nats, ours − reference), its combined standard
    error and the verdict (CONSISTENT, ABOVE, BELOW or SE_UNKNOWN)."""

    reference: PublishedLL
    diff: float
    se: float
    verdict: str

    @property
    def flag(self) -> bool:
        """Ours is below the reference by more than CONSISTENT_SE combined standard errors."""
        return self.verdict == BELOW

    @property
    def z(self) -> float:
        """The difference in combined standard errors."""
        return self.diff / self.se if self.se > 0 else math.nan

    def text(self) -> str:
        """'⚠ 5.20 nats below -85.57 (paper): 6.1 combined SE (0.85)', 'consistent with ...: −2.21 nats, 0.1 SE'."""
        ref = f"{self.reference.ll:.2f} ({self.reference.source})"
        if self.verdict == SE_UNKNOWN:
            side = "below" if self.diff < 0 else "above"
            out = f"{abs(self.diff):.2f} nats {side} {ref}; SE unknown: no verdict"
        elif self.verdict == CONSISTENT:
            out = f"consistent with {ref}: {self.diff:+.2f} nats, {abs(self.z):.1f} combined SE ({self.se:.2f})"
        else:
            out = (f"{'⚠ ' if self.flag else ''}{abs(self.diff):.2f} nats {self.verdict} {ref}: "
                   f"{abs(self.z):.1f} combined SE ({self.se:.2f})")
        if self.reference.split:
            out += f"; other test images: {self.reference.split}"
        return out


def compare(ours: float, ours_se: float, reference: PublishedLL, reference_se: float) -> Comparison:
    """Ours (with the standard error of our number) against a reference (with its standard error):
    CONSISTENT within CONSISTENT_SE combined SEs (COMPARISON_RULE), else ABOVE or BELOW; SE_UNKNOWN
    when either SE is not a finite number."""
    diff = ours - reference.ll
    se = math.sqrt(ours_se ** 2 + reference_se ** 2)
    if not math.isfinite(se):
        return Comparison(reference, diff, math.nan, SE_UNKNOWN)
    if abs(diff) <= CONSISTENT_SE * se:
        return Comparison(reference, diff, se, CONSISTENT)
    return Comparison(reference, diff, se, ABOVE if diff > 0 else BELOW)
