"""MLflow bookkeeping of the driver: the experiment, one parent run per sweep, its child runs.

The trials' own side (their run, found by trial id, and what they log) is trainables/tracking.py;
its names are re-exported here, so the sweeper has one module to use.
"""

from __future__ import annotations

import os
from pathlib import Path

from sweeper.errors import SweeperError
from trainables.tracking import (  # noqa: F401 (re-exported: the sweeper's one tracking module)
    ROLE_SWEEP,
    EXPERIMENT_KIND,
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
    RunHandle,
    client,
    find_child,
    flatten,
    open_trial_run,
    run_name,
    trial_run_name,
    ui_url,
)

DEFAULT_UI_PORT = 5000


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


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind host:port now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def launch_ui(tracking_uri: str | None, port: int, echo=print) -> None:
    """Replace this process by `mlflow ui` bound to 127.0.0.1 (never on all interfaces)."""
    import shutil
    import sys

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise SweeperError(f"no MLflow database at {uri[len('sqlite:///'):]}: run a sweep here first "
                           "(`sweeper run SPEC`) or pass --tracking-uri")
    if uri.startswith("http"):
        raise SweeperError(f"{uri} is an MLflow server: open it in a browser instead")
    if not port_free(port):
        raise SweeperError(f"port {port} on 127.0.0.1 is in use (another `sweeper ui` or MLflow server?); "
                           f"pass another one, e.g. `sweeper ui --port {port + 1}`")
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    args = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    root = artifact_root_for(uri)
    if root:
        args += ["--default-artifact-root", root]
    echo(f"MLflow UI on http://127.0.0.1:{port} for {uri} (Ctrl-C to stop)")
    for exp in sweep_experiments(uri):
        echo(f"  {exp.name}: {ui_url(ui_base(uri, port), exp.experiment_id)}")
    os.execv(args[0], args)


def sweep_experiments(tracking_uri: str) -> list:
    """The store's experiments that hold sweeps (their runs tables are what a user wants to see)."""
    try:
        c = client(tracking_uri)
        return [e for e in c.search_experiments()
                if c.search_runs([e.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{ROLE_SWEEP}'",
                                 max_results=1)]
    except Exception:   # an unreadable store: the UI will say more than we can
        return []
