"""The export stage: a finished run's splits as the formats people load elsewhere, with a dataset card.

Reads the dataset stage's tables (``<run>/dataset/<domain>/<split>.parquet``) and writes, under
``export.dest`` (a local folder or ``s3://`` URI; default ``<storage.root>/<run>/export``):

- ``imagefolder/<split>/<NN-class>/<id>.png`` and ``imagefolder/classes.json``: class folders are
  named ``<label>-<class slug>`` with the label zero-padded, so the sorted order torchvision's
  ``ImageFolder`` gives them is synth's label order and ``ImageFolder(root).class_to_idx`` maps
  each folder to synth's label. A class with no image in a split keeps an empty folder (a
  ``.keep`` file in it; load such a split with ``allow_empty=True``).
- ``huggingface/data/<split>-00000-of-0000N.parquet``: Parquet with the ``datasets`` library's
  own schema metadata (``Image`` and ``ClassLabel`` features), named the way the Hub expects,
  and ``huggingface/README.md``, the dataset card: YAML metadata (licence, task, size category,
  features with the class names, splits, data files per split) and how the set was made, read
  from the run's stage plans and summaries.
- ``webdataset/<split>-000000.tar``: ``<key>.png``, ``<key>.json`` (id, label, class_name,
  technique, accepted, source) and ``<key>.cls`` per sample, ``export.shard_size`` samples a tar.

Split names: the synthetic domain's ``train``, ``val`` and ``test``; ``real_<split>`` with
``export.include_real``; ``adversarial_test`` with ``export.include_adversarial``. A file's key is
the image id where the id is a plain name (letters, digits, ``-``, ``_``), else a cleaned id with a
hash of the id (an image-folder id holds ``/`` and ``.``); the id itself is in every format.

Exactly once, as every stage: ``<dest>/export-plan.json`` (the run, the storage root, the
selection and a hash of the selected ids per split) is claimed atomically; a destination
holding another plan is refused. Each split is cut into fixed shards of ``export.shard_size``
rows (by id), and each (format, split, shard) is a unit whose files have fixed names and are
each written atomically (a local temp file renamed; one S3 PUT), so a rerun lists the
destination, skips the complete units and writes the rest: no duplicates, no partial files.

Scale: the driver reads only the small columns (ids, labels, techniques) to plan; images are
read by the unit writers, a shard's rows at a time, from the split tables with ranged reads.
Sets up to ``export.in_process_max_images`` are written in the driver process; larger ones by a
Ray Data job, one task per shard (the same :func:`write_unit`).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from synth.config import Config, ConfigError, class_slug, label_classes
from synth.dataset import ADVERSARIAL, META_CLASSES, SPLITS, SPLITS_OF
from synth.progress import plural, rate, say
from synth.storage import TRANSIENT_MARK, Layout, Storage, StorageError, parquet_bytes

log = logging.getLogger(__name__)

STAGE = "export"
PLAN_KEY = "export-plan.json"
CARD_KEY = "huggingface/README.md"
CLASSES_KEY = "imagefolder/classes.json"
EMPTY_MARK = ".keep"
ROW_COLUMNS = ["id", "label", "class_name", "image", "technique", "accepted", "source"]
LIGHT_COLUMNS = [c for c in ROW_COLUMNS if c != "image"]
READ_BATCH = 256  # rows decoded at a time while a unit reads its shard from a split table
PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,120}")

# The Hugging Face files: the Arrow schema and the `datasets` features JSON kept in its metadata.
HF_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("label", pa.int64()),
        ("technique", pa.string()),
        ("accepted", pa.bool_()),
        ("source", pa.string()),
    ]
)


def hf_features(classes: Sequence[str]) -> dict:
    """The ``datasets`` features of the exported Parquet, as ``datasets`` writes them into the schema metadata."""
    value = lambda dtype: {"dtype": dtype, "_type": "Value"}  # noqa: E731
    return {
        "id": value("string"),
        "image": {"_type": "Image"},
        "label": {"names": list(classes), "_type": "ClassLabel"},
        "technique": value("string"),
        "accepted": value("bool"),
        "source": value("string"),
    }


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def part_name(domain: str, split: str) -> str:
    """The exported split's name: the synthetic domain's own split names, others prefixed (``real_train``)."""
    return split if domain == "synthetic" else f"{domain}_{split}"


def class_folders(classes: Sequence[str]) -> list[str]:
    """ImageFolder class folders in label order; sorted, they keep that order (``03-cat``)."""
    width = len(str(max(len(classes) - 1, 0)))
    return [f"{label:0{width}d}-{class_slug(name)}" for label, name in enumerate(classes)]


def file_stem(image_id: str) -> str:
    """The file key of an image: the id when it is a plain name, else a cleaned id and a hash of it.

    WebDataset groups a sample's files by the name before the first dot, and a ``/`` would make a
    folder, so neither may be in a key; the hash keeps two ids that clean alike apart.
    """
    if PLAIN_ID.fullmatch(image_id):
        return image_id
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", image_id).strip("_")[:80]
    return f"{cleaned}-{hashlib.sha256(image_id.encode()).hexdigest()[:10]}"


def hf_file(name: str, shard: int, shards: int) -> str:
    return f"huggingface/data/{name}-{shard:05d}-of-{shards:05d}.parquet"


def wds_file(name: str, shard: int) -> str:
    return f"webdataset/{name}-{shard:06d}.tar"


def imagefolder_file(name: str, folder: str, image_id: str) -> str:
    return f"imagefolder/{name}/{folder}/{file_stem(image_id)}.png"


# --------------------------------------------------------------------------------------------
# Selection: which rows of which split tables (small columns only, never images)
# --------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One exported split: the rows of one stored split table that the selection keeps."""

    name: str  # exported split name (part_name)
    domain: str
    split: str
    table: str  # the split table's key in run storage
    positions: list[int]  # kept rows, by their position in the stored table (id order)
    ids: list[str]
    labels: list[int]
    techniques: list[str]
    full: list[str] = field(default_factory=list)  # per kept row: its full-resolution PNG's key, or ""

    def shards(self, size: int) -> list[tuple[int, int]]:
        """``(start, end)`` into the kept rows of each shard."""
        return [(s, min(s + size, len(self.positions))) for s in range(0, len(self.positions), size)]


