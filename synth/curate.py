"""The curate stage: CLIP scores for every synthetic image, exactly once, then per-class filter rules.

Inputs are every image of the run's generate and derive manifests (:data:`synth.imagejob.IMAGE_STAGES`),
read from their checked shards (or their full-resolution PNGs where the stage kept them and
``curate.full_resolution`` is on). K = ``len(prompts.classes)``.

1. **Scoring** (Ray Data actor pool, the model loaded once per actor, batches on the device): per
   image the L2-normalised image embedding, ``similarity`` (cosine to its own class prompt,
   ``curate.prompt``), ``probabilities`` (softmax over the K class prompts with CLIP's logit
   scale), ``prob_own`` and ``entropy``. The text embeddings of the K prompts are computed once
   per actor. ``curate.scorer`` picks the scorer: ``clip`` (:class:`ClipScorer`) or a class as
   ``package.module:ClassName`` implementing :class:`Scorer` (the tests use
   ``synth.testkit:ColourTestScorer``, whose scores are exact).
2. **Exactly once.** The scoring job is a small parallel of :mod:`synth.imagejob` (its output is
   a score table, not images, so its maker and writer differ) built from the same parts:
   ``<run>/curate/plan.json`` claimed atomically (:func:`synth.imagejob.claim_plan`); the
   id-sorted inputs cut into fixed shards, each claimed at a fixed key
   (:meth:`synth.storage.Storage.create`) with the plan's hash and a content checksum
   (:mod:`synth.shards`); every stored shard checked (:func:`synth.imagejob.scan_shards`),
   corrupt ones quarantined and scored again, the manifest built from the checked shards. The
   driver hands actors ids and shard references, never images. A rerun scores nothing twice.
3. **Filtering** (:func:`filter_class`, a pure function), class by class so the driver holds one
   class's scores at a time: rank by similarity (1 = best; ties by id), then in rank order the
   first rule that rejects an image names its ``reason``: ``similarity`` (below
   ``min_similarity``), ``probability`` (own class probability below 1/K with
   ``probability_rule``, or below ``min_probability``), ``duplicate`` (embedding cosine to an
   image already kept >= ``dedup_cosine``), ``top`` (``top_per_class`` already kept). Then, if
   fewer than ``min_per_class`` are kept, the best-ranked rejected ones are rescued. The rules
   live outside the plan: changing them re-filters without scoring anything.
4. Outputs: ``<run>/curate/scores.parquet`` (:data:`SCORES_SCHEMA`, sorted by id; read it with
   :func:`read_scores`) and ``<run>/curate/summary.json`` (counts per class and reason, rules,
   model, diversity: the mean pairwise cosine distance of the embeddings per class and per
   technique, exact for every group size from running sums).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synth.config import HOSTILE, Config, ConfigError, CurateConfig, class_slug
from synth.imagejob import (
    IMAGE_STAGES, MAX_PASSES, PRESENT, WRITTEN, _refuse_foreign, _status_of_stored, build_manifest, claim_plan, cut_shards,
    import_class, rows_as_they_land, scan_shards, shard_pool,
)  # fmt: skip
from synth.progress import plural, rate, say
from synth.shards import META_CONTENT, META_PLAN, META_SHARD, check_shard, content_sha256, plan_sha256
from synth.storage import Layout, Storage, StorageError, parquet_bytes, quarantine

STAGE = "curate"
REASONS = ("similarity", "probability", "duplicate", "top")  # in the order the rules are applied

# One stored score shard: the manifest columns, then the scores.
SHARD_KEEP = ["id", "class_name", "label", "technique", "stage", "shard"]
SCORE_COLUMNS = SHARD_KEEP + ["similarity", "probabilities", "prob_own", "entropy", "embedding"]
SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("class_name", pa.string()),
        ("label", pa.int32()),
        ("technique", pa.string()),
        ("stage", pa.string()),
        ("similarity", pa.float32()),
        ("probabilities", pa.list_(pa.float32())),
        ("prob_own", pa.float32()),
        ("entropy", pa.float32()),
        ("rank", pa.int32()),
        ("embedding", pa.list_(pa.float32())),
        ("accepted", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def scores_key(run: str) -> str:
    return f"{Layout(run).stage(STAGE)}/scores.parquet"


def read_scores(storage: Storage, run: str, columns: Optional[list[str]] = None) -> Optional[pa.Table]:
    """``<run>/curate/scores.parquet`` (:data:`SCORES_SCHEMA`, sorted by id; only ``columns`` if given, the
    others not decoded), or None when curate has not run."""
    key = scores_key(run)
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    stored = pq.ParquetFile(io.BytesIO(data))
    missing = [c for c in columns or () if c not in stored.schema_arrow.names]
    if missing:
        raise ConfigError(f"{storage.uri(key)} lacks the columns {missing} (made by an older synth). Fix: rerun the curate stage")
    return stored.read(columns=columns)


# --------------------------------------------------------------------------------------------
# Scorers: the protocol, the registry, CLIP
# --------------------------------------------------------------------------------------------


class Scorer(Protocol):
    """What ``curate.scorer`` names: constructed once per Ray actor as ``Class(curate_cfg, classes)``.

    ``text`` holds the K class prompts' embeddings, (K, D), L2-normalised; ``embed`` maps at most
    ``curate.batch_size`` images ((H, W, 3) uint8 each) to their embeddings, (B, D), L2-normalised,
    each a function of its own image only. ``logit_scale`` multiplies cosines before the softmax.
    """

    needs_model: ClassVar[bool]  # whether curate.model is checked loadable on the driver
    text: np.ndarray
    logit_scale: float

    @classmethod
    def model_name(cls, cfg: CurateConfig) -> str: ...

    def __init__(self, cfg: CurateConfig, classes: Sequence[str]) -> None: ...

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


SCORER_MEMBERS = ("needs_model", "model_name", "embed")


def _features(out):
    """Projected features from get_*_features: a tensor (transformers 4) or an output's pooler_output (5)."""
    return out if hasattr(out, "norm") else out.pooler_output


