"""The derive stage: images made from parent images (variations, fusion, inpainting), exactly once.

DALL-E 2's users grew datasets from images as well as from text: many slight **variations** of
one image, **fusions** of two images into one, and realistic **inpainting** edits. This stage
does all three through the generate stage's exactly-once job (:mod:`synth.imagejob`) with
another input table, one row per child naming its parents, and another maker:

1. **Parents**: this run's generated images (``derive.parents=generate``; full resolution where
   the generate stage kept it) or a folder of the user's own photos,
   ``<folder>/<class>/*.png|jpg|jpeg`` (local or ``s3://``; unreadable files are skipped and
   counted, none usable is an error). They are stored once, as ``<run>/derive/parents.parquet``
   (claimed atomically like every plan), so every child points to a parent that exists.
2. **Children**, a pure function of the parents, the config and the run name:
   - variation ``k`` of parent ``p``: id ``<p>-v<k>``, by image-to-image (``strength``, ``steps``)
     or by the prior's CLIP image embedding of the parent (Kandinsky 2.2);
   - fusion ``j`` of a class: id ``<class>-fusion-<j>``, two different parents of the class drawn
     by a seeded RNG, mixed in the prior's embedding space with a seeded weight;
   - inpainting edit ``k`` of parent ``p``: id ``<p>-i<k>``, mask ``masks[k % len(masks)]``
     (:func:`synth.images.inpaint_mask`), an environment drawn per edit into the prompt.
   Seeds come from (run, child id). The technique, the parent ids and the technique's parameters
   are recorded in every shard and in ``<run>/derive/manifest.parquet``.
3. The job: fixed shards of the children, ``plan.json`` claimed atomically, shards checked and
   claimed, a manifest with every child exactly once (see :mod:`synth.imagejob`).

``derive.generator`` picks the class that makes the images: ``diffusers``
(:class:`synth.diffusion.DiffusersDeriver`) or ``package.module:ClassName`` implementing
:class:`Deriver` (the tests use ``synth.testkit:ClassAwareTestDeriver``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from synth.config import HOSTILE, Config, ConfigError, DeriveConfig, GenerateConfig, derive_enabled, class_slug
from synth.images import GeneratedImages, decode_png, encode_png
from synth.imagejob import ImageJob, cut_shards, import_class, run_image_job
from synth.progress import plural, say
from synth.prompts import derive_seed
from synth.shards import META_PLAN, check_shard
from synth.storage import Layout, Storage, parquet_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PARENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("prompt", pa.string()),  # the parent's own prompt; empty for the user's photos
        # Where it came from: a generate shard or full-size image (a key under the storage root, so a
        # run moved to another root still matches its plan), or the user's file (its URI).
        ("source", pa.string()),
        ("image", pa.binary()),  # PNG, RGB, at most the render resolution on its longer side
    ]
)
READ_THREADS = 16


class Deriver(Protocol):
    """What ``derive.generator`` names: a class that makes images from parent images.

    Constructed once per Ray actor as ``Class(derive_cfg, generate_cfg, classes)``; ``derive`` gets
    at most ``generate.batch_size`` rows at a time. Each row is a dict with ``id``, ``label``,
    ``class_name``, ``prompt``, ``negative``, ``seed``, ``technique`` (variation | fusion |
    inpainting), ``parents`` (their ids) and ``params`` (the technique's parameters), and
    ``parents[id]`` is a parent image, (H, W, 3) uint8. Each image must depend on its own row
    only, never on its batch, so a retried shard rewrites the same images.
    """

    needs_model: ClassVar[bool]

    @classmethod
    def model_name(cls, cfg: DeriveConfig) -> str: ...

    def __init__(self, cfg: DeriveConfig, gen: GenerateConfig, classes: Sequence[str]) -> None: ...

    def derive(self, rows: Sequence[dict], parents: Mapping[str, np.ndarray]) -> GeneratedImages: ...


DERIVER_MEMBERS = ("needs_model", "model_name", "derive")


def _diffusers_deriver() -> type:
    from synth.diffusion import DiffusersDeriver

    return DiffusersDeriver


# Names must match synth.config.GENERATOR_NAMES; a loader keeps diffusers out of the driver until used.
DERIVERS: dict[str, Callable[[], type]] = {"diffusers": _diffusers_deriver}


def deriver_class(spec: str) -> type:
    return import_class(
        spec, "derive.generator", DERIVERS, DERIVER_MEMBERS,
        "needs_model, model_name(cfg) and derive(rows, parents), constructed as Class(derive_cfg, generate_cfg, classes) "
        "(see synth.derive.Deriver)",
    )  # fmt: skip


def child_seed(run: str, child_id: str) -> int:
    """A 63-bit seed that depends only on the run and the child's id (which names its parent and k):
    the prompt table's seed function, with ``derive`` in the place of a class."""
    return derive_seed(run, "derive", child_id)


def _rng(run: str, *context: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join([run, "derive", *map(str, context)]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# --------------------------------------------------------------------------------------------
# Parents
# --------------------------------------------------------------------------------------------


@dataclass
class ParentScan:
    table: pa.Table  # PARENT_SCHEMA, sorted by id
    skipped: dict[str, list[str]]  # class -> files that could not be read as images
    ignored: list[str]  # folders or files that name no configured class


def _square_png(img, max_side: int) -> bytes:
    """Centre-crop to a square, shrink to at most ``max_side``, as PNG (RGB)."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s > max_side:
        img = img.resize((max_side, max_side), Image.Resampling.BICUBIC)
    return encode_png(np.asarray(img))


def _decode_photo(data: bytes, max_side: int) -> Optional[bytes]:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return _square_png(rgb, max_side)


def _file_id(class_name: str, name: str) -> str:
    """The parent id of a user's file: class and file name, id-safe ('oil-painting-img-001-jpg')."""
    return f"{class_slug(class_name)}-{class_slug(name)}"


def folder_parents(cfg: Config, storage_cfg) -> ParentScan:
    """The user's photos under ``derive.parents``: ``<folder>/<class>/*.png|jpg|jpeg``, local or s3."""
    from synth.storage import Storage

    folder = cfg.derive.parents
    reader = Storage(folder, storage_cfg.s3_endpoint_url, storage_cfg.s3_region, storage_cfg.retry_seconds)
    by_slug = {class_slug(c): (label, c) for label, c in enumerate(cfg.prompts.classes)}
    try:
        keys = [k for k in reader.list("") if not k.rsplit("/", 1)[-1].startswith(".")]
    except FileNotFoundError:
        keys = []
    files: list[tuple[str, int, str]] = []  # (key, label, class_name)
    ignored: list[str] = []
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) == 2 and parts[0] and class_slug(parts[0]) in by_slug and parts[1].lower().endswith(IMAGE_SUFFIXES):
            label, name = by_slug[class_slug(parts[0])]
            files.append((key, label, name))
        else:
            ignored.append(key)
    if not files and "://" not in folder and not Path(folder).expanduser().is_dir():
        raise ConfigError(f"derive.parents={folder!r} is not a folder. Fix: give <folder> holding <folder>/<class>/*.png|jpg, or generate")
    if not files:
        raise ConfigError(
            f"derive.parents={folder!r} holds no images in class folders (expected <folder>/<class>/*.png|jpg|jpeg with "
            f"<class> one of {list(cfg.prompts.classes)}; found {plural(len(keys), 'file')}). Fix: put the photos in one "
            "folder per class named like prompts.classes, or use derive.parents=generate"
        )
    max_side = max(cfg.generate.height, cfg.generate.width)

    def load(item):
        key, label, name = item
        try:
            data = reader.read_bytes(key)
        except OSError:
            return item, None
        return item, _decode_photo(data, max_side)

    columns: dict[str, list] = {n: [] for n in PARENT_SCHEMA.names}
    skipped: dict[str, list[str]] = defaultdict(list)
    seen: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for (key, label, name), png in pool.map(load, files):
            if png is None:
                skipped[name].append(reader.uri(key))
                continue
            pid = _file_id(name, key.split("/", 1)[1])
            if pid in seen:
                raise ConfigError(
                    f"derive.parents: {reader.uri(key)} and {seen[pid]} give the same parent id {pid!r}. Fix: rename one"
                )
            seen[pid] = reader.uri(key)
            for column, value in (("id", pid), ("label", label), ("class_name", name), ("prompt", ""),
                                  ("source", reader.uri(key)), ("image", png)):  # fmt: skip
                columns[column].append(value)
    if not columns["id"]:
        raise ConfigError(
            f"derive.parents={folder!r}: none of its {plural(len(files), 'image file')} could be read as an image "
            f"(e.g. {next(iter(skipped.values()))[0]}). Fix: give PNG or JPEG photos"
        )
    table = choose_parents(pa.table(columns, schema=PARENT_SCHEMA).sort_by("id"), cfg)  # among the readable ones
    return ParentScan(table, dict(skipped), ignored)


def generated_parents(cfg: Config, storage: Storage) -> ParentScan:
    """This run's generated images (the generate manifest), full size where the generate stage kept it."""
    layout = Layout(cfg.run)
    if not storage.exists(layout.generate_manifest):
        raise ConfigError(
            f"derive.parents=generate, but run {cfg.run!r} has no generate manifest at "
            f"{storage.uri(layout.generate_manifest)}. Fix: run the generate stage first, or give a folder of "
            "your own photos: derive.parents=<folder>/<class>/*.png"
        )
    manifest = storage.read_parquet(layout.generate_manifest)
    plan = (manifest.schema.metadata or {}).get(META_PLAN, b"").decode()
    plan_json = storage.read_json_or_none(layout.generate_plan) or {}
    full = bool(plan_json.get("keep_full_resolution"))
    ours = {class_slug(c): label for label, c in enumerate(cfg.prompts.classes)}
    # Hostile examples imitate a class without being it: never a parent of the class's images.
    rows = [
        r
        for r in manifest.select(["id", "class_name", "prompt", "shard", "technique"]).to_pylist()
        if class_slug(r["class_name"]) in ours and r["technique"] != HOSTILE
    ]
    # The seeded choice first, so only the chosen parents' images are read.
    chosen = _chosen_ids(_ids_by_class(rows), cfg)
    rows = [r for r in rows if chosen is None or r["id"] in chosen]
    images: dict[str, tuple[str, bytes]] = {}
    max_side = max(cfg.generate.height, cfg.generate.width)
    if not full and rows:
        say("derive", f"the parents are the generate stage's {cfg.generate.image_size} px images (it kept no full-size "
            "copies): children are made from them upscaled. For sharper children, generate with "
            "generate.keep_full_resolution=true")  # fmt: skip
    if full:
        def load(r):
            key = layout.generate_full_image(class_slug(r["class_name"]), r["id"])
            return r["id"], key, _decode_photo(storage.read_bytes(key), max_side)

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for pid, uri, png in pool.map(load, rows):
                images[pid] = (uri, png)
    else:
        ids_of: dict[int, list[str]] = defaultdict(list)
        for r in manifest.select(["id", "shard"]).to_pylist():
            ids_of[int(r["shard"])].append(r["id"])
        wanted = {r["id"] for r in rows}
        for shard in sorted({int(r["shard"]) for r in rows}):
            key = layout.generate_shard(shard)
            check = check_shard(storage.read_bytes(key), shard, plan, ids_of[shard])
            if not check.ok:
                raise ConfigError(
                    f"the generate shard {storage.uri(key)} {check.reason}. Fix: rerun the generate stage for this run"
                )
            for pid, png in zip(check.table.column("id").to_pylist(), check.table.column("image").to_pylist()):
                if pid in wanted:
                    images[pid] = (key, png)
    columns: dict[str, list] = {n: [] for n in PARENT_SCHEMA.names}
    for r in rows:
        uri, png = images[r["id"]]
        for column, value in (("id", r["id"]), ("label", ours[class_slug(r["class_name"])]), ("class_name", r["class_name"]),
                              ("prompt", r["prompt"]), ("source", uri), ("image", png)):  # fmt: skip
            columns[column].append(value)
    return ParentScan(pa.table(columns, schema=PARENT_SCHEMA).sort_by("id"), {}, [])


def choose_parents(table: pa.Table, cfg: Config) -> pa.Table:
    """At most ``derive.parents_per_class`` parents per class, a seeded choice (all when None)."""
    chosen = _chosen_ids(_ids_by_class(table.select(["id", "class_name"]).to_pylist()), cfg)
    return table if chosen is None else table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(chosen))))


