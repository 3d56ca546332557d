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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from synth.config import TUNE_MODES
from synth.storage import Layout, Storage

MIX_SALT = 0x5EED  # keeps the draw of a mix apart from the training randomness of the same seed
# Test domains scored as the union of others' test splits (the mixture's train and val sets
# are drawn by mix(); its test set is the union).
UNIONS = {"mixture": ("real", "synthetic")}


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indexing the config's classes
    ids: np.ndarray  # (N,) str: the dataset's image ids

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index], self.ids[index])

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
    )


def read_split(storage: Storage, run: str, domain: str, split: str, classes: list[str]) -> Split:
    """One stored split (``<run>/dataset/<domain>/<split>.parquet``) as arrays.

    The dataset stage has already dropped (and counted) undecodable images. This also checks that
    every row's ``class_name`` is ``classes[label]``: a mismatch means the dataset was built for
    another class list, and training on it would be silently wrong.
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
    images = decode_images(table)  # (N, S, S, 3) uint8
    if len(images) and images.shape[1] < MIN_IMAGE_SIZE:
        raise ValueError(f"{where}: images are {images.shape[1]} px; the CNN needs at least {MIN_IMAGE_SIZE}")
    return Split(images, labels, np.asarray(table.column("id").to_pylist(), dtype=object))


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


@dataclass
class SplitCache:
    """The splits a stage reads, decoded once and shared by all its models."""

    storage: Storage
    run: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)  # "real/train", "synthetic/test", ...

    def get(self, domain: str, split: str) -> Split:
        key = f"{domain}/{split}"
        if key not in self.splits:
            self.splits[key] = read_split(self.storage, self.run, domain, split, self.classes)
        return self.splits[key]

    def load(self, pairs: Iterable[tuple[str, str]]) -> "SplitCache":
        for domain, split in sorted(set(pairs)):
            self.get(domain, split)
        return self

    def train_val(self, train_domain: str, fraction: float, seed: int) -> tuple[Split, Split]:
        """A train domain's training and validation sets; the mixture's come from :func:`mix`."""
        if train_domain == "mixture":
            train = mix(self.get("real", "train"), self.get("synthetic", "train"), fraction, seed)
            val = mix(self.get("real", "val"), self.get("synthetic", "val"), fraction, seed)
            return train, val
        return self.get(train_domain, "train"), self.get(train_domain, "val")

    def counts(self) -> dict:
        return {k: {"images": len(s)} for k, s in sorted(self.splits.items())}


def needed_splits(train_domains: Iterable[str], test_domains: Iterable[str]) -> set[tuple[str, str]]:
    """The stored (domain, split) pairs that training on ``train_domains`` and testing on ``test_domains`` read."""
    needed: set[tuple[str, str]] = set()
    for d in train_domains:
        for domain in UNIONS.get(d, (d,)):
            needed |= {(domain, "train"), (domain, "val")}
    for d in test_domains:
        needed |= {(domain, "test") for domain in UNIONS.get(d, (d,))}
    return needed

