"""Errors that more than one tier raises or catches (the trainer, the studies, the commands)."""

from __future__ import annotations


class TrainingDiverged(FloatingPointError):
    """A training loss (or gradient norm) became NaN or infinite; ``step`` (1-based) and ``loss`` say where and what.
    The message names the run and what to change."""

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step, self.loss = step, loss
