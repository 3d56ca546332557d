"""The typed files stages hand each other: one dataclass per file, used by its writer and its readers.

- :class:`TrainMetrics`: ``<run>/train/<experiment>/seed-<seed>/metrics.json`` (train -> report)
- :class:`TrialRecord`: ``<run>/tune/trials/<experiment>/ratio-R-seed-S.json`` (a tune trial -> the tune driver)
- :class:`TuneRow`: a row of ``<run>/tune/results.{parquet,json}`` (tune -> report)

``to_json()`` is what is written; ``from_json(obj, where)`` is how it is read back, raising
:class:`RecordError` (a ``ValueError``) that names the file and the first field that is wrong.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


class RecordError(ValueError):
    """A stored record does not have the shape its writer gives it."""


def is_fraction(x: Any) -> bool:
    """A finite number in [0, 1] (not a bool): an accuracy or a share."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_scores(scores: Any, name: str, k: Optional[int]) -> None:
    """A scores object: ``{accuracy, n, per_class?, confusion_matrix?}`` (see recipe.classification_metrics)."""
    if not isinstance(scores, dict) or not is_fraction(scores.get("accuracy")):
        raise RecordError(f"{name}.accuracy is missing or not in [0, 1]")
    cm = scores.get("confusion_matrix")
    if cm is not None and k is not None:
        if not (isinstance(cm, list) and len(cm) == k and all(isinstance(row, list) and len(row) == k for row in cm)):
            raise RecordError(f"{name}.confusion_matrix is not {k}x{k} (one row and column per class)")
    per_class = scores.get("per_class")
    if per_class is not None and not isinstance(per_class, dict):
        raise RecordError(f"{name}.per_class is not an object keyed by class")


