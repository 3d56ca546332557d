"""The dataset stage: real photographs and synthetic images as train / val / test tables of one format.

Inputs:
- **real**: CIFAR-10 in its official python format (``cifar-10-python.tar.gz`` or the extracted
  ``cifar-10-batches-py`` folder, local or ``s3://``, or torchvision's downloader), or image folders
  ``<real_path>/<train|test>/<class>/*.png|jpg|jpeg``. Only the configured classes are kept; the
  official train/test split is kept.
- **synthetic**: the manifests and shards of the same run's generate stage (text-to-image) and,
  where it ran, derive stage (variations, fusion and inpainting of parent images), kept to
  ``dataset.techniques``. Each class is split into ``synthetic_train_per_class`` /
  ``synthetic_test_per_class`` images (CIFAR's 5,000 / 1,000), or proportionally when a class
  has fewer. Images made from one another form a *lineage group* (a parent, its variations and
  edits, fusions joining two parents' groups; a user's parent photos join the groups but are
  never synthetic images), and a group always lands in one split whole, so no test or val image
  has a relative in training.

Every training split then gives up ``val_fraction`` of each class to a validation split, used for
model selection and tuning; test splits are for final numbers only.

Outputs, ``<run>/dataset/<real|synthetic>/<train|val|test>.parquet``, one row per image:
``id`` (string), ``label`` (int32: the position of the class in ``prompts.classes``, plus "other" with
``dataset.hostile=other_class``: :func:`synth.config.label_classes`, the same label space for both domains), ``class_name``, ``image`` (PNG bytes, RGB, ``dataset.image_size`` square),
``domain`` and ``source`` (where the image came from). Beside them: config.yaml and summary.json.

Determinism: which split an image lands in is a pure function of the ids, their parents, their
classes, ``dataset.techniques`` and ``dataset.seed`` (a seeded shuffle of the sorted ids, or of
the lineage groups' keys), decided *before* any image is decoded. So a rerun gives the same
tables, and an image that fails to decode is dropped from its split and counted there without
moving any other image between splits (a test image can never leak into training through a
rerun).

The stage runs on the driver in plain Python: CIFAR-sized data (tens of thousands of 32 px
images) takes seconds, far less than starting Ray workers would.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import random
import tarfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa

from synth.config import (
    ADVERSARIAL, HOSTILE, OTHER_CLASS, TECHNIQUES, Config, ConfigError, DatasetConfig, StorageConfig, choose_synthetic_source,
    class_slug, label_classes,
)  # fmt: skip
from synth.imagejob import IMAGE_STAGES
from synth.images import decode_png, encode_png
from synth.progress import say
from synth.shards import META_PLAN, check_shard
from synth.storage import Layout, Storage

log = logging.getLogger(__name__)

DOMAINS = ("real", "synthetic", ADVERSARIAL)
SPLITS = ("train", "val", "test")
# Hostile examples (the prompts stage's technique "hostile": a class's look on the wrong object)
# are not their class: they make the test-only "adversarial" domain, labelled with the class they
# imitate, so a model's accuracy on it is its fooling rate. With dataset.hostile=evaluate they never
# enter a training split; with other_class they are also the synthetic class "other" (label K),
# split like a class, and the adversarial domain holds only those in the synthetic test split.
SPLITS_OF = {ADVERSARIAL: ("test",)}
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("image", pa.binary()),
        ("domain", pa.string()),
        ("source", pa.string()),
        # How a synthetic image was made ("" for real photographs), and the curate stage's verdict
        # after review decisions (null for real photographs and runs that were not curated).
        ("technique", pa.string()),
        ("accepted", pa.bool_()),
    ]
)
# Parquet schema metadata keys: what a reader needs without decoding an image.
META_IMAGE_SIZE = b"synth.image_size"
META_CLASSES = b"synth.classes"

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_FILES = ["batches.meta", *CIFAR_TRAIN_BATCHES, "test_batch"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Concurrent reads of small image objects; S3 latency, not bandwidth, bounds a folder import.
READ_THREADS = 16

MISSING_REAL = (
    "no real dataset is configured: dataset.real_path is unset and dataset.download is false. Fix: pass "
    "dataset.real_path=<cifar-10-python.tar.gz, its extracted cifar-10-batches-py folder, or an image-folder "
    "root with dataset.real_source=folder; a local path or s3:// URI>, or dataset.download=true to fetch "
    f"CIFAR-10 with torchvision into dataset.download_dir (needs internet; archive at {CIFAR_URL})"
)


@dataclass
class Item:
    """One image on its way into a split; exactly one of ``pixels``, ``data`` or ``key`` is set."""

    id: str
    label: int
    class_name: str
    source: str
    pixels: Optional[np.ndarray] = None  # (32, 32, 3) uint8, already decoded (CIFAR rows)
    data: Optional[bytes] = None  # encoded image bytes (synthetic shards)
    key: Optional[str] = None  # object to read from the image-folder storage
    technique: str = ""  # synthetic images: how it was made
    accepted: Optional[bool] = None  # synthetic images of a curated run: the verdict after review


@dataclass
class DomainItems:
    """A domain's images per split before decoding, and what the summary says about them."""

    splits: dict[str, list[Item]]
    info: dict
    reader: Optional[Storage] = None  # where ``Item.key``s are read from
    # Synthetic images: id -> lineage group key (whole groups stay in one split), and id -> technique.
    group_of: Optional[dict[str, str]] = None
    technique_of: Optional[dict[str, str]] = None
    # Synthetic images: the hostile examples, for the test-only adversarial domain.
    hostile: list[Item] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Deterministic splits
# --------------------------------------------------------------------------------------------


