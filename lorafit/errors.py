"""Errors a user can cause. The CLI prints their message in one block and exits 2; anything else is a bug (exit 1).

This module imports nothing from lorafit so every stage can raise these.
"""

from __future__ import annotations


class LorafitError(Exception):
    """A problem with the user's input: config, data, paths or arguments. Exit code 2, no traceback."""

    exit_code = 2


class ConfigError(LorafitError):
    """The config file or an override is invalid. `problems` holds one line per problem."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        where = f" in {self.source}" if self.source else ""
        lines = [f"{len(self.problems)} problems{where}:"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class DataError(LorafitError):
    """A data file or row cannot be used (missing file, malformed line, wrong columns, empty set)."""


class TargetNotFoundError(LorafitError):
    """`adapter.targets` matched no module of the model."""


class ModelLoadError(LorafitError):
    """The base model or tokenizer cannot be found or loaded."""


class RunDirError(LorafitError):
    """A run, adapter or output directory is missing, incomplete, or would be overwritten."""


class TrainingStopped(Exception):
    """Training stopped before the end: a signal (exit 130, checkpoint saved) or a NaN/inf loss (exit 1).

    Not a bug, so the CLI prints the message alone, without a traceback.
    """

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
