"""Helpers for the cluster tests: the security checks of cluster.yaml, and a real multi-node Ray
cluster plus an MLflow basic-auth server, all as separate processes on this machine.

Every process is started in its own session (`setsid`) and stopped by that session id, never by
name: `ray stop` would also kill any other Ray on the machine (another test, another user).

Addresses: the head listens on 127.0.0.2 and the worker on 127.0.0.3, two loopback addresses, so
the nodes have distinct IPs like real machines and no packet leaves the machine. (Ray rewrites
`127.0.0.1` and `localhost` to the machine's outbound address for multi-node clusters; other
127/8 addresses are kept as given.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"


# --------------------------------------------------------------------------------------------
# cluster.yaml: checks of our own on top of Ray's schema


# Secrets may be referenced ($NAME, ${NAME}) in the file, never written in it.
SECRET_NAMES = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD",
                "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_ASSIGNMENT = re.compile(
    r"\b(?P<name>" + "|".join(SECRET_NAMES) + r")\b\s*[=:]\s*(?P<value>[^\s;&|)]+)")
_LITERAL_SECRETS = (
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\b[0-9a-fA-F]{64}\b"), "a 64-hex-digit token (the shape of a Ray auth token)"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@"), "a password inside a URL"),
)
_DASHBOARD_HOST = re.compile(r"--dashboard-host[= ]+['\"]?(?P<host>[^\s'\";&|]+)")
_MLFLOW_HOST = re.compile(r"\bmlflow server\b.*?\s(?:--host|-h)[= ]+['\"]?(?P<host>[^\s'\";&|]+)", re.DOTALL)
_OPEN_ADDRESSES = ("0.0.0.0", "::", "[::]", "*")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _commands(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(path, command) for every shell command of the file, node-type overrides included."""
    out = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        out += [(f"{key}[{i}]", str(c)) for i, c in enumerate(config.get(key) or [])]
    for name, node in (config.get("available_node_types") or {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += [(f"available_node_types.{name}.{key}[{i}]", str(c))
                    for i, c in enumerate((node or {}).get(key) or [])]
    return out


def _strings(value: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def security_problems(config: Mapping[str, Any], text: str = "") -> list[str]:
    """What makes a cluster config unsafe to `ray up`, as "path: problem; fix" lines (none: ok).

    Whoever reaches Ray's dashboard / Jobs API, GCS or client port can run code on every node
    (CVE-2023-48022). So: every `ray start` with RAY_AUTH_MODE=token, the dashboard on the head's
    loopback, MLflow with basic-auth and not on every interface, the cloud firewall open for SSH
    only and not to the whole internet, and no secret in the file (it is committed). `text` is
    the raw file, so that secrets pasted into comments are caught too.
    """
    problems: list[str] = []
    commands = _commands(config)

    starts = {key: [(w, c) for w, c in commands if w.startswith(key + "[") and "ray start" in c]
              for key in ("head_start_ray_commands", "worker_start_ray_commands")}
    for key, found in starts.items():
        if not found:
            problems.append(f"{key}: no `ray start` command")
        for where, cmd in found:
            if not re.search(r"\bRAY_AUTH_MODE=token\b", cmd):
                problems.append(f"{where}: `ray start` without RAY_AUTH_MODE=token: the node would accept "
                                f"unauthenticated requests; prefix it with RAY_AUTH_MODE=token")
    for where, cmd in commands:
        for m in re.finditer(r"\bRAY_AUTH_MODE=['\"]?(\w+)", cmd):
            if m.group(1) != "token":
                problems.append(f"{where}: RAY_AUTH_MODE={m.group(1)}; it must be token on every node")

    for where, cmd in starts["head_start_ray_commands"]:
        if "--head" not in cmd:
            continue
        m = _DASHBOARD_HOST.search(cmd)
        if not m:
            problems.append(f"{where}: `ray start --head` without --dashboard-host (Ray's default may bind "
                            f"every interface); add --dashboard-host 127.0.0.1 and use `ray dashboard`")
        elif m.group("host") not in _LOOPBACK:
            problems.append(f"{where}: --dashboard-host {m.group('host')} exposes the dashboard and its Jobs "
                            f"API (CVE-2023-48022); use --dashboard-host 127.0.0.1 and `ray dashboard`")

    for where, cmd in commands:
        if "mlflow server" not in cmd:
            continue
        if not re.search(r"--app-name[= ]+['\"]?basic-auth\b", cmd):
            problems.append(f"{where}: mlflow server without --app-name basic-auth: anyone who reaches it can "
                            f"read and change every run")
        m = _MLFLOW_HOST.search(cmd)
        if m and m.group("host") in _OPEN_ADDRESSES:
            problems.append(f"{where}: mlflow server --host {m.group('host')} listens on every interface; "
                            f"bind it to the head's private address")

    provider = config.get("provider") or {}
    rules = (provider.get("security_group") or {}).get("IpPermissions") or []
    if provider.get("type") == "aws" and not rules:
        problems.append("provider.security_group.IpPermissions: missing; open SSH (tcp 22) from your CIDR only")
    for i, rule in enumerate(rules):
        where = f"provider.security_group.IpPermissions[{i}]"
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ports != (22, 22) or str(rule.get("IpProtocol", "")).lower() != "tcp":
            problems.append(f"{where}: opens {rule.get('IpProtocol')} {ports[0]}-{ports[1]}; only SSH (tcp 22) "
                            f"may be open: reach the dashboard and MLflow through SSH tunnels")
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges") or []) or \
                any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges") or []):
            problems.append(f"{where}: open to the whole internet; restrict it to your network's CIDR")

    for path, value in _strings(config):
        for m in _SECRET_ASSIGNMENT.finditer(value):
            if not m.group("value").strip("'\"").startswith("$"):
                problems.append(f"{path}: {m.group('name')} is written in the file; read it from the "
                                f"environment (~/.vampprior-sweeper/cluster.env, shipped by file_mounts)")
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern, what in _LITERAL_SECRETS:
            if pattern.search(line):
                problems.append(f"line {lineno}: looks like {what}; keep secrets out of cluster.yaml")
    return problems


# EC2 RunInstances parameters (plus Ray's SubnetIds) that a node_config may use. Ray's schema
# leaves node_config free-form (it is the cloud's API), so a misspelled key there would only fail
# at launch time, in the cloud, after minutes.
AWS_NODE_CONFIG_KEYS = frozenset({
    "BlockDeviceMappings", "CapacityReservationSpecification", "CpuOptions", "CreditSpecification",
    "DisableApiStop", "DisableApiTermination", "EbsOptimized", "EnclaveOptions", "HibernationOptions",
    "IamInstanceProfile", "ImageId", "InstanceInitiatedShutdownBehavior", "InstanceMarketOptions",
    "InstanceType", "Ipv6AddressCount", "KernelId", "KeyName", "LaunchTemplate", "LicenseSpecifications",
    "MaintenanceOptions", "MetadataOptions", "Monitoring", "NetworkInterfaces", "Placement",
    "PrivateDnsNameOptions", "RamdiskId", "SecurityGroupIds", "SubnetId", "SubnetIds", "TagSpecifications",
    "UserData",
})


def node_config_problems(config: Mapping[str, Any]) -> list[str]:
    """Unknown keys in AWS node_configs, with the closest known key."""
    import difflib

    if (config.get("provider") or {}).get("type") != "aws":
        return []
    problems = []
    for name, node in (config.get("available_node_types") or {}).items():
        for key in (node or {}).get("node_config") or {}:
            if key not in AWS_NODE_CONFIG_KEYS:
                close = difflib.get_close_matches(key, sorted(AWS_NODE_CONFIG_KEYS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"available_node_types.{name}.node_config.{key}: not an EC2 RunInstances "
                                f"parameter{hint}")
    return problems


# --------------------------------------------------------------------------------------------
# Processes


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports that are free right now (all sockets held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (what one `setsid` start and its children became);
    zombies (dead, waiting to be reaped) are not counted."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
        if stat.rpartition(")")[2].split()[0] != "Z":
            pids.append(pid)
    return pids


def tree_pids(root: int) -> list[int]:
    """`root` and its live descendants, by parent id (PostgreSQL's backends each start a session
    of their own, so a session does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the session's processes, then SIGKILL whatever is still there after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_pids(sid):
            time.sleep(0.2)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


class Service:
    """One background command in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str], cwd: Path | None = None):
        self.name, self.argv, self.log = name, argv, log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop(); the process outlives any block
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT, env=dict(env),
                                     cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)

    @property
    def sid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        return session_pids(self.sid)

    def stop(self, grace_s: float = 5.0) -> None:
        self.proc.poll()   # reap the session leader if it already exited
        kill_session(self.sid, grace_s)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()

    def describe(self) -> str:
        return f"{self.name} (exit {self.proc.poll()}), last lines of {self.log}:\n{tail(self.log)}"


