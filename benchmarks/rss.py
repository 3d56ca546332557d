"""The driver-memory probes' sampler: the peak resident memory of this process while a block runs."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psutil


@contextlib.contextmanager
def peak_rss(interval: float = 0.05) -> Iterator[list[int]]:
    """Yields a one-element list holding the peak RSS in bytes, sampled every ``interval`` s and
    once more when the block ends."""
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
