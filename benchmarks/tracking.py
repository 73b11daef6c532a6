"""Load test of the tracking path: simulated trials replay a trial's real MLflow traffic against an
`mlflow server` (sqlite or PostgreSQL; plain or basic-auth) that this script starts on 127.0.0.1.

What a trial sends is taken from the code, not guessed: one real epoch of the library's Trainer
(VampPrior K=500 on a static-MNIST subset: its metrics dict, its pseudo-input grid, its weights,
its final evaluation's keys) replayed through `trainables.tracking` exactly as
`trainables/vae_trainable.py` calls it: per trial the run (search, create, params, node tag,
dataset input, step-0 image), per epoch one log_batch and every `--image-every` epochs the
pseudo-input image, at its end three images, the weights (~4.7 MB), the per-image CSV, the
histogram, the final metrics, the tags, set_terminated.

Modes
    saturate  N trials, each logging its epochs back to back and waiting for each (a closed loop):
              the server's capacity, trial-epochs/s and request latency.
    pool      GPU pools of `--trials` trials: every `--round-s` seconds (the pool's compute) all
              of a pool's trials log their epoch at once, and the next round starts when every
              trial is back (what `trainables/pool.py` does): the time a round waits on logging.
Clients
    async     the outbox (`wait=False`): the trial returns at once, a thread sends in order
    blocking  the same client, waiting for each write (`wait=True`)
    old       trainables/tracking.py as of commit 9a45c7e (synchronous, retried only "locked")

Reported: trial-epochs/s, server CPU ms per trial-epoch (the server's and PostgreSQL's process
trees; the stable figure on a shared machine), p50/p99 of log_batch requests, failed requests
(calls that raised, before any retry), failed trials, the time rounds waited on logging, and the
check that every acknowledged epoch is stored exactly once (and every image once).

    PYTHONPATH=. python benchmarks/tracking.py --mode saturate --trials 8 32 128 --seconds 40
    PYTHONPATH=. python benchmarks/tracking.py --backend postgresql --auth --auth-cache-ttl 60 \\
        --workers 4 --pool-size 40 --max-overflow 60 --mode pool --pools 8 --trials 32 --client async
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OLD_CLIENT_COMMIT = "9a45c7e"      # the last commit before the outbox and the wider retries
CLK_TCK = os.sysconf("SC_CLK_TCK")
from trainables.tracking import IMAGE_PSEUDO_INPUTS  # noqa: E402 (after the path; the old client keeps this key)


# --------------------------------------------------------------------------------------------
# What one trial sends, recorded from the real code


def record_traffic(data_root: str | None) -> dict[str, Any]:
    """One real epoch of a VampPrior K=500 trial (a 200-image subset: the payloads' shapes and keys,
    not the training, matter here) and its final evaluation's keys, as the trainable logs them."""
    import numpy as np
    import torch

    from trainables.vae.config import TrainConfig
    from trainables.vae.data import get_spec, load_dataset
    from trainables.vae.evaluate import display_grid
    from trainables.vae.train import Trainer, final_evaluation

    torch.set_num_threads(1)
    cfg = TrainConfig(dataset="static_mnist", prior="vamp", K=500, max_epochs=1, warmup=1, train_subset=200,
                      val_subset=100, test_subset=100, test_samples=10, device="cpu")
    trainer = Trainer(cfg, load_dataset(cfg.dataset, data_root))
    metrics = trainer.step()
    shape = get_spec(cfg.dataset).image_shape
    grid = display_grid(trainer.model.prior.pseudo_inputs[:100], shape)
    final = final_evaluation(trainer)
    final.pop("per_image_ll")
    n_test = get_spec(cfg.dataset).info.split_sizes[2]
    return {
        "config": cfg.to_dict(),
        "metrics": {k: v for k, v in metrics.items() if v is not None and k != "stop_reason"},
        "grid": grid,
        "state": {"state_dict": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                  "config": cfg.to_dict(), "best_epoch": 1},
        "final": {k: float(v) for k, v in final.items()},
        "per_image_ll": np.random.default_rng(0).normal(-90, 10, n_test),   # the real file's length
    }


def load_client(kind: str):
    """trainables.tracking, or (kind 'old') the module as of OLD_CLIENT_COMMIT."""
    if kind != "old":
        from trainables import tracking

        return tracking
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_CLIENT_COMMIT}:trainables/tracking.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="tracking-old-")) / "tracking_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tracking_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module           # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Counting requests: every MlflowClient call a trial makes, timed, failures counted before retries

