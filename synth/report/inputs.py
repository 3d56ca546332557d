"""Everything the report reads from storage, gathered into one :class:`Inputs`.

- required: ``<run>/train/<experiment>/seed-<seed>/metrics.json``, one per trained model;
- optional: ``<run>/dataset/<domain>/<split>.parquet`` (composition table, sample grids),
  ``<run>/tune/results.json`` (the mixing-ratio sweep) and each earlier stage's ``config.yaml`` /
  ``summary.json`` (provenance).

A missing optional input becomes a note in the report, never an error; a malformed metrics file
is skipped, counted and named, so one bad model never hides the others. This is the only module
of the report that touches storage for reading.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from synth.images import decode_png
from synth.report.numbers import ReportInputError, choose_samples, validate_metrics
from synth.records import TuneRow
from synth.storage import Layout, Storage

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Earlier stages whose config.yaml / summary.json the report quotes, in pipeline order.
PROVENANCE_STAGES = ("prompts", "generate", "derive", "curate", "dataset", "train", "tune")
# Sample grids: images per class, and the split they come from. val is a random slice of the
# training pool, so it shows what the models learn from at a fraction of the read.
SAMPLES_PER_CLASS = 8
SAMPLE_SPLITS = ("val", "train", "test")

# <run>/train/<experiment>/seed-<seed>/metrics.json; checkpoints and other files beside it are ignored.
_METRICS_KEY = re.compile(r"/train/[^/]+/seed-[^/]+/metrics\.json$")


@dataclass
class Inputs:
    """Everything the report reads, with what was missing or malformed."""

    metrics: list[dict]
    metrics_keys: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"key", "reason"} per unusable metrics.json
    configs: dict[str, str] = field(default_factory=dict)  # stage -> config.yaml text
    summaries: dict[str, dict] = field(default_factory=dict)  # stage -> summary.json
    dataset_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # domain -> split -> class -> n
    samples: dict[str, dict] = field(default_factory=dict)  # domain -> {"split", "classes", "images"}
    notes: list[str] = field(default_factory=list)
    tune: Optional[dict] = None  # <run>/tune/results.json: the mixing-ratio sweep, when it ran


def load_inputs(storage: Storage, run: str) -> Inputs:
    """Read the report's inputs; raises :class:`ReportInputError` when no usable metrics exist."""
    metrics, keys, skipped = load_train_metrics(storage, run)
    if not metrics:
        err = _missing_train_error(storage, run)
        if skipped:
            err = ReportInputError(
                f"all {len(skipped)} metrics.json files of run {run!r} are unusable, e.g. {skipped[0]['key']}: "
                f"{skipped[0]['reason']}. Fix: rerun the train stage for them"
            )
        raise err
    inputs = Inputs(metrics=metrics, metrics_keys=keys, skipped=skipped)
    for s in skipped:
        inputs.notes.append(f"Skipped {s['key']}: {s['reason']}.")

    layout = Layout(run)
    for stage in PROVENANCE_STAGES:
        try:
            inputs.configs[stage] = storage.read_bytes(layout.config_file(stage)).decode("utf-8", "replace")
        except FileNotFoundError:
            pass
        try:
            summary = storage.read_json(layout.summary(stage))
            if isinstance(summary, dict):
                inputs.summaries[stage] = summary
        except FileNotFoundError:
            pass
        except ValueError as exc:
            inputs.notes.append(f"{layout.summary(stage)} is not valid JSON ({exc}); its counts are left out.")

    _load_dataset(storage, run, inputs)
    inputs.tune = load_tune_results(storage, run, inputs)
    return inputs


def load_train_metrics(storage: Storage, run: str) -> tuple[list[dict], list[str], list[dict]]:
    """``(metrics, keys, skipped)`` for every ``<run>/train/*/seed-*/metrics.json``.

    A file that is not valid JSON or breaks the schema is skipped and listed with the reason,
    so one bad model never hides the others and never silently disappears.
    """
    metrics, keys, skipped = [], [], []
    for key in storage.list(Layout(run).stage("train")):
        if not _METRICS_KEY.search(key):
            continue
        try:
            m = storage.read_json(key)
            validate_metrics(m)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            skipped.append({"key": key, "reason": str(exc).splitlines()[0]})
            log.warning("report: skipping %s: %s", key, exc)
            continue
        metrics.append(m)
        keys.append(key)
    return metrics, keys, skipped


