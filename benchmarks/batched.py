"""Many trials per GPU with batched weights: M VampPrior models trained at once in one process.

    PYTHONPATH=. python3 benchmarks/batched.py [--device cuda] [--models 1 8 32] [--epochs 2]

Each M builds one BatchedTrainer (trainables/vae/batched.py) of M VampPrior K=500 models (REF
architecture, batch 100, learning rates 5e-4 .. +2% per model, one seed each) on MNIST-sized
synthetic data resident on the device (50,000 training images; speed does not depend on the
pixels), warms up one epoch (on CUDA this captures the batched step as a CUDA graph), then times
`--epochs` training epochs (no validation, as benchmarks/concurrency.py). The figure is
M * epochs / seconds model-epochs/s per GPU, counted in 50,000-image epochs when a smoke run uses
fewer images; the paper's reference code does 0.21 on one H200
(10,500 samples/s / 50,000). Prints one JSON line per measurement. Needs only torch and numpy.
`--precision tf32` also times TF32 matmuls (not the identical-math figure), `--eager` the eager path.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from benchmarks.throughput import MNIST_TRAIN_IMAGES, REFERENCE_MODEL_EPOCHS_PER_S, sync, synthetic_mnist
from trainables.vae.batched import BatchedTrainer
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits


def measure(M: int, splits: Splits, device: torch.device, epochs: int, K: int, graphs: bool) -> dict:
    """Model-epochs/s of M batched VampPrior models over `epochs` timed training epochs."""
    configs = [TrainConfig(prior="vamp", K=K, lr=5e-4 * (1 + 0.02 * m), seed=m, batch_size=100, warmup=0,
                           max_epochs=epochs + 2, early_stopping=0, device=device.type, cuda_graphs=graphs)
               for m in range(M)]
    trainer = BatchedTrainer(configs, splits, device)
    betas = [1.0] * M
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer._train_epoch(betas)                # warm-up: graph capture, allocator, cuBLAS
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        means = trainer._train_epoch(betas)    # [M, 3] mean elbo, rec, kl
    sync(device)
    seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(means).all()):
        raise RuntimeError(f"non-finite training loss with {M} models: {means.tolist()}")
    n = trainer.x_train.shape[0]
    # Per MNIST-sized epoch (50,000 images), so a smoke run on fewer images is not flattered.
    rate = M * epochs * n / MNIST_TRAIN_IMAGES / seconds
    out = {"value": round(rate, 3), "x_reference": round(rate / REFERENCE_MODEL_EPOCHS_PER_S, 1),
           "models": M, "samples_per_s": round(M * epochs * n / seconds, 1),
           "seconds_per_epoch": round(seconds / epochs, 3), "epochs": epochs, "train_images": n, "K": K,
           "batch": 100, "mean_train_elbo": round(float(means[:, 0].mean()), 3)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", type=int, nargs="+", default=[1, 8, 32], help="M values to time")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    ap.add_argument("--train-images", type=int, default=None, help="default: 50,000 (GPU), 1,000 (CPU)")
    ap.add_argument("--K", type=int, default=500, help="pseudo-inputs per model")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "tf32"], default=["fp32"],
                    help="fp32: identical math; tf32: TF32 matmuls on CUDA (faster, ~1e-3 relative error)")
    ap.add_argument("--eager", action="store_true", help="also time the eager path (no CUDA graph)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n_train = args.train_images or (50_000 if gpu else 1_000)
    splits = synthetic_mnist(n_train, device)
    where = (torch.cuda.get_device_name(device) if gpu
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for precision in args.precision:
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        for graphs in ((True, False) if gpu and args.eager else (gpu,)):
            for M in args.models:
                label = f"batched,{M} models" + (",tf32" if precision == "tf32" else "") + ("" if graphs else ",eager")
                line = {"figure": f"model_epochs_per_s_per_gpu[{label}]"}
                try:
                    line.update(measure(M, splits, device, args.epochs, args.K, graphs))
                except torch.cuda.OutOfMemoryError as exc:   # report and go on with the next M
                    line.update({"value": None, "models": M, "error": f"out of memory: {exc}"[:300]})
                line.update({"device": where, "torch": torch.__version__})
                print(json.dumps(line), flush=True)
                if gpu:
                    torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    main()
