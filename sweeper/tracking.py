"""MLflow bookkeeping of the driver: the experiment, one parent run per sweep, its child runs.

The trials' own side (their run, found by trial id, and what they log) is trainables/tracking.py;
its names are re-exported here, so the sweeper has one module to use.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from sweeper.errors import SweeperError
from trainables.vae.catalog import (METRIC_BEST_EPOCH, METRIC_BEST_VAL_ELBO, METRIC_TEST_LL, METRIC_TEST_LL_SE,
                                    METRIC_VAL_ELBO)
from trainables.tracking import (  # noqa: F401 (re-exported: the sweeper's one tracking module)
    ROLE_SWEEP,
    EXPERIMENT_KIND,
    SWEEP_KEY,
    TAG_CONFIG,
    TAG_ERRORS,
    TAG_EXPERIMENT_KIND,
    TAG_MODEL_ID,
    TAG_NOTE,
    WEIGHTS_FILE,
    TAG_ORPHANED,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SCHEDULER,
    TAG_STOP,
    TAG_STUDY_NAME,
    TAG_STUDY_STORAGE,
    TAG_SWEEP,
    TAG_TRIAL,
    TAG_VIEW_PREFIX,
    VIEW_KEY,
    RunHandle,
    client,
    find_child,
    flatten,
    open_trial_run,
    run_name,
    trial_params,
    trial_run_name,
    ui_url,
)

DEFAULT_UI_PORT = 5000


def run_config(run) -> dict[str, str]:
    """A trial run's whole configuration as MLflow params would give it (strings: '0.0005',
    'None', 'True'): from its TAG_CONFIG, exact; runs made before it existed logged every value as
    a param."""
    text = run.data.tags.get(TAG_CONFIG)
    if not text:
        return dict(run.data.params)
    return {key: str(value) for key, value in json.loads(text).items()}


def default_tracking_uri(workdir: str | Path | None = None) -> str:
    """`sqlite:////abs/path/mlflow.db` in the working directory (absolute: trials run elsewhere)."""
    base = Path(workdir or os.getcwd()).expanduser().resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None, workdir: str | Path | None = None) -> str:
    """Make a user-given URI usable from any folder: relative sqlite/file paths become absolute."""
    if uri is None:
        return default_tracking_uri(workdir)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            return f"sqlite:///{(Path(workdir or os.getcwd()) / path).resolve()}"
    if "://" not in uri:
        raise SweeperError(f"--tracking-uri {uri!r}: expected sqlite:///PATH, http(s)://HOST:PORT or databricks; "
                           "a bare folder (the ./mlruns file store) is not supported by MLflow 3 for writing")
    return uri


def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifacts beside a sqlite database (absolute); a server decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Get or create the experiment (in the driver, with an absolute artifact location)."""
    c = client(tracking_uri)
    try:
        exp = c.get_experiment_by_name(name)
    except Exception as exc:  # connection refused, bad credentials, unreadable database
        raise SweeperError(f"cannot reach the MLflow tracking store {tracking_uri!r}: {exc}") from exc
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise SweeperError(f"MLflow experiment {name!r} is deleted; restore it in the UI or choose another "
                               "`experiment:` name in the spec")
        if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:   # experiments made by older versions
            c.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    root = artifact_root_for(tracking_uri)
    location = f"{root}/{name}" if root else None
    # A model-training experiment: the UI opens it on its runs table (not the GenAI overview).
    return c.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})


def sweep_view(metric: str, mode: str, parameters: Sequence[str], parent_run_id: str | None = None) -> dict:
    """The runs table as a sweep's reader wants it (MLflow's shared-view state): the choosing
    metric at each trial's tested epoch first and sorted on (validation, never test), the test LL
    and its standard error beside it, then the tested epoch, the stop reason and the searched parameters."""
    choose = METRIC_BEST_VAL_ELBO if metric == METRIC_VAL_ELBO else metric   # the tested epoch's value
    metrics = dict.fromkeys([choose, METRIC_BEST_VAL_ELBO, METRIC_TEST_LL, METRIC_TEST_LL_SE, METRIC_BEST_EPOCH])
    return {"selectedColumns": [*(f"metrics.`{m}`" for m in metrics), f"tags.`{TAG_STOP}`",
                                *(f"params.`{p}`" for p in parameters)],
            "orderByKey": f"metrics.`{choose}`", "orderByAsc": mode == "min",
            "runsExpanded": {parent_run_id: True} if parent_run_id else {}}


