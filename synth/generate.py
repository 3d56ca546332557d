"""The generate stage: Ray Data maps a text-to-image generator over the prompt table, exactly once.

Exactly-once design. Ray retries crashed work (at-least-once) and Ray Data's own writers append
under fresh names, so this stage never relies on either for correctness:

1. ``plan.json`` pins everything the images depend on. It is claimed atomically
   (:meth:`synth.storage.Storage.create`): of two drivers starting together with different
   plans, exactly one proceeds and the other is refused; a rerun with another plan is refused
   rather than mixing two datasets under one run name. The prompt table is claimed the same way.
2. The prompt table, sorted by id, is cut into fixed **shards** of ``generate.shard_size`` rows.
   Shard ``k`` always holds the same ids and is stored at the same key,
   ``<run>/generate/shards/shard-0000k.parquet``, claimed atomically, and carries the plan's
   hash and a checksum of its content (:mod:`synth.shards`).
3. A run (or rerun) reads and checks every stored shard: intact ones are kept, corrupt ones
   (unreadable, truncated, a wrong checksum, another shard's copy) are moved to
   ``<run>/quarantine/generate/`` and made again, shards of another plan stop the run, stray
   names are reported and ignored. Only the missing or bad shards go to Ray Data: one dataset row
   per shard -> ``ShardGenerator`` actors (the model loads once per actor; a shard another driver
   stored meanwhile is skipped) -> ``write_shards`` tasks (PNG encoding and the claim, on CPUs,
   off the GPU's path). A retried shard finds its own bytes already there, so retries cannot
   duplicate.
4. After generation the shards are checked again (a shard deleted or damaged mid-run is made
   again, up to :data:`MAX_PASSES` passes); then the manifest is written from the checked shards,
   listing every planned id exactly once; then ``summary.json``.

``generate.generator`` picks the class that makes the images (see :class:`Generator`): a name
registered in :data:`GENERATORS` (``"diffusers"``: a pipeline from ``from_pretrained``), or any
class given as ``package.module:ClassName``, as the tests give ``synth.testkit:ClassAwareTestGenerator``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa

from synth.config import Config, ConfigError, GenerateConfig, class_slug
from synth.images import GeneratedImages, encode_png
from synth.progress import plural, rate, say
from synth.shards import MANIFEST_COLUMNS, META_PLAN, check_shard, plan_sha256, shard_number, shard_table
from synth.storage import TRANSIENT_MARK, Layout, Storage, StorageError, parquet_bytes, quarantine

log = logging.getLogger(__name__)

MAX_PASSES = 3  # generation passes over missing or bad shards before the stage gives up
WRITTEN, PRESENT, BAD = "written", "present", "bad"  # what write_shards found for each shard


# --------------------------------------------------------------------------------------------
# Generators: the protocol, the registry, the diffusers one
# --------------------------------------------------------------------------------------------


class Generator(Protocol):
    """What ``generate.generator`` names: a class that turns prompts into images.

    ``ShardGenerator`` constructs it once per Ray actor (load weights in ``__init__``) and calls
    ``generate`` on at most ``generate.batch_size`` prompts at a time. The driver reads the two
    class-level members before Ray starts, without constructing anything.
    """

    # Whether the generator loads ``generate.model``; only then is the model checked loadable
    # (and a local folder made absolute) on the driver before Ray starts.
    needs_model: ClassVar[bool]

    @classmethod
    def model_name(cls, cfg: GenerateConfig) -> str:
        """The model the plan and the manifest's ``model`` column record for these images."""
        ...

    def __init__(self, cfg: GenerateConfig, classes: Sequence[str]) -> None: ...

    def generate(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int]) -> GeneratedImages:
        """One image per prompt, each a function of its own prompt, negative and seed only (not of
        its batch), so a retried shard rewrites the same images."""
        ...


GENERATOR_MEMBERS = ("needs_model", "model_name", "generate")


