"""Domain errors. The CLI turns every one of `USER_ERRORS` (the sweeper's and the VAE library's
own) into one clear message and an exit code, in one place (cli._Group)."""

from __future__ import annotations

# The library's errors (it imports nothing from here); re-exported so the sweeper has one place.
from trainables.vae.errors import DataError, VAEError  # noqa: F401


class SweeperError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class SpecError(SweeperError):
    """A sweep spec is invalid; `problems` lists every problem with its path in the file."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the sweep spec:\n{lines}")


class SweepInterrupted(SweeperError):
    """The user interrupted a sweep (Ctrl-C); the message says how to continue it."""

    exit_code = 130   # 128 + SIGINT, as shells report an interrupted command
    prefix = ""


class SweepFailed(SweeperError):
    """The sweep ran to its end but some trials ended with an error (listed in the message)."""


# What the CLI reports as a message and an exit code instead of a traceback.
USER_ERRORS = (SweeperError, VAEError)
