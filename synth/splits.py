"""What the training stages train and test on: decoded dataset splits, and the one mixing rule.

The dataset stage stores ``<run>/dataset/<domain>/<split>.parquet``; this module decodes them
into arrays (:func:`read_split`) and builds every training set that mixes the two domains
(:func:`mix`). The train stage's mixture cell at fraction f and tune's trial at r = f call the
same function with the same arguments, so they train on the same images.

The mixing rule, decided once:

- **Size** (``fixed_budget``): N = min(real, synthetic) images, round(f x N) synthetic and the
  rest real, so every fraction trains on as many images (f = 0 is a real-only subset, f = 1 a
  synthetic-only one). ``augment`` (tune only): every real image plus round(f x real) synthetic.
- **Which images**: prefixes of one seeded permutation per domain. The permutation depends on
  the training seed, so the spread over seeds covers the draw of the images as well as the
  training noise (what a user who draws their own mix would see); for one seed the images at
  f = 0.3 are a subset of those at f = 0.4, so neighbouring fractions compare like with like.
- **Order**: the chosen images, shuffled together with the same generator.

Curation (issue 12): synthetic split tables carry ``technique`` and ``accepted`` (the curate
stage's verdict after review; null before curate ran, and for real images).
``dataset.synthetic_source`` (auto | all | curated) decides whether the synthetic *train and
val* splits are read with ``accepted_only`` (:func:`resolve_synthetic_source`). Test splits are
never filtered: every model, curated or not, is scored on the same test images.

The ablation (:func:`ablation_draw`): per class, a seeded prefix of ``images_per_class`` images
of one selection (a technique, the accepted images, or all of them), so every ablation cell
trains on as many images per class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from synth.config import ADVERSARIAL, TUNE_MODES, choose_synthetic_source
from synth.storage import Layout, Storage

MIX_SALT = 0x5EED  # keeps the draw of a mix apart from the training randomness of the same seed
# Test domains scored as the union of others' test splits (the mixture's train and val sets
# are drawn by mix(); its test set is the union).
UNIONS = {"mixture": ("real", "synthetic")}
# Test domains that a run may lack (no hostile images made): listed but absent -> skipped with a warning.
OPTIONAL_TEST_DOMAINS = (ADVERSARIAL,)
ABLATION_SALT = 0xAB1A  # keeps an ablation cell's draw apart from mix()'s draw of the same seed

log = logging.getLogger(__name__)


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indexing the config's classes
    ids: np.ndarray  # (N,) str: the dataset's image ids
    techniques: Optional[np.ndarray] = None  # (N,) str: how each image was made; "" for real images
    accepted: Optional[np.ndarray] = None  # (N,) object: True / False / None (curate has not judged it)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.techniques is None:
            self.techniques = np.full(n, "", dtype=object)
        if self.accepted is None:
            self.accepted = np.full(n, None, dtype=object)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index], self.ids[index], self.techniques[index], self.accepted[index])

    def judged(self) -> bool:
        """Whether the curate stage has given any verdict on this split's images."""
        return any(a is not None for a in self.accepted)

    def accepted_only(self) -> "Split":
        """The rows whose verdict is True (null and False are dropped)."""
        return self.take(np.flatnonzero(np.array([a is True for a in self.accepted], dtype=bool)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.labels

    def ids_digest(self) -> str:
        """sha256 of the ids in order: which images, in which order, a model was trained on."""
        import hashlib

        return hashlib.sha256("\n".join(map(str, self.ids)).encode()).hexdigest()


def concat(*splits: Split) -> Split:
    return Split(
        np.concatenate([s.images for s in splits]),
        np.concatenate([s.labels for s in splits]),
        np.concatenate([s.ids for s in splits]),
        np.concatenate([s.techniques for s in splits]),
        np.concatenate([s.accepted for s in splits]),
    )


def read_split(
    storage: Storage, run: str, domain: str, split: str, classes: list[str], images: bool = True
) -> Split:  # fmt: skip
    """One stored split (``<run>/dataset/<domain>/<split>.parquet``) as arrays.

    The dataset stage has already dropped (and counted) undecodable images. This also checks that
    every row's ``class_name`` is ``classes[label]``: a mismatch means the dataset was built for
    another class list, and training on it would be silently wrong (:meth:`Split.accepted_only`
    keeps the curated rows). ``images=False`` skips decoding: ``images`` is then (N, 0, 0, 3), for planning which rows to use.
    """
    from synth.dataset import decode_images, load_split_table
    from synth.recipe import MIN_IMAGE_SIZE

    table = load_split_table(storage, run, domain, split)
    where = storage.uri(Layout(run).dataset_split(domain, split))
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    names = table.column("class_name").to_pylist()
    bad = [(int(y), n) for y, n in zip(labels, names) if not (0 <= y < len(classes)) or classes[y] != n]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} rows have labels that do not match prompts.classes={classes} "
            f"(first: label {bad[0][0]}, class_name {bad[0][1]!r}). Fix: rebuild the dataset with this class list"
        )
    if not images:
        return Split(
            np.zeros((len(labels), 0, 0, 3), np.uint8), labels, np.asarray(table.column("id").to_pylist(), dtype=object),
            _techniques_column(table), np.asarray(_accepted_column(table), dtype=object),
        )  # fmt: skip
    images = decode_images(table)  # (N, S, S, 3) uint8
    if len(images) and images.shape[1] < MIN_IMAGE_SIZE:
        raise ValueError(f"{where}: images are {images.shape[1]} px; the CNN needs at least {MIN_IMAGE_SIZE}")
    return Split(
        images, labels, np.asarray(table.column("id").to_pylist(), dtype=object),
        _techniques_column(table), np.asarray(_accepted_column(table), dtype=object),
    )  # fmt: skip