def resolve_model(model: str) -> str:
    """Check, before Ray starts, that ``model`` can be loaded; returns it unchanged.

    A local folder must hold a ``model_index.json``; a Hugging Face id must be in the local cache
    or the Hub must be reachable.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"generate.model={model!r} is a folder without model_index.json; "
                "point it at a folder written by DiffusionPipeline.save_pretrained"
            )
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"generate.model={model!r} is neither an existing folder nor a Hugging Face id like 'stabilityai/sd-turbo'"
        )
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return model
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
    else:
        try:
            model_info(model, timeout=15)
            return model
        except Exception as exc:  # network errors, 401/404 from the Hub
            reason = f"the Hugging Face Hub could not be reached or refused it ({type(exc).__name__})"
    raise ConfigError(
        f"cannot load generate.model={model!r}: {reason}. Fix: download it where the Hub is reachable "
        "(huggingface-cli download, or DiffusionPipeline.from_pretrained(...).save_pretrained(folder)) "
        "and pass generate.model=<that folder>, or make the Hub reachable from every node"
    )


class DiffusersGenerator:
    """A diffusers text-to-image pipeline, loaded once; the whole image path stays on the device."""

    needs_model = True

    @classmethod
    def model_name(cls, cfg: GenerateConfig) -> str:
        return cfg.model

    def __init__(self, cfg: GenerateConfig, classes: Sequence[str]):
        import torch
        from diffusers import AutoPipelineForText2Image

        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Half precision only where it is fast and supported; CPU inference stays in float32.
        dtype = getattr(torch, cfg.dtype) if self.device.type == "cuda" else torch.float32
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.pipe = AutoPipelineForText2Image.from_pretrained(cfg.model, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        if getattr(self.pipe, "safety_checker", None) is not None:
            self.pipe.safety_checker = None  # 32 px classifier data; the checker blacks out images
        self.pipe.to(self.device)
        if self.device.type == "cuda":
            for name in ("unet", "vae", "transformer"):
                module = getattr(self.pipe, name, None)
                if module is not None:
                    module.to(memory_format=torch.channels_last)

    def generate(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int]) -> GeneratedImages:
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        # One generator per image: an image depends only on its own seed, not on its batch.
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            images = self.pipe(
                prompt=list(prompts),
                # Negative prompts only act through classifier-free guidance (scale > 1).
                negative_prompt=list(negatives) if cfg.guidance_scale > 1.0 else None,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                height=cfg.height,
                width=cfg.width,
                generator=generators,
                output_type="pt",
            ).images  # (B, 3, H, W) in [0, 1], on the device
            images = images.float().clamp_(0, 1)
            small = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
            small_u8 = _to_uint8_hwc(small)
            full_u8 = _to_uint8_hwc(images) if cfg.keep_full_resolution else None
        return GeneratedImages(small=small_u8, full=full_u8)


def _to_uint8_hwc(x) -> np.ndarray:
    import torch

    # (B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, converted on the device
    return (x * 255).round_().to(dtype=torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


# One entry per kind of generator; the names must match synth.config.GENERATOR_NAMES, which
# validates generate.generator without importing this module.
GENERATORS: dict[str, type[Generator]] = {"diffusers": DiffusersGenerator}


def generator_class(spec: str) -> type[Generator]:
    """The class ``generate.generator`` names: a key of :data:`GENERATORS` or ``package.module:ClassName``.

    Imports the module of a path, so calling it on the driver before Ray starts turns a typo or a
    missing package into a :class:`ConfigError` that names the fix instead of a failed actor.
    """
    if spec in GENERATORS:
        return GENERATORS[spec]
    registered = ", ".join(GENERATORS)
    module_name, sep, class_name = spec.partition(":")
    if not sep:
        raise ConfigError(
            f"generate.generator={spec!r} is not a registered generator. "
            f"Fix: choose one of {registered}, or give a class as package.module:ClassName"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"generate.generator={spec!r} cannot be imported ({exc}). Fix: install the package that holds it or "
            f"put its folder on PYTHONPATH (on a cluster, ship it with the job's working_dir), "
            f"or choose a registered generator ({registered})"
        ) from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(
            f"generate.generator={spec!r}: module {module_name!r} has no attribute {class_name!r}. "
            "Fix: correct the class name after the ':'"
        )
    missing = [m for m in GENERATOR_MEMBERS if not hasattr(cls, m)]
    if not isinstance(cls, type) or missing:
        what = f"lacks {', '.join(missing)}" if isinstance(cls, type) else f"is a {type(cls).__name__}, not a class"
        raise ConfigError(
            f"generate.generator={spec!r} {what}. "
            "Fix: give a class with needs_model, model_name(cfg) and generate(prompts, negatives, seeds), "
            "constructed as Class(cfg, classes) (see synth.generate.Generator)"
        )
    return cls


def build_generator(cfg: GenerateConfig, classes: Sequence[str]) -> Generator:
    return generator_class(cfg.generator)(cfg, classes)


def model_name(cfg: GenerateConfig) -> str:
    return generator_class(cfg.generator).model_name(cfg)


# --------------------------------------------------------------------------------------------
# Ray Data stages: one row per shard
# --------------------------------------------------------------------------------------------


class ShardGenerator:
    """Ray Data callable class: the generator loads once per actor in ``__init__``."""

    def __init__(self, cfg: GenerateConfig, classes: Sequence[str], storage: Storage, run: str):
        self.cfg, self.storage, self.layout = cfg, storage, Layout(run)
        self.generator = build_generator(cfg, classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("shard", "rows", "pixels", "full_pixels", "generate_seconds")}
        for shard, rows_json in zip(batch["shard"], batch["rows"]):
            start = time.perf_counter()
            smalls, fulls = [], []
            # A concurrent driver with the same plan may have stored it meanwhile: the writer checks it.
            if not self.storage.exists(self.layout.generate_shard(int(shard))):
                rows = json.loads(rows_json)
                prompts = [r["prompt"] for r in rows]
                negatives = [r["negative"] for r in rows]
                seeds = [r["seed"] for r in rows]
                for i in range(0, len(rows), self.cfg.batch_size):
                    images = self.generator.generate(
                        prompts[i : i + self.cfg.batch_size],
                        negatives[i : i + self.cfg.batch_size],
                        seeds[i : i + self.cfg.batch_size],
                    )
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
    batch: dict[str, np.ndarray], storage: Storage, run: str, cfg: GenerateConfig, plan: str
) -> dict[str, np.ndarray]:
    """Ray Data task: encode and claim each shard (full-resolution PNGs first).

    Each shard's status: ``written`` (this task stored it), ``present`` (an intact copy of this
    plan's shard was there first: another driver running the same plan, or an earlier attempt of
    this task), ``bad`` (what is there is not this plan's intact shard: the driver's next check
    deals with it). Each shard is ``written`` once, whoever writes it.
    """
    layout = Layout(run)
    model = model_name(cfg)
    statuses, counts = [], []
    for shard, rows, pixels, full in zip(batch["shard"], batch["rows"], batch["pixels"], batch["full_pixels"]):
        rows, shard = json.loads(rows), int(shard)
        key = layout.generate_shard(shard)
        ids = [r["id"] for r in rows]
        if not pixels:  # the actor skipped it: someone stored it meanwhile
            statuses.append(_status_of_stored(storage, key, shard, plan, ids))
            counts.append(len(rows))
            continue
        small = _unpack(pixels)
        if len(small) != len(rows):
            raise RuntimeError(f"shard {shard}: generator returned {len(small)} images for {len(rows)} prompts")
        if full:
            for row, img in zip(rows, _unpack(full)):
                storage.write_bytes(layout.generate_full_image(class_slug(row["class_name"]), row["id"]), encode_png(img))
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


def _status_of_stored(storage: Storage, key: str, shard: int, plan: str, ids: list[str]) -> str:
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return BAD  # gone again: the driver's next check makes it
    return PRESENT if check_shard(data, shard, plan, ids).ok else BAD


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def plan_for(cfg: Config, prompts: pa.Table) -> dict:
    """Everything the stored images depend on; a rerun must match it exactly."""
    g = cfg.generate
    digest = hashlib.sha256()
    for name in ("id", "label", "prompt", "negative", "seed"):
        digest.update("\x1e".join(map(str, prompts.column(name).to_pylist())).encode())
    return {
        "prompt_table_sha256": digest.hexdigest(),
        "images": prompts.num_rows,
        "shard_size": g.shard_size,
        "generator": g.generator,
        "model": model_name(g),
        "steps": g.steps,
        "guidance_scale": g.guidance_scale,
        "height": g.height,
        "width": g.width,
        "image_size": g.image_size,
        "dtype": g.dtype,
        "keep_full_resolution": g.keep_full_resolution,
    }


def shard_rows(prompts: pa.Table, shard_size: int) -> list[list[dict]]:
    """Rows of each shard: the table sorted by id, cut every ``shard_size`` rows."""
    rows = prompts.sort_by("id").to_pylist()
    return [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]


def existing_shards(storage: Storage, layout: Layout) -> set[int]:
    """The shard numbers stored under their own names (unchecked: for watching a run)."""
    names = (key.rsplit("/", 1)[-1] for key in storage.list(layout.generate_shards))
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
    storage: Storage, layout: Layout, ids: Sequence[Sequence[str]], plan: str, known: Optional[ShardScan] = None
) -> ShardScan:
    """Read and check every stored shard (``ids[k]``: the ids shard k must hold, in order).

    A shard ``known`` found good, and still stored with the same size, is not read again.
    """
    from concurrent.futures import ThreadPoolExecutor

    sizes: dict[int, int] = {}
    stray = []
    for key, size in storage.sizes(layout.generate_shards).items():
        k = shard_number(key[len(layout.generate_shards) + 1 :])
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
            data = storage.read_bytes(layout.generate_shard(k))
        except FileNotFoundError:  # deleted since the listing
            return k, None, None
        return k, check_shard(data, k, plan, ids[k]), len(data)

    with ThreadPoolExecutor(max_workers=16) as pool:
        for k, result, size in pool.map(check, unread):
            if result is None:
                scan.missing.append(k)
            elif result.ok:
                scan.good[k], scan.sizes[k] = result.table.select(MANIFEST_COLUMNS), size
            elif result.status == "foreign":
                scan.foreign[k] = result.reason
            else:
                scan.corrupt[k] = result.reason
    scan.missing.sort()
    return scan


def claim_plan(storage: Storage, layout: Layout, plan: dict) -> None:
    """Claim the run for ``plan`` (atomically), or check that the plan that claimed it is the same."""
    if storage.create_json(layout.generate_plan, plan):
        return
    stored = storage.read_json_or_none(layout.generate_plan)
    if not isinstance(stored, dict):
        raise ConfigError(
            f"{storage.uri(layout.generate_plan)} is unreadable. Fix: delete it and rerun (each shard records "
            "the plan that made it, so no mixing can follow), or choose a new run name (run=...)"
        )
    changed = sorted(k for k in set(plan) | set(stored) if plan.get(k) != stored.get(k))
    if changed:
        details = ", ".join(f"{k}: stored {stored.get(k)!r} vs now {plan.get(k)!r}" for k in changed)
        raise ConfigError(
            f"run {layout.run!r} already holds images made with a different plan ({details}). "
            f"Fix: choose a new run name (run=...) or delete {storage.uri(layout.stage('generate'))}"
        )


def run_ray_generation(
    storage: Storage, run: str, g: GenerateConfig, classes: Sequence[str], todo: list[tuple[int, list[dict]]], plan: str
) -> Iterator[dict]:
    """Generate and write the given shards with Ray Data; yields one small result row per shard as it lands."""
    import ray
    import ray.data
    num_gpus = g.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    # Storage retries each request for storage.retry_seconds; past that, Ray Data retries the
    # whole map task a few times (a claim makes a repeated write harmless) before the stage fails.
    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [TRANSIENT_MARK]
    context.max_map_retries = 3
    # Rows travel as JSON text: one small string column instead of nested Arrow structs.
    items = [{"shard": k, "rows": json.dumps(rows)} for k, rows in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ShardGenerator,
        fn_constructor_args=(g, list(classes), storage, run),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(g.num_actors, len(items))),  # no idle actor for a short todo list
        num_gpus=num_gpus,
        # A CPU actor still needs a CPU slot; a GPU actor's CPU work is light.
        num_cpus=1 if num_gpus == 0 else 0.5,
        # Ray Data restarts a dead actor and resubmits its shard; the shard's fixed key makes
        # the retry harmless.
    )
    ds = ds.map_batches(
        write_shards,
        fn_kwargs={"storage": storage, "run": run, "cfg": g, "plan": plan},
        batch_size=1,
        num_cpus=0.5,
    )
    return ds.iter_rows()


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


def run_generate(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or resume) the generate stage; returns the summary that is also stored."""
    from synth.prompts import ensure_prompt_table
    from synth.runtime import init_ray, write_stage_config, write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout = Layout(cfg.run)

    # 1. Fail fast on anything that would waste a cluster: generator, storage, model, plan.
    generator = generator_class(cfg.generate.generator)  # imports a module:Class path, here on the driver
    storage.check_writable()
    gen_cfg = cfg.generate
    if generator.needs_model:
        # Actors load the resolved path; the plan keeps the name as given, so cwd does not matter.
        gen_cfg = dataclasses.replace(gen_cfg, model=resolve_model(gen_cfg.model))
    prompts = ensure_prompt_table(cfg, storage)
    plan = plan_for(cfg, prompts)
    claim_plan(storage, layout, plan)
    plan_hash = plan_sha256(plan)
    write_stage_config(storage, cfg, "generate")
    removed = storage.remove_partials(layout.stage("generate"))

    # 2. Check what is stored; make what is missing or bad, then check again.
    shards = shard_rows(prompts, cfg.generate.shard_size)
    ids = [[r["id"] for r in rows] for rows in shards]
    scan = scan_shards(storage, layout, ids, plan_hash)
    stored_at_start = len(scan.good)
    if scan.stray:
        names = ", ".join(k.rsplit("/", 1)[-1] for k in scan.stray[:3])
        say("generate", f"ignoring {plural(len(scan.stray), 'stray object')} under {storage.uri(layout.generate_shards)} ({names}"
            f"{', ...' if len(scan.stray) > 3 else ''}): no plan writes those names")  # fmt: skip
    results: list[dict] = []
    quarantined: list[str] = []
    gen_seconds = 0.0
    for attempt in range(MAX_PASSES + 1):
        _refuse_foreign(storage, layout, scan)
        for k, reason in scan.corrupt.items():
            quarantined.append(quarantine(storage, layout, layout.generate_shard(k), "generate"))
            say("generate", f"shard {k} is corrupt ({reason}); moved to {storage.uri(quarantined[-1])}, making it again")
        todo = [(k, shards[k]) for k in scan.todo]
        if attempt == 0:
            to_make = sum(len(rows) for _, rows in todo)
            say("generate", f"{prompts.num_rows:,} images in {len(shards)} shards with {model_name(cfg.generate)}: "
                f"{len(scan.good)} shards stored, {len(todo)} to make ({to_make:,} images)")  # fmt: skip
        elif todo:
            say("generate", f"{plural(len(todo), 'shard')} went missing or bad during the run; making them again")
        if not todo:
            break
        if attempt == MAX_PASSES:
            raise StorageError(
                f"after {MAX_PASSES} passes, shards {scan.todo[:5]} under {storage.uri(layout.generate_shards)} are still "
                "missing or bad: something else deletes or overwrites them. Fix: stop whatever writes there, then rerun"
            )
        tick = time.perf_counter()
        init_ray(cfg.ray)  # joins once; a later pass finds Ray up
        results += _generate_with_progress(storage, cfg, gen_cfg, todo, plan_hash)
        gen_seconds += time.perf_counter() - tick
        scan = scan_shards(storage, layout, ids, plan_hash, known=scan)

    made = int(sum(r["images"] for r in results if r["status"] == WRITTEN))
    by_other = sum(1 for r in results if r["status"] == PRESENT)
    if by_other:
        say("generate", f"{plural(by_other, 'shard')} already stored when this driver went to write them (another driver "
            "running this run with the same plan, or a retried task); they were checked and kept")  # fmt: skip

    # 3. The manifest, from the checked shards, then the summary.
    manifest = build_manifest(scan, prompts.column("id").to_pylist(), plan_hash)
    storage.write_parquet(layout.generate_manifest, manifest)
    per_class = {c: int(n) for c, n in zip(*np.unique(manifest.column("class_name").to_numpy(zero_copy_only=False), return_counts=True))}
    summary = {
        "images_total": manifest.num_rows,
        "images_per_class": per_class,
        "shards_total": len(shards),
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
        "wall_seconds": round(time.perf_counter() - start, 3),
        "manifest": storage.uri(layout.generate_manifest),
        "plan": plan,
        "plan_sha256": plan_hash,
    }
    speed = f", {summary['images_per_second']:.2f} images/s" if made else ""
    say("generate", f"{manifest.num_rows:,} images ({len(per_class)} classes), {made:,} made now in {gen_seconds:.1f} s{speed} "
        f"-> {summary['manifest']}")  # fmt: skip
    return write_stage_summary(storage, cfg, "generate", summary)