CALLS = ("log_batch", "log_artifacts", "log_artifact", "log_image", "set_tag", "create_run", "search_runs",
         "log_inputs", "set_terminated", "update_run", "log_text", "log_figure", "create_logged_model",
         "log_model_artifacts", "finalize_logged_model", "log_outputs", "get_metric_history", "list_artifacts",
         "get_run", "delete_tag")


@dataclass
class Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    batch_latency_s: list[float] = field(default_factory=list)
    calls: int = 0
    calls_in_window: int = 0
    window: tuple[float, float] = (0.0, float("inf"))
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def record(self, name: str, seconds: float, error: BaseException | None) -> None:
        with self.lock:
            self.calls += 1
            self.calls_in_window += int(self.window[0] <= time.time() <= self.window[1])
            if name == "log_batch" and error is None:
                self.batch_latency_s.append(seconds)
            if error is not None:
                self.failed += 1
                key = f"{name}: {str(error).splitlines()[0][:90]}"
                self.failures[key] = self.failures.get(key, 0) + 1


def instrument(counters: Counters) -> None:
    from mlflow import MlflowClient

    for name in CALLS:
        original = getattr(MlflowClient, name)

        def timed(self, *args, __original=original, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                out = __original(self, *args, **kwargs)
            except BaseException as exc:
                counters.record(__name, time.perf_counter() - start, exc)
                raise
            counters.record(__name, time.perf_counter() - start, None)
            return out

        setattr(MlflowClient, name, timed)


# --------------------------------------------------------------------------------------------
# One simulated trial


class Trial:
    """Replays a trial's calls (vae_trainable: _open_run, step, finalize) through `tracking`."""

    def __init__(self, tracking, traffic, uri, experiment_id, parent_id, trial_id, client_kind, image_every):
        self.tracking, self.traffic, self.uri = tracking, traffic, uri
        self.experiment_id, self.parent_id, self.trial_id = experiment_id, parent_id, trial_id
        self.kw = {} if client_kind == "old" else {"wait": client_kind == "blocking"}
        self.image_every = image_every
        self.run = None
        self.epoch = 0
        self.first = 1              # the first epoch this trial logs (a pool's slots start mid-trial)

    def open(self) -> None:
        from trainables.vae.config import TrainConfig
        from trainables.vae_trainable import log_dataset_input

        t = self.tracking
        cfg = TrainConfig.from_dict(self.traffic["config"])
        self.run = t.open_trial_run(self.uri, self.experiment_id, self.parent_id, trial_id=self.trial_id,
                                    trial_name=f"vamp K=500 {self.trial_id}", params=cfg.to_dict(),
                                    sweep_name="bench", description="load test")
        self.run.set_tags({"sweeper.node_id": "bench"})
        log_dataset_input(self.run, cfg)
        self.run.log_image(self.traffic["grid"], IMAGE_PSEUDO_INPUTS, 0, **self.kw)

    def log_epoch(self) -> float:
        """One epoch's logging as the trainable does it; the seconds the trial was blocked."""
        self.epoch += 1
        start = time.perf_counter()
        metrics = {**self.traffic["metrics"], "epoch": self.epoch}
        self.run.log_metrics(metrics, step=self.epoch, **self.kw)
        if self.image_every and self.epoch % self.image_every == 0:
            self.run.log_image(self.traffic["grid"], IMAGE_PSEUDO_INPUTS, self.epoch, **self.kw)
        return time.perf_counter() - start

    def finalize(self, full: bool = True) -> None:
        t, run = self.tracking, self.run
        if full:
            grid = self.traffic["grid"]
            for name in ("reconstructions.png", "samples.png", "pseudo_inputs.png"):
                run.log_image_file(grid, name)
            run.log_weights(self.experiment_id, self.traffic["state"], name="static_mnist-vae-vamp",
                            step=self.epoch, params={"dataset": "static_mnist", "K": 500})
            per_image = self.traffic["per_image_ll"].tolist()
            run.log_text(t.per_image_csv(per_image), "per_image_ll.csv")
            run.log_figure(t.ll_histogram_figure(per_image, "bench"), "test_ll_histogram.png")
            run.log_metrics(self.traffic["final"], step=self.epoch, **self.kw)
            run.set_tags({t.TAG_STOP: "completed", "stop_detail": "load test"})
        run.terminate("FINISHED")


# --------------------------------------------------------------------------------------------
# A worker process: a group of trials (saturate) or one pool (pool)


def worker(args: dict, uri: str, env: dict, experiment_id: str, parent_id: str, group: int, n_trials: int,
           t0: float, t1: float, out) -> None:
    os.environ.update(env)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # One keep-alive connection per thread (a trial's and its outbox's), as separate trial processes have.
    os.environ["MLFLOW_HTTP_POOL_MAXSIZE"] = str(4 * n_trials + 4)
    import numpy as np

    counters = Counters(window=(t0, t1))
    instrument(counters)
    tracking = load_client(args["client"])
    traffic = np.load(args["traffic"], allow_pickle=True)["traffic"].item()
    results = {"epochs": 0, "failed_trials": 0, "errors": [], "blocked_s": [], "round_blocked_s": [],
               "round_active": [], "runs": [], "epochs_in_window": 0}
    lock = threading.Lock()
    serial = iter(range(10**9))

    def new_trial():
        with lock:
            k = next(serial)
        return Trial(tracking, traffic, uri, experiment_id, parent_id, f"g{group}-t{k}", args["client"],
                     args["image_every"])

    def record_run(trial, failed):
        with lock:
            results["runs"].append({"run_id": trial.run.run_id if trial.run else None, "first": trial.first,
                                    "epochs": trial.epoch, "failed": failed, "image_every": args["image_every"]})

    def fail(trial, exc):
        with lock:
            results["failed_trials"] += 1
            results["errors"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        record_run(trial, True)

    if args["mode"] == "saturate":
        def loop(i):
            time.sleep(max(0.0, t0 - time.time()) * (i / max(1, n_trials)))   # staggered start
            while time.time() < t1:
                trial = new_trial()
                try:
                    trial.open()
                    while trial.epoch < args["trial_epochs"] and time.time() < t1:
                        blocked = trial.log_epoch()
                        now = time.time()
                        with lock:
                            results["epochs"] += 1
                            results["epochs_in_window"] += int(t0 <= now <= t1)
                            results["blocked_s"].append(blocked)
                    trial.finalize(full=trial.epoch >= args["trial_epochs"])
                    record_run(trial, False)
                except Exception as exc:   # a trial that fails on logging: Tune would retry it
                    fail(trial, exc)

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(n_trials)]
    else:
        # One pool: `n_trials` slots; a round = the compute (sleep), then every active slot logs its
        # epoch; the round ends when all are back. A trial that reached its epochs finalizes and the
        # slot opens a new one, outside the rounds (the pool does not wait for either).
        go = [threading.Event() for _ in range(n_trials)]
        done = [threading.Event() for _ in range(n_trials)]
        active = [False] * n_trials
        stop = threading.Event()

        def slot(i):
            # Slots start mid-trial at different epochs, so trials do not all end together.
            first = True
            while not stop.is_set():
                trial = new_trial()
                try:
                    trial.open()
                    if first:
                        trial.epoch = i % args["trial_epochs"]
                        trial.first = trial.epoch + 1
                        first = False
                    active[i] = True
                    while trial.epoch < args["trial_epochs"]:
                        go[i].wait()
                        go[i].clear()
                        if stop.is_set():
                            break
                        try:
                            blocked = trial.log_epoch()
                        finally:
                            if trial.epoch >= args["trial_epochs"]:
                                active[i] = False
                            done[i].set()
                        with lock:
                            results["epochs"] += 1
                            results["epochs_in_window"] += int(time.time() <= t1)
                            results["blocked_s"].append(blocked)
                    active[i] = False
                    trial.finalize(full=trial.epoch >= args["trial_epochs"])
                    record_run(trial, False)
                except Exception as exc:
                    active[i] = False
                    done[i].set()
                    fail(trial, exc)

        def pool():
            time.sleep(max(0.0, t0 - time.time()) + args["round_s"] * (group % 8) / 8)   # pools out of phase
            while time.time() < t1:
                time.sleep(args["round_s"])                  # the GPU's round
                members = [i for i in range(n_trials) if active[i]]
                start = time.perf_counter()
                for i in members:
                    done[i].clear()
                    go[i].set()
                for i in members:
                    done[i].wait()
                with lock:
                    results["round_blocked_s"].append(time.perf_counter() - start)
                    results["round_active"].append(len(members))
            stop.set()
            for e in go:
                e.set()

        threads = [threading.Thread(target=slot, args=(i,)) for i in range(n_trials)]
        threads.append(threading.Thread(target=pool))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results["requests"] = {"calls": counters.calls, "in_window": counters.calls_in_window,
                           "failed": counters.failed, "failures": counters.failures,
                           "batch_latency_s": counters.batch_latency_s}
    out.put(results)


# --------------------------------------------------------------------------------------------
# Server side


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process and its descendants, the reaped children included."""
    from cluster_utils import tree_pids

    total = 0
    for pid in tree_pids(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))   # utime stime cutime cstime
    return total / CLK_TCK


def verify(uri: str, env: dict, runs: list[dict]) -> dict[str, int]:
    """Every acknowledged epoch stored exactly once, every image once."""
    os.environ.update(env)
    from mlflow import MlflowClient

    from trainables import tracking

    client = MlflowClient(uri)
    bad, checked = [], 0
    for run in runs:
        if run["run_id"] is None or run["failed"]:
            continue
        steps = sorted(m.step for m in client.get_metric_history(run["run_id"], "epoch"))
        first = run["first"]
        if steps != list(range(first, run["epochs"] + 1)):
            bad.append((run["run_id"], "epochs", steps[:5], len(steps), run["epochs"]))
        every = run["image_every"]
        files = [f.path for f in client.list_artifacts(run["run_id"], "images")]
        images = tracking.RunHandle(uri, run["run_id"]).stored_images()
        expected = {0} | {s for s in range(first, run["epochs"] + 1) if every and s % every == 0}
        if {s for _, s in images} != expected or len(files) != 2 * len(expected):
            bad.append((run["run_id"], "images", sorted(s for _, s in images)[:5], len(files)))
        checked += 1
    return {"runs_checked": checked, "runs_wrong": len(bad), "examples": bad[:3]}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def run_config(args: argparse.Namespace, n_trials: int, traffic_file: str, root: Path) -> dict[str, Any]:
    from cluster_utils import MlflowServer, PostgresServer

    pg = None
    if args.backend == "postgresql":
        pg = PostgresServer(root / "pg", max_connections=args.pg_max_connections)
        pg.start()
    server = MlflowServer(root / "mlflow", auth=args.auth, backend_uri=pg.uri if pg else None,
                          workers=args.workers, auth_cache_ttl_s=args.auth_cache_ttl,
                          pool_size=args.pool_size, max_overflow=args.max_overflow)
    try:
        server.start()
        env = server.client_env()
        os.environ.update(env)
        from mlflow import MlflowClient

        client = MlflowClient(server.url)
        experiment_id = client.create_experiment(f"bench-{n_trials}")
        parent_id = client.create_run(experiment_id, tags={"sweeper.role": "sweep"}).info.run_id
        pools = args.pools if args.mode == "pool" else 1
        groups = pools if args.mode == "pool" else min(args.procs, n_trials)
        per_group = [n_trials] * pools if args.mode == "pool" else \
            [n_trials // groups + (g < n_trials % groups) for g in range(groups)]
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        t0 = time.time() + args.warmup_s
        t1 = t0 + args.seconds
        wargs = {"client": args.client, "traffic": traffic_file, "mode": args.mode, "image_every": args.image_every,
                 "trial_epochs": args.trial_epochs, "round_s": args.round_s}
        procs = [ctx.Process(target=worker, args=(wargs, server.url, env, experiment_id, parent_id, g, per_group[g],
                                                  t0, t1, out)) for g in range(groups)]
        for p in procs:
            p.start()
        time.sleep(max(0.0, t0 - time.time()))
        server0, pg0 = tree_cpu_s(server.service.sid), (tree_cpu_s(pg.service.sid) if pg else 0.0)
        time.sleep(max(0.0, t1 - time.time()))
        server1, pg1 = tree_cpu_s(server.service.sid), (tree_cpu_s(pg.service.sid) if pg else 0.0)
        cpu_s = (server1 - server0) + (pg1 - pg0)
        results = []
        while len(results) < len(procs):      # a worker that died reports nothing: do not wait for it
            try:
                results.append(out.get(timeout=10))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    raise RuntimeError(f"{len(procs) - len(results)} load-generating process(es) died")
        for p in procs:
            p.join()
        epochs_window = sum(r["epochs_in_window"] for r in results)
        blocked = [b for r in results for b in r["blocked_s"]]
        rounds = [b for r in results for b in r["round_blocked_s"]]
        latency = [b for r in results for b in r["requests"]["batch_latency_s"]]
        failures: dict[str, int] = {}
        for r in results:
            for k, v in r["requests"]["failures"].items():
                failures[k] = failures.get(k, 0) + v
        check = verify(server.url, env, [run for r in results for run in r["runs"]])
        row = {
            "backend": args.backend, "auth": args.auth, "auth_cache_ttl": args.auth_cache_ttl,
            "workers": args.workers, "pool": f"{args.pool_size or 5}+{args.max_overflow or 10}",
            "mode": args.mode, "client": args.client, "trials": n_trials * (pools if args.mode == "pool" else 1),
            "trial_epochs_per_s": epochs_window / args.seconds,
            "server_cpu_ms_per_trial_epoch": 1000 * cpu_s / max(1, epochs_window),
            "server_cpu_ms_per_request": 1000 * cpu_s / max(1, sum(r["requests"]["in_window"] for r in results)),
            "postgres_cpu_share": (pg1 - pg0) / max(1e-9, cpu_s),
            "batch_p50_ms": 1000 * percentile(latency, 50), "batch_p99_ms": 1000 * percentile(latency, 99),
            "blocked_p50_ms": 1000 * percentile(blocked, 50), "blocked_p99_ms": 1000 * percentile(blocked, 99),
            "round_blocked_p50_ms": 1000 * percentile(rounds, 50),
            "round_blocked_p99_ms": 1000 * percentile(rounds, 99),
            "idle_fraction": (sum(rounds) / (sum(rounds) + args.round_s * len(rounds))) if rounds else float("nan"),
            "requests": sum(r["requests"]["calls"] for r in results),
            "failed_requests": sum(r["requests"]["failed"] for r in results),
            "failed_trials": sum(r["failed_trials"] for r in results),
            "trial_errors": sorted({e for r in results for e in r["errors"]})[:3],
            "failures": failures, "check": check,
        }
        return row
    finally:
        server.stop()
        if pg:
            pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--auth", action="store_true", help="--app-name basic-auth (what cluster.yaml starts)")
    p.add_argument("--auth-cache-ttl", type=int, default=0, help="auth_cache_ttl_seconds (0: MLflow's default)")
    p.add_argument("--workers", type=int, default=4, help="mlflow server --workers (MLflow's default: 4)")
    p.add_argument("--pool-size", type=int, default=None, help="MLFLOW_SQLALCHEMYSTORE_POOL_SIZE (default 5)")
    p.add_argument("--max-overflow", type=int, default=None, help="MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW (default 10)")
    p.add_argument("--pg-max-connections", type=int, default=100)
    p.add_argument("--mode", choices=("saturate", "pool"), default="saturate")
    p.add_argument("--client", choices=("async", "blocking", "old"), default="blocking")
    p.add_argument("--trials", type=int, nargs="+", default=[8, 32, 128], help="saturate: trials; pool: per pool")
    p.add_argument("--pools", type=int, default=1)
    p.add_argument("--round-s", type=float, default=2.46, help="a pool round's compute (32 trials on an H200)")
    p.add_argument("--trial-epochs", type=int, default=37, help="epochs per trial (ASHA's expectation)")
    p.add_argument("--image-every", type=int, default=10)
    p.add_argument("--seconds", type=float, default=40.0, help="the measured window")
    p.add_argument("--warmup-s", type=float, default=15.0)
    p.add_argument("--procs", type=int, default=4, help="saturate: client processes")
    p.add_argument("--data-root", default=os.environ.get("SWEEPER_DATA_DIR"))
    p.add_argument("--out", type=Path, default=None, help="append the rows as JSON lines")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C: the servers this script started are stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        traffic_file = str(Path(tmp) / "traffic.npz")
        np.savez(traffic_file, traffic=np.array(record_traffic(args.data_root), dtype=object))
        print(f"# {platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        for n in args.trials:
            row = run_config(args, n, traffic_file, Path(tempfile.mkdtemp(prefix=f"n{n}-", dir=tmp)))
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M"),
                                        "load": os.getloadavg()[0]}) + "\n")


if __name__ == "__main__":
    main()
