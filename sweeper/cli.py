"""The `sweeper` command line: each command parses, validates and calls one function.

Domain errors (`errors.USER_ERRORS`: the sweeper's and the VAE library's) become one message on
stderr and an exit code, here, in one place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sweeper.errors import USER_ERRORS


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            click.echo(f"{getattr(exc, 'prefix', 'error: ')}{exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C before a command has its own handler (e.g. while `sweeper run` imports Ray):
            # the shell's status for an interrupted command, not click's "Aborted!" and 1.
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="vampprior-sweeper")
def main() -> None:
    """Hyperparameter sweeps of VAEs with the VampPrior (Ray Tune + Optuna + ASHA + MLflow)."""


# --- sweeper data ---------------------------------------------------------------------------------
# trainables.vae.data is imported inside the commands: it pulls in torch, which `sweeper --help`
# should not pay for.
_root_option = click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Data folder (default: $SWEEPER_DATA_DIR, else the per-user cache folder).")


@main.group()
def data() -> None:
    """List, download and verify the datasets of the study."""


@data.command("list")
@_root_option
def data_list(root: Path | None) -> None:
    """One line per dataset: name, likelihood, train/val/test sizes, state in the data root."""
    from trainables.vae.data import resolve_root, verify

    click.echo(f"data root: {resolve_root(root)}")
    for name, report in verify(root).items():
        sizes = "/".join(str(n) for n in report.info.split_sizes)
        click.echo(f"{name:<14} {report.info.likelihood:<12} {sizes:<18} {report.state}")


@data.command("fetch")
@click.argument("name")
@_root_option
def data_fetch(name: str, root: Path | None) -> None:
    """Download dataset NAME (or `all`) into the data root and verify its checksums."""
    from trainables.vae.data import DATASETS, fetch

    for one in (list(DATASETS) if name == "all" else [name]):
        for path in fetch(one, root):
            click.echo(f"{one}: ok {path}")


@data.command("verify")
@_root_option
def data_verify(root: Path | None) -> None:
    """Check every present file against its official checksum; exit 1 if any is corrupt."""
    from sweeper.errors import DataError
    from trainables.vae.data import verify

    corrupt = []
    for name, report in verify(root).items():
        click.echo(f"{name:<14} {report.state}")
        for f in report.files:
            if f.state == "corrupt":
                click.echo(f"  corrupt: {f.path} ({f.detail})")
                corrupt.append(f"{f.path} (delete it, then run `sweeper data fetch {name}`)")
    if corrupt:
        raise DataError("corrupt file(s):\n  - " + "\n  - ".join(corrupt))



# --- sweeper train --------------------------------------------------------------------------------
@main.command()
@click.option("--dataset", required=True, help="A dataset name (see `sweeper data list`).")
@click.option("--prior", default="vamp", show_default=True, help="standard, vamp, vamp_data or mog.")
@click.option("--model", default="vae", show_default=True, type=click.Choice(["vae", "hvae"]))
@click.option("--epochs", "max_epochs", type=int, default=None, help="Maximum epochs (default 1000).")
@click.option("--K", "K", type=int, default=None, help="Pseudo-inputs / components (default 500).")
@click.option("--lr", type=float, default=None, help="Adam learning rate (default 5e-4).")
@click.option("--warmup", type=int, default=None, help="KL warm-up epochs (default 100).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--train-subset", type=int, default=None, help="Use a fixed random subset of N training images.")
@click.option("--test-subset", type=int, default=None, help="Evaluate on a fixed random subset of N test images.")
@click.option("--test-samples", type=int, default=None, help="Importance samples S of the test LL (default 5000).")
@click.option("--seed", type=int, default=None)
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Data folder.")
def train(root: str | None, **options) -> None:
    """Train one model without a sweep; print per-epoch losses and the final test log-likelihood."""
    from trainables.vae.config import TrainConfig
    from trainables.vae.train import run_training

    values = {k: v for k, v in options.items() if v is not None}
    if root is not None:
        values["data_root"] = str(Path(root).expanduser().resolve())
    run_training(TrainConfig.from_dict(values, where="option"), echo=click.echo)


# --- sweeps ---------------------------------------------------------------------------------------
_spec_argument = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a spec value, e.g. --set trial.max_epochs=3 (repeatable).")


_num_samples_option = click.option("--num-samples", type=int, default=None, help="Override num_samples.")
_max_concurrent_option = click.option("--max-concurrent", type=int, default=None, help="Override max_concurrent.")


@main.command()
@_spec_argument
@_set_option
@_num_samples_option
@_max_concurrent_option
def validate(spec: Path, overrides: tuple[str, ...], num_samples: int | None, max_concurrent: int | None) -> None:
    """Check a sweep spec and list every problem; nothing is started. Takes `run`'s spec options,
    so a `sweeper run` command line validates as it is."""
    from sweeper.run import validate as validate_spec

    checked = validate_spec(spec, overrides, num_samples=num_samples, max_concurrent=max_concurrent, echo=click.echo)
    click.echo(f"{spec}: ok ({checked.total_trials} trial(s), search {checked.search.algorithm}, "
               f"scheduler {checked.scheduler.type})")


@main.command()
@_spec_argument
@_set_option
@_num_samples_option
@_max_concurrent_option
@click.option("--address", default=None, help="An existing Ray cluster (`auto` or HOST:PORT); default: a local one.")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db); http://HOST:PORT for a server.")
@click.option("--storage-path", default=None,
              help="Tune storage: a folder (default ./sweeps) or a URI such as s3://bucket/sweeps.")
@click.option("--resume", is_flag=True, help="Continue the newest interrupted sweep of this spec's name.")
def run(spec: Path, overrides: tuple[str, ...], **options) -> None:
    """Run a sweep: Ray Tune trials, Optuna search, ASHA stopping, every trial in MLflow."""
    from sweeper.run import run_sweep

    run_sweep(spec, overrides, **options, echo=click.echo)   # ends by printing where to look


@main.command()
@click.argument("run_id")
@click.option("--samples", type=int, default=20_000, show_default=True, help="Importance samples S per test image.")
@click.option("--tracking-uri", default=None, help="Default: sqlite:///<cwd>/mlflow.db, as `sweeper run`.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Data folder.")
def evaluate(run_id: str, samples: int, tracking_uri: str | None, device: str, root: str | None) -> None:
    """Re-score a finished trial's test log-likelihood with more importance samples (from MLflow alone)."""
    from sweeper.rescore import rescore_run

    data_root = str(Path(root).expanduser().resolve()) if root is not None else None
    out = rescore_run(run_id, samples, tracking_uri, device, data_root, echo=click.echo)
    before = f" (the run's test_ll: {out.logged_test_ll:.3f})" if out.logged_test_ll is not None else ""
    click.echo(f"{out.metric} = {out.test_ll:.3f} ± {out.se:.3f} (SE) nats over {out.images} images in {out.seconds:.1f} s, "
               f"logged to run {out.run_id}{before}")
    if out.raised:
        click.echo(f"it is the run's test_ll now (it had {'an estimate' if out.logged_test_ll is not None else 'none'})")


