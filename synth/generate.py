"""The generate stage: text-to-image over the prompt table, exactly once, with Ray Data.

The stage is the shared image job of :mod:`synth.imagejob` (fixed shards of the id-sorted input
table, an atomically claimed plan, checked shards, a manifest listing every planned id once) with
the prompt table as its input and a text-to-image generator as its maker. ``plan.json`` pins the
generator, model(s), resolution, steps, prompt-table hash and shard size.

``generate.generator`` picks the class that makes the images (see :class:`Generator`): a name
registered in :data:`GENERATORS` (``"diffusers"``: :class:`synth.diffusion.DiffusersGenerator`,
a pipeline from ``from_pretrained``, or a prior + decoder pair), or any class given as
``package.module:ClassName``, as the tests give ``synth.testkit:ClassAwareTestGenerator``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa

from synth.config import Config, ConfigError, GenerateConfig
from synth.images import GeneratedImages
from synth.progress import say
from synth.imagejob import ImageJob, cut_shards, import_class, run_image_job
from synth.storage import Storage

log = logging.getLogger(__name__)

MAX_PASSES = 3  # generation passes over missing or bad shards before the stage gives up
WRITTEN, PRESENT, BAD = "written", "present", "bad"  # what write_shards found for each shard


# --------------------------------------------------------------------------------------------
# Generators: the protocol, the registry, the diffusers one
# --------------------------------------------------------------------------------------------


class Generator(Protocol):
    """What ``generate.generator`` names: a class that turns prompts into images.

    :class:`synth.imagejob.ShardMaker` constructs it once per Ray actor (load weights in ``__init__``) and calls
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
        its batch), so a retried shard rewrites the same images.

        A generator that honours per-image guidance (``prompts.guidance_scale_range``) also takes
        ``guidance_scales``: one value per prompt, None for ``generate.guidance_scale``. It is passed
        only when some row of the batch has a value of its own.
        """
        ...


GENERATOR_MEMBERS = ("needs_model", "model_name", "generate")


def _diffusers_generator() -> type:
    from synth.diffusion import DiffusersGenerator

    return DiffusersGenerator


# One entry per kind of generator; the names must match synth.config.GENERATOR_NAMES, which
# validates generate.generator without importing this module.
# A zero-argument loader keeps diffusers and torch out of the driver until a stage needs them.
GENERATORS: dict[str, Callable[[], type]] = {"diffusers": _diffusers_generator}


def generator_class(spec: str) -> type[Generator]:
    """The class ``generate.generator`` names: a key of :data:`GENERATORS` or ``package.module:ClassName``.

    Imports the module of a path, so calling it on the driver before Ray starts turns a typo or a
    missing package into a :class:`ConfigError` that names the fix instead of a failed actor.
    """
    return import_class(
        spec, "generate.generator", GENERATORS, GENERATOR_MEMBERS,
        "needs_model, model_name(cfg) and generate(prompts, negatives, seeds), constructed as Class(cfg, classes) "
        "(see synth.generate.Generator)",
    )  # fmt: skip


def build_generator(cfg: GenerateConfig, classes: Sequence[str]) -> Generator:
    return generator_class(cfg.generator)(cfg, classes)


def model_name(cfg: GenerateConfig) -> str:
    return generator_class(cfg.generator).model_name(cfg)


# --------------------------------------------------------------------------------------------
# The stage: text-to-image through the shared image job
# --------------------------------------------------------------------------------------------


@dataclass
class TextToImage:
    """The image job's maker for prompts: built once per actor, it calls the configured generator."""

    cfg: GenerateConfig
    classes: list[str]

    def build(self) -> Callable[[list[dict]], GeneratedImages]:
        generator = build_generator(self.cfg, self.classes)

        def make(rows: list[dict]) -> GeneratedImages:
            args = ([r["prompt"] for r in rows], [r["negative"] for r in rows], [r["seed"] for r in rows])
            guidance = [r.get("guidance_scale") for r in rows]
            if any(g is not None for g in guidance):
                return generator.generate(*args, guidance_scales=guidance)
            return generator.generate(*args)

        return make


