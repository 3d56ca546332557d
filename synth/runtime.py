"""What every stage shares: connecting to Ray, the code version, and the provenance it writes."""

from __future__ import annotations

import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from synth import __version__
from synth.config import Config, RayConfig, to_yaml
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
    """Join the configured cluster ($RAY_ADDRESS under `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a private instance, never a `ray start` cluster found by accident.
        # Logical CPUs above the core count keep a generator + writer pipeline from stalling.
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=False, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = bool(os.environ.get("SYNTH_PROGRESS"))


def write_stage_config(storage: Storage, cfg: Config, stage: str) -> None:
    """The resolved config and code version, beside the stage's outputs."""
    layout = Layout(cfg.run)
    header = f"# synth {code_version()}, stage {stage}, written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
    storage.write_text(layout.config_file(stage), header + to_yaml(cfg))


def write_stage_summary(storage: Storage, cfg: Config, stage: str, summary: dict) -> dict:
    summary = {"stage": stage, "run": cfg.run, "code_version": code_version(), **summary}
    storage.write_json(Layout(cfg.run).summary(stage), summary)
    return summary
