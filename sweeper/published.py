"""Published test log-likelihoods of the VampPrior study, with their sources: what reports compare with.

Nats, higher is better. Sources are cited in full in ../shared/REFERENCE.md and
results/*/report.md; "(unverified)" marks a number that could not be read in its source here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedLL:
    dataset: str
    model: str
    prior: str
    ll: float          # nats
    source: str        # "paper", "REF re-run", "Exemplar VAE re-runs", "SEED", ...


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
    PublishedLL("frey_faces", "vae", "standard", -1799.27, "REF re-run (RobertYCXu/vae_vampprior)"),
    PublishedLL("frey_faces", "vae", "vamp", -1760.84, "REF re-run (RobertYCXu/vae_vampprior)"),
    PublishedLL("frey_faces", "hvae", "standard", -1795.56, "REF re-run (RobertYCXu/vae_vampprior)"),
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
