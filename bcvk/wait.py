"""Deadlines and polling under a named condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bcvk.errors import WaitTimeout

T = TypeVar("T")


@dataclass
class Deadline:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    @property
    def remaining(self) -> float:
        return max(0.0, self.start + self.seconds - time.monotonic())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def expired(self) -> bool:
        return self.remaining <= 0


def wait_until(
    check: Callable[[], T | None],
    deadline: Deadline,
    what: str,
    *,
    interval: float = 0.5,
    hint: str | None = None,
) -> T:
    """Call CHECK until it returns a value other than None/False, or time out."""
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if deadline.expired:
            raise WaitTimeout(f"timed out after {deadline.seconds:.0f}s waiting for {what}", hint)
        time.sleep(min(interval, deadline.remaining))
