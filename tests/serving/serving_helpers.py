"""Helpers the serving tests share: hold the engine between two steps, wait for a condition."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def engine_held(engine: Any) -> Iterator[None]:
    """Hold the engine between two steps: requests sent meanwhile queue up, then join together."""
    release, held = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    engine.call_between_steps(hold)
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