def seeded_order(ids: Sequence[str], seed: int, *context: str) -> list[str]:
    """``ids`` sorted, then shuffled by a RNG seeded from ``seed`` and ``context``.

    Sorting first makes the order independent of how the ids were listed or stored.
    """
    digest = hashlib.sha256("\x1f".join([str(seed), *context]).encode()).digest()
    out = sorted(ids)
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(out)
    return out


def synthetic_split_sizes(available: int, train: int, test: int) -> tuple[int, int, Optional[str]]:
    """(train, test, note) for a class with ``available`` images, asked for ``train`` + ``test``.

    With too few images the class is split proportionally, keeping the train:test ratio and at
    least one test image; the note says so for the summary.
    """
    if available >= train + test:
        return train, test, None
    if available == 0:
        return 0, 0, f"no images (asked for {train}+{test})"
    n_test = min(available, max(1, round(available * test / (train + test))))
    n_train = available - n_test
    note = f"only {available} images (asked for {train}+{test}): split proportionally, {n_train} train / {n_test} test"
    return n_train, n_test, note


def val_size(n_train: int, fraction: float) -> int:
    """Images of one class moved from train to val: ``round(n * fraction)``, at least 1 when the
    fraction is positive and the class has two training images, never the whole class."""
    if fraction <= 0 or n_train < 2:
        return 0
    return min(n_train - 1, max(1, round(n_train * fraction)))


def carve_val(
    train: list[Item], fraction: float, seed: int, domain: str, group_of: Optional[dict[str, str]] = None
) -> tuple[list[Item], list[Item]]:
    """Split a training split into (train, val), stratified by class and deterministic.

    ``group_of`` maps an id to its lineage group's key; a group moves to val whole, in a seeded
    order of the keys, until val holds :func:`val_size` images, never taking a class's last group.
    Without it (real photos) every image is its own group: a seeded choice of ``val_size`` ids.
    """
    by_class: dict[str, list[Item]] = defaultdict(list)
    for item in train:
        by_class[item.class_name].append(item)
    keep: list[Item] = []
    val: list[Item] = []
    for class_name, items in by_class.items():
        members: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            members[group_of[item.id] if group_of is not None else item.id].append(item)
        n_val = val_size(len(items), fraction)
        taken = 0
        for key in seeded_order(list(members), seed, domain, "val", class_name):
            group = members[key]
            if taken < n_val and taken + len(group) < len(items):
                val.extend(group)
                taken += len(group)
            else:
                keep.extend(group)
    return keep, val


# --------------------------------------------------------------------------------------------
# Real data: CIFAR-10 (official python format)
# --------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches and nothing else.

    The official format is pickle, and unpickling runs whatever callables the file names; a file
    fetched from a bucket or a mirror must not be able to run code here, so only what a dict of
    lists, bytes and one uint8 array needs is allowed.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # files pickled by numpy < 2 (the official ones)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # Python 3 bytes under pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 moved it; avoids a warning
        return super().find_class(module, name)


def _unpickle_batch(data: bytes, name: str, where: str) -> dict:
    try:
        # latin1 turns the Python 2 strings of the official files into str, as torchvision does.
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:
        raise ConfigError(
            f"{where}: {name} is not a CIFAR-10 python-format batch ({exc}). "
            f"Fix: point dataset.real_path at the official cifar-10-python.tar.gz ({CIFAR_URL}) or its extracted folder"
        ) from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: {name} holds a {type(obj).__name__}, not a CIFAR-10 batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _files_from_archive(data: bytes, where: str) -> dict[str, bytes]:
    try:
        # Read members in memory, never extract: no path in the archive can touch the filesystem.
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            files = {}
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in CIFAR_FILES:
                    files[base] = tar.extractfile(member).read()  # type: ignore[union-attr]
            return files
    except tarfile.TarError as exc:
        raise ConfigError(
            f"{where} is not a readable tar archive ({exc}). Fix: give the official cifar-10-python.tar.gz "
            f"({CIFAR_URL}) or its extracted {CIFAR_FOLDER} folder as dataset.real_path"
        ) from exc


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"dataset.real_path={uri!r} names no bucket; use s3://bucket/path")
    return bucket, key.strip("/")


def _download_cifar10(download_dir: str) -> str:
    """torchvision's downloader (checks the archive's MD5 and extracts it); returns the folder."""
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=download_dir, train=True, download=True)
    except Exception as exc:  # network errors, a bad checksum, an unwritable folder
        raise ConfigError(
            f"cannot download CIFAR-10 into dataset.download_dir={download_dir!r}: {exc}. Fix: download "
            f"cifar-10-python.tar.gz ({CIFAR_URL}) where the internet is reachable and pass "
            "dataset.real_path=<that file, or an s3:// copy of it>"
        ) from exc
    return str(Path(download_dir) / CIFAR_FOLDER)