def plan_for(cfg: Config, prompts: pa.Table) -> dict:
    """Everything the stored images depend on; a rerun must match it exactly."""
    g = cfg.generate
    digest = hashlib.sha256()
    names = ["id", "label", "prompt", "negative", "seed"]
    if "guidance_scale" in prompts.column_names and prompts.column("guidance_scale").null_count < prompts.num_rows:
        names.append("guidance_scale")  # per-image guidance changes the images; without it the hash is as before
    for name in names:
        digest.update("\x1e".join(map(str, prompts.column(name).to_pylist())).encode())
    plan = {
        "prompt_table_sha256": digest.hexdigest(),
        "images": prompts.num_rows,
        "shard_size": g.shard_size,
        "generator": g.generator,
        "model": model_name(g),
        "prior": g.prior,
        "steps": g.steps,
        "guidance_scale": g.guidance_scale,
        "height": g.height,
        "width": g.width,
        "image_size": g.image_size,
        "dtype": g.dtype,
        "keep_full_resolution": g.keep_full_resolution,
    }
    if g.decoder:
        plan["decoder"] = g.decoder  # a tiny decoder changes the images; without one the plan is as before
    return plan


def shard_rows(prompts: pa.Table, shard_size: int) -> list[list[dict]]:
    """Rows of each shard: the prompt table sorted by id, cut every ``shard_size`` rows.

    A row's params (JSON in the table) become a mapping, with its own guidance scale where it
    has one, so the manifest's params column records both.
    """
    rows = prompts.to_pylist()
    for r in rows:
        params = json.loads(r.get("params") or "{}")
        if r.get("guidance_scale") is not None:
            params["guidance_scale"] = r["guidance_scale"]
        r["params"] = params
    return cut_shards(rows, shard_size)


def takes_guidance(generator: type) -> bool:
    """Whether a generator class's ``generate`` takes per-image ``guidance_scales``."""
    import inspect

    try:
        return "guidance_scales" in inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):
        return False


def run_generate(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or resume) the generate stage; returns the summary that is also stored."""
    from synth.prompts import ensure_prompt_table
    from synth.runtime import write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    if not cfg.generate.enabled:
        raise ConfigError("generate.enabled=false: this config makes no text-to-image images. Fix: set generate.enabled=true")

    # 1. Fail fast on anything that would waste a cluster: generator, storage, model, plan.
    generator = generator_class(cfg.generate.generator)  # imports a module:Class path, here on the driver
    if cfg.prompts.guidance_scale_range is not None and not takes_guidance(generator):
        raise ConfigError(
            f"prompts.guidance_scale_range={cfg.prompts.guidance_scale_range} needs a generator that takes per-image "
            f"guidance, and generate.generator={cfg.generate.generator!r} has no guidance_scales argument. "
            "Fix: set prompts.guidance_scale_range=null, or give generate() a guidance_scales argument"
        )
    storage.check_writable()
    gen_cfg = cfg.generate
    if generator.needs_model:
        # Actors load the resolved paths; the plan keeps the names as given, so cwd does not matter.
        from synth.diffusion import resolve_model

        gen_cfg = dataclasses.replace(
            gen_cfg,
            model=resolve_model(gen_cfg.model, "generate.model"),
            prior=resolve_model(gen_cfg.prior, "generate.prior") if gen_cfg.prior else None,
            decoder=resolve_model(gen_cfg.decoder, "generate.decoder", pipeline=False) if gen_cfg.decoder else None,
        )
        if cfg.generate.generator == "diffusers":
            from synth.diffusion import check_models

            check_models(cfg)
    prompts = ensure_prompt_table(cfg, storage)
    plan = plan_for(cfg, prompts)
    job = ImageJob(
        stage="generate",
        run=cfg.run,
        shards=shard_rows(prompts, cfg.generate.shard_size),
        plan=plan,
        model=plan["model"],
        maker=TextToImage(gen_cfg, list(cfg.prompts.classes)),
        g=gen_cfg,
    )

    # 2. The shared exactly-once job: check what is stored, make what is missing or bad, manifest.
    result = run_image_job(storage, cfg, job)
    manifest, stats = result.manifest, result.stats
    per_class = {c: int(n) for c, n in zip(*np.unique(manifest.column("class_name").to_numpy(zero_copy_only=False), return_counts=True))}
    summary = {"images_total": stats["images_total"], "images_per_class": per_class, **stats}
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    made, gen_seconds = stats["images_generated"], stats["generation_wall_seconds"]
    speed = f", {stats['images_per_second']:.2f} images/s" if made else ""
    say("generate", f"{manifest.num_rows:,} images ({len(per_class)} classes), {made:,} made now in {gen_seconds:.1f} s{speed} "
        f"-> {stats['manifest']}")  # fmt: skip
    return write_stage_summary(storage, cfg, "generate", summary)
