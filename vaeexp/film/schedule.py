"""When the film takes a frame: dense early, when the latent space forms, sparse later."""

from __future__ import annotations

from dataclasses import dataclass

from vaeexp.config import FilmConfig


@dataclass(frozen=True)
class Schedule:
    """Steps count optimizer steps from 1; step 0 is the untrained model."""

    steps_per_epoch: int
    every_step_until: int | None  # None: every step of the run
    every_n_steps: int
    until_epoch: int

    @classmethod
    def from_config(cls, film: FilmConfig, steps_per_epoch: int) -> Schedule:
        return cls(steps_per_epoch, film.every_step_until, film.every_n_steps, film.until_epoch)

    def due(self, step: int) -> bool:
        """Whether `step` gets a frame."""
        if self.every_step_until is None or step <= self.every_step_until:
            return True
        if step % self.steps_per_epoch == 0:  # each epoch's end
            return True
        return step <= self.until_epoch * self.steps_per_epoch and step % self.every_n_steps == 0

    def steps(self, epochs: int) -> list[int]:
        """Every frame's step in a run of `epochs` epochs, step 0 included."""
        return [s for s in range(epochs * self.steps_per_epoch + 1) if self.due(s)]