def read_cifar10_files(d: DatasetConfig, storage_cfg: StorageConfig) -> tuple[dict[str, bytes], str]:
    """The raw CIFAR-10 batch files named by ``dataset.real_path`` (or downloaded), and where from."""
    path = d.real_path
    if path is None:
        if not d.download:
            raise ConfigError(MISSING_REAL)
        path = _download_cifar10(d.download_dir)
    files: dict[str, bytes] = {}
    if path.startswith("s3://"):
        bucket, key = _split_s3_uri(path)
        store = Storage(f"s3://{bucket}", storage_cfg.s3_endpoint_url, storage_cfg.s3_region)
        if key.endswith((".tar.gz", ".tgz", ".tar")):
            try:
                files = _files_from_archive(store.read_bytes(key), path)
            except FileNotFoundError as exc:
                raise ConfigError(
                    f"dataset.real_path={path!r} does not exist. Fix: upload cifar-10-python.tar.gz there, "
                    "correct the URI, or set dataset.download=true with dataset.real_path unset"
                ) from exc
        else:
            # The extracted folder, or a prefix holding it.
            nested = f"{key}/{CIFAR_FOLDER}".strip("/")
            folder = nested if store.exists(f"{nested}/batches.meta") else key
            for name in CIFAR_FILES:
                try:
                    files[name] = store.read_bytes(f"{folder}/{name}".strip("/"))
                except FileNotFoundError:
                    pass
    else:
        local = Path(path).expanduser()
        if not local.exists():
            raise ConfigError(
                f"dataset.real_path={path!r} does not exist. Fix: give the path of cifar-10-python.tar.gz or of its "
                f"extracted {CIFAR_FOLDER} folder (or an s3:// URI), or set dataset.download=true with dataset.real_path unset"
            )
        if local.is_file():
            files = _files_from_archive(local.read_bytes(), path)
        else:
            folder = local / CIFAR_FOLDER if (local / CIFAR_FOLDER / "batches.meta").is_file() else local
            files = {name: (folder / name).read_bytes() for name in CIFAR_FILES if (folder / name).is_file()}
    missing = [name for name in CIFAR_FILES if name not in files]
    if missing:
        raise ConfigError(
            f"dataset.real_path={path!r} lacks the CIFAR-10 files {missing}. Fix: give the official "
            f"cifar-10-python.tar.gz ({CIFAR_URL}) or its complete extracted {CIFAR_FOLDER} folder"
        )
    return files, path


def cifar10_items(cfg: Config) -> DomainItems:
    """The configured classes of CIFAR-10's official train and test splits, labelled by name."""
    files, where = read_cifar10_files(cfg.dataset, cfg.storage)
    meta = _unpickle_batch(files["batches.meta"], "batches.meta", where)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if len(names) != 10:
        raise ConfigError(f"{where}: batches.meta lists {len(names)} label names, CIFAR-10 has 10. Fix: use the official archive")
    # Our label = the class's position in prompts.classes; CIFAR's own label index is not used.
    ours = {class_slug(c): label for label, c in enumerate(cfg.prompts.classes)}
    cifar_to_ours = {i: ours[class_slug(n)] for i, n in enumerate(names) if class_slug(n) in ours}
    absent = [c for c in cfg.prompts.classes if class_slug(c) not in {class_slug(n) for n in names}]
    if absent:
        raise ConfigError(
            f"prompts.classes {absent} are not CIFAR-10 classes ({', '.join(names)}), so the real domain has no "
            "images of them. Fix: keep prompts.classes to CIFAR-10 classes, or give real photos of every class as "
            "image folders with dataset.real_source=folder dataset.real_path=<root>/<train|test>/<class>/"
        )
    splits: dict[str, list[Item]] = {"train": [], "test": []}
    for split, batches in (("train", CIFAR_TRAIN_BATCHES), ("test", ["test_batch"])):
        index = 0  # position in the official split: ids stay traceable to the original files
        for name in batches:
            batch = _unpickle_batch(files[name], name, where)
            data = np.asarray(batch.get("data"))
            labels = list(batch.get("labels", []))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise ConfigError(
                    f"{where}: {name} has data {data.dtype}{data.shape} and {len(labels)} labels, expected (N, 3072) "
                    "uint8 with N labels. Fix: use the official cifar-10-python.tar.gz"
                )
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 3072) CHW rows -> (N, 32, 32, 3)
            for row, cifar_label in enumerate(labels):
                label = cifar_to_ours.get(int(cifar_label))
                if label is not None:
                    splits[split].append(
                        Item(
                            id=f"cifar10-{split}-{index + row:06d}",
                            label=label,
                            class_name=cfg.prompts.classes[label],
                            source=f"cifar10/{name}",
                            pixels=images[row],
                        )
                    )
            index += len(labels)
    info = {"source": "cifar10", "path": where, "cifar_label_names": names}
    return DomainItems(splits=splits, info=info)


# --------------------------------------------------------------------------------------------
# Real data: image folders
# --------------------------------------------------------------------------------------------


