"""Rejecting concurrent use of an object whose methods mutate shared state (trainers, tuners).

Such objects are not safe to share across threads: two updates at once would interleave optimiser steps and
parameter writes. Instead of a lock that would silently serialise (and hide the design error), a second
concurrent call raises at once, naming the object and the method.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class ExclusiveUse:
    """``with guard(name):`` runs the block, or raises RuntimeError if another thread is inside a block of the
    same guard. Re-entry from the thread that holds it is allowed (a method calling another guarded one)."""

    def __init__(self, owner: str):
        self.owner = owner
        self._lock = threading.RLock()

    @contextmanager
    def __call__(self, method: str) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{self.owner}.{method} was called while another thread is using this "
                               f"{self.owner}; it is not safe to share across threads (its updates mutate "
                               "networks and optimiser state): give each thread its own, or serialise the calls")
        try:
            yield
        finally:
            self._lock.release()

    def __reduce__(self):  # copies and pickles get a fresh, unheld guard (a lock itself cannot be copied)
        return (ExclusiveUse, (self.owner,))


def exclusive(method: F) -> F:
    """Method decorator: the call runs inside ``self._exclusive(method name)`` (an ``ExclusiveUse``)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._exclusive(method.__name__):
            return method(self, *args, **kwargs)
    return guarded  # type: ignore[return-value]
