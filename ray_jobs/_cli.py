"""Shared command-line handling for the stage entrypoints."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Callable

from synth.config import Config, ConfigError, load_config
from synth.progress import VERBOSE_ENV, verbose
from synth.storage import Layout, Storage, StorageError

VERBOSE_FLAGS = ("--verbose", "-v")
USAGE = """usage: python -m ray_jobs.{stage} [--verbose] [config.yaml] [key=value ...]

  --verbose, -v   show Ray's own output and every log line (or set SYNTH_VERBOSE=1)"""


def parse(argv: list[str], stage: str) -> Config:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(stage=stage))
        raise SystemExit(0)
    argv = [a for a in argv if a not in VERBOSE_FLAGS]
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    return load_config(path, overrides)


USER_ERRORS = (StorageError, ValueError)  # ConfigError is a ValueError
REMOTE_ERROR = re.compile(r"^\s*(synth\.storage\.StorageError|synth\.config\.ConfigError): (.+)$", re.MULTILINE)


def user_error(exc: BaseException) -> BaseException | None:
    """The error the user can act on (bad config, unreachable storage, bad data), or None: a bug, shown whole.

    An error raised in a Ray task or actor reaches the driver wrapped (a RayTaskError holding the
    original as ``.cause``, inside Ray Data's own exceptions): the original, found down the chain
    of causes, is the one whose message names the fix. Down the chain only a ConfigError or a
    StorageError counts; a ValueError counts only where it is raised, on the driver.
    """
    if isinstance(exc, USER_ERRORS) and not isinstance(getattr(exc, "cause", None), BaseException):
        return exc
    seen, error = set(), exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, (ConfigError, StorageError)):
            return cause
        if isinstance(error, (ConfigError, StorageError)) and not isinstance(cause, BaseException):
            return error
        error = cause if isinstance(cause, BaseException) else error.__cause__
    # Ray Data's UserCodeException crosses from the worker as text: the original is a line of it.
    found = REMOTE_ERROR.findall(str(exc))
    if found:
        kind, message = found[-1]
        return (StorageError if kind.endswith("StorageError") else ConfigError)(message)
    return None


def main(
    stage: str, fn: Callable[[Config], dict], argv: list[str] | None = None, show: Callable[[Config, dict], None] | None = None
) -> int:
    """Parse, run ``fn(cfg)``, print the summary (or ``show(cfg, summary)`` it); one clear line and exit code 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in VERBOSE_FLAGS for a in argv):
        os.environ[VERBOSE_ENV] = "1"  # inherited by Ray's workers
    # synth's own warnings always show; its info lines and every library's only when verbose.
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse(argv, stage)
        summary = fn(cfg)
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"synth {stage}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if show is not None:  # a command with its own output (review: where the queue went, the log)
        show(cfg, summary)
    elif verbose() or stage == "pipeline":  # the pipeline's own summary is a few lines: where the report is
        print(json.dumps(summary, indent=2, default=str))
    else:
        where = Storage.from_config(cfg.storage).uri(Layout(cfg.run).summary(stage))
        print(f"[{stage}] done in {summary.get('wall_seconds', 0):.1f} s; summary: {where}")
    return 0