def _chosen_ids(ids_by_class: dict[str, list[str]], cfg: Config) -> Optional[set[str]]:
    """The ids :func:`choose_parents` keeps, or None for all of them."""
    n = cfg.derive.parents_per_class
    if n is None:
        return None
    keep: set[str] = set()
    for class_name, ids in ids_by_class.items():
        order = sorted(ids)
        _rng(cfg.run, "parents", class_name).shuffle(order)
        keep.update(order[:n])
    return keep


def _ids_by_class(rows: Sequence[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        out[r["class_name"]].append(r["id"])
    return dict(out)


def claim_parents(storage: Storage, layout: Layout, table: pa.Table, data: bytes) -> None:
    """Store the parent table (``data``: its Parquet bytes) once, atomically; a stored one must be the same."""
    key = layout.derive_parents
    stored, same = storage.claim_table(key, table, data)
    if not stored and not same:  # another table, or an unreadable one
        raise ConfigError(
            f"run {layout.run!r} already derived images from other parents ({storage.uri(key)} differs from the parents "
            f"found now). Fix: choose a new run name (run=...) or delete {storage.uri(layout.stage('derive'))}"
        )


# --------------------------------------------------------------------------------------------
# Children: one input row per image to make
# --------------------------------------------------------------------------------------------


def child_rows(cfg: Config, parents: pa.Table) -> list[dict]:
    """Every child the config asks for, with its parents and parameters (pure: no I/O)."""
    d, run = cfg.derive, cfg.run
    negative = cfg.prompts.negative_prompt
    rows: list[dict] = []

    def add(child_id: str, label: int, class_name: str, prompt: str, technique: str, parent_ids: list[str], params: dict):
        rows.append({"id": child_id, "label": label, "class_name": class_name, "prompt": prompt, "negative": negative,
                     "seed": child_seed(run, child_id), "technique": technique, "parents": parent_ids,
                     "params": params})  # fmt: skip

    parent_rows = parents.select(["id", "label", "class_name", "prompt"]).to_pylist()
    for p in parent_rows:
        prompt = p["prompt"] or d.prompt.format(cls=p["class_name"])
        v = d.variations
        for k in range(v.count):
            params = {"method": v.method} if v.method == "embedding" else {"method": v.method, "strength": v.strength, "steps": v.steps}
            add(f"{p['id']}-v{k}", p["label"], p["class_name"], prompt, "variation", [p["id"]], params)
        ip = d.inpainting
        for k in range(ip.count):
            child = f"{p['id']}-i{k}"
            env = _rng(run, "environment", child).choice(ip.environments)
            params = {"mask": ip.masks[k % len(ip.masks)], "environment": env, "strength": ip.strength, "steps": ip.steps}
            add(child, p["label"], p["class_name"], ip.template.format(cls=p["class_name"], env=env).strip(),
                "inpainting", [p["id"]], params)  # fmt: skip
    f = d.fusion
    if f.per_class > 0:
        label_of = {p["class_name"]: p["label"] for p in parent_rows}
        for class_name, ids in sorted(_ids_by_class(parent_rows).items()):
            if len(ids) < 2:
                continue  # counted by the stage: fusion needs two parents
            ids = sorted(ids)
            for j in range(f.per_class):
                rng = _rng(run, "fusion", class_name, j)
                a, b = rng.sample(ids, 2)
                weight = round(rng.uniform(f.weight_range[0], f.weight_range[1]), 4)
                params = {"weight": weight, "pairing": "two distinct parents of the class, seeded by (run, class, j)"}
                add(f"{class_slug(class_name)}-fusion-{j:05d}", label_of[class_name], class_name,
                    d.prompt.format(cls=class_name), "fusion", [a, b], params)  # fmt: skip
    return rows


def planned(cfg: Config, parents: pa.Table, data: Optional[bytes] = None) -> tuple[list[dict], dict]:
    """The children of ``parents`` and the plan they are made under (``data``: the table's Parquet
    bytes, if already made). The stage and verify both plan through here."""
    rows = child_rows(cfg, parents)
    return rows, plan_for(cfg, hashlib.sha256(data or parquet_bytes(parents)).hexdigest(), rows)


def plan_for(cfg: Config, parents_sha256: str, rows: list[dict]) -> dict:
    """Everything the derived images depend on; a rerun must match it exactly."""
    g, d = cfg.generate, cfg.derive
    digest = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["id"]):
        digest.update(json.dumps([r[k] for k in ("id", "label", "prompt", "negative", "seed", "technique", "parents", "params")],
                                 sort_keys=True).encode())  # fmt: skip
    return {
        "parents_sha256": parents_sha256,
        "children_sha256": digest.hexdigest(),
        "images": len(rows),
        "shard_size": g.shard_size,
        "generator": d.generator,
        "model": deriver_class(d.generator).model_name(d),
        "guidance_scale": g.guidance_scale,
        "steps": g.steps,
        "height": g.height,
        "width": g.width,
        "image_size": g.image_size,
        "dtype": g.dtype,
        "keep_full_resolution": g.keep_full_resolution,
    }


# --------------------------------------------------------------------------------------------
# The maker: a deriver plus the parent images, once per actor
# --------------------------------------------------------------------------------------------


@dataclass
class FromParents:
    """The image job's maker for children: loads the deriver and the parent table once per actor."""

    cfg: DeriveConfig
    gen: GenerateConfig
    classes: list[str]
    storage: Storage
    run: str

    def build(self) -> Callable[[list[dict]], GeneratedImages]:
        deriver = deriver_class(self.cfg.generator)(self.cfg, self.gen, self.classes)
        table = self.storage.read_parquet(Layout(self.run).derive_parents, columns=["id", "image"])
        pngs = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
        decoded: dict[str, np.ndarray] = {}

        def make(rows: list[dict]) -> GeneratedImages:
            for r in rows:
                for pid in r["parents"]:
                    if pid not in decoded:
                        decoded[pid] = decode_png(pngs[pid])
            return deriver.derive(rows, decoded)

        return make


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_derive(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or resume) the derive stage; returns the summary that is also stored."""
    from synth.runtime import write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout = Layout(cfg.run)
    d = cfg.derive
    if not derive_enabled(d):
        raise ConfigError(
            "the derive stage has nothing to make: derive.variations.count, derive.fusion.per_class and "
            "derive.inpainting.count are all 0. Fix: set one, e.g. derive.variations.count=4"
        )

    # 1. Fail fast: deriver, storage, models, parents, plan.
    deriver = deriver_class(d.generator)
    storage.check_writable()
    d_resolved = d
    if deriver.needs_model:
        from synth.diffusion import check_models, resolve_model

        inpaint_model = resolve_model(d.inpainting.model, "derive.inpainting.model") if d.inpainting.model else None
        d_resolved = dataclasses.replace(
            d,
            model=resolve_model(d.model, "derive.model"),
            prior=resolve_model(d.prior, "derive.prior") if d.prior else None,
            inpainting=dataclasses.replace(d.inpainting, model=inpaint_model),
        )
        if d.generator == "diffusers":
            check_models(cfg)
    scan = generated_parents(cfg, storage) if d.parents == "generate" else folder_parents(cfg, cfg.storage)
    parents = scan.table
    for class_name, files in sorted(scan.skipped.items()):
        say("derive", f"{class_name}: skipped {plural(len(files), 'unreadable file')} (e.g. {files[0]})")
    if scan.ignored:
        say("derive", f"ignored {plural(len(scan.ignored), 'file')} outside <class>/ folders of prompts.classes "
            f"(e.g. {scan.ignored[0]})")  # fmt: skip
    per_class_parents = Counter(parents.column("class_name").to_pylist())
    without = [c for c in cfg.prompts.classes if per_class_parents.get(c, 0) == 0]
    if without:
        say("derive", f"no parents for {', '.join(map(repr, without))}: nothing is derived for {'it' if len(without) == 1 else 'them'}")
    no_pair = [c for c, n in sorted(per_class_parents.items()) if n < 2] if d.fusion.per_class else []
    data = parquet_bytes(parents)
    claim_parents(storage, layout, parents, data)
    rows, plan = planned(cfg, parents, data)
    job = ImageJob(
        stage="derive",
        run=cfg.run,
        shards=cut_shards(rows, cfg.generate.shard_size),
        plan=plan,
        model=plan["model"],
        maker=FromParents(d_resolved, cfg.generate, list(cfg.prompts.classes), storage, cfg.run),
        g=cfg.generate,
    )

    # 2. The shared exactly-once job.
    result = run_image_job(storage, cfg, job)
    manifest, stats = result.manifest, result.stats
    techniques = Counter(manifest.column("technique").to_pylist())
    per_class = Counter(manifest.column("class_name").to_pylist())
    summary = {
        "images_total": stats["images_total"],
        "images_per_technique": dict(sorted(techniques.items())),
        "images_per_class": dict(sorted(per_class.items())),
        "parents": storage.uri(layout.derive_parents),
        "parents_source": d.parents,
        "parents_per_class": {c: int(per_class_parents.get(c, 0)) for c in cfg.prompts.classes},
        "parents_skipped_unreadable": {c: len(v) for c, v in sorted(scan.skipped.items())},
        "parents_skipped_files": {c: v for c, v in sorted(scan.skipped.items())},
        "files_ignored": len(scan.ignored),
        "classes_without_parents": without,
        "classes_without_fusion_pair": no_pair,
        **stats,
    }
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    made, gen_seconds = stats["images_generated"], stats["generation_wall_seconds"]
    speed = f", {stats['images_per_second']:.2f} images/s" if made else ""
    shares = ", ".join(f"{n:,} {t}" for t, n in sorted(techniques.items()))
    say("derive", f"{manifest.num_rows:,} images ({shares}) from {plural(parents.num_rows, 'parent')}, {made:,} made now "
        f"in {gen_seconds:.1f} s{speed} -> {stats['manifest']}")  # fmt: skip
    return write_stage_summary(storage, cfg, "derive", summary)
