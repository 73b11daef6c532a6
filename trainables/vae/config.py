"""The one frozen configuration of a training run, built once from a trial's dict."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Mapping

from trainables.vae.catalog import SELECT_ELBO, SELECT_ON, SELECT_VAL_LL
from trainables.vae.errors import ConfigError

OPTIMIZERS = ("adam", "adam_normgrad")
# torch device strings a trial may name: auto picks CUDA when the trial reserved a GPU.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N (e.g. cuda:0) or mps"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Defaults follow the paper's reference code (REF)."""

    dataset: str = "static_mnist"
    model: str = "vae"                 # "vae" (1 level) or "hvae" (2 levels)
    prior: str = "vamp"                # a name in trainables.vae.priors.PRIORS
    K: int = 500                       # pseudo-inputs / mixture components (vamp, vamp_data, mog)
    latent_dim: int = 40               # REF: 40 on both levels
    hidden_dim: int = 300              # REF: GatedDense(., 300)
    lr: float = 5e-4                   # REF: Adam 5e-4
    batch_size: int = 100              # REF: 100
    max_epochs: int = 1000             # SEED: 1000, REF: 2000
    warmup: int = 100                  # KL warm-up epochs: beta = min(1, epoch / warmup)
    early_stopping: int = 50           # REF's patience: stop after more than this many epochs in a row
                                       # without a new best, counted from the end of the warm-up; 0: off
    best_after_warmup: bool = False    # not REF: only epochs at full KL weight (beta = 1) may be best
    select_on: str = "elbo"            # what chooses the tested epoch and stops early: "elbo" (REF) or
                                       # "val_ll" (importance-sampled validation LL; not REF)
    val_ll_samples: int = 100          # S of the validation LL (select_on: val_ll; and at the tested epochs)
    val_ll_every: int = 5              # select_on: val_ll: computed every N epochs and at max_epochs
    optimizer: str = "adam"            # "adam" or REF's "adam_normgrad" (unit-norm gradients)
    fixed_pseudo_inputs: bool = False  # vamp_data only: keep the K training images fixed
    prob_clamp: float = 0.0            # binary data: p(x_d=1) kept in [eps, 1-eps] (REF: 1e-5); 0: exact
    seed: int = 0
    test_samples: int = 5000           # S of the importance-sampled test log-likelihood
    train_subset: int | None = None    # a fixed random subset of N training images (quick runs)
    val_subset: int | None = None      # ... validation images
    test_subset: int | None = None     # ... test images
    image_every: int = 10              # log the pseudo-input grid every N epochs (0: never)
    device: str = "auto"               # "auto", "cpu", "cuda", "cuda:1", ...
    cuda_graphs: bool = True           # on CUDA, replay the whole training step as one CUDA graph
    data_root: str | None = None       # absolute path, resolved by the driver

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "trial") -> "TrainConfig":
        """Build and validate a config; unknown keys and bad values raise `ConfigError`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(fields)}"
                problems.append(f"{where}.{key}: unknown key{hint}")
                continue
            try:
                kwargs[key] = coerce_value(value, fields[key].type)
            except (TypeError, ValueError) as exc:
                problems.append(f"{where}.{key}: {exc}")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        config = cls(**kwargs)
        config.check(where=where)
        return config

    def check(self, *, where: str = "trial") -> None:
        """Raise `ConfigError` listing every out-of-range value."""
        problems = [f"{where}.{p}" for p in self.problems()]
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid value as 'field: message' (empty when the config is valid)."""
        # Registries are imported here: they import this module.
        from trainables.vae.data import DATASETS
        from trainables.vae.model import MODELS
        from trainables.vae.priors import PRIORS

        out: list[str] = []
        for name, registry in (("dataset", DATASETS), ("model", MODELS), ("prior", PRIORS)):
            value = getattr(self, name)
            if value not in registry:
                close = difflib.get_close_matches(value, registry, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                out.append(f"{name}: unknown {name} {value!r}; {hint}choose one of {sorted(registry)}")
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            out.append(f"device: {self.device!r} is not a device; use {DEVICE_FORMS}")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer: unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if self.select_on not in SELECT_ON:
            out.append(f"select_on: unknown choice {self.select_on!r}; choose one of {list(SELECT_ON)} "
                       f"({SELECT_ELBO!r} is REF's rule)")
        elif (self.select_on == SELECT_VAL_LL and self.early_stopping
              and self.val_ll_every > self.early_stopping):
            out.append(f"val_ll_every: {self.val_ll_every} epochs is more than early_stopping "
                       f"({self.early_stopping}): the run would stop at the first validation LL after its best; "
                       f"set val_ll_every <= {self.early_stopping} or raise early_stopping")
        for name in ("K", "latent_dim", "hidden_dim", "batch_size", "max_epochs", "test_samples",
                     "val_ll_samples", "val_ll_every"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "early_stopping", "image_every", "seed"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("train_subset", "val_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name}: must be >= 1 or null, got {value}")
        if not 0.0 <= self.prob_clamp < 0.5:
            out.append(f"prob_clamp: must be in [0, 0.5), got {self.prob_clamp} (REF uses 1e-5; 0 turns it off)")
        if not self.lr > 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if self.fixed_pseudo_inputs and self.prior != "vamp_data":
            out.append("fixed_pseudo_inputs: only applies to prior 'vamp_data'; remove it or set prior: vamp_data")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce_value(value: Any, annotation: str) -> Any:
    """Coerce YAML/JSON scalars to the field's type; reject what cannot be meant."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise TypeError("must not be null")
    base = annotation.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if base == "int":
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if hasattr(value, "__index__"):  # numpy integers from a searcher
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    if base == "float":
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"expected a number, got {value!r}") from None
    if base == "str":
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {value!r}")
    return value
