"""MLflow bookkeeping that trials do themselves: their run, found by trial id, and what they log.

Everything goes through `MlflowClient` with explicit run ids, so trial processes (which Ray
starts in other folders, maybe on other nodes) never depend on a fluent "active run" or on
their working directory. A child run is found again by its trial id, so retries, reused actors
and resumed sweeps continue the same run instead of creating duplicates. The driver's side
(experiments, parent runs, closing and tagging runs after a crash, the UI) is sweeper/tracking.py,
which builds on this module.

A trial's per-epoch metrics and images go through its run's outbox: a queue that one background
thread per run sends in order, retrying while the server says "not now", so that a trial (and
the GPU pool it belongs to) does not wait for the tracking server: metrics never wait, an image
waits at most PUT_WAIT_S for room in a full queue, then is dropped. What the server has not
acknowledged yet is a plain list (`RunHandle.unacknowledged`) that the trial keeps in its
checkpoint and sends again when it is restored (`RunHandle.resume`): re-sending is idempotent
(a metric with the same key, step, timestamp and value is one row; an image goes to the same
file), so no metric is lost when a trial ends, is killed or resumes, and nothing is stored twice
(a checkpoint carries at most CHECKPOINT_IMAGE_BYTES of unsent images: a lost image is a frame of
the UI's slider, not a result).
"""

from __future__ import annotations

import atexit
import collections
import functools
import io
import json
import logging
import math
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from trainables.vae.catalog import STOP_ERROR

_logger = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "sweeper.trial_id"
TAG_SWEEP = "sweeper.sweep"
TAG_ROLE = "sweeper.role"
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"       # its values: a sweep's parent run, a trial's run
TAG_STOP = "stop_reason"
TAG_ORPHANED = "sweeper.orphaned"   # a run of a trial that the interrupted sweep lost (see run.py)
TAG_STUDY_STORAGE = "sweeper.optuna_storage"   # parent run: the sweep's Optuna study (storage URL ...
TAG_STUDY_NAME = "sweeper.optuna_study"        # ... and study name), for the report and optuna-dashboard
TAG_SCHEDULER = "sweeper.scheduler"            # trial run stopped by a scheduler: which one (asha, ...)
TAG_ERRORS = "sweeper.errors"                  # parent run: which trials ended with an error
TAG_MODEL_ID = "sweeper.model_id"              # trial run: the LoggedModel with its best-validation weights
TAG_NOTE = "mlflow.note.content"               # a run's description in the UI
TAG_CONFIG = "sweeper.config"                  # trial run: its whole configuration, JSON, exact values
# Step-indexed images. The UI's "Model metrics" tab makes a section of each key prefix before a
# "/" and puts those sections first: the pseudo-inputs open a trial's page. An image logged at one
# step only opens at that step (a key with several opens at step 0).
IMAGE_PSEUDO_INPUTS = "pseudo_inputs/by_epoch"                # every image_every epochs; step 0 = init
IMAGE_BEST_PSEUDO_INPUTS = "pseudo_inputs/best_weights"       # once, at the tested (best) epoch
# MLflow 3.x: an experiment's kind; "custom_model_development" is a model-training experiment
# (runs table), not a GenAI one (traces). MLflow 3.17's UI also reads the view from the URL:
# links add UI_QUERY so they open on the runs table whatever the browser last showed.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "?workflowType=machine_learning"
# The runs table's saved view that each sweep writes (an experiment tag MLflow's UI reads as a
# shared view: columns and sort order); a link that adds VIEW_QUERY opens the table in it.
TAG_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "sweeper"
VIEW_QUERY = f"&viewStateShareKey={VIEW_KEY}"
WEIGHTS_FILE = "weights.pt"                    # the LoggedModel's file: torch.load(weights_only=True)
# The key of a trial's Tune config that carries the sweep's bookkeeping, not training settings.
SWEEP_KEY = "sweeper"


