"""What a person sees while a job runs: one line per stage event, progress on long work.

- :func:`say` prints ``[stage] text``. Progress lines (``progress=True``) redraw one line in
  place on a terminal; elsewhere (CI logs, ``ray job logs``) at most one is printed every
  :data:`PLAIN_EVERY_S` seconds, so a log stays short whatever the work's length.
- :class:`ProgressRelay` carries progress from Ray workers (a Train worker's epochs) to the
  driver, which prints it: worker output itself stays in Ray's session logs unless verbose.
- :func:`verbose`: ``SYNTH_VERBOSE=1`` (or ``--verbose`` on any job) shows Ray's own output and
  every library log line as well.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, TypeVar

VERBOSE_ENV = "SYNTH_VERBOSE"
PLAIN_EVERY_S = 10.0  # without a terminal, the least time between two progress lines

T = TypeVar("T")
_state = {"open_line": False, "last_plain": 0.0}
_lock = threading.Lock()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0").lower() not in ("", "0", "false", "no")


def _tty() -> bool:
    return sys.stdout.isatty()


def say(stage: str, text: str, progress: bool = False) -> None:
    """Print one line for a person: ``[stage] text``; progress lines are throttled or redrawn."""
    line = f"[{stage}] {text}"
    with _lock:
        if progress:
            if _tty():
                sys.stdout.write("\r\x1b[K" + line)
                sys.stdout.flush()
                _state["open_line"] = True
                return
            now = time.monotonic()
            if now - _state["last_plain"] < PLAIN_EVERY_S:
                return
            _state["last_plain"] = now
        elif _state["open_line"]:
            sys.stdout.write("\r\x1b[K")  # the finished line replaces the progress line
        _state["open_line"] = False
        print(line, flush=True)


def plural(n: int, noun: str) -> str:
    """``1 shard``, ``3 shards``, ``1,204 images``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def rate(done: int, total: int, seconds: float, unit: str, since: int = 0) -> str:
    """``"120/384 images, 14.2 images/s, ETA 19 s"``; the speed counts the ``done - since`` made in ``seconds``."""
    speed = (done - since) / seconds if seconds > 0 else 0.0
    eta = f", ETA {(total - done) / speed:.0f} s" if speed > 0 and done < total else ""
    return f"{done:,}/{total:,} {unit}, {speed:.1f} {unit}/s{eta}"


class ProgressRelay:
    """A queue from Ray workers to the driver; :meth:`run` calls a blocking function meanwhile.

    ``sink`` (a ``ray.util.queue.Queue``, picklable) goes to the workers, which ``put`` small
    dicts; the driver's :meth:`run` hands each one to ``on_item`` as it arrives. One relay serves
    any number of :meth:`run` calls; :meth:`close` releases its actor.
    """

    def __init__(self):
        from ray.util.queue import Queue

        # No CPU: the queue must never wait for, or take, a slot the work itself needs.
        self.sink = Queue(actor_options={"num_cpus": 0})

    def run(self, fn: Callable[[], T], on_item: Callable[[Any], None]) -> T:
        from ray.util.queue import Empty

        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # re-raised on the calling thread below
                outcome["error"] = exc

        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        while worker.is_alive():
            try:
                on_item(self.sink.get(timeout=0.5))
            except Empty:
                pass
        while not self.sink.empty():  # what the last epochs put before the call returned
            on_item(self.sink.get_nowait())
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def close(self) -> None:
        try:
            self.sink.shutdown()
        except Exception:  # the queue's actor is gone already; nothing to release
            pass

