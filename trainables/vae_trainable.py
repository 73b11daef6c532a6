"""The Ray Tune trainable: one Tune iteration = one epoch of the VAE library's `Trainer`.

Each trial logs to its own nested MLflow run (found again by trial id, so retries, reused
actors and resumed sweeps continue the same run). A trial that ends by itself (max epochs,
early stopping, NaN) is finalized in its last step: best weights restored, test log-likelihood,
test ELBO, active units and images logged. A trial the scheduler stopped (ASHA) is finalized
from its last checkpoint by `evaluate_stopped_trial`, a Ray task the driver launches: Tune
kills a stopping actor after a timeout, so a long test LL cannot run in `cleanup()`.
"""

from __future__ import annotations

import enum
import gc
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainables import tracking
from trainables.pool import EVICT_WAIT_S, NotAMember, get_pool
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits, get_spec, load_dataset
from trainables.vae.data import dataset_digest
from trainables.vae.evaluate import display_grid, display_strip
from trainables.tracking import SWEEP_KEY
from trainables.vae.catalog import (CHOICE_LABELS, METRIC_BEST_EPOCH, METRIC_BEST_VAL_ELBO, METRIC_EPOCH,
                                    METRIC_TEST_BPD, METRIC_TEST_IMAGES, METRIC_TEST_LL, METRIC_TEST_LL_SE,
                                    METRIC_TEST_SAMPLES, RESULT_RUN_ID, SELECT_VAL_LL, STOP_ERROR, STOP_NAN,
                                    STOP_SCHEDULER, other_choice, other_choice_metrics)
from trainables.vae.train import Trainer, final_evaluation

# Tune's note that a trial's setup took over 10 s ("consider setting reuse_actors=True") reached
# the driver's console at the end of every sweep: the sweep does reuse actors; a fresh process
# importing torch, Ray and MLflow and loading its data is simply that slow on a small machine.
logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.WARNING)

CHECKPOINT_FILE = "trainer.pt"
N_GRID_IMAGES = 100

_SPLITS: dict[tuple[str, str | None], Splits] = {}


def _cached_splits(name: str, root: str | None) -> Splits:
    """Reused actors keep the dataset in memory instead of parsing it again."""
    key = (name, root)
    if key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[key] = load_dataset(name, root)
    return _SPLITS[key]