def folder_items(cfg: Config) -> DomainItems:
    """``<real_path>/<train|test>/<class>/*.png|jpg|jpeg`` (local or s3://), one folder per configured class."""
    root = cfg.dataset.real_path
    if root is None:
        raise ConfigError(
            "dataset.real_source=folder needs dataset.real_path=<root holding train/<class>/ and test/<class>/ "
            "image folders> (a local folder or s3:// URI); dataset.download only fetches CIFAR-10"
        )
    if root.startswith("s3://"):
        _split_s3_uri(root)
    elif not Path(root).expanduser().is_dir():
        raise ConfigError(
            f"dataset.real_path={root!r} is not a folder. Fix: give the root of train/<class>/ and test/<class>/ "
            "image folders, or use dataset.real_source=cifar10 for a CIFAR-10 archive"
        )
    reader = Storage(
        root if root.startswith("s3://") else str(Path(root).expanduser()),
        cfg.storage.s3_endpoint_url,
        cfg.storage.s3_region,
    )
    by_slug = {class_slug(c): label for label, c in enumerate(cfg.prompts.classes)}
    splits: dict[str, list[Item]] = {}
    ignored: dict[str, int] = {}
    for split in ("train", "test"):
        items: list[Item] = []
        unknown: set[str] = set()
        ignored[split] = 0
        for key in reader.list(split):
            parts = key.split("/")
            if len(parts) < 3 or parts[-1].startswith(".") or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
                ignored[split] += 1  # stray files (README, .DS_Store, loose images): counted, not read
                continue
            label = by_slug.get(class_slug(parts[1]))
            if label is None:
                unknown.add(parts[1])
                continue
            name = cfg.prompts.classes[label]
            items.append(
                Item(
                    id=f"folder-{split}-{class_slug(name)}-{'/'.join(parts[2:])}",
                    label=label,
                    class_name=name,
                    source=f"{root.rstrip('/')}/{key}",
                    key=key,
                )
            )
        present = {item.class_name for item in items}
        absent = [c for c in cfg.prompts.classes if c not in present]
        if unknown or absent:
            problems = []
            if unknown:
                problems.append(f"folders {sorted(unknown)} are not in prompts.classes (the synthetic domain lacks them)")
            if absent:
                problems.append(f"prompts.classes {absent} have no images under {root.rstrip('/')}/{split}/")
            raise ConfigError(
                f"the real image folders do not match the configured classes {list(cfg.prompts.classes)}: "
                f"{'; '.join(problems)}. Fix: make {split}/ hold exactly one folder of images per class in "
                "prompts.classes, or change prompts.classes (both domains must share one label space)"
            )
        dupes = [i for i, n in Counter(item.id for item in items).items() if n > 1]
        if dupes:
            raise ConfigError(
                f"image folders give the same id to several files, e.g. {dupes[0]!r} (class folders differing only in "
                "case or punctuation). Fix: keep one folder per class"
            )
        splits[split] = items
    info = {"source": "folder", "path": root, "ignored_files": ignored}
    return DomainItems(splits=splits, info=info, reader=reader)


# --------------------------------------------------------------------------------------------
# Synthetic data: the generate stage's manifest and shards
# --------------------------------------------------------------------------------------------


class Made(NamedTuple):
    """Where a synthetic image is stored and how it was made (one manifest row)."""

    stage: str  # generate or derive
    shard: int
    class_name: str
    technique: str
    parents: tuple[str, ...]