def wait_until(predicate, timeout_s: float, what: str, *, interval_s: float = 0.5, on_timeout=None):
    """Poll `predicate` until it returns something truthy; fail with `what` (and context)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    extra = on_timeout() if on_timeout else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{extra}")


# --------------------------------------------------------------------------------------------
# A two-node Ray cluster with token authentication


class LocalRayCluster:
    """A head (127.0.0.2) and worker nodes (127.0.0.3, ...) as separate `ray start --block`
    processes, with token authentication, unique ports and a private temp dir.

    `env` is what a driver (or `ray status`) needs to connect: RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN_PATH pointing at the cluster's token file.
    """

    def __init__(self, root: Path, *, object_store_bytes: int = 80 * 2**20):
        self.root = root
        self.object_store_bytes = object_store_bytes
        # Unix socket paths must stay under ~107 characters: a short temp dir of our own.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.token_path = root / "ray_auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_", "MLFLOW_")) or k == "RAY_DEDUP_LOGS"}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                        RAY_USAGE_STATS_ENABLED="0")
        self.nodes: dict[str, Service] = {}
        self.node_ids: dict[str, str] = {}   # ip -> Ray node id, filled by wait_for_nodes
        self.port = 0

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def _node_ports(self) -> list[str]:
        (nm, om, agent, agent_grpc, metrics, rt_env) = free_ports(6)
        return [f"--node-manager-port={nm}", f"--object-manager-port={om}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}"]

    def _common(self, cpus: int) -> list[str]:
        return [f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={self.object_store_bytes}",
                "--disable-usage-stats", "--block"]

    def start_head(self, cpus: int = 1, timeout_s: float = 90) -> None:
        self.port, dashboard = free_ports(2)
        argv = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                "--include-dashboard=false", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--temp-dir={self.temp_dir}",
                *self._node_ports(), *self._common(cpus)]
        self._start("head", argv, timeout_s)

    def add_worker(self, name: str = "worker", ip: str = WORKER_IP, cpus: int = 1, timeout_s: float = 90) -> None:
        argv = [str(BIN / "ray"), "start", f"--address={self.address}", f"--node-ip-address={ip}",
                *self._node_ports(), *self._common(cpus)]
        self._start(name, argv, timeout_s)

    def _start(self, name: str, argv: list[str], timeout_s: float) -> None:
        node = Service(f"ray node {name!r}", argv, self.root / f"ray-{name}.log", self.env)
        self.nodes[name] = node

        def started():
            if not node.alive():
                raise RuntimeError(f"`ray start` for {name} exited:\n{node.describe()}")
            return "Ray runtime started" in node.log.read_text(errors="replace")

        wait_until(started, timeout_s, f"ray node {name!r} to start", on_timeout=node.describe)

    def probe(self, timeout_s: float = 120) -> list[dict[str, Any]]:
        """The alive nodes as the GCS sees them, through a real driver with the token."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR', "
                "log_to_driver=False); print('NODES=' + json.dumps([{'id': n['NodeID'], "
                "'ip': n['NodeManagerAddress'], 'cpu': n['Resources'].get('CPU', 0)} "
                "for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                             timeout=timeout_s, cwd=self.root, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("NODES="):
                return json.loads(line[len("NODES="):])
        raise RuntimeError(f"could not list the cluster's nodes (exit {out.returncode}):\n"
                           f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> dict[str, str]:
        """Wait until `count` nodes are alive; return {ip: node_id}."""
        def ready():
            nodes = self.probe()
            return {n["ip"]: n["id"] for n in nodes} if len(nodes) >= count else None

        self.node_ids = wait_until(ready, timeout_s, f"{count} alive Ray nodes", interval_s=2,
                                   on_timeout=lambda: "\n".join(n.describe() for n in self.nodes.values()))
        return self.node_ids

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the node's raylet, then everything else of that node (a vanished machine)."""
        node = self.nodes[name]
        raylets = [p for p in node.pids() if process_name(p) == "raylet"]
        if not raylets:
            raise RuntimeError(f"no raylet process in {node.name}:\n{node.describe()}")
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)
        kill_session(node.sid, grace_s=0)
        return raylets[0]

    def shutdown(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + [n for n in self.nodes if n == "head"]:
            self.nodes[name].stop(grace_s=1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL, the tracking store for clusters (Debian's `postgresql` package; .ci/run installs it)


def postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, postgres): on PATH, else Debian's
    /usr/lib/postgresql/<version>/bin (the newest), else None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here (None: it can)."""
    if postgres_bindir() is None:
        return ("PostgreSQL's server is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                "apt-get install postgresql (as .ci/run does)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (SQLAlchemy's PostgreSQL driver): pip install -e '.[dev]' -c constraints.txt"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as (PostgreSQL refuses root)"
    return None


class PostgresServer:
    """A private PostgreSQL server: its own data folder, 127.0.0.1 on a free port, a database
    `mlflow` owned by the password-protected role `mlflow` (scram-sha-256). PostgreSQL refuses to
    run as root: as root it runs as the `postgres` user, in a folder of its own under /tmp."""

    user = "mlflow"
    database = "mlflow"

    def __init__(self, root: Path, *, max_connections: int = 100, durable: bool = True,
                 settings: Mapping[str, str] | None = None):
        why = postgres_missing()
        if why:
            raise RuntimeError(why)
        self.root = root
        self.bindir = postgres_bindir()
        self.password = secrets.token_urlsafe(18)
        self.port = free_ports(1)[0]
        self.max_connections = max_connections
        self.durable = durable          # False: no fsync (tests: what is tested is not the disk)
        self.settings = dict(settings or {})
        # Its own folder (PostgreSQL wants its data folder private; pytest's tmp_path is root's, mode 700).
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.service: Service | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI MLflow takes (`--backend-store-uri`)."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_user + argv, capture_output=True, text=True, check=False, cwd=self.dir, **kwargs)

    def start(self, timeout_s: float = 60) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password)
        if self._as_user:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        init = self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                          "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"], timeout=timeout_s)
        pwfile.unlink()
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        options = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": str(self.dir),
                   "max_connections": str(self.max_connections), **self.settings}
        if not self.durable:
            options.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        argv = self._as_user + [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        log = self.dir / "postgres.log"
        self.service = Service("postgres", argv, log, dict(os.environ), cwd=self.dir)
        import psycopg

        def ready():
            if not self.service.alive():
                raise RuntimeError(f"postgres exited:\n{self.service.describe()}")
            try:
                conn = psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                       dbname="postgres", connect_timeout=3, autocommit=True)
            except psycopg.OperationalError:
                return False
            with conn:
                conn.execute(f"CREATE DATABASE {self.database} OWNER {self.user}")
            return True

        wait_until(ready, timeout_s, f"postgres on 127.0.0.1:{self.port}", on_timeout=self.service.describe)

    def query(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.uri) as conn:
            return conn.execute(sql).fetchall()

    def pids(self) -> list[int]:
        """The server's processes: the postmaster and its backends (each in a session of its own)."""
        return tree_pids(self.service.sid) if self.service else []

    def stop(self) -> None:
        if self.service is not None:
            # Fast shutdown (SIGINT to the postmaster): clients are cut, the backends end with it.
            postmaster = [p for p in tree_pids(self.service.sid) if process_name(p) == "postgres"][:1]
            for pid in postmaster:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in self.pids()[1:]):
                time.sleep(0.2)
            self.service.stop(grace_s=5)
            self.service = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# An MLflow tracking server: basic-auth (what cluster.yaml starts) or plain, sqlite or PostgreSQL


def auth_config(path: Path, *, users_db: str, cache_ttl_s: int = 0) -> Path:
    """The basic-auth app's config file (MLFLOW_AUTH_CONFIG_PATH): MLflow's defaults, the user
    store at `users_db`, and a credential cache of `cache_ttl_s` seconds (0: none)."""
    path.write_text("[mlflow]\n"
                    "default_permission = READ\n"
                    f"database_uri = {users_db}\n"
                    "admin_username = admin\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    f"auth_cache_ttl_seconds = {int(cache_ttl_s)}\n")
    return path


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with artifacts proxied by the server (`--serve-artifacts`).

    auth: `--app-name basic-auth`, the admin password and Flask secret from the environment;
    auth_cache_ttl_s: the credential cache (0: hash the password on every request, MLflow's
    default); backend_uri: the run store (default: sqlite in `root`); pool_size / max_overflow:
    the store's SQLAlchemy pool per worker (None: SQLAlchemy's 5 + 10).
    """

    username = "admin"

    def __init__(self, root: Path, *, auth: bool = True, backend_uri: str | None = None, workers: int = 2,
                 auth_cache_ttl_s: int = 0, pool_size: int | None = None, max_overflow: int | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.workers = workers
        self.auth_cache_ttl_s = auth_cache_ttl_s
        self.pool_size, self.max_overflow = pool_size, max_overflow
        self.password = secrets.token_urlsafe(18)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.service: Service | None = None

    def start(self, timeout_s: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        if self.pool_size is not None:
            env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] = str(self.pool_size)
        if self.max_overflow is not None:
            env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"] = str(self.max_overflow)
        argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self.backend_uri, "--serve-artifacts",
                "--artifacts-destination", str(self.artifacts), "--workers", str(self.workers)]
        if self.auth:
            env.update(MLFLOW_AUTH_ADMIN_PASSWORD=self.password, MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(self.root / "basic_auth.ini",
                                                             users_db=f"sqlite:///{self.root / 'basic_auth.db'}",
                                                             cache_ttl_s=self.auth_cache_ttl_s))
            argv[2:2] = ["--app-name", "basic-auth"]
        self.service = Service("mlflow server", argv, self.root / "mlflow-server.log", env, cwd=self.root)

        def ready():
            if not self.service.alive():
                raise RuntimeError(f"mlflow server exited:\n{self.service.describe()}")
            return self.request("/api/2.0/mlflow/experiments/search?max_results=1", auth=True)[0] == 200

        wait_until(ready, timeout_s, f"mlflow server on {self.url}", on_timeout=self.service.describe)

    def request(self, path: str, *, auth: bool | tuple[str, str] = False) -> tuple[int, str]:
        """GET `path`; (status, body). `auth=True` uses the admin credentials."""
        req = urllib.request.Request(self.url + path)
        if auth and self.auth:
            user, password = (self.username, self.password) if auth is True else auth
            req.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            return 0, str(exc)

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password} if self.auth else {}

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(grace_s=5)
            self.service = None


class MlflowAuthServer(MlflowServer):
    """The server cluster.yaml starts: basic-auth with a credential cache, on `backend_uri`."""

    def __init__(self, root: Path, backend_uri: str | None = None, **kwargs):
        kwargs.setdefault("auth_cache_ttl_s", 60)
        super().__init__(root, auth=True, backend_uri=backend_uri, **kwargs)


@contextlib.contextmanager
def cluster_tracking_server(root: Path) -> Iterator[MlflowAuthServer]:
    """The cluster's tracking server, scaled to this machine: basic-auth with cluster.yaml's 60 s
    credential cache, 2 workers with a pool of 20 + 30 each, on a private PostgreSQL where one can
    be had (`server.postgres`; None on sqlite). Stopped, with its database, on the way out."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        import pytest

        pytest.fail("the MLflow basic-auth server needs Flask-WTF: pip install 'mlflow[auth]'")
    pg = None if postgres_missing() else PostgresServer(root / "pg", durable=False)
    server = None
    try:
        if pg:
            pg.start()
        server = MlflowAuthServer(root / "mlflow", backend_uri=pg.uri if pg else None, workers=2,
                                  auth_cache_ttl_s=60, pool_size=20, max_overflow=30)
        server.postgres = pg
        server.start()
        yield server
    finally:
        if server:
            server.stop()
        if pg:
            pg.stop()
