"""The exception a study's training loop raises when its loss stops being a number."""

from __future__ import annotations


class TrainingDiverged(FloatingPointError):
    """The training loss of run ``run`` became non-finite; ``step`` (1-based) and ``loss`` say where and what."""

    def __init__(self, run: str, step: int, loss: float) -> None:
        super().__init__(f"{run}: loss became {loss} at step {step}")
        self.step, self.loss = step, loss
