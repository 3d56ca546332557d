"""Shared command-line handling for the stage entrypoints."""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable

from synth.config import Config, ConfigError, load_config
from synth.storage import StorageError

USAGE = "usage: python -m ray_jobs.{stage} [config.yaml] [key=value ...]"


def parse(argv: list[str], stage: str) -> Config:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(stage=stage))
        raise SystemExit(0)
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    return load_config(path, overrides)


def main(stage: str, fn: Callable[[Config], dict], argv: list[str] | None = None) -> int:
    """Parse, run ``fn(cfg)``, print the summary; one clear line and exit code 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse(argv, stage)
        summary = fn(cfg)
    except (ConfigError, StorageError, ValueError) as exc:
        print(f"synth {stage}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