def save_sweep_view(tracking_uri: str, experiment_id: str, view: dict, name: str = "Sweep results") -> None:
    """Store `view` as the experiment's saved view VIEW_KEY (the newest sweep's replaces an older one)."""
    envelope = {"name": name, "createdAt": int(time.time() * 1000), "state": json.dumps(view)}
    client(tracking_uri).set_experiment_tag(experiment_id, TAG_VIEW_PREFIX + VIEW_KEY, json.dumps(envelope))


def has_sweep_view(experiment) -> bool:
    """Whether an experiment (an MLflow Experiment) holds the sweeps' saved view."""
    return TAG_VIEW_PREFIX + VIEW_KEY in (experiment.tags or {})


def ui_base(tracking_uri: str, port: int = DEFAULT_UI_PORT) -> str:
    """Where the UI of this store is: the server itself, or `sweeper ui` on this machine."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list:
    c = client(tracking_uri)
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                             max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def close_stale_children(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list[str]:
    """After a crash nothing runs any more: child runs still RUNNING are closed as KILLED."""
    closed = []
    for run in child_runs(tracking_uri, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            RunHandle(tracking_uri, run.info.run_id).terminate("KILLED")
            closed.append(run.info.run_id)
    return closed


def tag_orphans(tracking_uri: str, experiment_id: str, parent_run_id: str, known_trial_ids: set[str]) -> list[str]:
    """Child runs of trials the sweep does not know (see run.mark_lost_trials): tagged, closed."""
    out = []
    for run in child_runs(tracking_uri, experiment_id, parent_run_id):
        trial_id = run.data.tags.get(TAG_TRIAL)
        if trial_id is None or trial_id in known_trial_ids or TAG_ORPHANED in run.data.tags:
            continue
        handle = RunHandle(tracking_uri, run.info.run_id)
        handle.set_tags({TAG_ORPHANED: "the sweep was interrupted before Tune saved this trial; on resume "
                                       "Tune did not know it and ran the slot as another trial"})
        if run.info.status == "RUNNING":
            handle.terminate("KILLED")
        out.append(run.info.run_id)
    return out


def require_database(tracking_uri: str, command: str) -> None:
    """A sqlite store must already exist for commands that only read it: MlflowClient would
    silently create an empty database (and ./mlartifacts) wherever the command was typed."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise SweeperError(f"no MLflow database at {tracking_uri[len('sqlite:///'):]}: run `sweeper {command}` "
                           "in the folder where the sweep ran, or pass --tracking-uri")


STORE_CHECK_TIMEOUT_S = 5.0


