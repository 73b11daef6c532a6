"""cluster.yaml, offline: Ray's own cluster-config schema, and our security rules on top of it.

There is no `ray up --dry-run`; `validate_config(prepare_config(...))` is what `ray up` runs on
the file before it talks to the cloud (a private Ray API: plain `validate_config` rejects user
files, `prepare_config` first fills in the provider's defaults).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import ray
import yaml
from cluster_utils import node_config_problems, security_problems
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_DOC = ROOT / "docs" / "CLUSTER.md"


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture
def config(text) -> dict:
    return yaml.safe_load(text)


def ray_validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def rename(config: dict, path: tuple[str, ...], new_key: str) -> dict:
    node = config
    for key in path[:-1]:
        node = node[key]
    node[new_key] = node.pop(path[-1])
    return config


def head_start(config: dict) -> str:
    return next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)


# --------------------------------------------------------------------------------------------
# Ray's schema


def test_cluster_yaml_passes_rays_schema(config):
    ray_validate(config)


@pytest.mark.parametrize("path, typo", [
    (("max_workers",), "max_worker"),
    (("idle_timeout_minutes",), "idle_timeout_minute"),
    (("head_start_ray_commands",), "head_start_ray_command"),
    (("worker_setup_commands",), "worker_setup_comands"),
    (("docker", "head_image"), "head_imag"),
    (("auth", "ssh_user"), "ssh_usr"),
    (("available_node_types", "gpu_worker", "min_workers"), "min_worker"),
    (("provider", "security_group", "IpPermissions"), "IpPermission"),
], ids=lambda v: v if isinstance(v, str) else ".".join(v))
def test_a_misspelled_key_fails_rays_schema(config, path, typo):
    ray_validate(config)   # the unmodified file is fine ...
    with pytest.raises(Exception, match=re.escape(repr(typo))):   # ... the typo is named
        ray_validate(rename(config, path, typo))


def test_a_misspelled_node_config_key_is_caught_by_our_check(config):
    # Ray leaves node_config to the cloud's API, so its schema accepts any key there.
    assert node_config_problems(config) == []
    rename(config, ("available_node_types", "gpu_worker", "node_config", "InstanceType"), "InstanceTyp")
    ray_validate(config)
    problems = node_config_problems(config)
    assert len(problems) == 1 and "did you mean 'InstanceType'" in problems[0], problems


# --------------------------------------------------------------------------------------------
# Secure by default


def test_cluster_yaml_is_secure_by_default(config, text):
    assert security_problems(config, text) == []
    start = head_start(config)
    assert "--dashboard-host 127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]


def _dashboard_everywhere(config, text):
    cmds = config["head_start_ray_commands"]
    i = cmds.index(head_start(config))
    cmds[i] = cmds[i].replace("--dashboard-host 127.0.0.1", "--dashboard-host 0.0.0.0")


def _dashboard_host_default(config, text):
    cmds = config["head_start_ray_commands"]
    i = cmds.index(head_start(config))
    cmds[i] = cmds[i].replace("--dashboard-host 127.0.0.1", "")


def _no_token_on_workers(config, text):
    config["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                           for c in config["worker_start_ray_commands"]]


def _no_token_on_head(config, text):
    cmds = config["head_start_ray_commands"]
    i = cmds.index(head_start(config))
    cmds[i] = cmds[i].replace("RAY_AUTH_MODE=token ", "")


def _auth_disabled(config, text):
    config["setup_commands"].append("echo 'export RAY_AUTH_MODE=disabled' >> ~/.bashrc")


def _dashboard_port_open(config, text):
    config["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]})


def _mlflow_port_open(config, text):
    config["provider"]["security_group"]["IpPermissions"][0].update(FromPort=22, ToPort=5000)


def _ssh_from_everywhere(config, text):
    config["provider"]["security_group"]["IpPermissions"][0]["IpRanges"] = [{"CidrIp": "0.0.0.0/0"}]


def _mlflow_everywhere(config, text):
    cmds = config["head_start_ray_commands"]
    i = next(j for j, c in enumerate(cmds) if "mlflow server" in c)
    cmds[i] = re.sub(r'--host "\$SWEEPER_HEAD_IP"', "--host 0.0.0.0", cmds[i])


def _mlflow_without_auth(config, text):
    cmds = config["head_start_ray_commands"]
    i = next(j for j, c in enumerate(cmds) if "mlflow server" in c)
    cmds[i] = cmds[i].replace("--app-name basic-auth", "")


def _admin_password_in_file(config, text):
    config["head_setup_commands"].append("export MLFLOW_AUTH_ADMIN_PASSWORD=hunter2-but-longer")


def _flask_secret_in_file(config, text):
    cmds = config["head_start_ray_commands"]
    i = next(j for j, c in enumerate(cmds) if "mlflow server" in c)
    cmds[i] = "MLFLOW_FLASK_SERVER_SECRET_KEY='s3cr3t' " + cmds[i]


def _token_in_file(config, text):
    config["worker_start_ray_commands"][-1] = "RAY_AUTH_TOKEN=" + "ab" * 32 + " " + config["worker_start_ray_commands"][-1]


def _password_in_uri(config, text):
    config["setup_commands"].append("export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:pa55@db:5432/mlflow")


UNSAFE = {
    "dashboard on 0.0.0.0": (_dashboard_everywhere, "--dashboard-host 0.0.0.0"),
    "dashboard host left to Ray's default": (_dashboard_host_default, "without --dashboard-host"),
    "workers without token auth": (_no_token_on_workers, "without RAY_AUTH_MODE=token"),
    "head without token auth": (_no_token_on_head, "without RAY_AUTH_MODE=token"),
    "token auth disabled": (_auth_disabled, "RAY_AUTH_MODE=disabled"),
    "dashboard port opened": (_dashboard_port_open, "only SSH"),
    "port range opened": (_mlflow_port_open, "only SSH"),
    "SSH open to the internet": (_ssh_from_everywhere, "whole internet"),
    "MLflow on every interface": (_mlflow_everywhere, "every interface"),
    "MLflow without basic-auth": (_mlflow_without_auth, "without --app-name basic-auth"),
    "admin password in the file": (_admin_password_in_file, "MLFLOW_AUTH_ADMIN_PASSWORD is written"),
    "Flask secret in the file": (_flask_secret_in_file, "MLFLOW_FLASK_SERVER_SECRET_KEY is written"),
    "Ray token in the file": (_token_in_file, "RAY_AUTH_TOKEN is written"),
    "password inside a URI": (_password_in_uri, "password inside a URL"),
}


@pytest.mark.parametrize("name", UNSAFE)
def test_an_unsafe_change_is_rejected(config, text, name):
    mutate, expected = UNSAFE[name]
    mutate(config, text)
    dumped = yaml.safe_dump(config)   # the file as it would be written
    ray_validate(config)              # Ray's schema has no opinion on any of this ...
    problems = security_problems(config, dumped)
    assert any(expected in p for p in problems), f"{name}: not caught; problems: {problems}"


def test_a_secret_pasted_into_a_comment_is_rejected(config, text):
    leaked = text + "\n# token for later: " + "0f" * 32 + "\n"
    problems = security_problems(yaml.safe_load(leaked), leaked)
    assert any("64-hex-digit token" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# What the file promises


def test_images_pin_the_projects_ray_and_python(config):
    """The head, the workers and the driver must run the same Ray and Python as this install."""
    docker = config["docker"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    for key in ("image", "head_image"):
        m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-(?P<flavour>cpu|gpu|cu\d+)",
                         docker[key])
        assert m, f"docker.{key} {docker[key]!r}: expected rayproject/ray:<ray>-py<XY>-<cpu|gpu|cuXYZ>"
        assert m["ray"] == ray.__version__, f"docker.{key} pins Ray {m['ray']}, installed {ray.__version__}"
        assert m["py"] == py, f"docker.{key} pins {m['py']}, this is {py}"
    assert docker["head_image"].endswith("-cpu") and not docker["image"].endswith("-cpu")


def test_head_runs_no_trials_and_gpu_workers_autoscale_on_spot(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)
    assert all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in workers)


def test_nodes_install_the_project_fetch_data_and_run_mlflow_on_shared_storage(config):
    from mlflow.environment_variables import (
        MLFLOW_AUTH_ADMIN_PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY,
    )

    assert config["file_mounts"]["~/vampprior-sweeper"] == "."
    workers = " ".join(config["worker_setup_commands"])
    assert "pip install" in workers and "~/vampprior-sweeper" in workers and "sweeper data fetch" in workers
    assert "mlflow[auth]" in " ".join(config["head_setup_commands"])
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--serve-artifacts" in mlflow and '--artifacts-destination "$SWEEPER_BUCKET/' in mlflow
    # The names MLflow reads its secrets from, as documented for cluster.env.
    doc = CLUSTER_DOC.read_text(encoding="utf-8")
    for var in (MLFLOW_AUTH_ADMIN_PASSWORD.name, MLFLOW_FLASK_SERVER_SECRET_KEY.name):
        assert f"export {var}=" in doc


def test_the_documented_sweep_command_uses_real_options():
    """docs/CLUSTER.md's `sweeper run` line must keep working as the CLI changes."""
    from sweeper.cli import main

    run = main.commands["run"]
    known = {opt for p in run.params for opt in getattr(p, "opts", [])}
    doc = CLUSTER_DOC.read_text(encoding="utf-8").replace("\\\n", " ")
    # Commands are the indented (code block) lines.
    lines = [line for line in doc.splitlines() if line.startswith("    ") and "sweeper run " in line]
    assert lines, "docs/CLUSTER.md has no `sweeper run` command"
    for line in lines:
        used = set(re.findall(r"(?<=\s)--[a-z][a-z-]*", line.split("sweeper run", 1)[1]))
        assert used <= known, f"unknown options {used - known} in: {line.strip()}"
        assert {"--address", "--tracking-uri", "--storage-path"} <= used