def _refuse_foreign(storage: Storage, layout: Layout, scan: ShardScan) -> None:
    if scan.foreign:
        k, reason = next(iter(sorted(scan.foreign.items())))
        raise ConfigError(
            f"{len(scan.foreign)} shards under {storage.uri(layout.generate_shards)} were made under another plan than "
            f"{storage.uri(layout.generate_plan)} (e.g. shard {k}: {reason}). Fix: choose a new run name (run=...), or "
            "move them aside and remake them with python -m ray_jobs.verify <config> --repair"
        )


def _generate_with_progress(storage: Storage, cfg: Config, g: GenerateConfig, todo: list, plan: str) -> list[dict]:
    """One pass of Ray Data generation over ``todo``; progress lines as shards land."""
    results: list[dict] = []
    to_make = sum(len(rows) for _, rows in todo)
    start = time.perf_counter()
    first: Optional[tuple[int, float]] = None  # (images, time) when the first shard landed: start-up excluded
    made_so_far = 0
    for result in run_ray_generation(storage, cfg.run, g, cfg.prompts.classes, todo, plan):
        results.append(result)
        made_so_far, now = made_so_far + int(result["images"]), time.perf_counter()
        first = first or (made_so_far, now)
        if made_so_far > first[0]:
            say("generate", rate(made_so_far, to_make, now - first[1], "images", since=first[0]), progress=True)
        else:
            say("generate", f"{made_so_far:,}/{to_make:,} images (first shard after {now - start:.0f} s of start-up)", progress=True)
    return results
