"""The tracking server as cluster.yaml starts it (basic-auth with a credential cache, PostgreSQL
behind it, a larger SQLAlchemy pool), a real `mlflow server` and a real PostgreSQL on this machine:
it refuses what it must, and a trial's logging survives it freezing.

PostgreSQL is Debian's `postgresql` package (.ci/run installs it); where it cannot be had, the
server runs on sqlite and the PostgreSQL test is skipped with the reason.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from cluster_utils import cluster_tracking_server, postgres_missing
from mlflow.exceptions import MlflowException

from trainables import tracking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory):
    with cluster_tracking_server(tmp_path_factory.mktemp("tracking-server")) as server:
        yield SimpleNamespace(server=server, pg=server.postgres)


@pytest.fixture
def as_admin(cluster_server, monkeypatch):
    for key, value in cluster_server.server.client_env().items():
        monkeypatch.setenv(key, value)
    return mlflow.MlflowClient(cluster_server.server.url)


def test_the_cluster_server_refuses_requests_without_or_with_wrong_credentials(cluster_server, as_admin,
                                                                                 monkeypatch):
    server = cluster_server.server
    search = "/api/2.0/mlflow/experiments/search?max_results=5"
    assert server.request(search)[0] == 401
    assert server.request("/ajax-api/2.0/mlflow/runs/search")[0] == 401
    assert server.request(search, auth=True)[0] == 200      # the right password is in the cache now ...
    for user, password in (("admin", "wrong"), ("admin", server.password + "x"), ("admin", ""),
                           ("nobody", server.password)):
        status, _ = server.request(search, auth=(user, password))
        assert status == 401, f"{user}:{password[:3]}... answered {status}"   # ... and only it gets in

    run_id = as_admin.create_run(as_admin.create_experiment("auth")).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    start = time.monotonic()
    with pytest.raises(MlflowException, match="401"):        # refused at once, not retried as "not now"
        tracking.RunHandle(server.url, run_id).set_tags({"intruder": "yes"})
    assert time.monotonic() - start < 10
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    assert "intruder" not in as_admin.get_run(run_id).data.tags


def freeze(server, sig) -> None:
    for pid in server.service.pids():
        os.kill(pid, sig)


def test_a_frozen_server_delays_a_trials_logging_but_loses_and_duplicates_nothing(cluster_server, as_admin,
                                                                                   monkeypatch):
    """SIGSTOP the server mid-trial: the trial's calls return at once, its queued writes time out
    and are retried; the server, thawed, also serves the requests whose clients gave up, so some
    writes arrive twice: each is stored once."""
    server, pg = cluster_server.server, cluster_server.pg
    # The test's own calls (setting up, checking) keep MLflow's patient defaults: on a loaded
    # machine creating the experiment took over 2 s and failed the test before the freeze.
    run_id = as_admin.create_run(as_admin.create_experiment("frozen")).info.run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")       # our backoff, not urllib3's, here
    run = tracking.RunHandle(server.url, run_id, retry_s=120)
    image = np.zeros((56, 56), dtype=np.uint8)
    for epoch in range(1, 6):
        run.log_metrics({"epoch": epoch, "val_elbo": -90.0 - epoch}, step=epoch, wait=False)
    run.flush()
    freeze(server, signal.SIGSTOP)
    try:
        start = time.monotonic()
        for epoch in range(6, 21):
            if epoch % 10 == 0:
                run.log_image(image, "pseudo_inputs", epoch, wait=False)
            run.log_metrics({"epoch": epoch, "val_elbo": -90.0 - epoch}, step=epoch, wait=False)
        assert time.monotonic() - start < 1.0, "the trial waited for a frozen server"
        time.sleep(5)                                       # two or more timeouts and retries
        assert run.unacknowledged(), "a frozen server acknowledged writes"
    finally:
        freeze(server, signal.SIGCONT)
    run.terminate()
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    for key in ("epoch", "val_elbo"):
        assert sorted(m.step for m in as_admin.get_metric_history(run_id, key)) == list(range(1, 21))
    assert run.stored_images() == {("pseudo_inputs", 10), ("pseudo_inputs", 20)}
    assert len(as_admin.list_artifacts(run_id, "images")) == 4
    assert as_admin.get_run(run_id).info.status == "FINISHED"
    if pg:   # the rows themselves, in PostgreSQL
        rows = pg.query(f"SELECT key, step, count(*) FROM metrics WHERE run_uuid = '{run_id}' "
                        "GROUP BY key, step HAVING count(*) > 1")
        assert rows == [], rows


def test_the_tracking_store_for_clusters_is_a_real_postgresql(cluster_server, as_admin):
    if cluster_server.pg is None:
        pytest.skip(f"no PostgreSQL here: {postgres_missing()}")
    pg = cluster_server.pg
    run_id = as_admin.create_run(as_admin.create_experiment("postgres")).info.run_id
    tracking.RunHandle(cluster_server.server.url, run_id).log_metrics({"epoch": 1}, step=1)
    assert pg.query("SELECT version()")[0][0].startswith("PostgreSQL")
    assert pg.query(f"SELECT key, value, step FROM metrics WHERE run_uuid = '{run_id}'") == [("epoch", 1.0, 1)]