def test_one_constraints_file_pins_the_tested_ray_optuna_mlflow_everywhere():
    """The searcher and the resumable scheduler use private attributes of Ray and Optuna: the
    versions they were tested with are pinned once and used by CI, the README and the cluster."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"ray", "optuna", "mlflow"} <= set(pins)
    for package, pinned in pins.items():
        assert version(package) == pinned, f"installed {package} {version(package)} is not the pinned {pinned}"
    for path in (".ci/run", "README.md"):
        assert '-e ".[dev]" -c constraints.txt' in (ROOT / path).read_text(), path
    cluster = (ROOT / "cluster.yaml").read_text()
    assert cluster.count("-c ~/vampprior-sweeper/constraints.txt") == 2       # head and workers


def test_the_heads_mlflow_runs_on_postgresql_with_pools_that_fit_together(config):
    """What benchmarks/tracking.py measured, as cluster.yaml sets it: PostgreSQL on a Unix socket
    only, a SQLAlchemy pool per worker that a full worker cannot exhaust, max_connections for all
    workers' pools, and the credential cache."""
    import anyio

    commands = config["head_start_ray_commands"]
    server = next(c for c in commands if "mlflow server" in c)
    postgres = next(c for c in commands if "pg_ctl" in c)
    workers = int(re.search(r"--workers (\d+)", server)[1])
    pool = int(re.search(r"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=(\d+)", server)[1])
    overflow = int(re.search(r"MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=(\d+)", server)[1])
    max_connections = int(re.search(r"max_connections=(\d+)", postgres)[1])

    async def threads() -> int:   # how many requests one worker runs at once (Flask under anyio)
        return int(anyio.to_thread.current_default_thread_limiter().total_tokens)

    assert pool + overflow >= 2 * anyio.run(threads), "log_batch holds two connections per request"
    assert max_connections >= workers * (pool + overflow) + 10
    assert '${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg://' in server
    assert "listen_addresses=''" in postgres and "--auth=peer" in postgres     # no TCP port, no password
    assert "MLFLOW_AUTH_CONFIG_PATH=" in server
    ini = next(c for c in commands if "basic_auth.ini" in c and "printf" in c)
    assert "'auth_cache_ttl_seconds = 60'" in ini and "'default_permission = READ'" in ini
    setup = " ".join(config["head_setup_commands"])
    assert "apt-get install" in setup and "postgresql" in setup and "psycopg[binary]" in setup
