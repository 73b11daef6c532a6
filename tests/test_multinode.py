"""A real multi-node cluster on this machine: what `ray up cluster.yaml` builds, without a cloud.

A head (127.0.0.2) and a worker (127.0.0.3) as separate `ray start` processes with token
authentication, an `mlflow server --app-name basic-auth` on 127.0.0.1, and `sweeper run
--address ... --tracking-uri http://...` as a separate driver process, exactly as on the cluster
(`ray exec cluster.yaml 'sweeper run ...'`). Each node has 1 CPU, so two concurrent trials
must land on different nodes. Needs `mlflow[auth]` (Flask-WTF) for the basic-auth server.

The server is configured as cluster.yaml's (credential cache, larger pool) and stores runs in a
real PostgreSQL (Debian's package, which .ci/run installs); where PostgreSQL cannot be had it
falls back to sqlite, and tests/test_tracking_server.py says why in its skip.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from trainables import tracking
from cluster_utils import (
    BIN,
    HEAD_IP,
    WORKER_IP,
    LocalRayCluster,
    MlflowAuthServer,
    cluster_tracking_server,
    tail,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
SWEEP_TIMEOUT_S = 420

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with cluster_tracking_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalRayCluster(tmp_path)
    try:
        cluster.start_head(cpus=1)
        cluster.add_worker(cpus=1)
        cluster.wait_for_nodes(2)
        assert set(cluster.node_ids) == {HEAD_IP, WORKER_IP}, cluster.node_ids
        yield cluster
    finally:
        cluster.shutdown()


def sweep_command(cluster: LocalRayCluster, server: MlflowAuthServer, storage: Path, experiment: str,
                  *extra: str) -> list[str]:
    return [str(BIN / "sweeper"), "run", str(QUICKSTART), "--address", cluster.address,
            "--tracking-uri", server.url, "--storage-path", str(storage),
            "--set", f"experiment={experiment}", *extra]


def sweep_env(cluster: LocalRayCluster, server: MlflowAuthServer, data: Path) -> dict[str, str]:
    # The driver gets the Ray token like any cluster client, and the MLflow credentials that it
    # forwards to every trial through the job's runtime_env.
    return {**cluster.env, **server.client_env(), "SWEEPER_DATA_DIR": str(data)}


def mlflow_client(server: MlflowAuthServer, monkeypatch):
    import mlflow

    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    return mlflow.MlflowClient(server.url)


def sweep_runs(client, experiment: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on the server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]


def run_sweep_process(cmd, env, cwd: Path, log: Path, timeout_s: float = SWEEP_TIMEOUT_S) -> str:
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                              check=False)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"sweeper run exited {proc.returncode}:\n{text[-6000:]}"
    return text


def assert_arrived_over_http(run, server: MlflowAuthServer, client, workdir: Path) -> None:
    """The run's artifacts went through the server's artifact proxy into its destination."""
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    # mlflow-artifacts:/<experiment>/<run>/artifacts -> <destination>/<experiment>/<run>/artifacts
    stored = server.artifacts / run.info.artifact_uri.split(":/", 1)[1].lstrip("/")
    assert (stored / "reconstructions.png").is_file(), f"nothing under {stored}"
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists(), \
        "the driver fell back to a local tracking store"


def test_sweep_places_trials_on_both_nodes_and_logs_over_http(cluster, mlflow_server, shared_datasets,
                                                               tmp_path, monkeypatch):
    server = mlflow_server
    # Secure by default: no MLflow request without credentials, no Ray client without the token.
    for path in ("/api/2.0/mlflow/experiments/search?max_results=5", "/ajax-api/2.0/mlflow/runs/search"):
        status, _ = server.request(path)
        assert status == 401, f"unauthenticated GET {path} answered {status}, expected 401"
    assert server.request("/api/2.0/mlflow/experiments/search?max_results=5", auth=True)[0] == 200
    # Wrong credentials are refused, also while the right ones are in the server's cache.
    status, _ = server.request("/api/2.0/mlflow/experiments/search?max_results=5", auth=("admin", "wrong"))
    assert status == 401
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    status_cmd = subprocess.run([str(BIN / "ray"), "status", f"--address={cluster.address}"], env=wrong,
                                capture_output=True, text=True, timeout=120, check=False)
    assert status_cmd.returncode != 0 and "InvalidAuthToken" in status_cmd.stdout + status_cmd.stderr, \
        f"a client with a wrong token reached the cluster:\n{status_cmd.stdout}\n{status_cmd.stderr}"

    workdir = tmp_path / "driver"
    workdir.mkdir()
    experiment = "multinode-placement"
    log = run_sweep_process(
        sweep_command(cluster, server, tmp_path / "storage", experiment,
                      "--num-samples", "4", "--max-concurrent", "2", "--set", "trial.max_epochs=3"),
        sweep_env(cluster, server, shared_datasets), workdir, tmp_path / "sweep.log")

    client = mlflow_client(server, monkeypatch)
    parents, runs = sweep_runs(client, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", log[-4000:]
    assert len(runs) == 4, f"{len(runs)} child runs for 4 trials:\n{log[-4000:]}"
    nodes = {run.data.tags.get("sweeper.node_id") for run in runs}
    assert nodes == set(cluster.node_ids.values()), \
        f"trials ran on {nodes}, expected both nodes {cluster.node_ids}"
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status, tags.get("stop_detail"))
        assert tags["stop_reason"] in ("completed", "scheduler")
        epochs = int(metrics["epoch"])
        history = client.get_metric_history(run.info.run_id, "val_elbo")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (run.info.run_name, history)
        assert math.isfinite(metrics["test_ll"]) and metrics["test_ll"] < 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"reconstructions.png", "samples.png", "test_ll_histogram.png"} <= artifacts, artifacts
        if run.data.params["prior"] == "vamp":
            images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
            assert any(p.startswith(tracking.image_artifact_prefix(tracking.IMAGE_PSEUDO_INPUTS, 1)) for p in images), images
        assert_arrived_over_http(run, server, client, workdir)
    if server.postgres:   # the runs are PostgreSQL's rows, each epoch once
        pg = server.postgres
        ids = ", ".join(f"'{run.info.run_id}'" for run in runs)
        assert pg.query(f"SELECT count(*) FROM runs WHERE run_uuid IN ({ids})") == [(4,)]
        assert pg.query(f"SELECT run_uuid, step FROM metrics WHERE key = 'val_elbo' AND run_uuid IN ({ids}) "
                        "GROUP BY run_uuid, step HAVING count(*) > 1") == []


@pytest.mark.parametrize("pooled", [False, True], ids=["processes", "pooled"])
def test_killed_worker_trials_resume_on_the_surviving_node(cluster, mlflow_server, shared_datasets,
                                                           tmp_path, monkeypatch, pooled):
    """Pooled: each node's trials train in that node's pool; the worker's pool dies with it, and
    its trial joins the head's pool from its checkpoint."""
    server = mlflow_server
    client = mlflow_client(server, monkeypatch)
    head_id, worker_id = cluster.node_ids[HEAD_IP], cluster.node_ids[WORKER_IP]
    experiment = "multinode-node-loss" + ("-pooled" if pooled else "")
    epochs = 8
    workdir = tmp_path / "driver"
    workdir.mkdir()
    storage = tmp_path / "storage"
    log_path = tmp_path / "sweep.log"
    # FIFO (no ASHA): every trial runs all its epochs, so the worker's trial is still running when
    # the node dies. max_failures=2: a trial may be retried twice.
    cmd = sweep_command(cluster, server, storage, experiment, "--num-samples", "3", "--max-concurrent", "2",
                        "--set", f"trial.max_epochs={epochs}", "--set", "scheduler={type: fifo}",
                        "--set", "max_failures=2",
                        *(["--set", "resources.batched=true", "--set", "checkpoint_every=1"] if pooled else []))
    with open(log_path, "wb") as out:
        sweep = subprocess.Popen(cmd, env=sweep_env(cluster, server, shared_datasets), cwd=workdir, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def worker_trial_mid_way():
            if sweep.poll() is not None:
                raise RuntimeError(f"the sweep ended before the worker was killed:\n{tail(log_path, 80)}")
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                return None
            for run in client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'"):
                if run.data.tags.get("sweeper.node_id") != worker_id or run.info.status != "RUNNING":
                    continue
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_elbo")]
                # Epoch 3 logged: the checkpoints of epochs 1 and 2 were written and are known to the
                # driver (the actor saves before it trains again), and 5 epochs are still to go.
                if steps and 3 <= max(steps) < epochs:
                    return run
            return None

        victim = wait_until(worker_trial_mid_way, 240, "a trial on the worker node to log epoch 3",
                            interval_s=0.5, on_timeout=lambda: tail(log_path, 80))
        trial_id = victim.data.tags["sweeper.trial_id"]
        cluster.kill_raylet("worker")

        try:
            sweep.wait(timeout=SWEEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not finish {SWEEP_TIMEOUT_S} s after the worker died:\n{tail(log_path, 80)}")
        log = log_path.read_text(errors="replace")
        assert sweep.returncode == 0, f"sweeper run exited {sweep.returncode}:\n{log[-6000:]}"
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()

    # The GCS declares the worker dead once its health checks fail (seconds, not minutes).
    wait_until(lambda: [n["id"] for n in cluster.probe()] == [head_id], 90,
               "the GCS to report the worker node dead", interval_s=2)
    parents, runs = sweep_runs(client, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", log[-4000:]
    trial_ids = [run.data.tags["sweeper.trial_id"] for run in runs]
    # Nothing lost, nothing duplicated: one child run per trial, the retried one included.
    assert len(runs) == 3 and len(set(trial_ids)) == 3, f"child runs per trial: {sorted(trial_ids)}"
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status, run.data.tags.get("stop_detail"))
        assert run.data.tags["stop_reason"] == "completed"
        history = client.get_metric_history(run.info.run_id, "val_elbo")
        assert {m.step for m in history} == set(range(1, epochs + 1)), (run.info.run_name, sorted(m.step for m in history))
        assert math.isfinite(run.data.metrics["test_ll"])
        if pooled:
            assert client.get_metric_history(run.info.run_id, "pool_size"), "the trial did not train in a pool"

    retried = next(run for run in runs if run.data.tags["sweeper.trial_id"] == trial_id)
    assert retried.info.run_id == victim.info.run_id
    assert retried.data.tags["sweeper.node_id"] == head_id, "the retried trial did not move to the head"
    steps = [m.step for m in client.get_metric_history(retried.info.run_id, "val_elbo")]
    # Resumed from its checkpoint, not restarted: the first epochs were trained (and logged) once;
    # the epochs replayed after the checkpoint are not logged twice.
    assert steps.count(1) == 1 and steps.count(2) == 1, f"restarted from scratch? val_elbo steps {sorted(steps)}"
    assert len(steps) == len(set(steps)), f"replayed epochs logged twice: {sorted(steps)}"
