"""Domain errors. The CLI turns every `SweeperError` into one clear message and an exit code."""

from __future__ import annotations


class SweeperError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class DataError(SweeperError):
    """A dataset is missing, corrupt, or cannot be downloaded."""


class ConfigError(SweeperError):
    """A trial or model configuration is invalid."""

    exit_code = 2


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


class TrainingDiverged(SweeperError):
    """The loss became NaN or infinite; the message names the epoch and the quantity."""