def split_config(config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Trial dict -> (frozen training config, sweep bookkeeping). A None value is a searched
    parameter that does not apply to this trial (K of the standard prior): the default stays."""
    sweep = dict(config.get(SWEEP_KEY) or {})
    return TrainConfig.from_dict({k: v for k, v in config.items() if k != SWEEP_KEY and v is not None}), sweep


def trial_device(cfg: TrainConfig) -> str | None:
    """'cpu' for a `device: auto` trial that reserved no GPU, else None (the config decides).

    Ray 2.60 no longer hides a node's GPUs from tasks that reserved none, so `auto` alone would
    put CPU trials on a GPU nobody accounted for.
    """
    if cfg.device == "auto" and ray.is_initialized() and not ray.get_gpu_ids():
        return "cpu"
    return None


def _set_threads(sweep: dict[str, Any]) -> None:
    torch.set_num_threads(max(1, int(sweep.get("cpus_per_trial", 1))))  # 1-CPU trials: no oversubscription


def _make_trainer(cfg: TrainConfig, sweep: dict[str, Any]) -> Trainer:
    _set_threads(sweep)
    return Trainer(cfg, _cached_splits(cfg.dataset, cfg.data_root), device=trial_device(cfg))


IMAGES_NOTE = (f"Images: `{tracking.IMAGE_PSEUDO_INPUTS}` in Model metrics shows the first {N_GRID_IMAGES} "
               "pseudo-inputs u_k as they learn (step = epoch, step 0 = at initialisation; drag the slider to the "
               f"last step), `{tracking.IMAGE_BEST_PSEUDO_INPUTS}` those of the tested weights (the best "
               "validation epoch); each pixel 0..1 is drawn black..white, the same mapping at every step. "
               "Artifacts: pseudo_inputs.png, reconstructions.png (test images above their reconstructions) and "
               "samples.png are the tested weights'; the Models column holds those weights.")
# Final figures as they are stored in MLflow (what the UI's tables show): nats to 0.01, bits/dim to
# 1e-4; per_image_ll.csv and the trial's Tune result keep every digit.
# Figures shown to people, rounded to what they can tell. The validation ELBO at the tested epoch
# (best_val_elbo) is what trials are chosen on: stored exactly, so near-ties are decided by value.
ROUNDED = {METRIC_TEST_LL: 2, METRIC_TEST_LL_SE: 2, "test_elbo": 2, "test_rec": 2, "test_kl": 2, METRIC_TEST_BPD: 4,
           "test_ll_seconds": 2}
# The other choice of epoch's test figures, rounded as the own choice's.
for _choice in CHOICE_LABELS:
    _names = other_choice_metrics(_choice)
    ROUNDED.update({_names[k]: ROUNDED[k] for k in (METRIC_TEST_LL, METRIC_TEST_LL_SE, METRIC_TEST_BPD)})


def stored_finals(final: dict[str, Any]) -> dict[str, float]:
    """The final figures as MLflow gets them: rounded (ROUNDED), undefined ones left out."""
    out = {}
    for key, value in final.items():
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = round(float(value), ROUNDED[key]) if key in ROUNDED else value
    return out


def summary_note(run: tracking.RunHandle, trainer: Trainer, final: dict[str, Any], strip: bool) -> str:
    """The run's description once it is tested: the test LL first, with the pseudo-inputs (or
    samples) of the tested weights as a strip linked to the full image; the UI folds what follows."""
    experiment = run.experiment_id or run.client.get_run(run.run_id).info.experiment_id
    ll = ll_text(final, METRIC_TEST_LL, METRIC_TEST_LL_SE)
    images = final[METRIC_TEST_IMAGES]
    subset = "an estimate on the first " if images < trainer.x_test.shape[0] else ""
    line = (f"**test LL {ll} nats**{bpd_text(final, METRIC_TEST_BPD)} "
            f"(S={final[METRIC_TEST_SAMPLES]}, ± SE over {subset}{images} test images) · tested: epoch "
            f"{final[METRIC_BEST_EPOCH]} of {trainer.epoch}"
            f"{' (best validation LL)' if trainer.config.select_on == SELECT_VAL_LL else ''}, "
            f"best val ELBO {final[METRIC_BEST_VAL_ELBO]:.2f}")
    choice = other_choice(trainer.config.select_on, trainer.config.best_after_warmup)
    names = other_choice_metrics(choice)
    if names[METRIC_TEST_LL] in final:      # the other choice of epoch, tested from the same run
        epoch = final[names[METRIC_BEST_EPOCH]]
        tested = (" (the same)" if epoch == final[METRIC_BEST_EPOCH] else
                  f", test LL {ll_text(final, names[METRIC_TEST_LL], names[METRIC_TEST_LL_SE])}"
                  + bpd_text(final, names[METRIC_TEST_BPD]))
        line += f" · {CHOICE_LABELS[choice]}: epoch {epoch}{tested}"
    if strip:
        name = "pseudo_inputs" if hasattr(trainer.model.prior, "pseudo_inputs") else "samples"
        # A path the UI's server answers (no data: URIs in descriptions), one line under the text.
        what = "pseudo-inputs" if name == "pseudo_inputs" else "samples"
        line += (f"\n[![{name}](get-artifact?path={STRIP_FILE}&run_uuid={run.run_id})]"
                 f"(#/experiments/{experiment}/runs/{run.run_id}/artifacts/{name}.png)"
                 f"\n{STRIP_IMAGES} of the tested weights' {what}, each stretched to its own gray range "
                 f"(click for all, as they are)")
    return line


STRIP_FILE = "strip.png"


def ll_text(final: dict[str, Any], metric: str, se: str) -> str:
    """'-85.71 ± 0.25': a test LL with its standard error (as stored: 0.01 nats)."""
    value = f"{final[metric]:.2f}"
    return value + (f" ± {final[se]:.2f}" if math.isfinite(final.get(se, math.nan)) else "")


def bpd_text(final: dict[str, Any], metric: str) -> str:
    """' = 4.5420 bits/dim' for gray data, else ''."""
    return f" = {final[metric]:.4f} bits/dim" if metric in final else ""


def _open_run(sweep: dict[str, Any], trial_id: str, cfg: TrainConfig, config: dict[str, Any]) -> tracking.RunHandle | None:
    """The trial's MLflow run, named for what the trial is; a new one records its dataset."""
    if not sweep.get("tracking_uri"):
        return None
    name = tracking.trial_run_name(config, trial_id)
    run = tracking.open_trial_run(
        sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"], trial_id=trial_id, trial_name=name,
        params=tracking.trial_params(cfg.to_dict(), sweep.get("name_keys", ())), config=cfg.to_dict(),
        sweep_name=sweep.get("sweep_name", ""),
        description=f"{name}: trial {trial_id} of sweep {sweep.get('sweep_name', '')}. {IMAGES_NOTE}")
    if not run.has_dataset:   # new, or a first attempt died before it logged its dataset
        log_dataset_input(run, cfg)
    return run


