"""One exactly-once image job for every kind of image making: text-to-image, variations, fusion, inpainting.

A job is an input table cut into fixed shards, a plan, and a maker that turns one shard's rows
into images. The generate stage (text-to-image: one row per prompt) and the derive stage (one
row per child image, naming its parents) are this job with different rows and makers.

Exactly-once design. Ray retries crashed work (at-least-once) and Ray Data's own writers append
under fresh names, so a job never relies on either for correctness:

1. ``<run>/<stage>/plan.json`` pins everything the images depend on. It is claimed atomically
   (:meth:`synth.storage.Storage.create`): of two drivers starting together with different
   plans, exactly one proceeds and the other is refused; a rerun with another plan is refused
   rather than mixing two datasets under one run name.
2. The input rows, sorted by id, are cut into fixed **shards**. Shard ``k`` always holds the same
   ids and is stored at the same key, ``<run>/<stage>/shards/shard-0000k.parquet``, claimed
   atomically, and carries the plan's hash and a checksum of its content (:mod:`synth.shards`).
3. A run (or rerun) reads and checks every stored shard: intact ones are kept, corrupt ones
   (unreadable, truncated, a wrong checksum, another shard's copy) are moved to
   ``<run>/quarantine/<stage>/`` and made again, shards of another plan stop the run, stray names
   are reported and ignored. Only the missing or bad shards go to Ray Data: one dataset row per
   shard -> :class:`ShardMaker` actors (the model loads once per actor; a shard another driver
   stored meanwhile is skipped) -> :func:`write_shards` tasks (PNG encoding and the claim, on
   CPUs, off the GPU's path). A retried shard finds its own bytes already there, so retries
   cannot duplicate.
4. After making, the shards are checked again (a shard deleted or damaged mid-run is made
   again, up to :data:`MAX_PASSES` passes); then the manifest is built from the checked shards,
   listing every planned id exactly once.
"""

from __future__ import annotations

import importlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa

from synth.config import Config, ConfigError, GenerateConfig, class_slug
from synth.images import GeneratedImages, encode_png
from synth.progress import plural, rate, say
from synth.shards import MANIFEST_COLUMNS, META_PLAN, SHARD_COLUMNS, check_shard, plan_sha256, shard_number, shard_table
from synth.storage import TRANSIENT_MARK, Layout, Storage, StorageError, parquet_bytes, quarantine

MAX_PASSES = 3  # passes over missing or bad shards before the job gives up
WRITTEN, PRESENT, BAD = "written", "present", "bad"  # what write_shards found for each shard
# The stages whose manifests and shards hold a run's synthetic images: text-to-image, then images
# made from parent images (read by curate, dataset and export).
IMAGE_STAGES = ("generate", "derive")


class MakerSpec(Protocol):
    """A picklable description of how to make images; built once per Ray actor.

    ``build()`` loads the model(s) and returns a function from one batch of input rows (at most
    ``generate.batch_size`` of them) to their images, each a function of its own row only.
    """

    def build(self) -> Callable[[list[dict]], GeneratedImages]: ...


@dataclass
class ImageJob:
    """What one image-making stage hands the shared machinery."""

    stage: str  # storage prefix under the run, and the name in progress lines: generate | derive
    run: str
    shards: list[list[dict]]  # the input rows of each shard (fixed by the plan), sorted by id
    plan: dict  # everything the images depend on; claimed in <run>/<stage>/plan.json
    model: str  # what the manifest's model column records
    maker: MakerSpec
    g: GenerateConfig  # batch size, actor pool, GPUs per actor

    @property
    def ids(self) -> list[list[str]]:
        return [[r["id"] for r in rows] for rows in self.shards]

    @property
    def images(self) -> int:
        return sum(len(rows) for rows in self.shards)


@dataclass
class JobResult:
    manifest: pa.Table
    stats: dict = field(default_factory=dict)  # the summary fields every image stage shares


def cut_shards(rows: list[dict], shard_size: int) -> list[list[dict]]:
    """Rows of each shard: sorted by id, cut every ``shard_size`` rows."""
    rows = sorted(rows, key=lambda r: r["id"])
    return [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]


