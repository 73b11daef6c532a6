"""Many trials on one GPU: per-GPU model-epochs/s with N concurrent trial processes.

    python benchmarks/concurrency.py [--trials 1 8 32] [--epochs 2]

Each process is what a Ray trial with `resources: {gpu: 1/N}` runs: its own Trainer (VampPrior
K=500, batch 100, 50,000 MNIST-sized images, the CUDA-graph fast path). Processes start, build
their model and warm up, wait at a barrier, then train `--epochs` epochs; the figure is
N * epochs / (wall time from the barrier to the last process's end).
The paper's reference code: 0.21 model-epochs/s on one H200 (10,500 samples/s / 50,000).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.multiprocessing as mp

from benchmarks.throughput import REFERENCE_MODEL_EPOCHS_PER_S


def worker(rank: int, epochs: int, n_train: int, barrier, queue) -> None:
    from benchmarks.throughput import synthetic_mnist
    from trainables.vae.config import TrainConfig
    from trainables.vae.train import Trainer

    torch.set_num_threads(1)
    splits = synthetic_mnist(n_train, torch.device("cuda"))
    cfg = TrainConfig(prior="vamp", K=500, warmup=0, max_epochs=epochs + 2, early_stopping=0, seed=rank)
    trainer = Trainer(cfg, splits, "cuda")
    trainer._train_epoch(1.0)                  # capture the graph, warm up
    torch.cuda.synchronize()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(epochs):
        trainer._train_epoch(1.0)
    torch.cuda.synchronize()
    queue.put((t0, time.perf_counter()))


def measure(n: int, epochs: int, n_train: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, epochs, n_train, barrier, queue)) for r in range(n)]
    for p in procs:
        p.start()
    spans = [queue.get(timeout=900) for _ in range(n)]
    for p in procs:
        p.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    rate = n * epochs / wall
    return {"figure": f"model_epochs_per_s_per_gpu[{n} trials]", "value": round(rate, 2),
            "x_reference": round(rate / REFERENCE_MODEL_EPOCHS_PER_S, 1), "trials": n, "epochs": epochs,
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=50_000)
    args = ap.parse_args()
    for n in args.trials:
        print(json.dumps(measure(n, args.epochs, args.train_images)), flush=True)


if __name__ == "__main__":
    main()