def log_dataset_input(run: tracking.RunHandle, cfg: TrainConfig) -> None:
    """Which files the trial trained on: the dataset (name, digest of its official files, split
    sizes, binarisation) and the trial's subsets of it."""
    spec = get_spec(cfg.dataset)
    info = spec.info
    run.log_dataset(
        cfg.dataset, dataset_digest(spec),
        source={"files": [f.path for f in spec.files.values()], "urls": [f.urls[0] for f in spec.files.values()]},
        profile={"train": info.split_sizes[0], "val": info.split_sizes[1], "test": info.split_sizes[2],
                 "likelihood": info.likelihood, "binarization": str(info.binarization),
                 "image_shape": "x".join(map(str, info.image_shape)),
                 "digest": "sha256 of the official file (first 32 hex digits; of the files' sha256s for several)"},
        tags={k: getattr(cfg, k) for k in ("train_subset", "val_subset", "test_subset") if getattr(cfg, k)})


# Ray Train logs "Checkpoint successfully created at: ..." at every save; forwarded to the
# driver, that is a line per trial per epoch in the user's console.
RAY_CHECKPOINT_LOGGER = "ray.train._internal.storage"
CHECKPOINT_LOG = "checkpoints.log"


def keep_checkpoint_lines_in(folder: str | Path) -> None:
    """Write Ray's per-checkpoint log lines to <folder>/checkpoints.log (the trial's folder),
    not to the console. A reused actor points them at its new trial's folder."""
    log = logging.getLogger(RAY_CHECKPOINT_LOGGER)
    for handler in [h for h in log.handlers if getattr(h, "sweeper_checkpoint_log", False)]:
        log.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(Path(folder) / CHECKPOINT_LOG, delay=True)
    handler.sweeper_checkpoint_log = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def log_pseudo_inputs(run: tracking.RunHandle, u: torch.Tensor, image_shape: tuple[int, ...], step: int,
                      wait: bool = True) -> None:
    """The pseudo-input grid (u [>= N_GRID_IMAGES, D]) as a step-indexed image (the UI's slider
    shows them learning), enlarged to be read (evaluate.display_grid). As square as the images
    allow: the UI's image card centres a 256-px thumbnail in a square box (a wide strip would sit
    below the visible part), and clicking it opens the full-size image, scaled to the window."""
    run.log_image(display_grid(u[:N_GRID_IMAGES], image_shape), tracking.IMAGE_PSEUDO_INPUTS, step, wait=wait)


def trainer_from_state(cfg: TrainConfig, sweep: dict[str, Any], state: dict[str, Any]) -> Trainer:
    """A plain Trainer in this process holding a (pooled) trial's state: to finalize it here."""
    trainer = _make_trainer(cfg, sweep)
    trainer.load_state_dict(state)
    return trainer


