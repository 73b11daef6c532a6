"""The Ray Tune trainable: one Tune iteration = one epoch of the VAE library's `Trainer`.

Each trial logs to its own nested MLflow run (found again by trial id, so retries, reused
actors and resumed sweeps continue the same run). When the trial ends, by itself (max epochs,
early stopping, NaN) or because the scheduler stopped it (ASHA), the best weights are restored
and the test log-likelihood, test ELBO, active units and images are logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from sweeper import tracking
from trainables.vae.config import TrainConfig
from trainables.vae.data import Splits, load_dataset
from trainables.vae.evaluate import image_grid
from trainables.vae.train import STOP_NAN, Trainer, final_evaluation

# The key of the trial config that carries sweep bookkeeping, not training settings.
SWEEP_KEY = "sweeper"
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
    """Trial dict -> (frozen training config, sweep bookkeeping)."""
    sweep = dict(config.get(SWEEP_KEY) or {})
    return TrainConfig.from_dict({k: v for k, v in config.items() if k != SWEEP_KEY}), sweep


class VAETrainable(tune.Trainable):
    """A class-based Tune trainable around `trainables.vae.train.Trainer`."""

    def setup(self, config: dict[str, Any]) -> None:
        self._start(config)

    def _start(self, config: dict[str, Any]) -> None:
        self.cfg, self.sweep = split_config(config)
        threads = int(self.sweep.get("cpus_per_trial", 1))
        torch.set_num_threads(max(1, threads))   # 1-CPU trials must not oversubscribe the node
        self.trainer = Trainer(self.cfg, _cached_splits(self.cfg.dataset, self.cfg.data_root))
        self.finalized = False
        self.failed = False
        self.run: tracking.RunHandle | None = None
        if self.sweep.get("tracking_uri"):
            self.run = tracking.open_trial_run(
                self.sweep["tracking_uri"], self.sweep["experiment_id"], self.sweep["parent_run_id"],
                trial_id=self.trial_id, trial_name=self.trial_name, params=self.cfg.to_dict(),
                sweep_name=self.sweep.get("sweep_name", ""))
            # Which node ran the trial (the last one, if a retry moved it): for cluster debugging.
            self.run.set_tags({"sweeper.node_id": ray.get_runtime_context().get_node_id()})

    # -- Tune API ------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        try:
            metrics = self.trainer.step()
        except Exception as exc:
            self._fail(exc)
            raise
        epoch = metrics["epoch"]
        if self.run is not None:
            self.run.log_metrics(metrics, step=epoch)
            every = self.cfg.image_every
            if every and (epoch == 1 or epoch % every == 0) and hasattr(self.trainer.model.prior, "pseudo_inputs"):
                self._log_pseudo_inputs(epoch)
        result = {k: v for k, v in metrics.items() if v is not None}
        if self.trainer.done:
            result.update(self._finalize(self.trainer.stop_reason))
            result["done"] = True
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        torch.save({"trainer": self.trainer.state_dict(), "finalized": self.finalized,
                    "run_id": self.run.run_id if self.run else None},
                   os.path.join(checkpoint_dir, CHECKPOINT_FILE))

    def load_checkpoint(self, checkpoint: str | dict) -> None:
        path = Path(checkpoint if isinstance(checkpoint, str) else checkpoint["path"]) / CHECKPOINT_FILE
        state = torch.load(path, map_location=self.trainer.device, weights_only=False)
        self.trainer.load_state_dict(state["trainer"])
        self.finalized = state["finalized"]
        if state["run_id"] and self.sweep.get("tracking_uri"):
            self.run = tracking.RunHandle(self.sweep["tracking_uri"], state["run_id"])

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # A reused actor: the previous trial ended (by itself or stopped by the scheduler).
        self._finalize_if_stopped()
        self._start(new_config)
        return True

    def cleanup(self) -> None:
        self._finalize_if_stopped()

    # -- ending a trial ------------------------------------------------------------------
    def _finalize_if_stopped(self) -> None:
        """Called when Tune ends a trial that did not finish by itself: the scheduler stopped it."""
        if not self.finalized and not self.failed and self.trainer.epoch > 0:
            self._finalize("asha")

    def _finalize(self, reason: str) -> dict[str, Any]:
        """Restore the best weights, evaluate on the test set, log everything, close the run."""
        if self.finalized:
            return {}
        self.finalized = True
        out: dict[str, Any] = {"stop_reason": reason}
        if reason == STOP_NAN:
            if self.run is not None:
                self.run.set_tags({tracking.TAG_STOP: reason, "stop_detail": self.trainer.stop_detail})
                self.run.terminate("FAILED")
            return out
        self.trainer.finish()
        final = final_evaluation(self.trainer)
        per_image = final.pop("per_image_ll")
        out.update(final)
        if self.run is not None:
            step = self.trainer.epoch
            self.run.log_metrics({**final, "best_epoch": self.trainer.best_epoch or step}, step=step)
            self._log_final_images(step)
            self.run.log_text(tracking.per_image_csv(per_image.tolist()), "per_image_ll.csv")
            self.run.log_figure(tracking.ll_histogram_figure(
                per_image.tolist(), f"{self.cfg.dataset} / {self.cfg.model} / {self.cfg.prior}"),
                "test_ll_histogram.png")
            self.run.set_tags({tracking.TAG_STOP: reason, "stop_detail": self.trainer.stop_detail})
            self.run.terminate("FINISHED")
        return out

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        if self.run is not None:
            self.run.set_tags({tracking.TAG_STOP: "error", "stop_detail": f"{type(exc).__name__}: {exc}"[:5000]})
            self.run.terminate("FAILED")

    # -- images ----------------------------------------------------------------------------
    def _log_pseudo_inputs(self, step: int) -> None:
        u = self.trainer.model.prior.pseudo_inputs[:N_GRID_IMAGES]
        self.run.log_image(image_grid(u, self.trainer.info.image_shape), "pseudo_inputs", step)

    def _log_final_images(self, step: int) -> None:
        model, shape = self.trainer.model, self.trainer.info.image_shape
        n_test = self.trainer.x_test.shape[0]
        ncol = min(10, n_test)
        rows = min(5, n_test // ncol)
        x = self.trainer.x_test[:rows * ncol]
        recon = model.reconstruct(x)
        # Pairs of rows: real test images above their reconstructions.
        pairs = torch.stack([x.reshape(rows, ncol, -1), recon.reshape(rows, ncol, -1)], 1)
        self.run.log_image_file(image_grid(pairs.reshape(2 * rows * ncol, -1), shape, ncol=ncol),
                                "reconstructions.png")
        self.run.log_image_file(image_grid(model.sample(N_GRID_IMAGES), shape, ncol=10), "samples.png")
        if hasattr(model.prior, "pseudo_inputs"):
            self._log_pseudo_inputs(step)
            self.run.log_image_file(image_grid(model.prior.pseudo_inputs[:N_GRID_IMAGES], shape, ncol=10),
                                    "pseudo_inputs.png")