@main.command()
@click.argument("experiment")
@click.option("--tracking-uri", default=None, help="Default: sqlite:///<cwd>/mlflow.db, as `sweeper run`.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: ./report-EXPERIMENT).")
@click.option("--no-log", is_flag=True, help="Do not log the report to the sweep's MLflow run.")
def report(experiment: str, tracking_uri: str | None, out: Path | None, no_log: bool) -> None:
    """The study's table and figures (PNG, report.md, report.html) from the runs of MLflow EXPERIMENT,
    every choice made on validation."""
    from sweeper.report import make_report

    result = make_report(experiment, tracking_uri, out, log_to_parent=not no_log)
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"{len(result.files)} file(s) in {result.out}: " + ", ".join(p.name for p in result.files))
    if result.logged_to:
        click.echo(f"logged under report/ of the sweep run {result.logged_to}")


@main.command()
@click.option("--tracking-uri", default=None, help="Default: sqlite:///<cwd>/mlflow.db, as `sweeper run`.")
@click.option("--port", type=int, default=5000, show_default=True)
def ui(tracking_uri: str | None, port: int) -> None:
    """Open the MLflow UI on 127.0.0.1 against the sweeps' tracking store."""
    from sweeper.tracking import launch_ui

    code = launch_ui(tracking_uri, port, echo=click.echo)   # returns when the server stops (Ctrl-C)
    if code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