@functools.lru_cache(maxsize=8)
def client(tracking_uri: str):
    """One client per URI and process (a sqlite client holds a connection pool)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# Answers that mean "not now" rather than "no", retried with backoff (matched in the lower-cased
# message): sqlite's one writer at a time (directly, or behind a server); a server whose
# SQLAlchemy pool is exhausted (HTTP 400 "QueuePool limit ... timed out", which MLflow's client
# does not retry); a database that refuses or drops connections (PostgreSQL's max_connections,
# a restart); the store's OperationalError (TEMPORARILY_UNAVAILABLE, HTTP 503), 429s and 5xx
# answers, timeouts and connection errors once MLflow's own HTTP retries gave up.
TRANSIENT = ("locked", "queuepool limit", "temporarily_unavailable", "request_limit_exceeded",
             "failed with exception", "failed with timeout exception", "failed with error code 5",
             "failed with error code 429", "too many clients", "too many connections", "remaining connection slots",
             "the database system is starting up", "the database system is shutting down",
             "server closed the connection", "could not connect to server", "connection refused")
# MlflowException error codes that say the same (a REST answer with a JSON body has no message text for it).
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
# How long one call is retried before the trial fails: long enough for the tracking server or its
# database to restart.
RETRY_S = 600.0
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 10.0     # backoff: the first wait, the longest wait


def is_transient(exc: BaseException, transient: Sequence[str] = ()) -> bool:
    """Whether `exc` from an MLflow call is worth retrying: see TRANSIENT (plus `transient`)."""
    if getattr(exc, "error_code", None) in TRANSIENT_CODES:
        return True
    message = str(exc).lower()
    return any(t in message for t in (*TRANSIENT, *transient))


def _with_retry(fn: Callable[..., Any], *args, transient: Sequence[str] = (), retry_s: float = RETRY_S,
                **kwargs) -> Any:
    """fn(*args, **kwargs), retried with jittered exponential backoff for up to `retry_s` seconds
    while it fails transiently (`is_transient`; `transient` adds messages for this call)."""
    start = time.monotonic()
    for attempt in range(10**6):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps the store's and the HTTP layer's errors in MlflowException
            waited = time.monotonic() - start
            if not is_transient(exc, transient) or waited >= retry_s:
                raise
            if attempt == 3:   # a slow server should be visible, not only in the trial's pace
                _logger.warning("MLflow answered %s: %s; retrying for up to %.0f s", type(exc).__name__,
                                str(exc)[:300], retry_s - waited)
            # Full jitter: the trials of a pool that failed together do not retry together.
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2**attempt) * random.uniform(0.5, 1.0)
            time.sleep(max(0.0, min(delay, retry_s - waited)))
    raise AssertionError("unreachable")


# MLflow's log_inputs reads whether the experiment has the dataset, then inserts it: trials that
# start together race, and the loser's insert breaks the unique (experiment, name, digest) key
# (sqlite: "UNIQUE constraint failed", PostgreSQL/MySQL: "duplicate key"/"Duplicate entry").
# Its transaction is rolled back whole; tried again, it finds the winner's row.
DATASET_RACE = ("unique constraint", "duplicate key", "duplicate entry")


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested settings as MLflow params."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}


# A run's queued writes, at most (bytes): a server this far behind makes an image wait for room
# (back-pressure), then drops it, instead of growing the trial's memory without bound.
QUEUE_BYTES = 64 * 2**20
# The longest an image waits for room in a full queue before it is dropped; metrics never wait (a
# few hundred bytes an epoch). A step queues at most two images (a trial's first step also logs
# its step-0 image), so it waits at most 2 x PUT_WAIT_S = 40 s on its outbox: a third of the time
# its pool waits for a silent trial before evicting it (trainables/pool.py, wait_s = 120 s), the
# rest left to the step's own work (its round, its checkpoint).
PUT_WAIT_S = 20.0
# The unsent images a checkpoint carries, at most (bytes; a pseudo-input grid is ~0.3 MB): see
# RunHandle.unacknowledged. Unsent metrics are all carried: they are small, and an exact resume
# needs them.
CHECKPOINT_IMAGE_BYTES = 2 * 2**20
BATCH_METRICS = 1000            # MLflow's limit of metrics per log_batch: queued epochs go out together
TAG_LOGGED_IMAGES = "mlflow.loggedImages"     # MLflow's tag: the run has step-indexed images
_IMAGE_NAME = re.compile(r"^(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[^+]+\.png$")


class TrackingError(RuntimeError):
    """A queued write could not be logged (a permanent error, or a server unreachable for RETRY_S)."""


class RunClosedError(RuntimeError):
    """A write through a RunHandle after its `close` or `terminate` (a bug in the caller)."""


def _write_bytes(write: Mapping[str, Any]) -> int:
    if write["kind"] == "image":
        return int(write["image"].nbytes) + 200
    return 100 * len(write["metrics"])


OPEN, CLOSING, CLOSED = "open", "closing", "closed"     # an outbox's states


class _Outbox:
    """One run's writes in order, sent by one background thread; a write leaves the queue only
    when the server acknowledged it. Writes are plain dicts (picklable, for checkpoints):
    {"kind": "metrics", "metrics": [(key, value, timestamp_ms, step), ...]} and
    {"kind": "image", "key", "step", "timestamp", "uuid", "image": uint8 array}.

    Its lifecycle is `state`:
      open     it takes writes, and its sender thread (started with it) sends them. A write that
               fails for good stops the sender: `put` and `flush` raise TrackingError until
               `retry` (a restored trial) starts it again.
      closing  `close` was called: it takes no writes, and the sender sends what is queued. A new
               handle of the run in this process reopens it, so that its writes go after those.
      closed   everything queued was stored, or the sender had failed (what was left is in the
               trial's checkpoint): it is out of the registry and its thread has ended.
    """

    def __init__(self, tracking_uri: str, run_id: str, retry_s: float):
        _load_sender()
        _flush_first_at_exit()
        self.tracking_uri, self.run_id, self.retry_s = tracking_uri, run_id, retry_s
        self._cond = threading.Condition()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._bytes = 0
        self._error: BaseException | None = None
        self._images_tagged = False
        self._shedding = False      # an image was dropped for want of room, and none has fitted since
        self.images_dropped = 0
        self.images: set[tuple[str, int]] = set()   # (key, step) queued or stored: logged once
        self.state = OPEN
        self._thread: threading.Thread | None = None
        self._start_sender()

    def _start_sender(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mlflow-outbox-{self.run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, write: dict[str, Any]) -> bool:
        """Queue `write` (True). Metrics never wait. An image waits up to PUT_WAIT_S while the queue
        is full (one write always fits, however large), then is dropped (False, with a warning), as
        is every image after it, without waiting, until one fits again."""
        size = _write_bytes(write)
        with self._cond:
            self._check_writable()
            if write["kind"] == "image":
                if not self._fits(size) and not self._shedding:
                    deadline = time.monotonic() + PUT_WAIT_S
                    while not self._fits(size) and self._error is None and self.state == OPEN:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    self._check_writable()
                if not self._fits(size):
                    self._shedding = True
                    self.images_dropped += 1
                    _logger.warning("MLflow run %s: image %s of step %s dropped: %.1f MiB are waiting for the "
                                    "tracking server (%d image(s) dropped so far)", self.run_id, write["key"],
                                    write["step"], self._bytes / 2**20, self.images_dropped)
                    return False
                self._shedding = False
            self._queue.append(write)
            self._bytes += size
            self._cond.notify_all()
            return True

    def _fits(self, size: int) -> bool:
        return not self._queue or self._bytes + size <= QUEUE_BYTES

    def unacknowledged(self, image_bytes: float = math.inf) -> list[dict[str, Any]]:
        """The writes the server has not acknowledged yet, oldest first: every metrics write, and
        the oldest images while their total fits `image_bytes` (a warning counts the others)."""
        with self._cond:
            writes = list(self._queue)
        kept, used, left_out = [], 0, 0
        for write in writes:
            if write["kind"] == "image":
                size = _write_bytes(write)
                if used + size > image_bytes:
                    left_out += 1
                    continue
                used += size
            kept.append(write)
        if left_out:
            _logger.warning("MLflow run %s: %d unsent image(s) left out of the checkpoint (it carries %.1f MiB "
                            "of images at most): lost if the trial is restored from it", self.run_id, left_out,
                            image_bytes / 2**20)
        return kept

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is acknowledged (True) or `timeout_s` passed (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._queue and self._error is None and self.state != CLOSED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            self._raise()
            return True

    def retry(self) -> None:
        """After a failure: the writes still queued are tried again (a restored trial)."""
        with self._cond:
            self._check_open()
            self._error = None
            if self._thread is None:
                self._start_sender()

    def reopen(self) -> bool:
        """open <- closing, for a new handle of the run (the sender goes on); False once closed."""
        with self._cond:
            if self.state == CLOSING:
                self.state = OPEN
            return self.state == OPEN

    def close(self) -> None:
        """open -> closing: what is queued is still sent, then the outbox is closed (at once if
        its sender had failed: nothing would send what is left)."""
        with self._cond:
            if self.state != OPEN:
                return
            self.state = CLOSING if self._thread is not None else CLOSED
            self._cond.notify_all()
            closed = self.state == CLOSED
        if closed:
            _unregister(self)

    def _check_open(self) -> None:
        if self.state != OPEN:
            raise RunClosedError(f"MLflow run {self.run_id}: its outbox is {self.state}; make a new RunHandle "
                                 "to log to the run again")

    def _check_writable(self) -> None:
        self._check_open()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise TrackingError(f"MLflow run {self.run_id} on {self.tracking_uri}: {len(self._queue)} queued "
                                f"write(s) could not be logged: {self._error}") from self._error

    def _run(self) -> None:
        """The sender: the queue's writes in order, until it is closing and empty, or a write fails."""
        while True:
            with self._cond:
                while not self._queue and self.state == OPEN:
                    self._cond.wait()
                if not self._queue:             # closing, and everything is stored
                    self.state, self._thread = CLOSED, None
                    self._cond.notify_all()
                    break
                batch = self._next_batch()
            try:
                self._send(batch)
            except BaseException as exc:   # kept for the trial's next call to raise; the writes stay queued
                with self._cond:
                    self._error, self._thread = exc, None
                    closed = self.state == CLOSING      # no call of the trial's will raise it
                    if closed:
                        self.state = CLOSED
                    self._cond.notify_all()
                if not closed:
                    return
                _logger.warning("MLflow run %s: %d write(s) left unsent after it was closed (a restored trial "
                                "sends its checkpoint's again): %s", self.run_id, len(self._queue), exc)
                break
            with self._cond:
                for _ in batch:
                    self._bytes -= _write_bytes(self._queue.popleft())
                self._cond.notify_all()
        _unregister(self)

    def _next_batch(self) -> list[dict[str, Any]]:
        """The queue's first write, and the metrics writes right after a metrics write (one request)."""
        batch = [self._queue[0]]
        if batch[0]["kind"] == "metrics":
            count = len(batch[0]["metrics"])
            for write in list(self._queue)[1:]:
                if write["kind"] != "metrics" or count + len(write["metrics"]) > BATCH_METRICS:
                    break
                batch.append(write)
                count += len(write["metrics"])
        return batch

    def _send(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        def call(method: str, *args) -> Any:
            # The client is made inside the retried call: a sqlite store's first connection may find
            # the database locked too.
            return _with_retry(lambda: getattr(client(self.tracking_uri), method)(self.run_id, *args),
                               retry_s=self.retry_s)

        if batch[0]["kind"] == "metrics":
            call("log_batch", [Metric(k, v, ts, step) for write in batch for (k, v, ts, step) in write["metrics"]])
            return
        from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image

        (write,) = batch
        # MLflow's own file names for a step-indexed image (MlflowClient.log_image), with the
        # timestamp and uuid fixed when the write was queued: a re-send overwrites the same files.
        name = (f"{write['key'].replace('/', '~')}+step+{write['step']}+timestamp+{write['timestamp']}"
                f"+{write['uuid']}")
        image = convert_to_pil_image(write["image"])
        # Not a TemporaryDirectory: its clean-up also runs at interpreter exit (weakref.finalize),
        # under a send that the exit flush is waiting for.
        folder = tempfile.mkdtemp(prefix="sweeper-image-")
        try:
            image.save(Path(folder) / f"{name}.png")
            compress_image_size(image).save(Path(folder) / f"{name}+compressed.webp")
            call("log_artifacts", folder, "images")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not self._images_tagged:
            call("set_tag", TAG_LOGGED_IMAGES, True)
            self._images_tagged = True


# (tracking URI, run id) -> the run's outbox in this process while it is open or closing: every
# handle of the run shares its order, and the exit flush finds what is unsent.
_OUTBOXES: dict[tuple[str, str], _Outbox] = {}
_OUTBOXES_LOCK = threading.Lock()       # taken before an outbox's own lock, never while holding it


def _open_outbox(tracking_uri: str, run_id: str, retry_s: float) -> _Outbox:
    """The run's outbox to write to: the open one, the closing one reopened (what it holds goes
    first), or a new one."""
    with _OUTBOXES_LOCK:
        box = _OUTBOXES.get((tracking_uri, run_id))
        if box is None or not box.reopen():
            box = _OUTBOXES[(tracking_uri, run_id)] = _Outbox(tracking_uri, run_id, retry_s)
        return box


def _registered(tracking_uri: str, run_id: str) -> _Outbox | None:
    with _OUTBOXES_LOCK:
        return _OUTBOXES.get((tracking_uri, run_id))


def _unregister(box: _Outbox) -> None:
    """A closed outbox leaves the registry: nothing in the process holds its queue any more."""
    with _OUTBOXES_LOCK:
        if _OUTBOXES.get((box.tracking_uri, box.run_id)) is box:
            del _OUTBOXES[(box.tracking_uri, box.run_id)]


def _load_sender() -> None:
    """Import what the sender sends with, in the thread that makes an outbox. A process that ends
    right after queueing its writes sends them at exit (`_flush_at_exit`), when Python refuses what
    some imports do (concurrent.futures, which MLflow imports, registers a hook: "can't register
    atexit after shutdown"): the sender's first send must not be the process's first MLflow import."""
    import PIL.Image  # noqa: F401
    from mlflow.entities import Metric  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401
    from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image  # noqa: F401


EXIT_FLUSH_S = 10.0     # at interpreter exit, what is still queued gets this long to go out


def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_S
    with _OUTBOXES_LOCK:
        boxes = list(_OUTBOXES.values())
    for box in boxes:
        try:
            box.flush(max(0.0, deadline - time.monotonic()))
        except TrackingError:
            pass


def _flush_first_at_exit() -> None:
    """Exit hooks run last registered first: registered again whenever an outbox is made, the
    flush runs before the hooks registered until then, which may clean up what a send still uses
    (weakref.finalize's removes temporary folders; MLflow's)."""
    atexit.unregister(_flush_at_exit)
    atexit.register(_flush_at_exit)


@dataclass
class RunHandle:
    """One MLflow run addressed by id: what the parent and each trial log through.

    `log_metrics` and `log_image` queue their write in the run's outbox (see the module's
    docstring); with `wait=True` (the default) they return once it is stored, with `wait=False` at
    once. Writes are stored in the order they were queued, so a trainable that queues an epoch's
    image before its metrics knows that an epoch whose metrics are stored has its image too
    (`resume` returns the last such epoch). Other calls are synchronous, retried while the server
    says "not now"; `terminate` and `last_step` first wait for the queue.

    `close` and `terminate` close the handle: its writes (`log_metrics`, `log_image`, `resume`)
    raise RunClosedError from then on, its reads (`flush`, `unacknowledged`) still answer. What
    the run's outbox holds is still sent, then the outbox is released; a new handle of the run (a
    retried trial in a reused actor) logs to it again, after what is left.
    """

    tracking_uri: str
    run_id: str
    created: bool = False          # open_trial_run made it now (not found again)
    experiment_id: str | None = None       # known to open_trial_run: saves a get_run where it is needed
    has_dataset: bool = False              # the run records a dataset input (as open_trial_run found it)
    retry_s: float = RETRY_S               # how long a call is retried while the server says "not now"
    _closed: bool = field(default=False, init=False, repr=False, compare=False)   # by close or terminate
    _box: _Outbox | None = field(default=None, init=False, repr=False, compare=False)  # the outbox it last used

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_box": None}       # a copy in another process has no outbox there

    @property
    def client(self):
        return client(self.tracking_uri)

    def _outbox_to_write(self) -> _Outbox:
        if self._closed:
            raise RunClosedError(f"MLflow run {self.run_id}: this handle was closed (close or terminate); make a "
                                 "new RunHandle to log to the run again")
        self._box = _open_outbox(self.tracking_uri, self.run_id, self.retry_s)
        return self._box

    def _outbox_to_read(self) -> _Outbox | None:
        """The run's outbox in this process, else the one this handle last used (closed: what it
        could not send), else None (nothing was queued here)."""
        return _registered(self.tracking_uri, self.run_id) or self._box

    def _retry(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return _with_retry(fn, *args, retry_s=self.retry_s, **kwargs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten("", dict(params)).items()]
        for i in range(0, len(items), 100):
            self._retry(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, wait: bool = True) -> None:
        """Numeric values of `metrics` at `step`, through the outbox (`wait=False`: return at once)."""
        now = int(time.time() * 1000)
        items = [(k, v if math.isfinite(v) else float("nan"), now, step or 0) for k, v in _numeric(metrics).items()]
        box = self._outbox_to_write()
        if items:
            box.put({"kind": "metrics", "metrics": items})
        if wait:
            self.flush()

    def log_image(self, image: np.ndarray, key: str, step: int, wait: bool = True) -> None:
        """A step-indexed image (the UI's step slider shows it changing over epochs), through the
        outbox. Logged once per (key, step): a replayed epoch does not add a second copy. While the
        tracking server is far behind, it may be dropped (see `_Outbox.put`)."""
        box = self._outbox_to_write()
        if (key, step) not in box.images and box.put({
                "kind": "image", "key": key, "step": int(step), "timestamp": int(time.time() * 1000),
                "uuid": str(uuid.uuid4()), "image": np.asarray(image)}):
            box.images.add((key, step))
        if wait:
            self.flush()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued for this run is stored (False: `timeout_s` passed first).
        Raises TrackingError if a write failed for good."""
        box = self._outbox_to_read()
        return True if box is None else box.flush(timeout_s)

    def unacknowledged(self, image_bytes: float | None = None) -> list[dict[str, Any]]:
        """The queued writes the server has not acknowledged yet, oldest first: plain data for a
        checkpoint, to give to `resume` when the trial is restored from it. Every metrics write
        (small, and an exact resume needs them); of the images, the oldest while they fit
        `image_bytes` (default CHECKPOINT_IMAGE_BYTES), with a warning that counts the others: an
        image left out is never stored if the trial is restored from this checkpoint, which costs
        a frame of the UI's slider, not a result."""
        box = self._outbox_to_read()
        if box is None:
            return []
        return box.unacknowledged(CHECKPOINT_IMAGE_BYTES if image_bytes is None else image_bytes)

    def resume(self, unacknowledged: Iterable[Mapping[str, Any]] = (), step_key: str = "epoch") -> int:
        """After a restore: send again what the checkpoint held unacknowledged, wait until it is
        stored, and return the last step of metric `step_key` in the run (0 if none). The images
        the run already has are remembered, so that replayed epochs do not log them again."""
        box = self._outbox_to_write()
        box.retry()
        for write in unacknowledged:
            if box.put(dict(write)) and write["kind"] == "image":
                box.images.add((write["key"], write["step"]))
        self.flush()
        box.images.update(self.stored_images())
        return self.last_step(step_key)

    def stored_images(self) -> set[tuple[str, int]]:
        """(key, step) of the step-indexed images the run has."""
        files = self._retry(self.client.list_artifacts, self.run_id, "images")
        found = set()
        for f in files:
            m = _IMAGE_NAME.match(f.path.rsplit("/", 1)[-1])
            if m:
                found.add((m["key"].replace("~", "/"), int(m["step"])))
        return found

    def close(self, timeout_s: float = 30.0) -> bool:
        """Close the handle (a trial's cleanup): what is queued gets up to `timeout_s` to be stored,
        then the run's outbox is closed; what is left is still sent in the background (it is also in
        the last checkpoint), then the outbox is released. False if writes were left."""
        if self._closed:          # closed before: nothing more to do
            return self._box is None or not self._box.unacknowledged()
        self._closed = True
        box = self._box = self._outbox_to_read()
        if box is None:
            return True
        try:
            done = box.flush(timeout_s)
        except TrackingError as exc:
            _logger.warning("%s", exc)
            done = False
        if not done:
            _logger.warning("MLflow run %s: %d write(s) not yet stored when the trial closed", self.run_id,
                            len(box.unacknowledged()))
        box.close()
        return done

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image_file(self, image: np.ndarray, name: str) -> None:
        self._retry(self.client.log_image, self.run_id, image, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        self._retry(self.client.log_text, self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        self._retry(self.client.log_figure, self.run_id, figure, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._retry(self.client.log_artifact, self.run_id, str(path), folder)

    def last_step(self, key: str) -> int:
        """The highest step logged for metric `key` (0 if none), once the queued writes are stored."""
        self.flush()
        history = self._retry(self.client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=0)

    def last_timestamp(self, key: str) -> int | None:
        """When metric `key` was last logged (ms since the epoch), once the queued writes are stored."""
        self.flush()
        history = self._retry(self.client.get_metric_history, self.run_id, key)
        return max((m.timestamp for m in history), default=None)

    def terminate(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        """Close the run as `status` once everything queued for it is stored (`end_time` in ms:
        when its own work ended, default now), and the handle as `close` does. A run that cannot
        be FINISHED for want of its writes raises TrackingError (the handle stays open); a failing
        or killed run is closed all the same (what was not stored is in the trial's checkpoint)."""
        try:
            self.flush()
        except TrackingError as exc:
            if status == "FINISHED":
                raise
            _logger.warning("%s", exc)
        self._retry(self.client.set_terminated, self.run_id, status, end_time)
        self._closed = True
        box = self._box = self._outbox_to_read()
        if box is not None:
            box.close()

    def reopen(self) -> None:
        self._retry(self.client.update_run, self.run_id, status="RUNNING")

    def log_dataset(self, name: str, digest: str, source: Mapping[str, Any], profile: Mapping[str, Any],
                    tags: Mapping[str, Any]) -> None:
        """The run's training data as an MLflow dataset input (the UI's Datasets column). MLflow
        keeps one dataset per (name, digest) and experiment: `profile` describes the files, the
        run's own use of them (subsets) goes in `tags`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="url", source=json.dumps(dict(source)),
                          profile=json.dumps(dict(profile)))
        input_tags = [InputTag("mlflow.data.context", "training")] + [InputTag(k, str(v)) for k, v in tags.items()]
        self._retry(self.client.log_inputs, self.run_id, datasets=[DatasetInput(dataset, input_tags)],
                    transient=DATASET_RACE)

    def log_weights(self, experiment_id: str, state: Mapping[str, Any], name: str, step: int,
                    params: Mapping[str, Any]) -> str:
        """`state` (tensors and plain values) as a LoggedModel of this run (the UI's Models column),
        saved as WEIGHTS_FILE for `torch.load(weights_only=True)`; the run is tagged with its id."""
        import torch
        from mlflow.entities import LoggedModelOutput

        model = self._retry(self.client.create_logged_model, experiment_id, name=name, source_run_id=self.run_id,
                            params={k: str(v) for k, v in params.items()}, model_type="pytorch-state-dict")
        with tempfile.TemporaryDirectory(prefix="sweeper-weights-") as folder:
            torch.save(dict(state), Path(folder) / WEIGHTS_FILE)
            self._retry(self.client.log_model_artifacts, model.model_id, folder)
        self._retry(self.client.finalize_logged_model, model.model_id, "READY")
        self._retry(self.client.log_outputs, self.run_id, [LoggedModelOutput(model.model_id, step)])
        self.set_tags({TAG_MODEL_ID: model.model_id})
        return model.model_id


def ui_url(base: str, experiment_id: str, run_id: str | None = None, view: bool = False) -> str:
    """The MLflow UI's page of an experiment's runs (in the sweeps' saved view if `view`), or of one
    run: `base` is the UI's address."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id:
        return f"{page}/runs/{run_id}{UI_QUERY}"
    return f"{page}/runs{UI_QUERY}" + (VIEW_QUERY if view else "")


def image_artifact_prefix(key: str, step: int) -> str:
    """The start of a step-indexed image's artifact path (MLflow writes a key's "/" as "~")."""
    return f"images/{key.replace('/', '~')}+step+{step}+"


def trial_run_name(config: Mapping[str, Any], trial_id: str) -> str:
    """A trial's run name from its Tune config (the sweep's `name_keys`), else `trial_<id>`."""
    keys = (config.get(SWEEP_KEY) or {}).get("name_keys", ("prior",))
    return run_name(config, keys) or f"trial_{trial_id}"


def run_name(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    """What a trial is, short: 'vamp K=13 lr=2.3e-3 seed=0' from its values of `keys` (words
    as they are, numbers to 2 significant digits); a None value (does not apply) is left out."""
    from trainables.vae.catalog import short

    parts = []
    for key in keys:
        value = config.get(key)
        if value is None or value is False:
            continue
        if isinstance(value, str):
            parts.append(value)
        elif value is True:
            parts.append(key)
        else:
            parts.append(f"{key}={short(value, 2)}")
    return " ".join(parts)


def find_child(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = _with_retry(
        client(tracking_uri).search_runs, [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=2)
    return runs[0] if runs else None


def _create_child(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str,
                  tags: Mapping[str, str]):
    """create_run is not idempotent: a retry after an answer that never came (a timeout, a dropped
    connection) first looks for the run the server may have created after all."""
    attempts = 0

    def create():
        nonlocal attempts
        attempts += 1
        found = find_child(tracking_uri, experiment_id, parent_run_id, trial_id) if attempts > 1 else None
        return found or client(tracking_uri).create_run(experiment_id, run_name=run_name, tags=dict(tags))

    return _with_retry(create)


def _delete_tag(handle: RunHandle, key: str) -> None:
    """delete_tag, where a tag already gone (a retry whose first attempt did delete it) is fine."""
    def delete():
        try:
            handle.client.delete_tag(handle.run_id, key)
        except Exception as exc:
            if "no tag with name" not in str(exc).lower():
                raise

    _with_retry(delete)


def trial_params(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, str]:
    """What a trial's run shows as MLflow params (the runs table's columns, and the header of every
    image and chart card on its page, above the picture): what sets it apart from the sweep's
    other trials, its dataset, model and prior and the sweep's searched `keys` it uses, as people
    read them ('2.34e-3'). K only for a prior made of K components. The whole configuration, with
    exact values, is the run's TAG_CONFIG."""
    from trainables.vae.catalog import K_PRIORS, short

    out: dict[str, str] = {}
    for key in ("dataset", "model", "prior", *keys):
        value = config.get(key)
        if value is None or key in out or (key == "K" and config.get("prior") not in K_PRIORS):
            continue
        out[key] = value if isinstance(value, str) else short(value)
    return out


def open_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                   trial_name: str, params: Mapping[str, Any], sweep_name: str,
                   description: str = "", config: Mapping[str, Any] | None = None) -> RunHandle:
    """The trial's child run: found by trial id and reopened, or created with its params (the
    Tune trial id is a tag; `trial_name` says what the trial is) and its whole `config` as the
    TAG_CONFIG tag (JSON)."""
    existing = find_child(tracking_uri, experiment_id, parent_run_id, trial_id)
    if existing is not None:
        handle = RunHandle(tracking_uri, existing.info.run_id, experiment_id=experiment_id,
                           has_dataset=bool(existing.inputs.dataset_inputs))
        handle.reopen()
        if existing.data.tags.get(TAG_STOP) == STOP_ERROR:    # retried by Tune: it runs again
            for key in (TAG_STOP, "stop_detail"):
                _delete_tag(handle, key)
        return handle
    tags = {TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_SWEEP: sweep_name, TAG_ROLE: ROLE_TRIAL}
    if description:
        tags[TAG_NOTE] = description
    if config is not None:
        tags[TAG_CONFIG] = json.dumps(dict(config), sort_keys=True, default=str)
    run = _create_child(tracking_uri, experiment_id, parent_run_id, trial_id, trial_name, tags)
    handle = RunHandle(tracking_uri, run.info.run_id, created=True, experiment_id=experiment_id)
    handle.log_params(params)
    return handle


def ll_histogram_figure(per_image_ll: Iterable[float], title: str):
    """Histogram of the per-image test log-likelihood (nats)."""
    from matplotlib.figure import Figure

    values = np.asarray(list(per_image_ll), dtype=float)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    ax.hist(values, bins=min(60, max(5, values.size // 10)), color="#3465a4")
    ax.axvline(values.mean(), color="k", linestyle="--", linewidth=1, label=f"mean {values.mean():.2f}")
    ax.set_xlabel("test log-likelihood per image (nats)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def per_image_csv(per_image_ll: Iterable[float]) -> str:
    values = np.asarray(list(per_image_ll), dtype=float)
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack([np.arange(values.size), values]), fmt=["%d", "%.6f"],
               delimiter=",", header="index,log_likelihood", comments="")
    return buf.getvalue()