def _missing_train_error(storage: Storage, run: str) -> ReportInputError:
    return ReportInputError(
        f"no training metrics for run {run!r}: nothing matches "
        f"{storage.uri(Layout(run).stage('train'))}/<experiment>/seed-<seed>/metrics.json. "
        f"Fix: run the train stage first (python -m ray_jobs.train <config.yaml> run={run}), "
        "or check run= and storage.root"
    )


def load_tune_results(storage: Storage, run: str, inputs: Inputs) -> Optional[dict]:
    """The tune stage's ``results.json`` (rows, table by ratio, best ratio), or None when it did not run."""
    key = f"{Layout(run).tune_results}.json"
    try:
        document = storage.read_json(key)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        inputs.notes.append(f"{key} is not valid JSON ({exc}); the mixing-ratio sweep is left out.")
        return None
    if not isinstance(document, dict) or not isinstance(document.get("table"), list) or not document["table"]:
        inputs.notes.append(f"{key} holds no table by ratio; the mixing-ratio sweep is left out (rerun the tune stage).")
        return None
    try:
        document["rows"] = [TuneRow.from_json(row).to_json() for row in document.get("rows", [])]
    except ValueError as exc:
        inputs.notes.append(f"{key} has a malformed row ({exc}); the mixing-ratio sweep is left out (rerun the tune stage).")
        return None
    return document


# --------------------------------------------------------------------------------------------
# Dataset tables: per-class counts and a few decoded sample images
# --------------------------------------------------------------------------------------------


def _load_dataset(storage: Storage, run: str, inputs: Inputs) -> None:
    """Per-class counts of every dataset table, and a few decoded images per class and domain."""
    for domain in ("real", "synthetic"):
        for split in SPLITS:
            table = _read_table(storage, Layout(run).dataset_split(domain, split), ["class_name"], inputs)
            if table is not None:
                counts = Counter(table.column("class_name").to_pylist())
                inputs.dataset_counts.setdefault(domain, {})[split] = dict(counts)
        split = next((s for s in SAMPLE_SPLITS if s in inputs.dataset_counts.get(domain, {})), None)
        if split is None:
            inputs.notes.append(
                f"No {domain} dataset tables under {storage.uri(Layout(run).stage('dataset'))}/{domain}/, so no {domain} "
                "sample images or counts are shown (run the dataset stage to include them)."
            )
            continue
        table = _read_table(storage, Layout(run).dataset_split(domain, split), ["id", "label", "class_name", "image"], inputs)
        if table is None:
            continue
        inputs.samples[domain] = _decode_samples(table, SAMPLES_PER_CLASS, f"{domain}/{split}", inputs)  # the grid and caption assume it
        inputs.samples[domain]["split"] = split


def _read_table(storage: Storage, key: str, columns: list[str], inputs: Inputs) -> Optional[pa.Table]:
    try:
        return storage.read_parquet(key, columns=columns)
    except FileNotFoundError:
        return None
    except (pa.ArrowException, ValueError, KeyError) as exc:
        inputs.notes.append(f"Dataset table {key} could not be read ({str(exc).splitlines()[0]}); it is left out.")
        return None


def _decode_samples(table: pa.Table, per_class: int, where: str, inputs: Inputs) -> dict:

    labels = table.column("label").to_pylist()
    names = table.column("class_name").to_pylist()
    class_names = {int(label): name for label, name in zip(labels, names)}
    picks = choose_samples(table.column("id").to_pylist(), labels, per_class)
    images_col = table.column("image")
    classes, images, bad = [], [], 0
    for label, rows in picks.items():
        decoded = []
        for row in rows:
            try:
                decoded.append(decode_png(images_col[row].as_py()))
            except Exception:  # PIL raises many types for corrupt bytes; count them, show the rest
                bad += 1
        classes.append(class_names[label])
        images.append(decoded)
    if bad:
        inputs.notes.append(f"{bad} sample images in {where} could not be decoded as images and are left out of the grid.")
    return {"classes": classes, "images": images}
