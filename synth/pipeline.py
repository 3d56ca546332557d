"""The whole chain: prompts -> generate -> [derive] -> [curate] -> dataset -> train -> tune -> report, each stage resumable.

derive (variations, fusion, inpainting of parent images) runs when the config asks for any;
prompts and generate are skipped with generate.enabled=false (images from your own photos only);
curate (CLIP scores and filter rules) runs with curate.enabled=true.

Every stage reads what the one before wrote to storage, so this is only their sequence; a rerun
skips finished work stage by stage (generate by shard, train by (experiment, seed), tune by trial).
"""

from __future__ import annotations

import time
from typing import Optional

from synth.config import Config, derive_enabled
from synth.progress import say
from synth.storage import Storage

REVIEW_PER_CLASS = 100  # the pipeline's review queue: enough for a first look, small enough for one page


def review_queue(cfg: Config, storage: Storage) -> dict:
    """After curate: the review queue (lowest CLIP scores first, near-duplicates skipped) for a person
    to look at; decisions recorded with ``ray_jobs.review ... decide`` reach the next dataset run."""
    from synth.review import DEFAULT_THRESHOLD, write_queue

    start = time.perf_counter()
    out = write_queue(storage, cfg.run, list(cfg.prompts.classes), order="diverse", per_class=REVIEW_PER_CLASS)
    say("review", f"{out['images']:,} images to review first -> {out['html']} (per class at most {REVIEW_PER_CLASS}, lowest CLIP "
        f"score first, skipping any within cosine {DEFAULT_THRESHOLD} of one already queued); record decisions with: python -m ray_jobs.review "
        "<config> decide --reviewer NAME ID accept|reject|relabel CLASS")  # fmt: skip
    return {**out, "wall_seconds": round(time.perf_counter() - start, 3)}


def run_pipeline(cfg: Config, storage: Optional[Storage] = None) -> dict:
    from synth.curate import run_curate
    from synth.dataset import run_dataset
    from synth.derive import run_derive
    from synth.generate import run_generate
    from synth.prompts import run_prompts
    from synth.report import run_report
    from synth.train import run_train
    from synth.tune import run_tune

    storage = storage or Storage.from_config(cfg.storage)
    storage.check_writable()
    stages = [("prompts", run_prompts), ("generate", run_generate)] if cfg.generate.enabled else []
    stages += [("derive", run_derive)] if derive_enabled(cfg.derive) else []
    stages += [("curate", run_curate), ("review", review_queue)] if cfg.curate.enabled else []
    stages += [("dataset", run_dataset), ("train", run_train), ("tune", run_tune), ("report", run_report)]
    say("pipeline", f"run {cfg.run!r}: {' -> '.join(name for name, _ in stages)}, into {storage.uri(cfg.run)}")
    summaries: dict[str, dict] = {}
    start = time.perf_counter()
    for name, stage in stages:
        summaries[name] = stage(cfg, storage)
    return {
        "run": cfg.run,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "report": summaries["report"].get("html"),
        "report_markdown": summaries["report"].get("markdown"),
        "stages": {name: s.get("wall_seconds") for name, s in summaries.items()},
    }
