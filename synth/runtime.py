"""What every stage shares: connecting to Ray, the code version, and the provenance it writes."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

from synth import __version__
from synth.config import Config, RayConfig, to_yaml
from synth.progress import verbose
from synth.storage import Layout, Storage


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+g<git commit>[.dirty]`` where a git checkout is at hand, else the version."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SYNTH_CODE_VERSION", __version__)


def init_ray(cfg: RayConfig) -> None:
    """Join the configured cluster ($RAY_ADDRESS under `ray job submit`), or start a local one.

    Quiet unless verbose (:func:`synth.progress.verbose`): Ray's workers keep their output in
    Ray's session logs instead of echoing it to the driver, Ray's own loggers show only errors,
    Tune prints no status table, and the driver's native (C++) log lines go to a file in
    Ray's log folder. Ray Data's progress bars show when stdout is a terminal.
    """
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    if not loud:
        # The legacy Tune output engine honours verbose=0; the new one still prints its header.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    options = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
    else:
        # address="local": always a private instance, never a `ray start` cluster found by accident.
        # Logical CPUs above the core count keep a generator + writer pipeline from stalling.
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=False, **options)
    if not loud:
        divert_native_stderr(ray)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    if not loud:  # Ray Data configures its own logger, apart from the "ray" one ray.init set
        # Its report of a failed task is a traceback; the stage's command prints the one line
        # that names the fix instead (and the whole traceback when the failure is a bug).
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)


_NATIVE_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")


_diverted: list[bool] = []  # once per process


def divert_native_stderr(ray) -> None:
    """Send the driver's native Ray log lines (``[date I pid tid] file.cc:N: ...``) to Ray's log folder.

    Ray's C++ core worker writes them straight to file descriptor 2, past Python's logging. Only
    native writes are diverted: Python's ``sys.stderr`` keeps the original descriptor, so tracebacks
    and synth's own messages are untouched, and any other native line still reaches the terminal.
    """
    if _diverted:
        return
    _diverted.append(True)
    try:  # Ray names no public API for its session's log folder
        log_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:
        log_dir = Path(tempfile.gettempdir())
    sink_path = log_dir / f"synth-driver-{os.getpid()}.native.log"
    sys.stderr.flush()
    original = os.dup(2)
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe, open(sink_path, "ab") as sink, os.fdopen(original, "wb", buffering=0) as terminal:
            for line in iter(pipe.readline, b""):
                if _NATIVE_LOG_LINE.match(line.decode("utf-8", "replace")):
                    sink.write(line)
                    sink.flush()
                else:
                    terminal.write(line)

    threading.Thread(target=forward, name="synth-native-stderr", daemon=True).start()


def write_stage_config(storage: Storage, cfg: Config, stage: str) -> None:
    """The resolved config and code version, beside the stage's outputs."""
    layout = Layout(cfg.run)
    header = f"# synth {code_version()}, stage {stage}, written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
    storage.write_text(layout.config_file(stage), header + to_yaml(cfg))


def write_stage_summary(storage: Storage, cfg: Config, stage: str, summary: dict) -> dict:
    summary = {"stage": stage, "run": cfg.run, "code_version": code_version(), **summary}
    storage.write_json(Layout(cfg.run).summary(stage), summary)
    return summary