class ClipScorer:
    """transformers' ``CLIPModel`` + ``CLIPProcessor`` from ``curate.model`` (a Hub id or a save_pretrained folder)."""

    needs_model = True

    @classmethod
    def model_name(cls, cfg: CurateConfig) -> str:
        return cfg.model

    def __init__(self, cfg: CurateConfig, classes: Sequence[str]):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model = CLIPModel.from_pretrained(cfg.model, dtype=self.dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(cfg.model)
        prompts = [cfg.prompt.format(cls=c) for c in classes]
        with torch.inference_mode():
            tokens = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            text = _features(self.model.get_text_features(**tokens)).float()  # (K, D)
            self.text = torch.nn.functional.normalize(text, dim=-1).cpu().numpy()
            self.logit_scale = float(self.model.logit_scale.exp().float().item())

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        torch = self.torch
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()  # (B, D)


# Names must match the one synth.config accepts without a ':' ("clip").
SCORERS: dict[str, Callable[[], type]] = {"clip": lambda: ClipScorer}


def scorer_class(spec: str) -> type:
    return import_class(
        spec, "curate.scorer", SCORERS, SCORER_MEMBERS,
        "needs_model, model_name(cfg), text (K, D), logit_scale and embed(images), constructed as Class(curate_cfg, "
        "classes) (see synth.curate.Scorer)",
    )  # fmt: skip


def check_clip_model(model: str) -> str:
    """Check on the driver, before Ray starts, that ``model`` is a CLIP checkpoint we can read; returns
    a local folder made absolute (actors run elsewhere), a Hub id unchanged."""
    from transformers import PretrainedConfig

    fix = "Fix: give a local path written by save_pretrained (CLIPModel + CLIPProcessor) or a Hub id reachable from the cluster"
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no config.json"
        raise ConfigError(f"curate.model={model!r} {what}. {fix}")
    try:
        config, _ = PretrainedConfig.get_config_dict(str(path.resolve()) if looks_local else model)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo: all the same advice
        raise ConfigError(f"curate.model={model!r} cannot be loaded ({str(exc).splitlines()[0][:200]}). {fix}") from exc
    if config.get("model_type") != "clip":
        raise ConfigError(f"curate.model={model!r} is a {config.get('model_type')!r} model, not CLIP. {fix}")
    return str(path.resolve()) if looks_local else model


def score_images(scorer, images: Sequence[np.ndarray], labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Embedding, similarity, probabilities, prob_own and entropy of each image against its own class ``labels``."""
    emb = np.asarray(scorer.embed(images), dtype=np.float32)  # (B, D)
    cos = emb.astype(np.float64) @ np.asarray(scorer.text, dtype=np.float64).T  # (B, K)
    logits = float(scorer.logit_scale) * cos
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    labels = np.asarray(labels, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    return {
        "similarity": cos[rows, labels].astype(np.float32),
        "probabilities": probs.astype(np.float32),
        "prob_own": probs[rows, labels].astype(np.float32),
        "entropy": entropy.astype(np.float32),
        "embedding": emb,
    }


# --------------------------------------------------------------------------------------------
# Inputs: the images of the generate and derive manifests
# --------------------------------------------------------------------------------------------


def candidate_rows(cfg: Config, storage: Storage) -> tuple[list[dict], dict[str, str]]:
    """One row per image of the run's image stages (id, label, class_name, technique, stage, src: its
    shard, full: its full-size PNG's key or ""), and each stage's plan hash. An error naming the fix
    when no image stage has run."""
    layout = Layout(cfg.run)
    classes = list(cfg.prompts.classes)
    rows: list[dict] = []
    plans: dict[str, str] = {}
    for stage in IMAGE_STAGES:
        key = layout.manifest(stage)
        if not storage.exists(key):
            continue
        manifest = storage.read_parquet(key, columns=["id", "label", "class_name", "technique", "shard"])
        plans[stage] = (manifest.schema.metadata or {}).get(META_PLAN, b"").decode()
        plan = storage.read_json_or_none(layout.plan(stage)) or {}
        full = cfg.curate.full_resolution and bool(plan.get("keep_full_resolution"))
        unknown = sorted(set(manifest.column("class_name").to_pylist()) - set(classes))
        if unknown:
            raise ConfigError(
                f"the {stage} manifest {storage.uri(key)} holds classes {unknown[:5]} that prompts.classes={classes} lacks. "
                "Fix: run curate with the config that made the images"
            )
        for image_id, label, class_name, technique, shard in zip(*(manifest.column(c).to_pylist() for c in manifest.column_names)):
            rows.append({
                "id": image_id, "label": classes.index(class_name), "class_name": class_name, "technique": technique,
                "stage": stage, "src": int(shard),
                "full": layout.full_image(stage, class_slug(class_name), image_id) if full else "",
            })  # fmt: skip
    if not rows:
        raise ConfigError(
            f"run {cfg.run!r} has no images to curate under {storage.uri(cfg.run)} (no generate or derive manifest). "
            "Fix: run python -m ray_jobs.generate <config> (and ray_jobs.derive) first, with the same run and storage.root"
        )
    return rows, plans


def planned(cfg: Config, storage: Storage) -> tuple[list[list[dict]], dict]:
    """The score shards (id-sorted candidate rows, cut) and the plan this config makes, for the stage and verify."""
    rows, plans = candidate_rows(cfg, storage)
    return cut_shards(rows, cfg.curate.shard_size), plan_for(cfg, rows, plans, scorer_class(cfg.curate.scorer).model_name(cfg.curate))


def plan_for(cfg: Config, rows: list[dict], plans: dict[str, str], model: str) -> dict:
    """Everything the scores depend on (not the filter rules: they apply after scoring)."""
    digest = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["id"]):
        digest.update(f"{r['id']}\x1f{r['stage']}\x1f{r['label']}\x1f{r['src']}\x1f{r['full']}\x1e".encode())
    return {
        "inputs_sha256": digest.hexdigest(),
        "image_plans": plans,
        "images": len(rows),
        "shard_size": cfg.curate.shard_size,
        "scorer": cfg.curate.scorer,
        "model": model,
        "prompt": cfg.curate.prompt,
        "classes": list(cfg.prompts.classes),
        "full_resolution": cfg.curate.full_resolution,
    }


# --------------------------------------------------------------------------------------------
# Ray Data: one row per score shard -> actors that read, score and claim it
# --------------------------------------------------------------------------------------------


def score_shard_table(rows: Sequence[dict], scores: dict[str, np.ndarray], shard: int, plan: str) -> pa.Table:
    """The stored form of one score shard: :data:`SCORE_COLUMNS` plus its number, plan hash and checksum."""
    n = len(rows)
    k = scores["probabilities"].shape[1] if n else 0
    d = scores["embedding"].shape[1] if n else 0

    def lists(arr: np.ndarray, width: int) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1), pa.float32())
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width, pa.int32()), flat)  # (n, width)

    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "class_name": [r["class_name"] for r in rows],
            "label": pa.array([int(r["label"]) for r in rows], pa.int32()),
            "technique": [r["technique"] for r in rows],
            "stage": [r["stage"] for r in rows],
            "shard": pa.array([shard] * n, pa.int32()),
            "similarity": pa.array(scores["similarity"], pa.float32()),
            "probabilities": lists(scores["probabilities"], k),
            "prob_own": pa.array(scores["prob_own"], pa.float32()),
            "entropy": pa.array(scores["entropy"], pa.float32()),
            "embedding": lists(scores["embedding"], d),
        }
    )
    return table.replace_schema_metadata(
        {META_SHARD: str(shard).encode(), META_PLAN: plan.encode(), META_CONTENT: content_sha256(table, SCORE_COLUMNS).encode()}
    )


@dataclass
class ScorerSpec:
    """Picklable: how an actor builds its scorer."""

    cfg: CurateConfig
    classes: list[str]

    def build(self):
        return scorer_class(self.cfg.scorer)(self.cfg, self.classes)


class ShardScorer:
    """Ray Data callable class: the scorer (CLIP) loads once per actor in ``__init__``; each call
    reads one shard's images from the image stages' shards, scores them in batches, claims the shard."""

    def __init__(self, spec: ScorerSpec, storage: Storage, run: str, plans: dict, plan: str, batch_size: int):
        self.storage, self.layout, self.plans, self.plan, self.batch_size = storage, Layout(run), plans, plan, batch_size
        self.scorer = spec.build()
        self.sources: OrderedDict = OrderedDict()  # (stage, shard) -> {id: png}; the last few, as shards are id-sorted

    def _png(self, row: dict) -> bytes:
        if row["full"]:
            return self.storage.read_bytes(row["full"])
        source = (row["stage"], row["src"])
        if source not in self.sources:
            key = self.layout.shard(*source)
            check = check_shard(self.storage.read_bytes(key), row["src"], self.plans[row["stage"]])
            if not check.ok:
                raise ConfigError(
                    f"the {row['stage']} shard {self.storage.uri(key)} {check.reason}. Fix: rerun the {row['stage']} stage "
                    "(it remakes bad shards), then curate"
                )
            self.sources[source] = dict(zip(check.table.column("id").to_pylist(), check.table.column("image").to_pylist()))
            while len(self.sources) > 2:
                self.sources.popitem(last=False)
        return self.sources[source][row["id"]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from synth.images import decode_png

        out: dict[str, list] = {"shard": [], "images": [], "status": [], "score_seconds": []}
        for shard, rows_json in zip(batch["shard"], batch["rows"]):
            start, shard, rows = time.perf_counter(), int(shard), json.loads(rows_json)
            key, ids = self.layout.shard(STAGE, shard), [r["id"] for r in rows]
            if self.storage.exists(key):  # a concurrent driver with the same plan stored it meanwhile
                status = _status_of_stored(self.storage, key, shard, self.plan, ids, SCORE_COLUMNS)
            else:
                parts = []
                for i in range(0, len(rows), self.batch_size):
                    chunk = rows[i : i + self.batch_size]
                    images = [decode_png(self._png(r)) for r in chunk]
                    parts.append(score_images(self.scorer, images, [r["label"] for r in chunk]))
                scores = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                data = parquet_bytes(score_shard_table(rows, scores, shard, self.plan))
                status = WRITTEN if self.storage.create(key, data) else _status_of_stored(self.storage, key, shard, self.plan, ids, SCORE_COLUMNS)
            out["shard"].append(shard)
            out["images"].append(len(rows))
            out["status"].append(status)
            out["score_seconds"].append(time.perf_counter() - start)
        return {
            "shard": np.array(out["shard"], dtype=np.int64),
            "images": np.array(out["images"], dtype=np.int64),
            "status": np.array(out["status"], dtype=object),
            "score_seconds": np.array(out["score_seconds"], dtype=np.float64),
        }


def _score_with_ray(storage: Storage, cfg: Config, spec: ScorerSpec, plans: dict, plan: str, todo: list) -> Iterator[dict]:
    """Score the given shards on the image job's actor pool (each actor claims its score shard itself);
    ``plans``: each image stage's plan hash, to check the shards the images are read from."""
    c = cfg.curate
    args = (spec, storage, cfg.run, plans, plan, c.batch_size)
    return rows_as_they_land(shard_pool(todo, ShardScorer, args, c.num_actors, c.num_gpus_per_actor))


def run_scoring(cfg: Config, storage: Storage, shards: list[list[dict]], plan: dict, spec: ScorerSpec) -> tuple[pa.Table, dict]:
    """Claim the plan, record the stage's config, check stored score shards, score what is missing
    or bad, check again; the manifest and stats."""
    from synth.runtime import init_ray, write_stage_config

    layout = Layout(cfg.run)
    claim_plan(storage, layout, plan, STAGE)
    write_stage_config(storage, cfg, STAGE)  # after the claim: a driver with another plan stops before touching it
    plan_hash = plan_sha256(plan)
    removed = storage.remove_partials(layout.stage(STAGE))
    ids = [[r["id"] for r in rows] for rows in shards]
    scan = scan_shards(storage, layout, ids, plan_hash, stage=STAGE, columns=SCORE_COLUMNS, keep=SHARD_KEEP)
    stored_at_start, quarantined, results, seconds = len(scan.good), [], [], 0.0
    total = sum(map(len, ids))
    for attempt in range(MAX_PASSES + 1):
        _refuse_foreign(storage, layout, scan, STAGE)
        for k, reason in scan.corrupt.items():
            quarantined.append(quarantine(storage, layout, layout.shard(STAGE, k), STAGE))
            say(STAGE, f"score shard {k} is corrupt ({reason}); moved to {storage.uri(quarantined[-1])}, scoring it again")
        todo = [(k, shards[k]) for k in scan.todo]
        if attempt == 0:
            say(STAGE, f"{total:,} images in {len(shards)} score shards with {plan['model']}: {len(scan.good)} stored, "
                f"{len(todo)} to score ({sum(len(r) for _, r in todo):,} images)")  # fmt: skip
        elif todo:
            say(STAGE, f"{plural(len(todo), 'score shard')} went missing or bad during the run; scoring them again")
        if not todo:
            break
        if attempt == MAX_PASSES:
            raise StorageError(
                f"after {MAX_PASSES} passes, score shards {scan.todo[:5]} under {storage.uri(layout.shards(STAGE))} are "
                "still missing or bad: something else deletes or overwrites them. Fix: stop whatever writes there, then rerun"
            )
        tick = time.perf_counter()
        init_ray(cfg.ray)
        to_score, done = sum(len(r) for _, r in todo), 0
        for result in _score_with_ray(storage, cfg, spec, plan["image_plans"], plan_hash, todo):
            results.append(result)
            done += int(result["images"])
            say(STAGE, rate(done, to_score, time.perf_counter() - tick, "images"), progress=True)
        seconds += time.perf_counter() - tick
        scan = scan_shards(storage, layout, ids, plan_hash, known=scan, stage=STAGE, columns=SCORE_COLUMNS, keep=SHARD_KEEP)
    manifest = build_manifest(scan, [i for shard_ids in ids for i in shard_ids], plan_hash)
    storage.write_parquet(layout.manifest(STAGE), manifest)
    scored = int(sum(r["images"] for r in results if r["status"] == WRITTEN))
    stats = {
        "images_total": manifest.num_rows,
        "shards_total": len(shards),
        "shards_already_stored": stored_at_start,
        "shards_scored": sum(1 for r in results if r["status"] == WRITTEN),
        "shards_found_stored_meanwhile": sum(1 for r in results if r["status"] == PRESENT),
        "shards_quarantined": [storage.uri(k) for k in quarantined],
        "stray_objects": [storage.uri(k) for k in scan.stray],
        "images_scored": scored,
        "partial_writes_removed": removed,
        "scoring_wall_seconds": round(seconds, 3),
        "images_per_second": round(scored / seconds, 3) if scored else 0.0,
        "manifest": storage.uri(layout.manifest(STAGE)),
        "plan_sha256": plan_hash,
    }
    return manifest, stats


# --------------------------------------------------------------------------------------------
# Filtering: a pure function per class
# --------------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    rank: np.ndarray  # (n,) int32, 1 = highest similarity in the class
    accepted: np.ndarray  # (n,) bool
    reason: list[str]  # "" when accepted, else the first rule that rejected it
    rescued: int  # rejected by a rule, kept by min_per_class


def filter_class(
    ids: Sequence[str], similarity: np.ndarray, prob_own: np.ndarray, embedding: np.ndarray, rules: CurateConfig, num_classes: int
) -> Verdicts:
    """Ranks and verdicts of one class's images (rules: ``curate.*``; see the module docstring for the order)."""
    n = len(ids)
    similarity = np.asarray(similarity, dtype=np.float32)
    order = sorted(range(n), key=lambda i: (-float(similarity[i]), ids[i]))  # ties by id: deterministic
    rank = np.empty(n, dtype=np.int32)
    rank[order] = np.arange(1, n + 1, dtype=np.int32)
    reason = [""] * n
    kept: list[int] = []
    emb = np.asarray(embedding, dtype=np.float32)
    kept_emb = np.empty_like(emb)  # the kept images' embeddings, in the order kept (no copy per image)
    for i in order:
        p = float(prob_own[i])
        if rules.min_similarity is not None and float(similarity[i]) < rules.min_similarity:
            reason[i] = "similarity"
        elif (rules.probability_rule and p < 1.0 / num_classes) or (rules.min_probability is not None and p < rules.min_probability):
            reason[i] = "probability"
        elif rules.dedup_cosine is not None and kept and float((kept_emb[: len(kept)] @ emb[i]).max()) >= rules.dedup_cosine:
            reason[i] = "duplicate"
        elif rules.top_per_class is not None and len(kept) >= rules.top_per_class:
            reason[i] = "top"
        else:
            kept_emb[len(kept)] = emb[i]
            kept.append(i)
    rescued = 0
    if rules.min_per_class is not None and len(kept) < rules.min_per_class:
        for i in order:
            if len(kept) + rescued >= rules.min_per_class:
                break
            if reason[i]:
                reason[i], rescued = "", rescued + 1
    accepted = np.array([not r for r in reason], dtype=bool)
    return Verdicts(rank, accepted, reason, rescued)


class Spread:
    """Running sums for the mean pairwise cosine distance of unit vectors, exact at any group size.

    mean_{i<j} (1 - e_i.e_j) = 1 - (|sum e|^2 - sum |e|^2) / (n (n - 1)): no pairwise matrix, O(D) memory.
    """

    def __init__(self):
        self.n, self.total, self.sq = 0, None, 0.0

    def add(self, emb: np.ndarray) -> None:
        if len(emb) == 0:
            return
        e = np.asarray(emb, dtype=np.float64)
        s = e.sum(axis=0)
        self.total = s if self.total is None else self.total + s
        self.sq += float((e * e).sum())
        self.n += len(e)

    def value(self) -> Optional[float]:
        if self.n < 2:
            return None
        return round(1.0 - (float(self.total @ self.total) - self.sq) / (self.n * (self.n - 1)), 6)


def embeddings(column: pa.ChunkedArray) -> np.ndarray:
    """(N, D) float32 from an ``embedding`` list column of score shards or ``scores.parquet``."""
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    lengths = set(column.value_lengths().to_pylist())
    if len(lengths) != 1 or values.size != n * next(iter(lengths)):
        raise ConfigError("the embedding column of the curate scores has rows of different lengths. Fix: rerun the curate stage")
    return values.reshape(n, -1)


def curate_scores(cfg: Config, storage: Storage, manifest: pa.Table) -> dict:
    """Filter class by class, write ``scores.parquet`` (sorted by id) atomically; the summary's filter part."""
    layout = Layout(cfg.run)
    rules, classes = cfg.curate, list(cfg.prompts.classes)
    shards_of: dict[str, list[int]] = defaultdict(list)
    for class_name, shard in sorted(set(zip(manifest.column("class_name").to_pylist(), manifest.column("shard").to_pylist()))):
        shards_of[class_name].append(shard)
    verdict: dict[str, tuple[int, bool, str]] = {}
    hostile_counts = {"scored": 0, "accepted": 0}  # hostile examples: ranked and filtered apart, counted apart
    per_class: dict[str, dict] = {}
    spread = {"class": defaultdict(lambda: (Spread(), Spread())), "technique": defaultdict(lambda: (Spread(), Spread()))}
    columns = ["id", "class_name", "technique", "similarity", "prob_own", "embedding"]
    # 1. One class at a time: the driver holds one class's scores (shards are id-sorted, so a class
    #    mostly spans a few consecutive shards).
    for class_name in classes:
        if class_name not in shards_of:
            continue
        parts = [storage.read_parquet(layout.shard(STAGE, k), columns=columns) for k in shards_of[class_name]]
        table = pa.concat_tables(parts)
        table = table.filter(pc.equal(table.column("class_name"), class_name))
        # Hostile examples (they imitate the class, they are not it) are ranked and filtered among
        # themselves, so they never take a place in the class's quotas.
        hostile = pc.equal(table.column("technique"), HOSTILE)
        table = pa.concat_tables([table.filter(pc.invert(hostile)), table.filter(hostile)])
        n_own = table.num_rows - int(pc.sum(hostile).as_py() or 0)
        ids = table.column("id").to_pylist()
        emb = embeddings(table.column("embedding"))
        similarity, prob_own = table.column("similarity").to_numpy(), table.column("prob_own").to_numpy()
        for part in (slice(0, n_own), slice(n_own, None)):  # the class's own images, then its hostile ones
            part_ids = ids[part]
            found = filter_class(part_ids, similarity[part], prob_own[part], emb[part], rules, len(classes))
            for image_id, r, a, why in zip(part_ids, found.rank.tolist(), found.accepted.tolist(), found.reason):
                verdict[image_id] = (r, a, why)
            if part.start == 0:
                v = found
            else:
                hostile_counts["scored"] += len(part_ids)
                hostile_counts["accepted"] += int(found.accepted.sum())
        ids, emb, table = ids[:n_own], emb[:n_own], table.slice(0, n_own)
        reasons = {name: v.reason.count(name) for name in REASONS}
        per_class[class_name] = {"scored": len(ids), "accepted": int(v.accepted.sum()), "rejected": int((~v.accepted).sum()),
                                 "rejected_by": reasons, "rescued": v.rescued}  # fmt: skip
        techniques = np.array(table.column("technique").to_pylist(), dtype=object)
        every, kept = spread["class"][class_name]
        every.add(emb)
        kept.add(emb[v.accepted])
        for technique in sorted(set(techniques)):
            mask = techniques == technique
            every, kept = spread["technique"][technique]
            every.add(emb[mask])
            kept.add(emb[mask & v.accepted])
    # 2. scores.parquet in id order: the score shards in order, with each image's verdict.
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCORES_SCHEMA, compression="zstd", write_page_checksum=True) as writer:
        last = None
        for k in sorted(set(manifest.column("shard").to_pylist())):
            table = storage.read_parquet(layout.shard(STAGE, k), columns=[f.name for f in SCORES_SCHEMA if f.name in SCORE_COLUMNS])
            ids = table.column("id").to_pylist()
            if last is not None and ids and ids[0] <= last:
                raise RuntimeError("score shards are out of id order")
            last = ids[-1] if ids else last
            rank, accepted, reason = zip(*(verdict[i] for i in ids)) if ids else ((), (), ())
            table = table.append_column("rank", pa.array(rank, pa.int32()))
            table = table.append_column("accepted", pa.array(accepted, pa.bool_())).append_column("reason", pa.array(reason, pa.string()))
            writer.write_table(table.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA))
    storage.write_bytes(scores_key(cfg.run), buf.getvalue())
    reasons_total = {name: sum(c["rejected_by"][name] for c in per_class.values()) for name in REASONS}
    diversity = {
        group: {name: {"all": pair[0].value(), "accepted": pair[1].value(), "images": pair[0].n} for name, pair in sorted(found.items())}
        for group, found in spread.items()
    }  # fmt: skip
    return {
        "scored": len(verdict),
        "accepted": sum(1 for _, a, _ in verdict.values() if a),
        "rejected": sum(1 for _, a, _ in verdict.values() if not a),
        "rejected_by": reasons_total,
        "rescued": sum(c["rescued"] for c in per_class.values()),
        "per_class": per_class,
        "hostile": hostile_counts,
        "rules": {k: getattr(rules, k) for k in ("min_similarity", "probability_rule", "min_probability", "dedup_cosine",
                                                  "top_per_class", "min_per_class")},  # fmt: skip
        "probability_rule_threshold": round(1.0 / len(classes), 6),
        # Mean pairwise cosine distance (1 - cos) of the image embeddings, exact (running sums, every image).
        "diversity": diversity,
        "scores": storage.uri(scores_key(cfg.run)),
    }


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_curate(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or resume) the curate stage: score every synthetic image once, filter, write scores and summary."""
    from synth.runtime import write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    # 1. Fail fast, before Ray starts: scorer class, model, storage, inputs.
    scorer = scorer_class(cfg.curate.scorer)
    c = cfg.curate
    if scorer.needs_model:  # actors load the absolute folder; the plan keeps the name as given
        c = dataclasses.replace(c, model=check_clip_model(c.model))
    storage.check_writable()
    shards, plan = planned(cfg, storage)
    # 2. Score exactly once.
    manifest, stats = run_scoring(cfg, storage, shards, plan, ScorerSpec(c, list(cfg.prompts.classes)))
    del shards
    # 3. Filter class by class and write scores.parquet.
    filtered = curate_scores(cfg, storage, manifest)
    summary = {**filtered, "model": plan["model"], "scorer": c.scorer, "prompt": c.prompt, **stats, "plan": plan}
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    by = ", ".join(f"{n} {name}" for name, n in filtered["rejected_by"].items() if n)
    rescued = f", {filtered['rescued']} rescued by min_per_class" if filtered["rescued"] else ""
    say(STAGE, f"{filtered['scored']:,} images scored ({stats['images_scored']:,} now), {filtered['accepted']:,} accepted"
        f"{f' (rejected: {by})' if by else ''}{rescued} -> {filtered['scores']}")  # fmt: skip
    return write_stage_summary(storage, cfg, STAGE, summary)
