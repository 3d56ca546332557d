"""Shared command-line handling for the stage entrypoints."""

from __future__ import annotations

import json
import logging
import os
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


def main(stage: str, fn: Callable[[Config], dict], argv: list[str] | None = None) -> int:
    """Parse, run ``fn(cfg)``, print the summary; one clear line and exit code 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in VERBOSE_FLAGS for a in argv):
        os.environ[VERBOSE_ENV] = "1"  # inherited by Ray's workers
    # synth's own warnings always show; its info lines and every library's only when verbose.
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse(argv, stage)
        summary = fn(cfg)
    except (ConfigError, StorageError, ValueError) as exc:
        print(f"synth {stage}: error: {exc}", file=sys.stderr)
        return 2
    if verbose() or stage == "pipeline":  # the pipeline's own summary is a few lines: where the report is
        print(json.dumps(summary, indent=2, default=str))
    else:
        where = Storage.from_config(cfg.storage).uri(Layout(cfg.run).summary(stage))
        print(f"[{stage}] done in {summary.get('wall_seconds', 0):.1f} s; summary: {where}")
    return 0
