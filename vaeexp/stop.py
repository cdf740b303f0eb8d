"""A request to stop training between two steps, from a signal handler (no torch: the entry
point arms it before anything heavy is imported)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    """Set by a signal handler while the loop runs, so training stops between two steps and never
    in the middle of a checkpoint write or an MLflow call."""

    def __init__(self) -> None:
        self.active = False
        self.requested: str | None = None

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.active, self.requested = True, None
        try:
            yield
        finally:
            self.active = False

    def request(self, reason: str) -> bool:
        """True if the loop will stop at the next step; False if the caller must stop itself."""
        if not self.active or self.requested:
            return False
        self.requested = reason
        return True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt(self.requested)