def _techniques_column(table) -> np.ndarray:
    """How each image was made; "" for real images and tables written before the column existed."""
    if "technique" not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    return np.asarray([t or "" for t in table.column("technique").to_pylist()], dtype=object)


def _accepted_column(table) -> list:
    """The ``accepted`` verdicts (True / False / None); all None for a table written before curation."""
    if "accepted" not in table.column_names:
        return [None] * table.num_rows
    return [None if a is None else bool(a) for a in table.column("accepted").to_pylist()]


def resolve_synthetic_source(setting: str, storage: Storage, run: str) -> str:
    """``dataset.synthetic_source`` as the train and tune stages apply it: "all" or "curated".

    auto: curated when the synthetic train split holds any curate verdict, else all. curated
    without verdicts is an error naming the fix. Reads only the ``accepted`` column.
    """
    if setting == "all":
        return "all"
    key = Layout(run).dataset_split("synthetic", "train")
    judged = False
    if storage.exists(key):
        import pyarrow.parquet as pq

        with storage.open_read(key) as f:  # the footer and that one column, not the images
            stored = pq.ParquetFile(f)
            if "accepted" in stored.schema_arrow.names:
                judged = stored.read(columns=["accepted"]).column("accepted").null_count < stored.metadata.num_rows
    source = choose_synthetic_source(setting, judged)
    if source is None:
        raise ValueError(
            f"dataset.synthetic_source=curated, but {storage.uri(key)} holds no curate verdicts (its accepted column is "
            "empty or missing). Fix: run the curate stage and then the dataset stage (python -m ray_jobs.curate <config>; "
            "python -m ray_jobs.dataset <config>), or set dataset.synthetic_source=all"
        )
    return source


def _num_rows(storage: Storage, key: str) -> int:
    """Rows of a stored Parquet table, from its footer alone."""
    import pyarrow.parquet as pq

    with storage.open_read(key) as f:
        return pq.ParquetFile(f).metadata.num_rows


def present_test_domains(storage: Storage, run: str, test_domains: Iterable[str], stage: str = "train") -> list[str]:
    """``test_domains`` less the optional ones (adversarial) this run has no test images for, each with a warning."""
    from synth.progress import say

    out = []
    for d in test_domains:
        if d in OPTIONAL_TEST_DOMAINS:
            key = Layout(run).dataset_split(d, "test")
            if not storage.exists(key) or _num_rows(storage, key) == 0:
                say(stage, f"warning: test domain {d!r} skipped: {storage.uri(key)} has no images "
                    "(make hostile examples with the prompts stage to measure the fooling rate)")  # fmt: skip
                continue
        out.append(d)
    return out


def composition(n_real: int, n_synthetic: int, fraction: float, mode: str = "fixed_budget") -> tuple[int, int]:
    """``(real images, synthetic images)`` of a mix; raises when the data is short for it."""
    if mode == "fixed_budget":
        size = min(n_real, n_synthetic)
        synthetic = int(round(fraction * size))
        return size - synthetic, synthetic
    if mode == "augment":
        synthetic = int(round(fraction * n_real))
        if synthetic > n_synthetic:
            raise ValueError(
                f"tune.mode=augment at r={fraction:g} adds {synthetic:,} synthetic images (r x {n_real:,} real ones), and the "
                f"synthetic train split has {n_synthetic:,}. Fix: build more synthetic images "
                "(dataset.synthetic_train_per_class, prompts.per_class), lower the largest of tune.ratios to "
                f"{n_synthetic / max(n_real, 1):.2f}, or use tune.mode=fixed_budget"
            )
        return n_real, synthetic
    raise ValueError(f"mode={mode!r} is unknown; choose one of {', '.join(TUNE_MODES)}")