def import_class(spec: str, key: str, registry: dict[str, Callable[[], type]], members: Sequence[str], contract: str) -> type:
    """The class config ``key`` names: a key of ``registry`` (name -> loader) or ``package.module:ClassName`` with ``members``.

    Imports the module of a path, so calling it on the driver before Ray starts turns a typo or a
    missing package into a :class:`ConfigError` that names the fix instead of a failed actor.
    """
    if spec in registry:
        return registry[spec]()  # a zero-argument loader: heavy imports wait until a stage needs them
    registered = ", ".join(registry)
    module_name, sep, class_name = spec.partition(":")
    if not sep:
        raise ConfigError(f"{key}={spec!r} is not registered. Fix: choose one of {registered}, or give a class as package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{key}={spec!r} cannot be imported ({exc}). Fix: install the package that holds it or "
            f"put its folder on PYTHONPATH (on a cluster, ship it with the job's working_dir), "
            f"or choose a registered one ({registered})"
        ) from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no attribute {class_name!r}. Fix: correct the class name after the ':'")
    missing = [m for m in members if not hasattr(cls, m)]
    if not isinstance(cls, type) or missing:
        what = f"lacks {', '.join(missing)}" if isinstance(cls, type) else f"is a {type(cls).__name__}, not a class"
        raise ConfigError(f"{key}={spec!r} {what}. Fix: give a class with {contract}")
    return cls


# --------------------------------------------------------------------------------------------
# Ray Data stages: one row per shard
# --------------------------------------------------------------------------------------------


class ShardMaker:
    """Ray Data callable class: the maker loads once per actor in ``__init__``."""

    def __init__(self, maker: MakerSpec, storage: Storage, run: str, stage: str, batch_size: int):
        self.storage, self.layout, self.stage, self.batch_size = storage, Layout(run), stage, batch_size
        self.make = maker.build()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("shard", "rows", "pixels", "full_pixels", "generate_seconds")}
        for shard, rows_json in zip(batch["shard"], batch["rows"]):
            start = time.perf_counter()
            smalls, fulls = [], []
            # A concurrent driver with the same plan may have stored it meanwhile: the writer checks it.
            if not self.storage.exists(self.layout.shard(self.stage, int(shard))):
                rows = json.loads(rows_json)
                for i in range(0, len(rows), self.batch_size):
                    images = self.make(rows[i : i + self.batch_size])
                    smalls.append(images.small)
                    if images.full is not None:
                        fulls.append(images.full)
            out["shard"].append(int(shard))
            out["rows"].append(rows_json)
            out["pixels"].append(_pack(np.concatenate(smalls)) if smalls else b"")
            out["full_pixels"].append(_pack(np.concatenate(fulls)) if fulls else b"")
            out["generate_seconds"].append(time.perf_counter() - start)
        return {
            "shard": np.array(out["shard"], dtype=np.int64),
            "rows": np.array(out["rows"], dtype=object),
            "pixels": np.array(out["pixels"], dtype=object),
            "full_pixels": np.array(out["full_pixels"], dtype=object),
            "generate_seconds": np.array(out["generate_seconds"], dtype=np.float64),
        }


