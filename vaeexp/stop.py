"""A request to stop training between two steps, from a signal handler (no torch: the entry
point arms it before anything heavy is imported)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# The reason a cluster job stops with when it will come back (requeued after preemption or a
# signal before its time limit): its MLflow run waits as SCHEDULED, not KILLED.
REQUEUED = "requeued"


class StopFlag:
    """Set by a signal handler while the loop runs, so training stops between two steps and never
    in the middle of a checkpoint write or an MLflow call."""

    def __init__(self) -> None:
        self.active = False
        self.requested: str | None = None
        self.pending: str | None = None  # asked for before the loop started (defer=True)

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.active, self.requested, self.pending = True, self.pending, None
        try:
            yield
        finally:
            self.active = False

    def request(self, reason: str, defer: bool = False) -> bool:
        """True if the loop will stop at the next step; False if the caller must stop itself.
        With `defer`, a request made before the loop starts stops it after its first step (a
        cluster job signalled while it imports or loads data still leaves a checkpoint)."""
        if not self.active or self.requested:
            if defer and not self.active:
                self.pending = reason
            return False
        self.requested = reason
        return True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt(self.requested)


STOP = StopFlag()  # the process's one flag: armed by the training loop, set by signal handlers