def mix(real: Split, synthetic: Split, fraction: float, seed: int, mode: str = "fixed_budget") -> Split:
    """The one mixing rule (see the module docstring): seeded nested prefixes, shuffled together."""
    n_real, n_synthetic = composition(len(real), len(synthetic), fraction, mode)
    rng = np.random.default_rng([MIX_SALT, seed])
    take_real = rng.permutation(len(real))[:n_real]
    take_synthetic = rng.permutation(len(synthetic))[:n_synthetic]
    mixed = concat(real.take(take_real), synthetic.take(take_synthetic))
    return mixed.take(rng.permutation(len(mixed)))


def ablation_draw(pool: Split, num_classes: int, images_per_class: int, seed: int, name: str = "the pool") -> Split:
    """``images_per_class`` images of every class from ``pool``: seeded per-class prefixes, shuffled together.

    The permutation depends on the training seed (as in :func:`mix`), so the spread over seeds
    covers the draw as well as the training noise. Raises naming the fix when a class is short.
    """
    rng = np.random.default_rng([ABLATION_SALT, seed])
    chosen = []
    for label in range(num_classes):
        rows = np.flatnonzero(pool.labels == label)
        if len(rows) < images_per_class:
            raise ValueError(
                f"{name} has {len(rows)} synthetic train images of class {label}, fewer than the {images_per_class} per class "
                "every ablation cell trains on. Fix: lower train.ablation.images_per_class (or set it to null for the "
                "smallest available count), drop that technique from train.ablation.techniques, or make more images"
            )
        chosen.append(rows[rng.permutation(len(rows))[:images_per_class]])
    index = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return pool.take(index[rng.permutation(len(index))])


def class_counts(split: Split, num_classes: int) -> list[int]:
    return np.bincount(split.labels, minlength=num_classes).astype(int).tolist()


@dataclass
class SplitCache:
    """The splits a stage reads, decoded once and shared by all its models.

    ``synthetic_source`` is the resolved ``dataset.synthetic_source`` (all | curated):
    :meth:`selected` (and so :meth:`train_val`) keeps the accepted synthetic train and val images
    when it is curated; :meth:`get` always returns the whole stored split.
    """

    storage: Storage
    run: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)  # "real/train", "synthetic/test", ...
    synthetic_source: str = "all"
    curated: dict[str, Split] = field(default_factory=dict)  # the accepted rows of synthetic train / val

    def get(self, domain: str, split: str) -> Split:
        key = f"{domain}/{split}"
        if key not in self.splits:
            self.splits[key] = read_split(self.storage, self.run, domain, split, self.classes)
        return self.splits[key]

    def selected(self, domain: str, split: str) -> Split:
        """A split as training reads it: the synthetic train/val images curated when the source is curated."""
        if domain == "synthetic" and split in ("train", "val") and self.synthetic_source == "curated":
            key = f"{domain}/{split}"  # made once, not per cell or trial
            if key not in self.curated:
                self.curated[key] = self.get(domain, split).accepted_only()
            return self.curated[key]
        return self.get(domain, split)

    def load(self, pairs: Iterable[tuple[str, str]]) -> "SplitCache":
        for domain, split in sorted(set(pairs)):
            self.get(domain, split)
        return self

    def train_val(self, train_domain: str, fraction: float, seed: int) -> tuple[Split, Split]:
        """A train domain's training and validation sets; the mixture's come from :func:`mix`."""
        if train_domain == "mixture":
            train = mix(self.selected("real", "train"), self.selected("synthetic", "train"), fraction, seed)
            val = mix(self.selected("real", "val"), self.selected("synthetic", "val"), fraction, seed)
            return train, val
        return self.selected(train_domain, "train"), self.selected(train_domain, "val")

    def counts(self) -> dict:
        out = {k: {"images": len(s)} for k, s in sorted(self.splits.items())}
        for k, s in self.splits.items():
            if s.judged():
                out[k]["accepted"] = int(sum(a is True for a in s.accepted))
        return out


def needed_splits(train_domains: Iterable[str], test_domains: Iterable[str]) -> set[tuple[str, str]]:
    """The stored (domain, split) pairs that training on ``train_domains`` and testing on ``test_domains`` read."""
    needed: set[tuple[str, str]] = set()
    for d in train_domains:
        for domain in UNIONS.get(d, (d,)):
            needed |= {(domain, "train"), (domain, "val")}
    for d in test_domains:
        needed |= {(domain, "test") for domain in UNIONS.get(d, (d,))}
    return needed

