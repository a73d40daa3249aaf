"""Errors a user can cause. The CLI prints their message in one block and exits 2; anything else is a bug (exit 1).

This module imports nothing from lorafit so every stage can raise these.
"""

from __future__ import annotations

import errno


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


class DiskFullError(LorafitError):
    """A save ran out of disk (or quota, or hit a read-only filesystem). Not bad input and not a bug: exit 1, one line
    saying what was being written and how to continue."""

    exit_code = 1


# The OS errors that mean "this disk cannot take the file", and their texts: safetensors (Rust) and torch's C++
# writer report them inside their own exception types, so the text is all that reaches Python there.
DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                    errno.EROFS: "read-only file system"}


def disk_full_reason(exc: BaseException) -> str | None:
    """"no space left on device" (or quota / read-only) when `exc`, or an exception it was raised from, says the disk
    refused a write; None for anything else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return DISK_FULL_ERRNOS[exc.errno]
        text = str(exc).lower()
        for reason in DISK_FULL_ERRNOS.values():
            if reason in text:
                return reason
        exc = exc.__cause__ or exc.__context__
    return None