def create_store(tracking_uri: str) -> None:
    """Create a new sqlite store (other stores exist already), whole or not at all. MLflow builds its schema in some 60
    migrations, each committed on its own: a driver killed among them left a database that every
    later command refused ("duplicate column name"). So the schema is built in a file of its own
    beside the store's and linked into place only when complete (a link, not a rename: a store
    another process created meanwhile is never replaced)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri[len("sqlite:///"):])
    if path.exists():
        return
    # A name never used before: MLflow keeps what it knows of a database by its URI.
    partial = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
    try:
        store = SqlAlchemyStore(f"sqlite:///{partial}", artifact_root_for(tracking_uri))
        store.engine.dispose()
        try:
            os.link(partial, path)
        except FileExistsError:      # another sweep created it meanwhile: theirs stands
            pass
    finally:
        partial.unlink(missing_ok=True)


def check_store(tracking_uri: str, timeout_s: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, before Ray starts, on a tracking store the sweep cannot use: a server
    that does not answer or refuses the credentials, a sqlite file in a missing folder.

    MLflow's client retries a dead server for minutes (7 retries with backoff); this probe asks
    once, with the credentials the trials will use (MLFLOW_TRACKING_USERNAME/_PASSWORD/_TOKEN),
    for a page of experiments: the basic-auth app answers 401 to missing or wrong credentials."""
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise SweeperError(f"--tracking-uri {tracking_uri}: the folder {folder} does not exist")
        return     # created by `create_store` once nothing else can fail before the sweep starts
    if not tracking_uri.startswith(("http://", "https://")):
        return     # databricks and plugin stores: their own client decides
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(tracking_uri), "/api/2.0/mlflow/experiments/search", "POST",
                                max_retries=0, timeout=timeout_s, json={"max_results": 1})
    except Exception as exc:   # refused, unknown host, timeout, TLS
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise SweeperError(f"cannot reach the MLflow tracking server {tracking_uri} ({reason}): is it running, "
                           "and is the address right? Nothing was started") from None
    if response.status_code in (401, 403):
        raise SweeperError(f"the MLflow tracking server {tracking_uri} refused the credentials (HTTP "
                           f"{response.status_code}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                           "(or MLFLOW_TRACKING_TOKEN) to an account of that server. Nothing was started")
    if response.status_code != 200:
        raise SweeperError(f"{tracking_uri} did not answer as an MLflow tracking server (HTTP {response.status_code} "
                           "to a search of experiments); check the address. Nothing was started")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind host:port now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


UI_START_TIMEOUT_S = 300.0
# What `mlflow ui` would print that a user of a local UI does not need, turned off where it
# comes from: uvicorn's start-up and access lines (its log level), MLflow's INFO lines (its
# logger level), the registry-store notice (the URI given), and the Starlette deprecation
# warning MLflow's server module triggers at import (a warnings filter for that module). The
# GenAI job runner (seven huey processes that each import MLflow: half a minute of both cores
# on a small machine, for features a sweep does not use) is not started.
UI_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
UI_WARNINGS_FILTER = "ignore::UserWarning:mlflow.server.fastapi_app"


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """`mlflow ui` on 127.0.0.1 only (never on all interfaces), one worker: a personal UI on a
    small machine starts in seconds instead of importing MLflow in four processes."""
    import shutil
    import sys

    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    args = [mlflow, "ui", "--backend-store-uri", tracking_uri, "--registry-store-uri", tracking_uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--uvicorn-opts", "--log-level warning --no-access-log"]
    root = artifact_root_for(tracking_uri)
    if root:
        args += ["--default-artifact-root", root]
    return args


def server_answers(base: str, timeout_s: float = 2.0) -> bool:
    """Whether the MLflow server at `base` answers its health check now."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except Exception:
        return False


def launch_ui(tracking_uri: str | None, port: int, echo=print, start_timeout_s: float = UI_START_TIMEOUT_S) -> int:
    """Run `mlflow ui` bound to 127.0.0.1 until it exits (Ctrl-C); print its links once it answers.

    The server runs in a process group of its own, and Ctrl-C (SIGINT, SIGTERM, SIGHUP) here is
    passed to that whole group once: the server stops cleanly, whether the signal came from a
    terminal or was sent to this process alone. Returns the server's exit code (0 after Ctrl-C)."""
    import signal
    import subprocess

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("http"):
        raise SweeperError(f"{uri} is an MLflow server: open it in a browser instead")
    require_database(uri, "ui")
    if not port_free(port):
        raise SweeperError(f"port {port} on 127.0.0.1 is in use (another `sweeper ui` or MLflow server?); "
                           f"pass another one, e.g. `sweeper ui --port {port + 1}`")
    base = ui_base(uri, port)
    warnings = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), UI_WARNINGS_FILTER) if w)
    env = {**os.environ, **UI_ENV, "PYTHONWARNINGS": warnings}
    echo(f"starting the MLflow UI for {uri} on {base} (a few seconds) ...")
    server = subprocess.Popen(ui_command(uri, port), env=env, start_new_session=True)
    stopping: list[int] = []

    def stop(signum, frame) -> None:
        if not stopping and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)    # uvicorn's graceful shutdown; SIGINT would end it in a KeyboardInterrupt traceback
        stopping.append(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in handled}
    try:
        experiments = sweep_experiments(uri)      # read while the server starts
        deadline = time.monotonic() + start_timeout_s
        while not stopping and not server_answers(base):
            if server.poll() is not None:
                raise SweeperError(f"the MLflow UI did not start (exit code {server.returncode}); its messages "
                                   "are above")
            if time.monotonic() > deadline:
                raise SweeperError(f"the MLflow UI did not answer on {base} within {start_timeout_s:.0f} s; "
                                   "its messages are above")
            time.sleep(0.5)
        if not stopping:
            echo(f"MLflow UI on {base} (Ctrl-C to stop)")
            for exp in experiments:
                echo(f"  {exp.name}: {ui_url(base, exp.experiment_id, view=has_sweep_view(exp))}")
        code = server.wait()
        return 0 if stopping else code
    finally:
        if server.poll() is None:        # an error above, or the server ignores the signal
            for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(server.pid, sig)
                    server.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def sweep_experiments(tracking_uri: str) -> list:
    """The store's experiments that hold sweeps (their runs tables are what a user wants to see)."""
    try:
        c = client(tracking_uri)
        return [e for e in c.search_experiments()
                if c.search_runs([e.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{ROLE_SWEEP}'",
                                 max_results=1)]
    except Exception:   # an unreadable store: the UI will say more than we can
        return []