def finalize(trainer: Trainer, run: tracking.RunHandle | None, reason: str, *, test: bool = True,
             samples: int | None = None, images: int | None = None) -> dict[str, Any]:
    """End a trial: restore the best weights, evaluate on the test set (with `samples` importance
    samples on the first `images` test images; default: the config's S on all), log it all,
    close the run. Without `test`, the weights and images are logged and the run closed without a
    test LL (`sweeper evaluate` can add it later)."""
    out: dict[str, Any] = {"stop_reason": reason}
    if reason == STOP_NAN:
        if run is not None:
            run.set_tags({tracking.TAG_STOP: reason, "stop_detail": trainer.stop_detail})
            run.terminate("FAILED")
        return out
    if run is not None and reason == STOP_SCHEDULER:
        _log_last_pseudo_inputs(run, trainer)   # its last step() did not know it was the last
    trainer.finish()
    final, per_image = {}, None
    if test:
        final = final_evaluation(trainer, samples, images)
        per_image = final.pop("per_image_ll")
    else:
        final = tested_epoch(trainer)
    out.update(final)
    if run is not None:
        step = trainer.epoch
        cfg = trainer.config
        _log_final_images(run, trainer, final[METRIC_BEST_EPOCH])
        run.log_weights(run.experiment_id or run.client.get_run(run.run_id).info.experiment_id,
                        {"state_dict": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                         "config": cfg.to_dict(), "best_epoch": trainer.best_epoch or step},
                        name=f"{cfg.dataset}-{cfg.model}-{cfg.prior}", step=step,
                        params={**tracking.trial_params(cfg.to_dict(), ("K",)),
                                "best_epoch": trainer.best_epoch or step})
        if per_image is not None:
            run.log_text(tracking.per_image_csv(per_image.tolist()), "per_image_ll.csv")
            run.log_figure(tracking.ll_histogram_figure(per_image.tolist(),
                                                        f"{cfg.dataset} / {cfg.model} / {cfg.prior}"),
                           "test_ll_histogram.png")
        # test_ll last: a run that has it has everything (an interrupted evaluation is redone on resume).
        run.log_metrics(stored_finals(final), step=step)
        description = run.client.get_run(run.run_id).data.tags.get(tracking.TAG_NOTE, "")
        detail = trainer.stop_detail
        if test:
            note = summary_note(run, trainer, final, strip=True)
            description = f"{note}\n\n{description.split(NOTE_BREAK)[-1]}" if description else note
        else:
            detail += "; not tested (the spec's stopped_trials policy): `sweeper evaluate` tests it"
        run.set_tags({tracking.TAG_STOP: reason, "stop_detail": detail, tracking.TAG_NOTE: description})
        # A scheduler-stopped trial is evaluated later: its run's duration is its training, up to
        # its last epoch; the evaluation's own time is test_ll_seconds.
        end = run.last_timestamp(METRIC_EPOCH) if reason == STOP_SCHEDULER else None
        run.terminate("FINISHED", end_time=end)
    return out


def tested_epoch(trainer: Trainer) -> dict[str, Any]:
    """The epoch whose weights are kept and its validation ELBO, for a trial not tested."""
    best = trainer.progress
    return {METRIC_BEST_EPOCH: best.best_epoch or trainer.epoch,
            METRIC_BEST_VAL_ELBO: best.best_val_elbo if best.best_epoch is not None else float("nan")}


NOTE_BREAK = "\n\n"     # between the tested summary and the description the run was created with


