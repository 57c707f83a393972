"""Errors that mean "the user asked for something we cannot do": the CLI prints them as one clear message."""

import logging


class UserError(Exception):
    """Bad input: a config key, an option, a file. The message names it and says what was expected."""


class ConfigError(UserError):
    """One or more configuration problems, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class DataError(UserError):
    """A data file or folder is missing or does not hold what the loader expects."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or not an mmbalance checkpoint."""


class RunFolderError(UserError):
    """The run folder holds another run's record, or another process is writing to it."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: an expected ending (learning rate, data), not a bug."""


class NonFiniteError(UserError):
    """Model outputs became NaN or infinite where metrics are computed: no metric is reported on them."""


class SweepJobFailed(UserError):
    """A sweep job ended with an expected error, already printed and recorded in its metrics.json and train.log."""


def log_traceback_to_files(message: str, exc: BaseException | None, level: int = logging.ERROR) -> None:
    """`message` with the traceback of `exc` (none when None) written to the run's log files (train.log) only: the
    console gets the one-line message from the caller, the file keeps what a bug report needs."""
    log = logging.getLogger("mmbalance")
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (message,), exc_info)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
