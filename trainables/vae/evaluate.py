"""Evaluation: importance-sampled log-likelihood, test ELBO, active units, image grids.

The log-likelihood is batched over many images x many samples per forward pass and chunked to
a memory budget: the encoder runs once per image, the prior's components once per call.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from trainables.vae.model import LatentVariableModel

# Default activation memory per forward pass of the importance sampler.
DEFAULT_MEMORY_MB = {"cpu": 256, "cuda": 4096}


def _rows_per_pass(model: LatentVariableModel, device: torch.device, memory_mb: int | None) -> int:
    """How many (image, sample) rows fit in one forward pass."""
    budget = (memory_mb or DEFAULT_MEMORY_MB.get(device.type, 1024)) * 2**20
    K = getattr(model.prior, "K", 0)
    # float32 activations per row: gated layers (2H in, H out, x2), the D-wide decoder output and
    # its log-probability terms, the [row, K] prior matrix and its logsumexp, the latents.
    floats_per_row = 8 * model.hidden_dim + 4 * model.input_dim + 3 * K + 8 * model.latent_dim
    if model.name == "hvae":
        floats_per_row += 12 * model.hidden_dim
    return max(1, budget // (4 * floats_per_row))


@torch.no_grad()
def log_likelihood(model: LatentVariableModel, x: Tensor, samples: int = 5000, *,
                   memory_mb: int | None = None, compile: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """Importance-sampled log p(x) in nats, [N]: logsumexp_s log w_s - log S, z_s ~ q(z|x).

    `generator` (on x's device) draws the samples' noise, so the estimate is a function of the
    model, x and the generator's seed alone (default: torch's global generator).
    `compile=True` (CUDA only) fuses each pass's element-wise work with torch.compile; every
    pass then has the same shape (the last images are padded), so it compiles once.
    """
    was_training = model.training
    model.eval()
    rows = _rows_per_pass(model, x.device, memory_mb)
    images_per_pass = max(1, rows // samples)
    samples_per_pass = min(samples, rows)
    log_weights = model.importance_log_weights
    compile = compile and x.device.type == "cuda"
    if compile:
        log_weights = _compiled_or_eager(model)
    out = torch.empty(x.shape[0], device=x.device, dtype=x.dtype)
    try:
        with model.prior.cached():
            for i in range(0, x.shape[0], images_per_pass):
                xb = x[i:i + images_per_pass]                          # [b, D]
                b = xb.shape[0]
                if compile and b < images_per_pass and i > 0:           # same shape as every pass
                    xb = torch.cat([xb, x[: images_per_pass - b]])
                parts = []
                for s in range(0, samples, samples_per_pass):
                    n = min(samples_per_pass, samples - s)
                    noise = (torch.randn(xb.shape[0], n, model.noise_dim, device=x.device, dtype=x.dtype,
                                         generator=generator) if generator is not None else None)
                    log_w = log_weights(xb, n, noise)                 # [b, n]
                    parts.append(torch.logsumexp(log_w, dim=1))
                ll = torch.logsumexp(torch.stack(parts, 1), 1) - math.log(samples)
                out[i:i + b] = ll[:b]
    finally:
        model.train(was_training)
    return out


def _compiled_or_eager(model: LatentVariableModel):
    """torch.compile'd importance weights, or the eager ones where compiling fails (no compiler)."""
    compiled = torch.compile(model.importance_log_weights, dynamic=False)
    state = {"fn": compiled}

    def call(x: Tensor, samples: int, noise: Tensor | None = None) -> Tensor:
        try:
            return state["fn"](x, samples, noise)
        except Exception as exc:  # inductor raises many types; eager gives the same numbers
            if state["fn"] is not compiled:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); using eager mode", stacklevel=2)
            state["fn"] = model.importance_log_weights
            return state["fn"](x, samples, noise)

    return call


