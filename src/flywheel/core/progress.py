"""Progress reporting, one name for it: a `Reporter` opens a step and gets an `Advance` callback.

The CLI shows steps with Rich; tests and notebooks pass `QuietReporter`. Lower layers (a trainer,
a table load) take only the `Advance` callback and never know who draws it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[[int, int], None]  # (done, total)


def ignore(done: int, total: int) -> None:
    """An `Advance` that shows nothing."""


class Reporter(Protocol):
    """Where steps report progress."""

    def step(self, name: str, total: int | None = None) -> contextlib.AbstractContextManager[Advance]: ...


class QuietReporter:
    """A Reporter that shows nothing (tests, notebooks, background runs)."""

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Advance]:
        yield ignore