def _log_final_images(run: tracking.RunHandle, trainer: Trainer, best_epoch: int) -> None:
    """The tested weights' images: artifacts, the best-weights card (once, at the best epoch) and
    the strip of the run's description."""
    model, shape = trainer.model, trainer.info.image_shape
    n_test = trainer.x_test.shape[0]
    ncol = min(10, n_test)
    rows = min(5, n_test // ncol)
    # Evenly spaced test images: neighbouring ones may share a digit (files ordered by class).
    x = trainer.x_test[torch.linspace(0, n_test - 1, rows * ncol, device=trainer.device).long()]
    recon = model.reconstruct(x)
    # Pairs of rows: real test images above their reconstructions.
    pairs = torch.stack([x.reshape(rows, ncol, -1), recon.reshape(rows, ncol, -1)], 1)
    run.log_image_file(display_grid(pairs.reshape(2 * rows * ncol, -1), shape, ncol=ncol), "reconstructions.png")
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        torch.manual_seed(trainer.config.seed)       # the samples are a function of the trial too
        samples = model.sample(N_GRID_IMAGES)
    run.log_image_file(display_grid(samples, shape, ncol=10), "samples.png")
    u = getattr(model.prior, "pseudo_inputs", None)
    if u is not None:
        grid = display_grid(u[:N_GRID_IMAGES], shape)     # one grid: the artifact and the best-weights card
        run.log_image_file(grid, "pseudo_inputs.png")
        run.log_image(grid, tracking.IMAGE_BEST_PSEUDO_INPUTS, best_epoch)
    strip = (u if u is not None else samples)[:STRIP_IMAGES]
    run.log_image_file(display_strip(strip, shape), STRIP_FILE)


STRIP_IMAGES = 12      # one row, 2x enlarged (~700 px): within a run's description at 1440 px


def _log_last_pseudo_inputs(run: tracking.RunHandle, trainer: Trainer) -> None:
    u = getattr(trainer.model.prior, "pseudo_inputs", None)
    every = trainer.config.image_every
    if u is not None and every and trainer.epoch % every:    # a multiple of image_every is logged already
        log_pseudo_inputs(run, u, trainer.info.image_shape, trainer.epoch)


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """{"trainer": Trainer.state_dict(), "run_id": ...}, tensors on the CPU (Trainer moves them)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def evaluate_stopped_trial(config: dict[str, Any], checkpoint: "tune.Checkpoint", trial_id: str, *,
                           test: bool = True, samples: int | None = None, images: int | None = None) -> dict[str, Any]:
    """Finalize a trial the scheduler stopped, from its last checkpoint (runs as a Ray task): its
    test LL with `samples` on the first `images` test images (the spec's `stopped_trials`)."""
    cfg, sweep = split_config(config)
    with checkpoint.as_directory() as directory:
        saved = read_checkpoint(directory)
    trainer = trainer_from_state(cfg, sweep, saved["trainer"])
    scheduler = sweep.get("scheduler", "")
    trainer.stop_detail = f"stopped by the scheduler ({scheduler}) after epoch {trainer.epoch}"
    run = _open_run(sweep, trial_id, cfg, config)
    if run is not None:
        run.resume(saved.get("unlogged", []))     # what the stopped actor had not sent yet
        run.set_tags({tracking.TAG_SCHEDULER: scheduler})
    return finalize(trainer, run, STOP_SCHEDULER, test=test, samples=samples, images=images)


def newest_existing_checkpoint(missing: "tune.Checkpoint") -> tuple["tune.Checkpoint", int] | None:
    """The checkpoint of the same trial with the highest epoch among those that exist, and that
    epoch; None if the trial has none left.

    Tune's saved experiment state names each trial's latest checkpoint as of its last save
    (every few seconds); checkpoint retention may have deleted that one since, when a newer one
    was written. Any checkpoint of the trial is a state of the same run (a trial's randomness is
    its own: training from it replays exactly), so the newest that exists is where it continues.
    Its epoch is read from the file, not from the folder's index: a restored trial numbers its new
    checkpoints from Tune's saved index, so a higher index is not always a later epoch."""
    import pyarrow.fs

    fs = missing.filesystem
    trial_dir = str(Path(missing.path).parent)
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not Path(info.path).name.startswith("checkpoint_"):
            continue
        candidate = tune.Checkpoint(info.path, filesystem=fs)
        try:
            with candidate.as_directory() as directory:
                epoch = int(read_checkpoint(directory)["trainer"]["epoch"])
        except Exception:    # half written when the driver died, or not ours: not a state to continue
            continue
        found.append((epoch, info.path, candidate))
    if not found:
        return None
    epoch, _, checkpoint = max(found, key=lambda f: (f[0], f[1]))
    return checkpoint, epoch


def quiet_exit_in_finalizers(unraisable) -> None:
    """`sys.unraisablehook` of a trial's process. When Tune ends the actor of a stopped trial,
    Ray's SIGTERM handler raises SystemExit; landing inside a finalizer (a WeakSet's, say) Python
    cannot raise it and printed a 10-line "Exception ignored" traceback on the driver's console
    for a trial that ended as it should. Only that is silenced; anything else is printed as usual."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


class Phase(enum.Enum):
    """Where a trial's process is in the trial's life (`VAETrainable.phase`)."""

    SET_UP = "set up"       # nothing outside this process touched yet: Tune may discard it unused
    TRAINING = "training"   # its MLflow run is open; pooled: a member of its pool
    ENDED = "ended"         # it ended by itself and was finalized; pooled: it left its pool


@dataclass(frozen=True)
class Restored:
    """A checkpoint loaded before the trial's first step: applied when the trial begins."""

    trainer_state: dict[str, Any]
    unlogged: list[dict[str, Any]]     # writes MLflow had not acknowledged, sent again


class VAETrainable(tune.Trainable):
    """A class-based Tune trainable around `trainables.vae.train.Trainer`.

    Its state is one `Phase` plus what that phase needs: in SET_UP, maybe a `Restored`
    checkpoint; in TRAINING, the run (and, pooled, its membership and the state of its last
    checkpoint); in ENDED, the final state (pooled) it was finalized from. Everything that
    reaches outside the process (the MLflow run, the pool) starts in `_begin`, at the first step.

    Pooled (the sweep's `resources.batched`): the trial's epochs run as one slot of its
    device's `TrialPool` (trainables/pool.py), batched with the other trials there; this process
    only asks for each epoch, logs, checkpoints the slot's state (same format) and, when the
    trial ends by itself, finalizes it locally from that state.
    """

    def setup(self, config: dict[str, Any]) -> None:
        sys.unraisablehook = quiet_exit_in_finalizers
        self._start(config)

    def _start(self, config: dict[str, Any]) -> None:
        keep_checkpoint_lines_in(self.logdir)
        self.config_dict = config
        self.cfg, self.sweep = split_config(config)
        pool = self.sweep.get("pool")
        self.pool = get_pool(pool["sweep_id"], pool.get("wait_s", EVICT_WAIT_S)) if pool else None
        self.phase = Phase.SET_UP
        self.restored: Restored | None = None            # SET_UP: a checkpoint to begin from
        self.run: tracking.RunHandle | None = None
        self.logged_through = 0                          # epochs the run already has
        self.epoch = 0                                   # the last epoch it reported
        self.pool_token: int | None = None               # pooled, TRAINING: its membership
        self.checkpointed: dict[str, Any] | None = None  # pooled: the state of its last checkpoint
        self.final_state: dict[str, Any] | None = None   # pooled, ENDED: the state it was finalized from
        if self.pool is not None:
            _set_threads(self.sweep)
            self.trainer = None
        else:
            self.trainer = _make_trainer(self.cfg, self.sweep)

    def _begin(self) -> None:
        """SET_UP -> TRAINING: join its pool, create or reopen its MLflow run. At its first step
        rather than in setup: when Tune retries a trial it may start a fresh actor for it, give
        the trial to a cached one instead (reuse_actors) and discard the fresh one after its setup,
        by then maybe after the trial ended. That setup must leave no trace (it could reopen a
        finished run, and take the trial's slot in its pool)."""
        restored, self.restored = self.restored, None
        self.run = _open_run(self.sweep, self.trial_id, self.cfg, self.config_dict)
        if self.run is not None:
            # The node that trained the trial (the last one, if a retry moved it), for cluster
            # debugging; set here, not in _open_run: a stopped trial's test reopens the run
            # wherever Ray places it and must not rewrite where the trial trained.
            self.run.set_tags({"sweeper.node_id": ray.get_runtime_context().get_node_id()})
        # Epochs already in the run's history: a retried trial replays those after its checkpoint
        # (or all of them, when it had none yet), and they are not logged twice.
        if self.run is not None and not self.run.created:
            self.logged_through = self.run.resume(restored.unlogged if restored else [], "epoch")
        if self.pool is not None:
            # Last: its group's next round waits for it from now on, and it asks at once.
            self._join(restored.trainer_state if restored else None)
        if self.run is not None and self.logged_through == 0 and self.cfg.image_every:
            # At initialisation: step 0 of the UI's slider (again, the same image, for a retry
            # from scratch whose first attempt died before its first epoch).
            self._log_pseudo_inputs(0)
        self.phase = Phase.TRAINING

    def _join(self, state: dict[str, Any] | None) -> None:
        # The validated config itself: the pool does not validate it again.
        self.pool_token = ray.get(self.pool.join.remote(self.trial_id, self.cfg, state))
        self.checkpointed = state

    def _pool_step(self) -> dict[str, Any]:
        """The trial's next epoch from its pool. Evicted while alive (it was slow to ask: a busy
        Tune driver, a slow MLflow), it joins again with the state of the epoch it last reported
        (the pool keeps an evicted trial's state for a while; else its own last checkpoint's)
        and asks again; without such a state it fails, and Tune retries it from its checkpoint."""
        try:
            return ray.get(self.pool.step.remote(self.trial_id))
        except NotAMember:
            state = self._state_at(self.epoch)
            if state is None:
                raise
            self._join(state)
            return ray.get(self.pool.step.remote(self.trial_id))

    def _state_at(self, epoch: int) -> dict[str, Any] | None:
        """A state of this trial at `epoch`: its last checkpoint's, or the one its pool parked."""
        if (self.checkpointed["epoch"] if self.checkpointed is not None else 0) == epoch:
            return self.checkpointed
        try:
            parked = ray.get(self.pool.state.remote(self.trial_id))
        except NotAMember:
            return None
        return parked if parked["epoch"] == epoch else None

    def _leave(self) -> None:
        if self.pool is not None and self.pool_token is not None:
            try:
                # With its token: this process's membership only, not a retried incarnation's.
                ray.get(self.pool.leave.remote(self.trial_id, self.pool_token), timeout=30)
            except Exception:   # the pool is gone (sweep over): nothing to leave
                pass
            self.pool_token = None

    def step(self) -> dict[str, Any]:
        if self.phase is Phase.SET_UP:
            self._begin()
        try:
            metrics = self.trainer.step() if self.pool is None else self._pool_step()
        except Exception as exc:
            if self.run is not None:
                self.run.set_tags({tracking.TAG_STOP: STOP_ERROR, "stop_detail": f"{type(exc).__name__}: {exc}"[:5000]})
                self.run.terminate("FAILED")
            raise
        epoch = self.epoch = metrics["epoch"]
        stopped = metrics["stop_reason"] is not None
        trainer = self.trainer
        if stopped and self.pool is not None:
            # Its state leaves the pool with it; it is finalized here, in the trial's process.
            self.final_state = ray.get(self.pool.state.remote(self.trial_id))
            self._leave()
            trainer = trainer_from_state(self.cfg, self.sweep, self.final_state)
        # A retry from a checkpoint replays the epochs after it exactly (pooled or not: a trial's
        # randomness is its own); the run has them, so they are not logged twice.
        # Queued (the round does not wait for MLflow), the image before the metrics: an epoch whose
        # metrics are stored has its image stored too, so a resume replays exactly what is missing.
        if self.run is not None and epoch > self.logged_through:
            every = self.cfg.image_every
            if every and (epoch % every == 0 or stopped):
                self._log_pseudo_inputs(epoch, trainer)   # every image_every epochs, and the last one
            self.run.log_metrics(metrics, step=epoch, wait=False)
        # No stop_reason in the result until the trial ends by itself: its absence in the last
        # result tells the driver and the searcher that the scheduler stopped the trial.
        result = {k: v for k, v in metrics.items() if v is not None}
        if self.run is not None:
            result[RESULT_RUN_ID] = self.run.run_id
        if stopped:
            result.update(finalize(trainer, self.run, metrics["stop_reason"]))
            result["done"] = True
            self.phase = Phase.ENDED
            if self.pool is not None and trainer.device.type == "cuda":
                # This process's GPU memory goes back to the pool (its CUDA context stays). A
                # Trainer sits in reference cycles: only the cycle collector frees its tensors.
                del trainer
                gc.collect()
                torch.cuda.empty_cache()
        return result

    def _log_pseudo_inputs(self, epoch: int, trainer: Trainer | None = None) -> None:
        """From `trainer` (this process's), else from the trial's slot in its pool."""
        trainer = trainer if trainer is not None else self.trainer
        if trainer is not None:
            u = getattr(trainer.model.prior, "pseudo_inputs", None)
        else:
            u = ray.get(self.pool.pseudo_inputs.remote(self.trial_id, N_GRID_IMAGES))
        if u is not None:
            shape = get_spec(self.cfg.dataset).image_shape   # the registry's: no data loaded for it
            log_pseudo_inputs(self.run, u, shape, epoch, wait=False)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        if self.phase is Phase.SET_UP:
            self._begin()
        if self.pool is None:
            state = self.trainer.state_dict()
        elif self.phase is Phase.ENDED:
            state = self.final_state
        else:
            state = self.checkpointed = ray.get(self.pool.state.remote(self.trial_id))
        # With the writes MLflow has not acknowledged yet: a restore sends them again.
        torch.save({"trainer": state, "run_id": self.run.run_id if self.run else None,
                    "unlogged": self.run.unacknowledged() if self.run else []},
                   os.path.join(checkpoint_dir, CHECKPOINT_FILE))

    def restore(self, checkpoint_path: Any) -> None:
        """Tune's restore, from the newest checkpoint of the trial that exists when the one Tune's
        saved state names was deleted by retention since (`newest_existing_checkpoint`); Tune
        itself would fail the trial ("does not exist on storage anymore")."""
        from ray.air.constants import TRAINING_ITERATION
        from ray.train._internal.checkpoint_manager import _TrainingResult
        from ray.train._internal.storage import _exists_at_fs_path

        if isinstance(checkpoint_path, _TrainingResult):
            checkpoint = checkpoint_path.checkpoint
            if not _exists_at_fs_path(checkpoint.filesystem, checkpoint.path):
                newest = newest_existing_checkpoint(checkpoint)
                if newest is not None:
                    other, epoch = newest
                    logging.getLogger(__name__).warning(
                        "trial %s: checkpoint %s no longer exists (deleted by retention after Tune's last saved "
                        "state); continuing from %s, epoch %d", self.trial_id, checkpoint.path, other.path, epoch)
                    # One Tune iteration = one epoch: the trial goes on at the checkpoint's epoch.
                    checkpoint_path = _TrainingResult(checkpoint=other, metrics={
                        **checkpoint_path.metrics, TRAINING_ITERATION: epoch})
        super().restore(checkpoint_path)

    def load_checkpoint(self, checkpoint: str | dict) -> None:
        directory = checkpoint if isinstance(checkpoint, str) else checkpoint["path"]
        state = read_checkpoint(directory)
        self.epoch = int(state["trainer"]["epoch"])
        if self.pool is None:
            self.trainer.load_state_dict(state["trainer"])
        if self.phase is Phase.SET_UP:
            # Applied when it begins: the writes are sent when its run is opened, the state
            # (pooled) is what it joins its pool with.
            self.restored = Restored(state["trainer"], state.get("unlogged", []))
            return
        if state["run_id"] and self.sweep.get("tracking_uri"):
            self.run = tracking.RunHandle(self.sweep["tracking_uri"], state["run_id"])
            self.logged_through = self.run.resume(state.get("unlogged", []), "epoch")
        if self.pool is not None:
            # After the run's resume (which may wait for MLflow): from its join on, its group waits for it.
            self._join(state["trainer"])             # replaces its slot
        self.phase = Phase.TRAINING

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._leave()             # a reused actor: the old trial's slot goes, a new trial starts
        self._close_run()
        self._start(new_config)
        return True

    def _close_run(self) -> None:
        """What is still queued gets a few seconds to be stored; the rest is in the last
        checkpoint, or in epochs a resume replays."""
        if self.run is not None:
            self.run.close(timeout_s=10)

    def cleanup(self) -> None:
        self._leave()
        self._close_run()