def _read_light(storage: Storage, key: str) -> tuple[pa.Table, list[str]]:
    """A split table's small columns (column-selective, ranged reads on S3) and its class names."""
    with storage.open_read(key) as f:
        pf = pq.ParquetFile(f)
        missing = [c for c in ROW_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ConfigError(
                f"{storage.uri(key)} lacks the columns {missing} (made by an older synth). Fix: rerun the dataset "
                "stage (python -m ray_jobs.dataset <config>)"
            )
        meta = pf.schema_arrow.metadata or {}
        table = pf.read(columns=LIGHT_COLUMNS)
    classes = meta[META_CLASSES].decode().split("\x1f") if META_CLASSES in meta else []
    return table, classes


def _full_keys(storage: Storage, layout: Layout, run: str, ids: list[str], sources: list[str], cache: dict) -> list[str]:
    """Each image's full-resolution PNG key where its image stage kept one, else ""."""
    out = []
    for image_id, source in zip(ids, sources):
        stage = source[len(run) + 1 :].split("/", 1)[0] if source.startswith(f"{run}/") else ""
        if stage not in cache:
            plan = storage.read_json_or_none(layout.plan(stage)) if stage in ("generate", "derive") else None
            if plan and plan.get("keep_full_resolution"):
                manifest = storage.read_parquet(layout.manifest(stage), columns=["id", "class_name"])
                classes = dict(zip(manifest.column("id").to_pylist(), manifest.column("class_name").to_pylist()))
                stored = set(storage.list(f"{run}/{stage}/full"))
                cache[stage] = (classes, stored)
            else:
                cache[stage] = None
        found = cache[stage]
        key = ""
        if found is not None and image_id in found[0]:
            # The original class (a reviewer's relabel changes the label, not where the file is).
            candidate = layout.full_image(stage, class_slug(found[0][image_id]), image_id)
            key = candidate if candidate in found[1] else ""
        out.append(key)
    return out


def select(cfg: Config, storage: Storage) -> tuple[list[Part], list[str], dict]:
    """The exported splits, the class names, and notes for the summary; an error naming the fix when a table is missing."""
    e = cfg.export
    layout = Layout(cfg.run)
    domains = ["synthetic"] + (["real"] if e.include_real else []) + ([ADVERSARIAL] if e.include_adversarial else [])
    parts: list[Part] = []
    classes: Optional[list[str]] = None
    notes: dict = {"skipped_splits": {}, "techniques_not_found": []}
    found_techniques: Counter = Counter()
    full_cache: dict = {}
    for domain in domains:
        for split in SPLITS_OF.get(domain, SPLITS):
            key = layout.dataset_split(domain, split)
            if not storage.exists(key):
                if domain == ADVERSARIAL:
                    notes["skipped_splits"][part_name(domain, split)] = "the run made no hostile examples"
                    continue
                raise ConfigError(
                    f"{storage.uri(key)} does not exist. Fix: run the dataset stage for run {cfg.run!r} first "
                    f"(python -m ray_jobs.dataset <config>, with {domain!r} in dataset.domains)"
                    + ("" if domain == "synthetic" else ", or leave export.include_real=false")
                )
            table, table_classes = _read_light(storage, key)
            if classes is None:
                classes = table_classes or label_classes(cfg)
            elif table_classes and table_classes != classes:
                raise ConfigError(
                    f"{storage.uri(key)} has the classes {table_classes}, other splits {classes}. Fix: rerun the dataset stage"
                )
            ids = table.column("id").to_pylist()
            labels = table.column("label").to_pylist()
            techniques = table.column("technique").to_pylist()
            accepted = table.column("accepted").to_pylist()
            sources = table.column("source").to_pylist()
            keep = list(range(len(ids)))
            if domain == "synthetic":
                found_techniques.update(techniques)
                if e.techniques is not None:
                    keep = [i for i in keep if techniques[i] in e.techniques]
            if e.curation == "accepted" and domain != "real":
                if len(ids) and all(a is None for a in accepted):
                    raise ConfigError(
                        f"export.curation=accepted, but {storage.uri(key)} has no curate verdicts (the run was not curated). "
                        "Fix: run the curate stage and then the dataset stage, or use export.curation=all"
                    )
                keep = [i for i in keep if accepted[i]]
            if not keep:
                notes["skipped_splits"][part_name(domain, split)] = "no image left after the selection"
                continue
            part = Part(
                name=part_name(domain, split),
                domain=domain,
                split=split,
                table=key,
                positions=keep,
                ids=[ids[i] for i in keep],
                labels=[int(labels[i]) for i in keep],
                techniques=[techniques[i] for i in keep],
            )
            if e.full_resolution and domain != "real":
                part.full = _full_keys(storage, layout, cfg.run, part.ids, [sources[i] for i in keep], full_cache)
            parts.append(part)
    if e.techniques is not None:
        notes["techniques_not_found"] = [t for t in e.techniques if not found_techniques[t]]
        for t in notes["techniques_not_found"]:
            log.warning("export: export.techniques lists %r, but the synthetic splits of run %r have no such images", t, cfg.run)
    if not parts:
        raise ConfigError(
            f"the selection leaves no image to export from run {cfg.run!r} ({notes['skipped_splits']}). Fix: widen "
            "export.techniques or use export.curation=all"
        )
    if e.full_resolution:
        notes["full_resolution_images"] = sum(1 for p in parts for k in p.full if k)
    return parts, classes or label_classes(cfg), notes


# --------------------------------------------------------------------------------------------
# The plan and the units
# --------------------------------------------------------------------------------------------


def plan_for(cfg: Config, storage: Storage, parts: list[Part], classes: list[str]) -> dict:
    """Everything the exported files depend on; a rerun into the same destination must match it."""
    e = cfg.export
    splits = {}
    for p in parts:
        digest = hashlib.sha256()
        for image_id, label, full in zip(p.ids, p.labels, p.full or [""] * len(p.ids)):
            digest.update(f"{image_id}\x1f{label}\x1f{full}\x1e".encode())
        splits[p.name] = {"table": p.table, "images": len(p.ids), "rows_sha256": digest.hexdigest()}
    return {
        "run": cfg.run,
        "storage_root": storage.uri(),
        "classes": list(classes),
        "selection": {
            "formats": sorted(e.formats),
            "include_real": e.include_real,
            "include_adversarial": e.include_adversarial,
            "techniques": e.techniques,
            "curation": e.curation,
            "full_resolution": e.full_resolution,
            "shard_size": e.shard_size,
            "license": e.license,
        },
        "splits": splits,
    }


def claim_plan(dest: Storage, plan: dict) -> bool:
    """Claim the destination for ``plan`` atomically (True), or find the same plan there (False); else refuse."""
    if dest.create_json(PLAN_KEY, plan):
        return True
    stored = dest.read_json_or_none(PLAN_KEY)
    plan = json.loads(json.dumps(plan))  # as stored: tuples are lists
    if stored == plan:
        return False
    if not isinstance(stored, dict):
        raise ConfigError(f"{dest.uri(PLAN_KEY)} is unreadable. Fix: delete {dest.uri()} and rerun, or choose another export.dest")
    changed = []
    for k in sorted(set(plan) | set(stored)):
        old, new = stored.get(k), plan.get(k)
        if k == "selection" and isinstance(old, dict):
            changed += [f"export.{s}: {old.get(s)!r} there, {new.get(s)!r} now" for s in sorted(set(old) | set(new)) if old.get(s) != new.get(s)]
        elif old != new:
            changed.append(f"{k} (the selected images)" if k == "splits" else k)
    if stored.get("run") != plan["run"] or stored.get("storage_root") != plan["storage_root"]:
        what = f"an export of run {stored.get('run')!r} from {stored.get('storage_root')}"
    else:
        what = f"another export of run {plan['run']!r} (it differs in {'; '.join(changed)})"
    raise ConfigError(
        f"export.dest {dest.uri()} already holds {what}. Fix: choose another export.dest=<folder or s3:// URI>, "
        f"or delete {dest.uri()} to replace that export"
    )


def unit_files(part: Part, start: int, end: int, shard: int, shards: int, fmt: str, folders: list[str]) -> list[str]:
    """The files of one (format, split, shard) unit; all present means the unit is done."""
    if fmt == "imagefolder":
        return [imagefolder_file(part.name, folders[part.labels[i]], part.ids[i]) for i in range(start, end)]
    if fmt == "huggingface":
        return [hf_file(part.name, shard, shards)]
    return [wds_file(part.name, shard)]


def plan_units(parts: list[Part], formats: Sequence[str], shard_size: int, folders: list[str], present: set[str]) -> tuple[list[dict], int]:
    """The work: one spec per (split, shard) with the formats still missing there; and how many units are done."""
    specs, done = [], 0
    for part in parts:
        shards = part.shards(shard_size)
        for k, (start, end) in enumerate(shards):
            todo = []
            for fmt in formats:
                if all(f in present for f in unit_files(part, start, end, k, len(shards), fmt, folders)):
                    done += 1
                else:
                    todo.append(fmt)
            if todo:
                specs.append({
                    "table": part.table, "name": part.name, "shard": k, "shards": len(shards), "formats": todo,
                    "positions": part.positions[start:end], "full": part.full[start:end] if part.full else [],
                    "folders": folders,
                })  # fmt: skip
    return specs, done


# --------------------------------------------------------------------------------------------
# One unit: read a shard's rows, write its files (the same code in the driver and in Ray tasks)
# --------------------------------------------------------------------------------------------


def read_rows(storage: Storage, key: str, positions: Sequence[int]) -> pa.Table:
    """The rows at ``positions`` (ascending) of a stored split table, read a batch at a time."""
    out: list[pa.RecordBatch] = []
    start = taken = 0
    with storage.open_read(key) as f:
        # buffer_size: pages stream in; the whole image column is never held at once.
        pf = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        for batch in pf.iter_batches(batch_size=READ_BATCH, columns=ROW_COLUMNS):
            end = start + batch.num_rows
            upto = bisect.bisect_left(positions, end, lo=taken)
            if upto > taken:
                out.append(batch.take(pa.array([p - start for p in positions[taken:upto]], pa.int64())))
                taken = upto
            start = end
            if taken == len(positions):
                break
    if taken != len(positions):
        raise ConfigError(f"{storage.uri(key)} changed under the export (it has {start} rows). Fix: rerun the export")
    return pa.Table.from_batches(out) if out else pa.table({c: [] for c in ROW_COLUMNS})


def hf_parquet(rows: pa.Table, stems: list[str], classes: Sequence[str]) -> bytes:
    """One Hugging Face data file: :data:`HF_SCHEMA` with the ``datasets`` features in its metadata."""
    images = pa.StructArray.from_arrays(
        [rows.column("image").combine_chunks().cast(pa.binary()), pa.array([f"{s}.png" for s in stems], pa.string())],
        fields=list(HF_SCHEMA.field("image").type),
    )
    table = pa.table(
        [rows.column("id"), images, rows.column("label").cast(pa.int64()), rows.column("technique"), rows.column("accepted"),
         rows.column("source")],
        schema=HF_SCHEMA,
    )  # fmt: skip
    meta = {b"huggingface": json.dumps({"info": {"features": hf_features(classes)}}).encode()}
    return parquet_bytes(table.replace_schema_metadata(meta))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: a rewrite gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def wds_tar(rows: pa.Table, stems: list[str]) -> bytes:
    """One WebDataset shard: ``<key>.png``, ``<key>.json`` and ``<key>.cls`` per sample, in id order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row, stem in zip(rows.to_pylist(), stems):
            meta = {k: row[k] for k in ("id", "label", "class_name", "technique", "accepted", "source")}
            _tar_add(tar, f"{stem}.png", row["image"])
            _tar_add(tar, f"{stem}.json", json.dumps(meta, sort_keys=True).encode())
            _tar_add(tar, f"{stem}.cls", str(row["label"]).encode())
    return buf.getvalue()


def write_unit(storage: Storage, dest: Storage, spec: dict, classes: Sequence[str]) -> dict:
    """Write every missing format of one (split, shard): each file atomically, at its fixed key."""
    start = time.perf_counter()
    rows = read_rows(storage, spec["table"], spec["positions"])
    if spec["full"]:
        # The image stage's full-size PNG where it kept one; the stored dataset-size one otherwise.
        images = [storage.read_bytes(k) if k else b for k, b in zip(spec["full"], rows.column("image").to_pylist())]
        rows = rows.set_column(rows.column_names.index("image"), "image", pa.array(images, pa.binary()))
    ids = rows.column("id").to_pylist()
    stems = [file_stem(i) for i in ids]
    written = 0
    for fmt in spec["formats"]:
        if fmt == "imagefolder":
            labels = rows.column("label").to_pylist()
            for image_id, label, png in zip(ids, labels, rows.column("image").to_pylist()):
                dest.write_bytes(imagefolder_file(spec["name"], spec["folders"][label], image_id), png)
                written += len(png)
        elif fmt == "huggingface":
            data = hf_parquet(rows, stems, classes)
            dest.write_bytes(hf_file(spec["name"], spec["shard"], spec["shards"]), data)
            written += len(data)
        else:
            data = wds_tar(rows, stems)
            dest.write_bytes(wds_file(spec["name"], spec["shard"]), data)
            written += len(data)
    return {"name": spec["name"], "shard": spec["shard"], "images": len(ids), "bytes": written, "seconds": time.perf_counter() - start}


def _write_batch(batch: dict, storage: Storage, dest: Storage, classes: list[str]) -> dict:
    """Ray Data task: one unit spec (JSON text) -> its result row."""
    import numpy as np

    results = [write_unit(storage, dest, json.loads(s), classes) for s in batch["spec"]]
    return {k: np.array([r[k] for r in results]) for k in ("name", "shard", "images", "bytes", "seconds")}


def _write_with_ray(cfg: Config, storage: Storage, dest: Storage, specs: list[dict], classes: list[str]) -> Iterator[dict]:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [TRANSIENT_MARK]
    context.max_map_retries = 3
    # One block and one task per unit; the specs hold row positions and keys, never images.
    items = [{"spec": json.dumps(s)} for s in specs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _write_batch,
        fn_args=(storage, dest, classes),
        batch_size=1,
        concurrency=min(cfg.export.num_workers, len(items)),
        num_cpus=1,
    )
    return ds.iter_rows()


# --------------------------------------------------------------------------------------------
# The dataset card
# --------------------------------------------------------------------------------------------


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` examples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")]
    return next((name for bound, name in bounds if n < bound), "10M<n<100M")


def _provenance(storage: Storage, run: str) -> dict:
    """What the run's stages recorded: plans and summaries (None where a stage did not run)."""
    layout = Layout(run)
    read = storage.read_json_or_none
    return {
        "generate_plan": read(layout.plan("generate")),
        "derive_plan": read(layout.plan("derive")),
        "prompts": read(layout.summary("prompts")),
        "curate": read(layout.summary("curate")),
        "dataset": read(layout.summary("dataset")),
    }


def _n(value) -> str:
    """A count as the card prints it: ``12,000``, or ``?`` when a summary lacks it."""
    return f"{value:,}" if isinstance(value, int) else "?"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def dataset_card(cfg: Config, storage: Storage, parts: list[Part], classes: list[str], sizes: dict[str, int],
                 per_class: dict[str, dict[str, int]]) -> str:
    """``README.md`` of the Hugging Face export: YAML metadata and how the set was made."""
    import yaml

    from synth.runtime import code_version

    e = cfg.export
    total = sum(len(p.ids) for p in parts)
    meta = {
        "license": e.license,
        "task_categories": ["image-classification"],
        "size_categories": [size_category(total)],
        "pretty_name": f"synth {cfg.run}",
        "tags": ["synthetic", "synth"],
        "dataset_info": {
            "features": [
                {"name": "id", "dtype": "string"},
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): c for i, c in enumerate(classes)}}}},
                {"name": "technique", "dtype": "string"},
                {"name": "accepted", "dtype": "bool"},
                {"name": "source", "dtype": "string"},
            ],
            "splits": [
                {
                    "name": p.name,
                    "num_bytes": sum(n for k, n in sizes.items() if k.startswith(f"huggingface/data/{p.name}-")),
                    "num_examples": len(p.ids),
                }
                for p in parts
            ],
        },
        "configs": [
            {"config_name": "default", "data_files": [{"split": p.name, "path": f"data/{p.name}-*"} for p in parts]}
        ],
    }
    prov = _provenance(storage, cfg.run)
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# synth run `{cfg.run}`", ""]
    out.append(
        f"{total:,} labelled images of {len(classes)} classes ({', '.join(classes)}), made by "
        "synth (text-to-image generation, image variations and edits, CLIP curation) "
        f"and exported from `{storage.uri(cfg.run)}`."
    )
    out += ["", "## How it was made", ""]
    made = False
    for stage in ("generate", "derive"):
        plan = prov[f"{stage}_plan"]
        if plan:
            made = True
            extra = f" with prior `{plan['prior']}`" if plan.get("prior") else ""
            out.append(
                f"- **{stage}**: model `{plan.get('model')}`{extra} (generator `{plan.get('generator')}`), "
                f"{plan.get('steps')} steps, guidance {plan.get('guidance_scale')}, {plan.get('width')}x{plan.get('height')} px "
                f"resized to {plan.get('image_size')} px, {plan.get('dtype')}; {_n(plan.get('images'))} images planned."
            )
    if not made:
        out.append("- No generate or derive plan is stored for this run: the tables were made outside synth's image stages.")
    prompts = prov["prompts"]
    if prompts and prompts.get("techniques"):
        n = sum(prompts["techniques"].values()) or 1
        shares = ", ".join(f"{t} {k:,} ({k / n:.0%})" for t, k in sorted(prompts["techniques"].items(), key=lambda tk: (-tk[1], tk[0])))
        out.append(f"- **prompts**: {_n(prompts.get('rows', n))} prompts ({_n(prompts.get('distinct_prompts'))} distinct) by technique: {shares}.")
    out.append(
        "- **seeds**: every prompt row carries its own generation seed, derived from (run, class, index) "
        f"(`synth.prompts.derive_seed`; the prompt table `{storage.uri(Layout(cfg.run).prompts_table)}` lists them)"
        + (f"; splits drawn with dataset seed {prov['dataset']['seed']}" if prov["dataset"] and "seed" in prov["dataset"] else "")
        + "."
    )
    curate = prov["curate"]
    if curate:
        rules = {k: v for k, v in (curate.get("rules") or {}).items() if v not in (None, False)}
        rejected = {k: v for k, v in (curate.get("rejected_by") or {}).items() if v}
        out.append(
            f"- **curation**: CLIP scores (`{curate.get('model')}`, prompt \"{curate.get('prompt')}\") with the filter rules "
            f"{json.dumps(rules) if rules else '(none)'}: {_n(curate.get('accepted'))} of {_n(curate.get('scored'))} "
            f"accepted" + (f"; rejected by rule {json.dumps(rejected)}" if rejected else "") + "."
        )
    else:
        out.append("- **curation**: the curate stage did not run; `accepted` is null.")
    syn = ((prov["dataset"] or {}).get("domains") or {}).get("synthetic") or {}
    if syn.get("curation"):
        c = syn["curation"]
        out.append(
            f"- **review**: {_n(c.get('decisions_applied'))} review decisions applied "
            f"({_n(c.get('relabelled'))} relabels) to the curate verdicts before this dataset was built."
        )
    sel = [f"curation `{e.curation}`"] + ([f"techniques {e.techniques}"] if e.techniques else ["every technique"])
    if e.full_resolution:
        sel.append("full-resolution images where the image stage kept them")
    out.append(f"- **selection for this export**: {', '.join(sel)}.")
    dataset_version = (prov["dataset"] or {}).get("code_version")
    out.append(f"- **code version**: exported by synth `{code_version()}`" + (f"; dataset built by `{dataset_version}`." if dataset_version else "."))
    if any(p.domain == "real" for p in parts):
        out += ["", "**Real photographs** (`real_*` splits) are the source dataset's images under the source's own licence, "
                "not this card's; they are included for comparison only."]  # fmt: skip
    if any(p.domain == ADVERSARIAL for p in parts):
        out += ["", "`adversarial_test` holds hostile examples (a class's look on the wrong object), labelled with the class "
                "they imitate: a model's accuracy there is its fooling rate. Never train on it."]  # fmt: skip
    techniques = sorted({t for p in parts for t in p.techniques})
    out += ["", "## Splits and counts", "", "Images per class and split (these counts are the files' own):", ""]
    rows = []
    for name in classes:
        rows.append([name] + [per_class[p.name][name] for p in parts])
    rows.append(["**total**"] + [len(p.ids) for p in parts])
    out.append(_table(["class"] + [p.name for p in parts], rows))
    if len(techniques) > 1 or techniques != [""]:
        out += ["", "Images per technique:", ""]
        out.append(_table(["technique"] + [p.name for p in parts],
                          [[t or "(real)"] + [p.techniques.count(t) for p in parts] for t in techniques]))  # fmt: skip
    out += [
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"<this folder or repo>\")  # PIL images, ClassLabel labels",
        "```",
        "",
        "Columns: `id`, `image`, `label` (class index into the names above), `technique` (how the image was made; "
        "empty for real photographs), `accepted` (the curate verdict after review; null when not curated), "
        "`source` (where synth stored it).",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def export_dest(cfg: Config, storage: Storage) -> Storage:
    """The destination as a Storage: ``export.dest``, or ``<storage.root>/<run>/export``."""
    root = cfg.export.dest or storage.uri(Layout(cfg.run).stage(STAGE))
    return Storage(root, cfg.storage.s3_endpoint_url, cfg.storage.s3_region, cfg.storage.retry_seconds)


def run_export(cfg: Config, storage: Optional[Storage] = None, after_unit: Optional[Callable[[dict], None]] = None) -> dict:
    """Export (or finish exporting) the run's splits to ``export.dest``; returns the summary.

    ``after_unit(result)`` is called on the driver after each finished (split, shard): the tests
    stop an export there to check that a rerun completes it.
    """
    from synth.runtime import write_stage_config, write_stage_summary

    start = time.perf_counter()
    e = cfg.export
    storage = storage or Storage.from_config(cfg.storage)
    dest = export_dest(cfg, storage)

    # 1. Fail fast: both storages, the selection (small columns only), the plan's claim.
    storage.check_writable()
    dest.check_writable()
    parts, classes, notes = select(cfg, storage)
    plan = plan_for(cfg, storage, parts, classes)
    claimed = claim_plan(dest, plan)
    write_stage_config(storage, cfg, STAGE)
    removed = dest.remove_partials("")

    # 2. What is already there: complete units are skipped.
    folders = class_folders(classes)
    formats = [f for f in ("imagefolder", "huggingface", "webdataset") if f in e.formats]
    present = set(dest.list(""))
    specs, done = plan_units(parts, formats, e.shard_size, folders, present)
    total = sum(len(p.ids) for p in parts)
    todo_images = sum(len(s["positions"]) for s in specs)
    say(STAGE, f"{total:,} images in {len(parts)} splits ({', '.join(p.name for p in parts)}) as {', '.join(formats)} -> "
        f"{dest.uri()}: {done} units stored, {len(specs)} shards to write ({todo_images:,} images)")  # fmt: skip

    # 3. The units: in this process for small sets, else a Ray Data job; the same write_unit.
    in_process = todo_images <= e.in_process_max_images
    if not in_process:
        from synth.runtime import init_ray

        init_ray(cfg.ray)  # before the clock: images/s is the writing's
    tick, written, results = time.perf_counter(), 0, []
    stream = (write_unit(storage, dest, s, classes) for s in specs) if in_process else _write_with_ray(cfg, storage, dest, specs, classes)
    for result in stream:
        result = {k: (v.item() if hasattr(v, "item") else v) for k, v in result.items()}
        results.append(result)
        written += int(result["images"])
        say(STAGE, rate(written, todo_images, time.perf_counter() - tick, "images"), progress=True)
        if after_unit is not None:
            after_unit(result)
    seconds = time.perf_counter() - tick

    # 4. Check: every unit's files are there, then the small files that describe them.
    sizes = dest.sizes("")
    missing_specs, _ = plan_units(parts, formats, e.shard_size, folders, set(sizes))
    if missing_specs:
        raise StorageError(
            f"{plural(len(missing_specs), 'shard')} of the export are still missing under {dest.uri()} after writing "
            f"(e.g. {missing_specs[0]['name']} shard {missing_specs[0]['shard']}): something else deletes there. "
            "Fix: stop whatever writes there, then rerun the same command (it writes only what is missing)"
        )
    empty_folders = []
    if "imagefolder" in formats:
        for p in parts:
            held = set(p.labels)
            empty_folders += [f"imagefolder/{p.name}/{folders[y]}/{EMPTY_MARK}" for y in range(len(classes)) if y not in held]
        for key in empty_folders:
            dest.write_bytes(key, b"")
        dest.write_json(CLASSES_KEY, {"classes": classes, "class_to_idx": {f: i for i, f in enumerate(folders)}})
    per_class = {p.name: {c: sum(1 for y in p.labels if y == i) for i, c in enumerate(classes)} for p in parts}
    if "huggingface" in formats:
        dest.write_text(CARD_KEY, dataset_card(cfg, storage, parts, classes, sizes, per_class))

    summary = {
        "dest": dest.uri(),
        "formats": formats,
        "plan_claimed_now": claimed,
        "images": {p.name: len(p.ids) for p in parts},
        "per_class": per_class,
        "images_total": total,
        "units_already_stored": done,
        "shards_written": len(results),
        "images_written": written,
        "write_seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 1) if seconds > 0 and written else None,
        "mode": "in-process" if in_process else "ray",
        "empty_class_folders": len(empty_folders),
        "partial_writes_removed": removed,
        **notes,
    }
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    say(STAGE, f"{total:,} images ({', '.join(f'{p.name} {len(p.ids):,}' for p in parts)}) as {', '.join(formats)} in "
        f"{dest.uri()} ({written:,} written now, {summary['wall_seconds']:.1f} s)")  # fmt: skip
    return write_stage_summary(storage, cfg, STAGE, summary)
