"""Training throughput and test log-likelihood time of the VAE core.

    python benchmarks/throughput.py [--device cpu|cuda] [--ll-images N]

MNIST-sized binary data (synthetic Bernoulli images with the MNIST mean, so the benchmark runs
where the datasets are not; speed does not depend on the pixels). Prints one JSON line per
figure. The LL is timed on `--ll-images` images (default: all 10,000 on a GPU, 40 on a CPU)
and extrapolated to 10,000 images when fewer are used.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from trainables.vae.config import TrainConfig
from trainables.vae.data import DatasetInfo, Splits
from trainables.vae.evaluate import log_likelihood
from trainables.vae.train import Trainer


# Many-trial figures are model-epochs/s in MNIST-sized epochs; the paper's reference code trains
# 10,500 samples/s on one H200 (../shared/REFERENCE.md), i.e. 0.21 model-epochs/s.
MNIST_TRAIN_IMAGES = 50_000
REFERENCE_MODEL_EPOCHS_PER_S = 10_500 / MNIST_TRAIN_IMAGES


def synthetic_mnist(n_train: int, device: torch.device) -> Splits:
    g = torch.Generator().manual_seed(0)
    p = torch.full((1, 784), 0.13)   # MNIST's mean pixel intensity

    def draw(n: int) -> torch.Tensor:
        return torch.bernoulli(p.expand(n, 784), generator=g)

    info = DatasetInfo(name="synthetic_mnist", likelihood="bernoulli", image_shape=(1, 28, 28),
                       input_dim=784, binarization="static", pseudo_init=(0.05, 0.01),
                       split_sizes=(n_train, 1000, 10000))
    return Splits(train=draw(n_train), val=draw(1000), test=draw(10000), info=info)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(prior: str, splits: Splits, device: torch.device, epochs: int,
                     cuda_graphs: bool = True) -> float:
    cfg = TrainConfig(dataset="static_mnist", prior=prior, K=500, batch_size=100, warmup=0,
                      max_epochs=epochs + 1, early_stopping=0, device=device.type, cuda_graphs=cuda_graphs)
    trainer = Trainer(cfg, splits, device)
    trainer._train_epoch(1.0)                  # warm-up: allocator, kernels, thread pools
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        trainer._train_epoch(1.0)
    sync(device)
    return epochs * trainer.x_train.shape[0] / (time.perf_counter() - t0)


def ll_seconds(splits: Splits, device: torch.device, n_images: int, samples: int,
               compile: bool = False) -> tuple[float, float]:
    """(seconds, mean LL) of the test log-likelihood of `n_images` images."""
    cfg = TrainConfig(dataset="static_mnist", prior="vamp", K=500, device=device.type)
    torch.manual_seed(0)
    model = Trainer(cfg, splits, device).model
    x = splits.test[:n_images].to(device)
    log_likelihood(model, x[: min(n_images, 200)], samples, compile=compile)   # warm-up / compile
    sync(device)
    t0 = time.perf_counter()
    ll = log_likelihood(model, x, samples, compile=compile)
    sync(device)
    assert torch.isfinite(ll).all()
    return time.perf_counter() - t0, float(ll.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-images", type=int, default=None, help="images per timed epoch")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--ll-images", type=int, default=None)
    ap.add_argument("--ll-samples", type=int, default=5000)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd LL (CUDA)")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n_train = args.train_images or (50000 if gpu else 5000)
    epochs = args.epochs or (3 if gpu else 1)
    splits = synthetic_mnist(n_train, device)
    where = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    common = {"device": where, "torch": torch.__version__}
    for graphs in (() if args.skip_train else (True, False) if gpu else (False,)):
        for prior in ("standard", "vamp"):
            sps = train_throughput(prior, splits, device, epochs, graphs)
            label = f"{prior}{'' if prior == 'standard' else ',K=500'}{',cuda_graph' if graphs else ',eager'}"
            print(json.dumps({"figure": f"train_samples_per_s[{label}]", "value": round(sps, 1),
                              "batch": 100, **common}), flush=True)
    n_ll = args.ll_images or (10000 if gpu else 40)
    for compile in ((False, True) if gpu and args.compile else (False,)):
        seconds, mean_ll = ll_seconds(splits, device, n_ll, args.ll_samples, compile)
        label = f"vamp,K=500,10000 images,S={args.ll_samples}{',compiled' if compile else ''}"
        print(json.dumps({"figure": f"test_ll_seconds[{label}]", "value": round(seconds * 10000 / n_ll, 2),
                          "measured_images": n_ll, "seconds_per_image": round(seconds / n_ll, 5),
                          "mean_ll": round(mean_ll, 4), **common}), flush=True)


if __name__ == "__main__":
    main()