def lineage_groups(links: Iterable[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """Each id's lineage group, named by its key: the smallest id in the group.

    ``links`` are (image id, its parents' ids). Images connected through parent links, either way
    and over any number of steps, form one group: a parent with its variations and edits, and a
    fused image with both its parents and everything made from either. Parents that are not
    images themselves (a user's photos) are in the map too: they join the groups of their children.
    """
    root: dict[str, str] = {}

    def find(x: str) -> str:
        top = x
        while root.setdefault(top, top) != top:
            top = root[top]
        while root[x] != top:  # path compression: the next find is one step
            root[x], x = top, root[x]
        return top

    for image_id, parents in links:
        a = find(image_id)
        for parent in parents:
            b = find(parent)
            if a != b:
                # The smaller id stays the root, so every root is its group's smallest id.
                a, b = min(a, b), max(a, b)
                root[b] = a
    return {x: find(x) for x in list(root)}


def split_groups(sizes: dict[str, int], n_train: int, n_test: int, seed: int, *context: str) -> tuple[list[str], list[str]]:
    """(train, test) keys of whole groups of one class; ``sizes``: images per group key.

    In a seeded order of the keys, groups go to test until it holds ``n_test`` images (passing it
    by less than the last group's size), then to train where they fit in ``n_train``; the rest are
    unused. With one image per group this is a plain seeded choice of images.
    """
    train: list[str] = []
    test: list[str] = []
    in_train = in_test = 0
    for key in seeded_order(list(sizes), seed, *context):
        if in_test < n_test:
            test.append(key)
            in_test += sizes[key]
        elif in_train + sizes[key] <= n_train:
            train.append(key)
            in_train += sizes[key]
    return train, test


def _read_made(storage: Storage, layout: Layout) -> tuple[dict[str, Made], dict[str, str]]:
    """Every image of the run's generate and derive manifests, and each stage's plan hash."""
    made: dict[str, Made] = {}
    plans: dict[str, str] = {}
    for stage in IMAGE_STAGES:
        key = layout.manifest(stage)
        if not storage.exists(key):
            continue
        manifest = storage.read_parquet(key)
        missing = [c for c in ("id", "class_name", "technique", "parents", "shard") if c not in manifest.column_names]
        if missing:
            raise ConfigError(
                f"the {stage} manifest {storage.uri(key)} lacks the columns {missing} (made by an older synth). Fix: "
                f"delete {storage.uri(layout.stage(stage))} and rerun the {stage} stage"
            )
        plans[stage] = (manifest.schema.metadata or {}).get(META_PLAN, b"").decode()
        columns = (manifest.column(c).to_pylist() for c in ("id", "class_name", "technique", "parents", "shard"))
        for image_id, class_name, technique, parents, shard in zip(*columns):
            if image_id in made:
                raise ConfigError(
                    f"the id {image_id!r} is in both the {made[image_id].stage} and the {stage} manifest of run "
                    f"{layout.run!r}. Fix: delete {storage.uri(layout.stage('derive'))} and rerun the derive stage"
                )
            made[image_id] = Made(stage, int(shard), class_name, technique, tuple(parents or ()))
    return made, plans


def _group_classes(storage: Storage, layout: Layout, made: dict[str, Made], group_of: dict[str, str]) -> dict[str, str]:
    """The class of each lineage group, from its images and the user's parent photos; one class per group."""
    class_of = {image_id: m.class_name for image_id, m in made.items()}
    if storage.exists(layout.derive_parents):
        photos = storage.read_parquet(layout.derive_parents, columns=["id", "class_name"])
        for image_id, class_name in zip(photos.column("id").to_pylist(), photos.column("class_name").to_pylist()):
            if image_id in group_of:  # a photo no image was made from joins no group
                class_of.setdefault(image_id, class_name)
    classes: dict[str, dict[str, str]] = defaultdict(dict)  # group key -> class slug -> a member
    for image_id, class_name in class_of.items():
        classes[group_of[image_id]].setdefault(class_slug(class_name), image_id)
    for key, members in sorted(classes.items()):
        if len(members) > 1:
            examples = ", ".join(f"{i!r} ({class_of[i]})" for i in members.values())
            raise ConfigError(
                f"the lineage group of {key!r} (images made from one another) spans several classes: {examples}. "
                "Variations, inpainting and fusion keep their parents' class, so the derive stage's output is "
                f"inconsistent. Fix: delete {storage.uri(layout.stage('derive'))} and rerun the derive stage"
            )
    return {key: class_of[next(iter(members.values()))] for key, members in classes.items()}


def synthetic_items(cfg: Config, storage: Storage) -> DomainItems:
    """Per-class train/test splits of the run's synthetic images (generate and derive stages), with their bytes.

    An image and everything made from it (or it from) is one lineage group, and a group goes to
    one split whole, so no test image has a parent, sibling or child in training.
    """
    layout = Layout(cfg.run)
    d = cfg.dataset

    # 1. Every image of both stages, its lineage group, and each group's class.
    made, plans = _read_made(storage, layout)
    if not plans:
        raise ConfigError(
            f"run {cfg.run!r} has no generate manifest at {storage.uri(layout.manifest('generate'))} and no derive "
            f"manifest at {storage.uri(layout.manifest('derive'))}. Fix: run the generate stage first "
            "(python -m ray_jobs.generate <config>), and the derive stage for images made from parent images, with "
            "this run and storage.root, or build only the real domain with dataset.domains=[real]"
        )
    stages = list(plans)
    group_of = lineage_groups((image_id, m.parents) for image_id, m in made.items())
    class_of_group = _group_classes(storage, layout, made, group_of)
    curation, source = _curation(cfg, storage)

    # 2. The chosen techniques' images, by class and lineage group (never the hostile examples).
    found = Counter(m.technique for m in made.values())
    techniques = list(d.techniques) if d.techniques is not None else sorted(set(found) - {HOSTILE}, key=_technique_order)
    for technique in techniques:
        if not found[technique]:
            log.warning("dataset: dataset.techniques lists %r, but run %r has no such images", technique, cfg.run)
    chosen = set(techniques)  # never HOSTILE: dataset.techniques takes TRAIN_TECHNIQUES only
    members: dict[str, list[str]] = defaultdict(list)  # group key -> its chosen images
    for image_id, m in made.items():
        if m.technique in chosen:
            members[group_of[image_id]].append(image_id)
    groups_by_class: dict[str, list[str]] = defaultdict(list)  # class slug -> group keys
    images_by_class: Counter = Counter()  # class name as stored -> chosen images
    for key, ids in members.items():
        groups_by_class[class_slug(class_of_group[key])].append(key)
        images_by_class[class_of_group[key]] += len(ids)

    # Labels come from the class name, so a run with another class order still lines up.
    classes = label_classes(cfg)
    ours = {class_slug(c): label for label, c in enumerate(classes)}
    hostile_ids = sorted(
        i for i, m in made.items() if m.technique == HOSTILE and class_slug(m.class_name) in ours
    )
    n_hostile = len(hostile_ids)
    other = d.hostile == "other_class"
    if other:
        # The class "other": the hostile examples, split like a class (hostile images are never
        # parents, so each is its own lineage group).
        if not hostile_ids:
            raise ConfigError(
                f"dataset.hostile=other_class, but run {cfg.run!r} has no hostile examples (technique hostile) to make "
                f"the class {OTHER_CLASS!r}. Fix: set prompts.hostile_per_class >= 1 and rerun the prompts and generate "
                "stages under a new run name, or use dataset.hostile=evaluate"
            )
        for image_id in hostile_ids:
            members[group_of[image_id]].append(image_id)
            groups_by_class[OTHER_CLASS].append(group_of[image_id])

    def item(image_id: str, class_name: str) -> Item:
        # A reviewer's relabel changes the image's label, not the split its lineage group is in.
        # curation_state has checked that every relabel names one of prompts.classes.
        if curation is not None:
            class_name = curation.relabel.get(image_id, class_name)
        m = made[image_id]
        return Item(
            id=image_id,
            label=ours[class_slug(class_name)],
            class_name=class_name,
            source=layout.shard(m.stage, m.shard),
            technique=m.technique,
            accepted=curation.accepted.get(image_id) if curation is not None else None,
        )
    absent = [c for c in cfg.prompts.classes if not groups_by_class.get(class_slug(c))]
    if absent:
        which = f" of the techniques {techniques}" if d.techniques is not None else ""
        raise ConfigError(
            f"prompts.classes {absent} have no images{which} in the {' + '.join(stages)} run {cfg.run!r} (it has "
            f"{sorted(images_by_class)}), so the synthetic domain lacks them. Fix: generate them (rerun the generate "
            "stage with these prompts.classes under a new run name), "
            + ("choose more dataset.techniques, " if d.techniques is not None else "")
            + "or remove them from prompts.classes"
        )
    ignored_classes = {n: k for n, k in sorted(images_by_class.items()) if class_slug(n) not in ours}

    # 3. Per class, whole groups to test and train in a seeded order: decided by ids, parents,
    # classes and dataset.seed alone, before any image is read.
    splits: dict[str, list[Item]] = {"train": [], "test": []}
    available, unused, notes, groups, largest, lineage_notes = {}, {}, {}, {}, {}, {}
    for label, class_name in enumerate(classes):
        sizes = {key: len(members[key]) for key in groups_by_class[class_slug(class_name)]}
        n_images = sum(sizes.values())
        n_train, n_test, note = synthetic_split_sizes(n_images, d.synthetic_train_per_class, d.synthetic_test_per_class)
        train_keys, test_keys = split_groups(sizes, n_train, n_test, d.seed, "synthetic", class_name)
        got_train, got_test = sum(sizes[k] for k in train_keys), sum(sizes[k] for k in test_keys)
        if note and (got_train, got_test) != (n_train, n_test):
            note += f"; whole lineage groups make it {got_train} train / {got_test} test"
        elif not note and (got_test - n_test > n_test // 10 or n_train - got_train > n_train // 10):
            # Large groups (many fusions chain a class's parents together) cannot be split finely.
            lineage_notes[class_name] = (
                f"whole lineage groups make it {got_train} train / {got_test} test (asked for {n_train}/{n_test}); "
                f"its largest group holds {max(sizes.values())} of {n_images} images"
            )
            log.warning("dataset: synthetic class %r: %s", class_name, lineage_notes[class_name])
        available[class_name] = n_images
        groups[class_name] = len(sizes)
        largest[class_name] = max(sizes.values())
        unused[class_name] = n_images - got_train - got_test
        if note:
            notes[class_name] = note
            log.warning("dataset: synthetic class %r: %s", class_name, note)
        for split, keys in (("train", train_keys), ("test", test_keys)):
            for image_id in sorted(i for key in keys for i in members[key]):
                splits[split].append(item(image_id, class_name))
    # The hostile examples of the configured classes for the adversarial domain, labelled with the
    # class each imitates: all of them, or with other_class those in the synthetic test split only,
    # so none of them was seen in training.
    if other:
        in_test = {i.id for i in splits["test"]}
        hostile_ids = [i for i in hostile_ids if i in in_test]
    hostile = [item(image_id, cfg.prompts.classes[ours[class_slug(made[image_id].class_name)]]) for image_id in hostile_ids]

    # 4. Image bytes, one shard read at a time, only for the chosen ids.
    ids_of: dict[tuple[str, int], list[str]] = defaultdict(list)
    for image_id, m in made.items():
        ids_of[(m.stage, m.shard)].append(image_id)
    wanted: dict[str, Item] = {}
    for image in (i for items in [*splits.values(), hostile] for i in items):
        # With other_class a hostile test image is in both domains: one read fills both items.
        wanted.setdefault(image.id, image)
    twins = [(image, wanted[image.id]) for image in hostile if wanted[image.id] is not image]
    to_read = sorted({(made[i].stage, made[i].shard) for i in wanted}, key=lambda s: (IMAGE_STAGES.index(s[0]), s[1]))
    for stage, shard in to_read:
        key = layout.shard(stage, shard)
        try:
            # Shards are cut from id-sorted rows and the manifest is sorted by id, so the manifest
            # lists each shard's ids in the shard's own order.
            check = check_shard(storage.read_bytes(key), shard, plans[stage], ids_of[(stage, shard)])
        except FileNotFoundError:
            raise ConfigError(
                f"the {stage} manifest lists images in {storage.uri(key)}, which is missing. Fix: rerun the "
                f"{stage} stage for this run (it remakes only missing shards)"
            ) from None
        if not check.ok:
            raise ConfigError(
                f"the {stage} shard {storage.uri(key)} {check.reason}. Fix: rerun the {stage} stage for this run "
                "(it checks every shard and remakes bad ones), then this stage"
            )
        table = check.table
        for image_id, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            if image_id in wanted:
                wanted[image_id].data = data
    lost = [i for i, item in wanted.items() if item.data is None]
    if lost:
        stage = made[lost[0]].stage
        raise ConfigError(
            f"{len(lost)} images in the {stage} manifest are not in their shards (e.g. {lost[0]!r}). Fix: delete "
            f"{storage.uri(layout.stage(stage))} and rerun the {stage} stage"
        )
    for image, read in twins:
        image.data = read.data
    info = {
        "source": "+".join(stages),
        "manifests": {stage: storage.uri(layout.manifest(stage)) for stage in stages},
        "techniques": techniques,
        "unselected_techniques": {t: n for t, n in sorted(found.items()) if t not in chosen},
        "available_per_class": available,
        "groups_per_class": groups,
        "largest_group_per_class": largest,
        "lineage_split": lineage_notes,
        "unused_per_class": unused,
        "proportional_split": notes,
        "ignored_classes": ignored_classes,
        "hostile": d.hostile,
        "hostile_images": n_hostile,
        "synthetic_source": source,
    }
    if curation is not None:
        unscored = sorted(i for i in wanted if i not in curation.accepted)
        info["curation"] = {
            "scored": len(curation.accepted),
            "accepted": sum(curation.accepted.values()),
            "decisions_applied": curation.decisions,
            "relabelled": sum(1 for i in wanted if i in curation.relabel),
            "unscored": len(unscored),
        }
        if unscored:
            log.warning(
                "dataset: %d synthetic images (e.g. %r) have no curate score, so they count as not accepted; rerun the "
                "curate stage to score them", len(unscored), unscored[0],
            )
    technique_of = {image_id: made[image_id].technique for image_id in wanted}
    return DomainItems(
        splits=splits, info=info, group_of={i: group_of[i] for i in wanted}, technique_of=technique_of, hostile=hostile
    )


def _curation(cfg: Config, storage: Storage):
    """The curate stage's verdicts with review decisions applied (None when not curated), and the
    synthetic source the readers of the synthetic domain use: "curated" or "all"."""
    from synth.review import curation_state

    from synth.curate import scores_key

    state = curation_state(storage, cfg.run, list(cfg.prompts.classes))
    source = choose_synthetic_source(cfg.dataset.synthetic_source, judged=state is not None)
    if source is None:
        raise ConfigError(
            f"dataset.synthetic_source=curated, but run {cfg.run!r} has no curate scores at "
            f"{storage.uri(scores_key(cfg.run))}. Fix: run the curate stage first "
            "(python -m ray_jobs.curate <config>), or use dataset.synthetic_source=all"
        )
    return state, source


def _technique_order(technique: str) -> tuple[int, str]:
    """Known techniques in their pipeline order (config.TECHNIQUES), any other after them by name."""
    return (TECHNIQUES.index(technique) if technique in TECHNIQUES else len(TECHNIQUES), technique)


# --------------------------------------------------------------------------------------------
# Images: decode, check, normalise to square RGB PNG
# --------------------------------------------------------------------------------------------


def _to_square_rgb(img, size: int):
    """Centre-crop to a square (keeps the aspect ratio; subjects are usually central), then resize."""
    from PIL import Image

    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases.
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def normalize_image(item: Item, size: int) -> Optional[bytes]:
    """PNG bytes of ``item`` as ``size`` x ``size`` RGB, or None if its bytes are not a readable image."""
    from PIL import Image, ImageOps

    if item.pixels is not None:
        img = Image.fromarray(item.pixels)
    else:
        try:
            img = Image.open(io.BytesIO(item.data or b""))
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode large JPEGs at a reduced scale (still >= size)
            img.load()  # decode now: truncated or garbled data fails here, not later in training
            if img.format == "PNG" and img.mode == "RGB" and img.size == (size, size):
                return item.data  # already in the stored form (generate-stage shards): keep the bytes
            img = ImageOps.exif_transpose(img).convert("RGB")  # camera orientation; drops alpha / palette
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            log.debug("dataset: skipping unreadable image %s (%s): %s", item.id, item.source, exc)
            return None
    return encode_png(np.asarray(_to_square_rgb(img, size)))


def build_table(
    items: list[Item], domain: str, size: int, classes: Sequence[str], reader: Optional[Storage] = None
) -> tuple[pa.Table, int]:
    """The stored table of one split, sorted by id, and how many images were unreadable and skipped."""
    items = sorted(items, key=lambda item: item.id)
    if reader is not None:
        if reader.is_s3:
            reader.client  # noqa: B018 -- create the boto3 client once, before threads share it

        def fetch(item: Item) -> Item:
            try:
                item.data = reader.read_bytes(item.key or "")
            except OSError as exc:  # vanished or unreadable file; StorageError (network, keys) propagates
                log.debug("dataset: cannot read %s: %s", item.source, exc)
                item.data = b""
            return item

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            items = list(pool.map(fetch, items))
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    skipped = 0
    for item in items:
        png = normalize_image(item, size)
        item.data = item.pixels = None  # free memory as we go
        if png is None:
            skipped += 1
            continue
        columns["id"].append(item.id)
        columns["label"].append(item.label)
        columns["class_name"].append(item.class_name)
        columns["image"].append(png)
        columns["domain"].append(domain)
        columns["source"].append(item.source)
        columns["technique"].append(item.technique)
        columns["accepted"].append(item.accepted)
    schema = SCHEMA.with_metadata({META_IMAGE_SIZE: str(size).encode(), META_CLASSES: "\x1f".join(classes).encode()})
    return pa.table(columns, schema=schema), skipped


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _counts(table: pa.Table, classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(table.column("class_name").to_pylist())
    return {c: int(counts.get(c, 0)) for c in classes}


def _lineage_counts(table: pa.Table, found: DomainItems) -> tuple[int, dict]:
    """The lineage groups of one stored synthetic split, and per technique {images, groups}."""
    assert found.group_of is not None and found.technique_of is not None
    images: Counter = Counter()
    groups: dict[str, set] = defaultdict(set)
    for image_id in table.column("id").to_pylist():
        images[found.technique_of[image_id]] += 1
        groups[found.technique_of[image_id]].add(found.group_of[image_id])
    n_groups = len(set().union(*groups.values()))
    return n_groups, {t: {"images": int(images[t]), "groups": len(groups[t])} for t in _split_techniques(found)}


def _split_techniques(found: DomainItems) -> list[str]:
    """The techniques of a synthetic domain's splits: the chosen ones, and hostile with other_class."""
    return [*found.info["techniques"], *([HOSTILE] if found.info.get("hostile") == "other_class" else [])]


def run_dataset(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Build (or rebuild, identically) the real and synthetic splits of ``cfg.run``; returns the summary."""
    from synth.runtime import write_stage_config, write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout = Layout(cfg.run)
    d = cfg.dataset
    classes = label_classes(cfg)

    # 1. Fail fast: storage, then every input, before anything is written.
    storage.check_writable()
    domains: dict[str, DomainItems] = {}
    if "real" in d.domains:
        domains["real"] = cifar10_items(cfg) if d.real_source == "cifar10" else folder_items(cfg)
    if "synthetic" in d.domains:
        domains["synthetic"] = synthetic_items(cfg, storage)
        if domains["synthetic"].hostile:
            hostile = domains["synthetic"].hostile
            domains[ADVERSARIAL] = DomainItems(
                splits={"train": [], "test": hostile},
                info={
                    "source": "hostile examples (technique hostile), labelled with the class each imitates"
                    + (f"; only those in the synthetic test split (the rest train the class {OTHER_CLASS!r})" if d.hostile == "other_class" else "")
                },
                technique_of={i.id: i.technique for i in hostile},
            )
    write_stage_config(storage, cfg, "dataset")
    removed = storage.remove_partials(layout.stage("dataset"))

    summary: dict = {
        "classes": classes,
        "image_size": d.image_size,
        "seed": d.seed,
        "val_fraction": d.val_fraction,
        "hostile": d.hostile,
        "domains": {},
        "tables": {},
        "partial_writes_removed": removed,
    }
    trained: set[str] = set()  # synthetic train and val ids: no adversarial (test) image may be one
    for domain, found in domains.items():
        # 2. Validation split from the training split, by id, before any image is decoded.
        train, val = carve_val(found.splits["train"], d.val_fraction, d.seed, domain, found.group_of)
        planned = {"train": train, "val": val, "test": found.splits["test"]}
        if domain == "synthetic":
            trained = {item.id for item in [*train, *val]}
        leaked = sorted(trained & {item.id for item in planned["test"]}) if domain == ADVERSARIAL else []
        if leaked:  # by construction impossible with other_class; it would make the fooling rate a training score
            raise RuntimeError(f"{ADVERSARIAL}: hostile image {leaked[0]!r} is also in a synthetic train or val split")
        report = dict(found.info)
        report.update(images={}, per_class={}, skipped_corrupt={})
        if found.group_of is not None:
            report.update(groups={}, per_technique={})
        if domain == "synthetic" and "curation" in found.info:
            report["accepted"] = {}
        seen: dict[str, str] = {}
        group_split: dict[str, str] = {}
        for split in SPLITS_OF.get(domain, SPLITS):
            for item in planned[split]:
                # Both by construction impossible; a leak would void every number.
                if item.id in seen:
                    raise RuntimeError(f"{domain}: id {item.id!r} is in both {seen[item.id]} and {split}")
                seen[item.id] = split
                group = found.group_of[item.id] if found.group_of is not None else item.id
                if group_split.setdefault(group, split) != split:
                    raise RuntimeError(f"{domain}: the lineage group of {group!r} is in both {group_split[group]} and {split}")
            # 3. Decode, normalise and store each split.
            table, skipped = build_table(planned[split], domain, d.image_size, classes, found.reader)
            key = layout.dataset_split(domain, split)
            storage.write_parquet(key, table)
            report["images"][split] = table.num_rows
            report["per_class"][split] = _counts(table, classes)
            report["skipped_corrupt"][split] = skipped
            if found.group_of is not None:
                report["groups"][split], report["per_technique"][split] = _lineage_counts(table, found)
            if "accepted" in report:
                report["accepted"][split] = sum(1 for a in table.column("accepted").to_pylist() if a)
            summary["tables"][f"{domain}/{split}"] = storage.uri(key)
            if skipped:
                log.warning("dataset: %s/%s: skipped %d unreadable images", domain, split, skipped)
        summary["domains"][domain] = report
        line = f"{domain}: " + ", ".join(f"{split} {n:,}" for split, n in report["images"].items()) + " images"
        if "per_technique" in report:
            # e.g. "(template 4,500/500/1,000, variation 900/100/200 train/val/test)"
            per_split = [f"{t} " + "/".join(f"{report['per_technique'][s][t]['images']:,}" for s in SPLITS) for t in _split_techniques(found)]
            line += f" ({', '.join(per_split)} train/val/test)"
        if domain == "synthetic":
            if d.hostile == "other_class":
                report["other_images"] = {split: report["per_class"][split][OTHER_CLASS] for split in SPLITS}
                line += f"; class {OTHER_CLASS!r} (hostile examples) " + "/".join(f"{report['other_images'][s]:,}" for s in SPLITS)
                line += " train/val/test"
            line += f"; source {report['synthetic_source']}"
            if "accepted" in report:
                kept = "/".join(f"{report['accepted'][s]:,}" for s in SPLITS)
                line += f" ({kept} train/val/test accepted by the curate stage and review)"
        if domain == ADVERSARIAL:
            line += " (hostile examples; a model's accuracy here is its fooling rate)"
        say("dataset", line)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    return write_stage_summary(storage, cfg, "dataset", summary)


# --------------------------------------------------------------------------------------------
# Readers for the stages that follow
# --------------------------------------------------------------------------------------------


def load_split_table(storage: Storage, run: str, domain: str, split: str) -> pa.Table:
    """The stored table of one split (columns as in :data:`SCHEMA`)."""
    if domain not in DOMAINS:
        raise ConfigError(f"domain {domain!r} is unknown; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
    key = Layout(run).dataset_split(domain, split)
    if not storage.exists(key):
        raise ConfigError(
            f"{storage.uri(key)} does not exist. Fix: run the dataset stage for run {run!r} first "
            f"(python -m ray_jobs.dataset <config>, with {domain!r} in dataset.domains)"
        )
    return storage.read_parquet(key)


def decode_images(table: pa.Table) -> np.ndarray:
    """(N, S, S, 3) uint8 from a split table's PNG column."""
    meta = table.schema.metadata or {}
    blobs = table.column("image").to_pylist()
    if META_IMAGE_SIZE in meta:
        size = int(meta[META_IMAGE_SIZE])
    elif blobs:
        size = decode_png(blobs[0]).shape[0]
    else:
        size = 32
    # Filled in place: one (N, S, S, 3) array, never a list of N arrays beside it.
    images = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(blobs):
        images[i] = decode_png(data)
    return images


def load_split(storage: Storage, run: str, domain: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S, 3) uint8 (S = dataset.image_size, 32 by default) and labels (N,) int64 of one split."""
    table = load_split_table(storage, run, domain, split)
    labels = table.column("label").to_numpy().astype(np.int64)
    return decode_images(table), labels