def _known(cls, obj: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def _require_keys(obj: Any, keys: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise RecordError(f"missing key {key!r}")
    return obj


# --------------------------------------------------------------------------------------------
# train -> report
# --------------------------------------------------------------------------------------------


@dataclass
class TrainMetrics:
    """One trained cell of the train-domain x test-domain matrix.

    ``history``: one ``{epoch, step, train_loss, val_accuracy, val_loss, seconds, val_seconds}``
    per epoch (validation with one view per image; ``seconds``: that epoch's optimizer steps only).
    ``val`` and ``test[<domain>]``: the final model with the full test-time augmentation,
    ``{accuracy, n, per_class: {class: {precision, recall, f1, support}}, confusion_matrix}``
    (rows: true labels). ``wall_seconds`` is the cell's whole time, ``train_seconds`` the sum of
    its optimizer steps (this attempt's and any resumed epochs'), ``score_seconds`` the final
    scoring pass (every scored split, full test-time augmentation).
    """

    experiment: str
    train_domain: str
    seed: int
    classes: list[str]
    test: dict[str, dict]
    val: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    steps: int = 0
    batch_size: int = 0
    train_images: int = 0
    train_ids_sha256: str = ""  # splits.Split.ids_digest of the training set: its images and their order
    synthetic_fraction: Optional[float] = None  # the mixture's; None for a single domain
    num_workers: int = 1
    history: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    score_seconds: float = 0.0
    ray_startup_seconds: float = 0.0  # trainer.fit() called -> the last worker's loop began (any failed attempt included)
    ray_teardown_seconds: float = 0.0  # the worker's loop returned -> trainer.fit() returned
    train_images_per_second: float = 0.0
    code_version: str = ""
    config_hash: str = ""
    resumed_from_epochs: list[int] = field(default_factory=list)  # the epoch of each checkpoint the model was restored from
    epochs_recomputed: int = 0  # finished epochs trained again after a worker restart (this driver's count)
    device: str = "cpu"
    # Which synthetic train images were read: "all" or "curated" (dataset.synthetic_source resolved);
    # None for a model trained on real images only.
    synthetic_source: Optional[str] = None
    # Ablation cells only: {"selection": "technique:<t>" | "curated" | "uncurated", "technique",
    # "curated", "images_per_class", "validation"}; None for the train-domain matrix's cells.
    ablation: Optional[dict] = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "TrainMetrics":
        m = _require_keys(obj, ("experiment", "train_domain", "seed", "classes", "test"))
        if not isinstance(m["experiment"], str) or not m["experiment"]:
            raise RecordError(f"experiment={m['experiment']!r} is not a name")
        if not isinstance(m["train_domain"], str) or not m["train_domain"]:
            raise RecordError(f"train_domain={m['train_domain']!r} is not a domain name")
        if not _is_int(m["seed"]):
            raise RecordError(f"seed={m['seed']!r} is not an integer")
        classes = m["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise RecordError(f"classes={classes!r} is not a non-empty list of names")
        if not isinstance(m["test"], dict):
            raise RecordError("test is not an object of test domains")
        for domain, scores in m["test"].items():
            _check_scores(scores, f"test.{domain}", len(classes))
        if m.get("val"):
            _check_scores(m["val"], "val", len(classes))
        history = m.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise RecordError("history is not a list of objects")
        return cls(**_known(cls, m))


# --------------------------------------------------------------------------------------------
# tune trial -> tune driver
# --------------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """A finished tune trial, written by the trial before its last report.

    ``final`` is what that last report carried: a trial restarted after its record was written
    replays it instead of training again. ``val`` is the real validation split and ``test`` the
    test domains, all with the full test-time augmentation; ``attempt`` tells a kept record from
    a rewritten one.
    """

    experiment: str
    ratio: float
    seed: int
    mode: str
    trial_hash: str
    classes: list[str]
    val: dict
    test: dict[str, dict]
    final: dict
    history: list[dict]
    architecture: dict = field(default_factory=dict)
    train_images: int = 0
    train_ids_sha256: str = ""  # as TrainMetrics'
    real_images: int = 0
    synthetic_images: int = 0
    steps: int = 0
    batch_size: int = 0
    epochs: int = 0
    resumed_from_epochs: list[int] = field(default_factory=list)
    device: str = "cpu"
    wall_seconds: float = 0.0  # this attempt only
    train_seconds: float = 0.0
    finished_at: float = 0.0
    attempt: str = ""
    code_version: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "TrialRecord":
        r = _require_keys(obj, ("experiment", "ratio", "seed", "trial_hash", "classes", "val", "test", "final", "history"))
        if not is_fraction(r["ratio"]) or not _is_int(r["seed"]):
            raise RecordError(f"ratio={r['ratio']!r}, seed={r['seed']!r} do not name a trial")
        _check_scores(r["val"], "val", len(r["classes"]))
        for domain, scores in r["test"].items():
            _check_scores(scores, f"test.{domain}", len(r["classes"]))
        if not isinstance(r["history"], list) or not r["history"]:
            raise RecordError("history is empty: a finished trial has trained at least one epoch")
        return cls(**_known(cls, r))


# --------------------------------------------------------------------------------------------
# tune -> report
# --------------------------------------------------------------------------------------------

TRIAL_STATUSES = ("completed", "stopped_early", "error", "missing")


@dataclass
class TuneRow:
    """One (ratio, seed) of the sweep: its record's numbers when it completed, else why not.

    ``status``: completed | stopped_early (ASHA stopped it below the budget; its accuracy is at
    the step it stopped and is left out of the table) | error | missing.
    """

    ratio: float
    seed: int
    status: str
    train_images: int
    real_images: int
    synthetic_images: int
    epochs: int
    trial_id: Optional[str] = None
    step: Optional[int] = None
    val_real_accuracy: Optional[float] = None
    test_real_accuracy: Optional[float] = None
    test_synthetic_accuracy: Optional[float] = None
    test_mixture_accuracy: Optional[float] = None
    resumed_from_epochs: list[int] = field(default_factory=list)
    wall_seconds: Optional[float] = None
    finished_at: Optional[float] = None
    attempt: Optional[str] = None
    error: Optional[str] = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "TuneRow":
        r = _require_keys(obj, ("ratio", "seed", "status"))
        if r["status"] not in TRIAL_STATUSES:
            raise RecordError(f"status={r['status']!r} is not one of {', '.join(TRIAL_STATUSES)}")
        if r["status"] == "completed" and not is_fraction(r.get("val_real_accuracy")):
            raise RecordError(f"a completed row (ratio {r['ratio']}, seed {r['seed']}) has no val_real_accuracy")
        return cls(**_known(cls, r))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