@torch.no_grad()
def elbo(model: LatentVariableModel, x: Tensor, *, batch_size: int = 1000,
         noise: Tensor | None = None) -> dict[str, Tensor]:
    """Per-example ELBO, reconstruction term and KL at beta = 1: dict of [N]. `noise`
    [N, 1, noise_dim] fixes each image's sample (default: drawn from the global generator)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {"elbo": [], "rec": [], "kl": []}
    try:
        with model.prior.cached():
            for i in range(0, x.shape[0], batch_size):
                terms = model.elbo(x[i:i + batch_size], 1.0,
                                   noise[i:i + batch_size] if noise is not None else None)
                for key in parts:
                    parts[key].append(terms[key])
    finally:
        model.train(was_training)
    return {key: torch.cat(values) for key, values in parts.items()}


@torch.no_grad()
def active_units(model: LatentVariableModel, x: Tensor, *, threshold: float = 0.01,
                 batch_size: int = 1000) -> dict[str, int]:
    """Latent units u with Cov_x(E_q[u|x]) > threshold, per latent layer (Burda et al.)."""
    was_training = model.training
    model.eval()
    try:
        chunks = [model.latent_means(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    counts = {}
    for name in chunks[0]:
        means = torch.cat([c[name] for c in chunks]).double()   # [N, Z]
        counts[name] = int((means.var(dim=0, unbiased=False) > threshold).sum())
    return counts


# Grids for people (the MLflow UI, the report) are at least this wide: a 10x10 grid of 28x28
# images is 291 px, enlarged 2x with nearest-neighbour pixels.
DISPLAY_WIDTH = 560


def display_grid(images: Tensor | np.ndarray, image_shape: tuple[int, ...], ncol: int | None = None,
                 min_width: int = DISPLAY_WIDTH) -> np.ndarray:
    """`image_grid` enlarged by a whole factor (nearest neighbour: sharp pixels) to >= min_width px.
    Values map [0, 1] -> [0, 255] (black..white) the same way in every grid: no per-image scaling."""
    grid = image_grid(images, image_shape, ncol)
    factor = max(1, math.ceil(min_width / grid.shape[1]))
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def display_strip(images: Tensor | np.ndarray, image_shape: tuple[int, ...], scale: int = 2) -> np.ndarray:
    """One row of images for a glance (a run's description), each stretched to its own full
    black..white range and set apart by white lines, enlarged `scale` times. Unlike `display_grid`
    the gray levels of two images are not comparable: learned pseudo-inputs are often dark and
    low in contrast, and a strip a few pixels high showed nothing of them."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images, dtype=float)
    n = arr.shape[0]
    low, high = arr.min(axis=1, keepdims=True), arr.max(axis=1, keepdims=True)
    stretched = (arr - low) / np.where(high > low, high - low, 1.0)
    grid = 255 - image_grid(1.0 - stretched, image_shape, ncol=n)    # the padding white, not black
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def image_grid(images: Tensor | np.ndarray, image_shape: tuple[int, ...], ncol: int | None = None,
               pad: int = 1) -> np.ndarray:
    """[N, D] images in [0, 1] -> one uint8 grayscale grid [rows*(H+pad)+pad, ncol*(W+pad)+pad]."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    h, w = image_shape[-2], image_shape[-1]
    n = arr.shape[0]
    ncol = ncol or max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    pixels = np.clip(np.rint(arr.reshape(n, h, w) * 255.0), 0, 255).astype(np.uint8)
    # Pad every cell on its top/left, tile them, then close the grid on the bottom/right.
    cells = np.zeros((nrow * ncol, h + pad, w + pad), dtype=np.uint8)
    cells[:n, pad:, pad:] = pixels
    grid = cells.reshape(nrow, ncol, h + pad, w + pad).transpose(0, 2, 1, 3)
    grid = grid.reshape(nrow * (h + pad), ncol * (w + pad))
    return np.pad(grid, ((0, pad), (0, pad)))
