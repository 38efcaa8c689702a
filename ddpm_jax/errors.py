"""Errors of a run that cannot go on, and of a check that failed. Each command prints them as one line (`cli.py`
holds the exit codes: 1 for these, 128 + N for a stop by signal N, 2 for bad input, which arrives as ValueError or
OSError)."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


class StoppedBySignal(TrainingError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved first."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class VerificationError(RuntimeError):
    """Converted weights whose outputs differ from the reference's by more than the tolerance."""
