"""Many trials per device the way a sweep runs them: M trials as slots of one TrialPool.

    PYTHONPATH=. python3 benchmarks/pool.py [--device cuda] [--models 1 8 32] [--epochs 2]
    PYTHONPATH=. python3 benchmarks/pool.py --ray --models 1 4 8        # + the Ray round trip

`pool` figures: a TrialPool (trainables/pool.py, what `resources.batched` trials train in) with M
VampPrior K=500 trials (lr 5e-4 .. +2% per trial, one seed each) on MNIST-sized synthetic data (50,000 training and 10,000 validation images, on the
device). Each round is what a sweep's epoch is: one training epoch of every slot and its
validation ELBO (early stopping needs it). After one warm-up round (on CUDA: the CUDA graph is
captured), `--epochs` rounds are timed. model-epochs/s = M * rounds / seconds, per device; the
paper's reference code does 0.21 on one H200 (10,500 samples/s / 50,000, training only).

`--ray` also times M Ray actors (stand-ins for Tune trials) each calling `PoolActor.step` in a
loop against one pool actor: what a round costs on top of the pool's own work (the requests,
the wait for the last one, the replies). Needs ray; the pool figures need only torch.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from benchmarks.throughput import MNIST_TRAIN_IMAGES, REFERENCE_MODEL_EPOCHS_PER_S, sync, synthetic_mnist
from trainables.pool import TrialPool
from trainables.vae.config import TrainConfig

def configs(M: int, K: int, device: torch.device, max_epochs: int) -> list[TrainConfig]:
    return [TrainConfig(prior="vamp", K=K, lr=5e-4 * (1 + 0.02 * m), seed=m, batch_size=100, warmup=0,
                        max_epochs=max_epochs, early_stopping=0, device=device.type) for m in range(M)]


def measure_pool(M: int, splits, device: torch.device, epochs: int, K: int) -> dict:
    pool = TrialPool(device, splits=splits)
    for m, cfg in enumerate(configs(M, K, device, epochs + 2)):
        pool.join(f"t{m}", cfg)
    key = pool.group_of("t0")
    pool.run_round(key)                        # warm-up: build, graph capture, cuBLAS
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        out = pool.run_round(key)
    sync(device)
    seconds = time.perf_counter() - t0
    n = splits.train.shape[0]
    rate = M * epochs * n / MNIST_TRAIN_IMAGES / seconds
    return {"value": round(rate, 3), "x_reference": round(rate / REFERENCE_MODEL_EPOCHS_PER_S, 1), "models": M,
            "seconds_per_round": round(seconds / epochs, 3), "rounds": epochs, "train_images": n, "K": K,
            "mean_val_elbo": round(sum(m["val_elbo"] for m in out.values()) / M, 3)}


def measure_ray(M: int, splits, epochs: int, K: int) -> dict:
    """Seconds per round through Ray (M trial stand-ins, one PoolActor) and without it."""
    import ray

    from trainables.pool import PoolActor

    @ray.remote(num_cpus=0)
    class Trial:
        def __init__(self, pool, trial_id: str, config: dict):
            self.pool, self.trial_id = pool, trial_id
            ray.get(pool.join.remote(trial_id, config))

        def ready(self) -> bool:
            return True

        def run(self, rounds: int) -> float:
            t0 = time.perf_counter()
            for _ in range(rounds):
                ray.get(self.pool.step.remote(self.trial_id))
            return time.perf_counter() - t0

    device = torch.device("cpu")
    pool = ray.remote(PoolActor).options(max_concurrency=1000).remote("cpu", 600.0, splits)
    trials = [Trial.remote(pool, f"t{m}", c.to_dict()) for m, c in enumerate(configs(M, K, device, epochs + 3))]
    # Every trial joins before any asks for a round: a round waits for every member.
    ray.get([t.ready.remote() for t in trials])
    ray.get([t.run.remote(1) for t in trials])                    # warm-up round
    seconds = max(ray.get([t.run.remote(epochs) for t in trials]))
    direct = measure_pool(M, splits, device, epochs, K)["seconds_per_round"]
    ray.kill(pool)
    per_round = seconds / epochs
    return {"models": M, "seconds_per_round_via_ray": round(per_round, 4), "seconds_per_round_direct": direct,
            "ray_overhead_ms_per_round": round(1000 * (per_round - direct), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", type=int, nargs="+", default=[1, 8, 32], help="trials per pool")
    ap.add_argument("--epochs", type=int, default=2, help="timed rounds after one warm-up round")
    ap.add_argument("--train-images", type=int, default=None, help="default: 50,000 (GPU), 1,000 (CPU)")
    ap.add_argument("--K", type=int, default=500, help="pseudo-inputs per trial")
    ap.add_argument("--ray", action="store_true", help="also time the Ray round trip (CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n_train = args.train_images or (50_000 if gpu else 1_000)
    splits = synthetic_mnist(n_train, device)
    if not gpu:   # validation is 1,000 images by default; keep it in proportion on a small CPU run
        splits = type(splits)(splits.train, splits.val[: max(100, n_train // 5)], splits.test, splits.info)
    where = (torch.cuda.get_device_name(device) if gpu
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for M in args.models:
        line = {"figure": f"model_epochs_per_s_per_device[pool,{M} trials]"}
        try:
            line.update(measure_pool(M, splits, device, args.epochs, args.K))
        except torch.cuda.OutOfMemoryError as exc:
            line.update({"value": None, "models": M, "error": f"out of memory: {exc}"[:300]})
        line.update({"device": where, "torch": torch.__version__})
        print(json.dumps(line), flush=True)
        if gpu:
            torch.cuda.empty_cache()
    if args.ray:
        import ray

        ray.init(include_dashboard=False, logging_level="ERROR")
        cpu_splits = synthetic_mnist(min(n_train, 1_000), torch.device("cpu"))
        cpu_splits = type(cpu_splits)(cpu_splits.train, cpu_splits.val[:200], cpu_splits.test, cpu_splits.info)
        for M in args.models:
            line = {"figure": f"ray_round_trip[{M} trials]", **measure_ray(M, cpu_splits, args.epochs, args.K),
                    "device": f"cpu, {torch.get_num_threads()} threads", "ray": ray.__version__}
            print(json.dumps(line), flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