def _pack(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_shards(
    batch: dict[str, np.ndarray], storage: Storage, run: str, stage: str, model: str, plan: str
) -> dict[str, np.ndarray]:
    """Ray Data task: encode and claim each shard (full-resolution PNGs first).

    Each shard's status: ``written`` (this task stored it), ``present`` (an intact copy of this
    plan's shard was there first: another driver running the same plan, or an earlier attempt of
    this task), ``bad`` (what is there is not this plan's intact shard: the driver's next check
    deals with it). Each shard is ``written`` once, whoever writes it.
    """
    layout = Layout(run)
    statuses, counts = [], []
    for shard, rows, pixels, full in zip(batch["shard"], batch["rows"], batch["pixels"], batch["full_pixels"]):
        rows, shard = json.loads(rows), int(shard)
        key = layout.shard(stage, shard)
        ids = [r["id"] for r in rows]
        if not pixels:  # the actor skipped it: someone stored it meanwhile
            statuses.append(_status_of_stored(storage, key, shard, plan, ids))
            counts.append(len(rows))
            continue
        small = _unpack(pixels)
        if len(small) != len(rows):
            raise RuntimeError(f"{stage} shard {shard}: the maker returned {len(small)} images for {len(rows)} rows")
        if full:
            for row, img in zip(rows, _unpack(full)):
                storage.write_bytes(layout.full_image(stage, class_slug(row["class_name"]), row["id"]), encode_png(img))
        # The shard object is written last: its presence means the whole shard is done.
        table = shard_table(rows, [encode_png(img) for img in small], shard, model, small.shape[1:3], plan)
        data = parquet_bytes(table)
        statuses.append(WRITTEN if storage.create(key, data) else _status_of_stored(storage, key, shard, plan, ids))
        counts.append(len(rows))
    return {
        "shard": batch["shard"],
        "images": np.array(counts, dtype=np.int64),
        "status": np.array(statuses, dtype=object),
        "generate_seconds": batch["generate_seconds"],
    }


def _status_of_stored(storage: Storage, key: str, shard: int, plan: str, ids: list[str], columns: Sequence[str] = SHARD_COLUMNS) -> str:
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return BAD  # gone again: the driver's next check makes it
    return PRESENT if check_shard(data, shard, plan, ids, columns).ok else BAD


def shard_pool(
    todo: list[tuple[int, list[dict]]],
    actor,
    constructor_args: tuple,
    num_actors: int,
    num_gpus: Optional[float],
    *,
    max_actors: Optional[int] = None,
    num_cpus: Optional[float] = None,
):
    """A Ray Data dataset of one row per shard to do (its number and its rows as JSON), mapped by an
    actor pool of ``actor`` (loaded once per actor); the shared part of every sharded stage's Ray job.

    The pool holds ``num_actors`` actors, or autoscales from ``num_actors`` to ``max_actors``; each
    takes ``num_gpus`` GPUs (None: 1 if the cluster has GPUs) and ``num_cpus`` CPUs (None: 1 for a
    CPU actor, 0.5 beside a GPU). Ray sets a CPU actor's torch threads to its CPUs, rounded down.
    """
    import ray
    import ray.data

    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if num_cpus is None:
        num_cpus = 1.0 if num_gpus == 0 else 0.5  # a GPU actor's CPU work is light
    # Storage retries each request for storage.retry_seconds; past that, Ray Data retries the
    # whole map task a few times (a claim makes a repeated write harmless) before the stage fails.
    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [TRANSIENT_MARK]
    context.max_map_retries = 3
    # Rows travel as JSON text: one small string column instead of nested Arrow structs, and never images.
    items = [{"shard": k, "rows": json.dumps(rows)} for k, rows in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    low = min(num_actors, len(items))  # no idle actor for a short todo list
    if max_actors is None:
        pool = ray.data.ActorPoolStrategy(size=low)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=low, max_size=max(low, min(max_actors, len(items))))
    return ds.map_batches(
        actor,
        fn_constructor_args=constructor_args,
        batch_size=1,
        compute=pool,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        # Ray Data restarts a dead actor and resubmits its shard; the shard's fixed key makes
        # the retry harmless.
    )


def run_ray_generation(storage: Storage, job: ImageJob, todo: list[tuple[int, list[dict]]], plan: str) -> Iterator[dict]:
    """Make and write the given shards with Ray Data; yields one small result row per shard as it lands."""
    g = job.g
    ds = shard_pool(
        todo, ShardMaker, (job.maker, storage, job.run, job.stage, g.batch_size), g.num_actors, g.num_gpus_per_actor,
        max_actors=g.max_actors, num_cpus=g.cpus_per_actor,
    )  # fmt: skip
    ds = ds.map_batches(
        write_shards,
        fn_kwargs={"storage": storage, "run": job.run, "stage": job.stage, "model": job.model, "plan": plan},
        batch_size=1,
        num_cpus=0.5,
        concurrency=g.writer_concurrency,  # None: as many tasks as Ray Data schedules
    )
    yield from rows_as_they_land(ds)


def rows_as_they_land(ds) -> Iterator[dict]:
    """A Ray Dataset's rows, each as soon as its block is done.

    Not ``iter_rows``: it prefetches a block, so a shard's row would come only once the next shard
    is done too, and progress and timings would lag a shard behind.
    """
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


# --------------------------------------------------------------------------------------------
# Driver: claim, check, make, check again, manifest
# --------------------------------------------------------------------------------------------


def existing_shards(storage: Storage, layout: Layout, stage: str = "generate") -> set[int]:
    """The shard numbers stored under their own names (unchecked: for watching a run)."""
    names = (key.rsplit("/", 1)[-1] for key in storage.list(layout.shards(stage)))
    return {k for k in map(shard_number, names) if k is not None}


@dataclass
class ShardScan:
    """What is stored under ``shards/``, checked against the plan (see :func:`scan_shards`)."""

    good: dict[int, pa.Table]  # the manifest columns of each intact shard of this plan
    sizes: dict[int, int]  # the stored size of each good shard, to trust it unread in the next scan
    missing: list[int]
    corrupt: dict[int, str]  # shard -> why
    foreign: dict[int, str]  # shard -> which plan made it
    stray: list[str]  # keys under shards/ that no plan writes (other names, shards beyond the plan)

    @property
    def todo(self) -> list[int]:
        return sorted(self.missing + list(self.corrupt))


def scan_shards(
    storage: Storage,
    layout: Layout,
    ids: Sequence[Sequence[str]],
    plan: str,
    known: Optional[ShardScan] = None,
    stage: str = "generate",
    columns: Sequence[str] = SHARD_COLUMNS,
    keep: Sequence[str] = MANIFEST_COLUMNS,
) -> ShardScan:
    """Read and check every stored shard of ``stage`` (``ids[k]``: the ids shard k must hold, in order).

    A shard ``known`` found good, and still stored with the same size, is not read again.
    ``columns``: what a shard of this kind stores (its checksum's columns); ``keep``: the columns
    of each good shard kept for the manifest (image shards by default; see :mod:`synth.curate`).
    """
    prefix = layout.shards(stage)
    sizes: dict[int, int] = {}
    stray = []
    for key, size in storage.sizes(prefix).items():
        k = shard_number(key[len(prefix) + 1 :])
        if k is None or k >= len(ids):
            stray.append(key)
        else:
            sizes[k] = size
    scan = ShardScan({}, {}, [k for k in range(len(ids)) if k not in sizes], {}, {}, sorted(stray))
    unread = []
    for k, size in sorted(sizes.items()):
        if known is not None and k in known.good and known.sizes.get(k) == size:
            scan.good[k], scan.sizes[k] = known.good[k], size
        else:
            unread.append(k)

    def check(k: int):
        try:
            data = storage.read_bytes(layout.shard(stage, k))
        except FileNotFoundError:  # deleted since the listing
            return k, None, None
        return k, check_shard(data, k, plan, ids[k], columns), len(data)

    with ThreadPoolExecutor(max_workers=16) as pool:
        for k, result, size in pool.map(check, unread):
            if result is None:
                scan.missing.append(k)
            elif result.ok:
                scan.good[k], scan.sizes[k] = result.table.select(list(keep)), size
            elif result.status == "foreign":
                scan.foreign[k] = result.reason
            else:
                scan.corrupt[k] = result.reason
    scan.missing.sort()
    return scan


def claim_plan(storage: Storage, layout: Layout, plan: dict, stage: str = "generate") -> None:
    """Claim the stage of the run for ``plan`` (atomically), or check that the plan that claimed it is the same."""
    key = layout.plan(stage)
    if storage.create_json(key, plan):
        return
    stored = storage.read_json_or_none(key)
    if not isinstance(stored, dict):
        raise ConfigError(
            f"{storage.uri(key)} is unreadable. Fix: delete it and rerun (each shard records "
            "the plan that made it, so no mixing can follow), or choose a new run name (run=...)"
        )
    changed = sorted(k for k in set(plan) | set(stored) if plan.get(k) != stored.get(k))
    if changed:
        details = ", ".join(f"{k}: stored {_short(stored.get(k))} vs now {_short(plan.get(k))}" for k in changed)
        raise ConfigError(
            f"run {layout.run!r} already holds {stage} images made with a different plan ({details}). "
            f"Fix: choose a new run name (run=...) or delete {storage.uri(layout.stage(stage))}"
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_manifest(scan: ShardScan, expected_ids: Sequence[str], plan: str) -> pa.Table:
    """The checked shards' metadata, sorted by id: every planned id exactly once."""
    manifest = pa.concat_tables([scan.good[k] for k in sorted(scan.good)]).sort_by("id")
    ids = manifest.column("id").to_pylist()
    if ids != sorted(expected_ids):
        dupes = len(ids) - len(set(ids))
        missing = len(set(expected_ids) - set(ids))
        extra = len(set(ids) - set(expected_ids))
        raise RuntimeError(f"shards disagree with the plan: {dupes} duplicate, {missing} missing, {extra} unexpected ids")
    return manifest.replace_schema_metadata({META_PLAN: plan.encode()})


def run_image_job(storage: Storage, cfg: Config, job: ImageJob) -> JobResult:
    """Claim the plan, record the stage's config, check what is stored, make what is missing or bad,
    check again, write the manifest."""
    from synth.runtime import init_ray, write_stage_config

    stage, layout = job.stage, Layout(job.run)
    claim_plan(storage, layout, job.plan, stage)
    write_stage_config(storage, cfg, stage)  # after the claim: a driver with another plan stops before touching it
    plan_hash = plan_sha256(job.plan)
    removed = storage.remove_partials(layout.stage(stage))

    ids = job.ids
    scan = scan_shards(storage, layout, ids, plan_hash, stage=stage)
    stored_at_start = len(scan.good)
    if scan.stray:
        names = ", ".join(k.rsplit("/", 1)[-1] for k in scan.stray[:3])
        say(stage, f"ignoring {plural(len(scan.stray), 'stray object')} under {storage.uri(layout.shards(stage))} ({names}"
            f"{', ...' if len(scan.stray) > 3 else ''}): no plan writes those names")  # fmt: skip
    results: list[dict] = []
    quarantined: list[str] = []
    gen_seconds = 0.0
    for attempt in range(MAX_PASSES + 1):
        _refuse_foreign(storage, layout, scan, stage)
        for k, reason in scan.corrupt.items():
            quarantined.append(quarantine(storage, layout, layout.shard(stage, k), stage))
            say(stage, f"shard {k} is corrupt ({reason}); moved to {storage.uri(quarantined[-1])}, making it again")
        todo = [(k, job.shards[k]) for k in scan.todo]
        if attempt == 0:
            to_make = sum(len(rows) for _, rows in todo)
            say(stage, f"{job.images:,} images in {len(job.shards)} shards with {job.model}: "
                f"{len(scan.good)} shards stored, {len(todo)} to make ({to_make:,} images)")  # fmt: skip
        elif todo:
            say(stage, f"{plural(len(todo), 'shard')} went missing or bad during the run; making them again")
        if not todo:
            break
        if attempt == MAX_PASSES:
            raise StorageError(
                f"after {MAX_PASSES} passes, shards {scan.todo[:5]} under {storage.uri(layout.shards(stage))} are still "
                "missing or bad: something else deletes or overwrites them. Fix: stop whatever writes there, then rerun"
            )
        tick = time.perf_counter()
        init_ray(cfg.ray)  # joins once; a later pass finds Ray up
        results += _make_with_progress(storage, job, todo, plan_hash)
        gen_seconds += time.perf_counter() - tick
        scan = scan_shards(storage, layout, ids, plan_hash, known=scan, stage=stage)

    made = int(sum(r["images"] for r in results if r["status"] == WRITTEN))
    by_other = sum(1 for r in results if r["status"] == PRESENT)
    if by_other:
        say(stage, f"{plural(by_other, 'shard')} already stored when this driver went to write them (another driver "
            "running this run with the same plan, or a retried task); they were checked and kept")  # fmt: skip

    manifest = build_manifest(scan, [i for shard_ids in ids for i in shard_ids], plan_hash)
    storage.write_parquet(layout.manifest(stage), manifest)
    stats = {
        "images_total": manifest.num_rows,
        "shards_total": len(job.shards),
        "shards_already_stored": stored_at_start,
        "shards_generated": sum(1 for r in results if r["status"] == WRITTEN),
        "shards_found_stored_meanwhile": by_other,
        "shards_quarantined": [storage.uri(k) for k in quarantined],
        "stray_objects": [storage.uri(k) for k in scan.stray],
        "images_generated": made,
        "partial_writes_removed": removed,
        "generation_wall_seconds": round(gen_seconds, 3),
        "images_per_second": round(made / gen_seconds, 3) if made else 0.0,
        "actor_generate_seconds": round(float(sum(r["generate_seconds"] for r in results)), 3),
        "manifest": storage.uri(layout.manifest(stage)),
        "plan": job.plan,
        "plan_sha256": plan_hash,
    }
    return JobResult(manifest=manifest, stats=stats)


def _refuse_foreign(storage: Storage, layout: Layout, scan: ShardScan, stage: str) -> None:
    if scan.foreign:
        k, reason = next(iter(sorted(scan.foreign.items())))
        raise ConfigError(
            f"{len(scan.foreign)} shards under {storage.uri(layout.shards(stage))} were made under another plan than "
            f"{storage.uri(layout.plan(stage))} (e.g. shard {k}: {reason}). Fix: choose a new run name (run=...), or "
            "move them aside and remake them with python -m ray_jobs.verify <config> --repair"
        )


def _make_with_progress(storage: Storage, job: ImageJob, todo: list, plan: str) -> list[dict]:
    """One pass of Ray Data over ``todo``; progress lines as shards land."""
    results: list[dict] = []
    to_make = sum(len(rows) for _, rows in todo)
    start = time.perf_counter()
    first: Optional[tuple[int, float]] = None  # (images, time) when the first shard landed: start-up excluded
    made_so_far = 0
    for result in run_ray_generation(storage, job, todo, plan):
        results.append(result)
        made_so_far, now = made_so_far + int(result["images"]), time.perf_counter()
        first = first or (made_so_far, now)
        if made_so_far > first[0]:
            say(job.stage, rate(made_so_far, to_make, now - first[1], "images", since=first[0]), progress=True)
        else:
            say(job.stage, f"{made_so_far:,}/{to_make:,} images (first shard after {now - start:.0f} s of start-up)", progress=True)
    return results
