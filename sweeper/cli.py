"""The `sweeper` command line: each command parses, validates and calls one function.

Domain errors (`SweeperError`) become one message on stderr and an exit code, here, in one place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sweeper.errors import SweeperError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SweeperError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
