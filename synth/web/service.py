"""What the web app does, without Flask: runs in storage, uploads, classification, generation, review.

Every function takes checked inputs or checks them itself and raises :class:`WebError` (a status
code and a message that names the fix) for anything a client can get wrong, so the Flask layer
(:mod:`synth.web.app`) only maps requests to calls and errors to responses.

- **Names.** Run names, experiment names and image ids are checked against :data:`NAME` before
  they become storage keys: no ``/``, no ``..``, nothing outside the storage root.
- **Uploads.** :func:`read_upload` accepts PNG, JPEG and WebP only, reads the header first and
  refuses images over ``web.max_image_side`` / ``web.max_image_pixels`` before decoding a pixel
  (decompression bombs; Pillow's own bomb warning is an error here), then decodes and verifies.
- **Classification.** :func:`classify` preprocesses an upload exactly as the dataset stage does a
  photograph (:func:`synth.dataset.normalize_image`) and scores it with the train stage's one
  inference path (:func:`synth.recipe.logits`, the run's own test-time augmentation), so a test
  image classified here gets the train stage's prediction.
- **Generation.** :class:`GenerationQueue` holds the one generator (built like the batch stage's,
  :func:`synth.generate.build_generator`) behind a bounded queue: a full queue or a request that
  waits past ``web.generate_timeout_s`` answers 503 with Retry-After, never a hang.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import queue
import random
import re
import threading
import time
import unicodedata
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Optional

import pyarrow as pa
from omegaconf import OmegaConf
from PIL import Image

from synth.config import HOSTILE, PROMPT_TECHNIQUES, Config, WebConfig
from synth.images import GeneratedImages, encode_png
from synth.storage import Layout, Storage, StorageError

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEED = re.compile(r"seed-([0-9]{1,9})")  # not \d: that also matches other scripts' digits
# Upload formats: Pillow's name -> the MIME type the browser sent or we answer with.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
STAGE_FOLDERS = ("prompts", "generate", "derive", "curate", "dataset", "train", "tune", "report", "export", "web")
DOMAINS = ("synthetic", "real", "adversarial")
SPLITS = ("train", "val", "test")
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000  # before tokenising: nothing longer can be 77 CLIP tokens anyway
CLIP_TOKENS = 77


class WebError(Exception):
    """A request the app cannot serve as asked; ``status`` is the HTTP code, the message names the fix."""

    def __init__(self, message: str, status: int = 400, retry_after: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a safe storage name (letters, digits, '.', '_', '-'; no '..'), else a 400."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise WebError(f"{what} {shown} is not a valid name. Fix: use letters, digits, '.', '_' or '-' (at most 128, no '..')")
    return value


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise WebError(f"{what} {str(value)[:60]!r} is unknown. Fix: choose one of {', '.join(choices)}")
    return value


def parse_int(value: Any, what: str, low: int, high: int, default: Optional[int] = None) -> Optional[int]:
    """An integer in [low, high] from a query/form/JSON value; None or "" gives ``default``."""
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise WebError(f"{what} must be an integer in [{low}, {high}]")
    try:
        n = int(value)
    except ValueError:
        raise WebError(f"{what} {str(value)[:40]!r} is not an integer. Fix: give one in [{low}, {high}]") from None
    if not low <= n <= high:
        raise WebError(f"{what} {n} is out of range. Fix: give an integer in [{low}, {high}]")
    return n


class LRU:
    """A small thread-safe least-recently-used cache (models, split tables, thumbnails)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make: Callable[[], Any]):
        found = self.peek(key)
        if found is not None:
            return found
        value = make()  # outside the lock: loading a model must not block other readers
        self.put(key, value)
        return value

    def peek(self, key) -> Any:
        """The cached value, or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------


def read_upload(data: bytes, w: WebConfig) -> Image.Image:
    """The decoded first frame of an uploaded image; a 4xx :class:`WebError` for anything else."""
    if not data:
        raise WebError("the upload is empty. Fix: choose a PNG, JPEG or WebP image")
    if len(data) > w.max_upload_bytes:
        raise WebError(f"the upload is {len(data)} bytes, over the limit of {w.max_upload_bytes}. Fix: send a smaller image", 413)
    allowed = ", ".join(IMAGE_FORMATS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not decoded with a warning
        try:
            with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as probe:  # reads the header only
                width, height = probe.size
                _check_dimensions(width, height, w)
                probe.verify()  # structure and checksums (PNG CRCs) without decoding
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            img.load()
        except WebError:
            raise
        except Image.UnidentifiedImageError:
            raise WebError(f"the upload is not a {allowed} image. Fix: convert it to PNG or JPEG") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise WebError(f"the upload decodes to too many pixels (a decompression bomb). Fix: send at most {w.max_image_pixels} pixels") from None
        except Exception as exc:  # Pillow raises many kinds on damaged data; each is the file's fault
            raise WebError(f"the upload is a damaged or truncated image ({type(exc).__name__}). Fix: export it again as PNG or JPEG") from None
    if img.size != (width, height):
        raise WebError("the upload's size changed while decoding. Fix: export it again as PNG or JPEG")
    return img


def _check_dimensions(width: int, height: int, w: WebConfig) -> None:
    if width < 1 or height < 1:
        raise WebError(f"the upload is {width} x {height} px. Fix: send a non-empty image")
    if max(width, height) > w.max_image_side or width * height > w.max_image_pixels:
        raise WebError(
            f"the upload is {width} x {height} px, over the limit of {w.max_image_side} px a side and "
            f"{w.max_image_pixels} pixels. Fix: resize it (a classifier sees 32 x 32 px anyway)"
        )


# --------------------------------------------------------------------------------------------
# Runs in storage
# --------------------------------------------------------------------------------------------


def list_runs(storage: Storage) -> list[dict]:
    """The runs under the storage root: folders holding at least one stage's outputs."""
    runs = []
    for name in storage.children(""):
        if not NAME.fullmatch(name) or ".." in name:
            continue
        stages = [s for s in storage.children(name) if s in STAGE_FOLDERS]
        if stages:
            runs.append({"name": name, "stages": stages, "report": "report" in stages and storage.exists(report_key(name))})
    return runs


def require_run(storage: Storage, run: str) -> list[str]:
    """The stage folders of ``run``; 404 when it has none."""
    check_name(run, "run")
    stages = [s for s in storage.children(run) if s in STAGE_FOLDERS]
    if not stages:
        raise WebError(f"run {run!r} has no outputs under {storage.uri()}. Fix: pick a run from /api/runs", 404)
    return stages


def report_key(run: str) -> str:
    return f"{Layout(run).stage('report')}/report.html"


def run_details(storage: Storage, run: str) -> dict:
    """A run's stages with each stage's summary.json (counts, wall time), its models and dataset splits."""
    stages = require_run(storage, run)
    summaries = {}
    for stage in stages:
        try:
            summaries[stage] = storage.read_json_or_none(f"{Layout(run).stage(stage)}/summary.json")
        except (ValueError, StorageError):
            summaries[stage] = None  # unreadable: shown as missing, never a 500
    splits = {d: [s for s in SPLITS if storage.exists(Layout(run).dataset_split(d, s))] for d in DOMAINS} if "dataset" in stages else {}
    return {
        "name": run,
        "stages": stages,
        "summaries": summaries,
        "highlights": {stage: highlights(summary) for stage, summary in summaries.items()},
        "splits": {d: s for d, s in splits.items() if s},
        "models": list_models(storage, run) if "train" in stages else [],
        "report": "report" in stages and storage.exists(report_key(run)),
        "review": "curate" in stages and storage.exists(f"{Layout(run).stage('curate')}/scores.parquet"),
    }


HIDDEN_SUMMARY_KEYS = {"code_version", "run", "stage", "partial_writes_removed", "experiment"}


def highlights(summary: Any, limit: int = 8) -> list[tuple[str, Any]]:
    """What a person reads first in a stage summary: its counts, rates and sentences, not paths or bookkeeping."""
    if not isinstance(summary, dict):
        return []
    out = []
    for key, value in summary.items():
        if key in HIDDEN_SUMMARY_KEYS or isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, str) and (value.startswith(("/", "s3://")) or len(value) > 300):
            continue
        out.append((key, round(value, 3) if isinstance(value, float) else value))
    return out[:limit]


def stored_config(storage: Storage, run: str, stage: str) -> Optional[Any]:
    """The resolved config a stage recorded (``<run>/<stage>/config.yaml``), or None."""
    key = Layout(run).config_file(stage)
    try:
        if not storage.exists(key):
            return None
        return OmegaConf.create(storage.read_bytes(key).decode())
    except Exception:  # a damaged record: the caller falls back to the app's config
        log.warning("web: cannot read %s", storage.uri(key))
        return None


def run_classes(storage: Storage, run: str, fallback: Sequence[str]) -> list[str]:
    """The class names ``run`` was made with (its prompts or curate config), else ``fallback``."""
    for stage in ("curate", "prompts", "dataset"):
        stored = stored_config(storage, run, stage)
        classes = OmegaConf.select(stored, "prompts.classes") if stored is not None else None
        if classes:
            return [str(c) for c in classes]
    return list(fallback)


# --------------------------------------------------------------------------------------------
# Dataset samples
# --------------------------------------------------------------------------------------------


class Samples:
    """Browsing a run's dataset splits: filtered pages of ids, and one image's bytes by id."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._tables = LRU(2)  # (run, domain, split, size) -> (id -> row, image column)

    def _key(self, run: str, domain: str, split: str) -> str:
        check_name(run, "run")
        check_choice(domain, DOMAINS, "domain")
        check_choice(split, SPLITS, "split")
        key = Layout(run).dataset_split(domain, split)
        if not self.storage.exists(key):
            raise WebError(f"run {run!r} has no {domain}/{split} split. Fix: run the dataset stage, or pick another split", 404)
        return key

    def page(self, run: str, domain: str, split: str, class_name: Optional[str], technique: Optional[str], offset: int, limit: int) -> dict:
        key = self._key(run, domain, split)
        columns = ["id", "class_name", "technique", "accepted"]
        table = self.storage.read_parquet(key, columns=columns)
        rows = table.to_pylist()
        classes = sorted({r["class_name"] for r in rows})
        techniques = sorted({r["technique"] for r in rows if r["technique"]})
        picked = [r for r in rows if (not class_name or r["class_name"] == class_name) and (not technique or r["technique"] == technique)]
        return {
            "run": run, "domain": domain, "split": split, "total": len(picked), "offset": offset,
            "classes": classes, "techniques": techniques,
            "items": [{**r, "url": f"/api/runs/{run}/dataset/{domain}/{split}/{r['id']}.png"} for r in picked[offset : offset + limit]],
        }  # fmt: skip

    def image(self, run: str, domain: str, split: str, image_id: str) -> bytes:
        key = self._key(run, domain, split)
        check_name(image_id, "image id")
        size = self.storage.sizes(key).get(key, 0)

        def load() -> tuple[dict, pa.ChunkedArray]:
            table = self.storage.read_parquet(key, columns=["id", "image"])
            return {i: n for n, i in enumerate(table.column("id").to_pylist())}, table.column("image")

        rows, images = self._tables.get((run, domain, split, size), load)
        if image_id not in rows:
            raise WebError(f"{domain}/{split} of run {run!r} has no image {image_id!r}", 404)
        return images[rows[image_id]].as_py()


# --------------------------------------------------------------------------------------------
# Models and classification
# --------------------------------------------------------------------------------------------


def list_models(storage: Storage, run: str) -> list[dict]:
    """Every trained cell of ``run`` with a model.pt: ``{"key": "<run>/<experiment>/seed-S", ...}``."""
    layout = Layout(run)
    models = []
    for experiment in storage.children(layout.stage("train")):
        if not NAME.fullmatch(experiment) or "." in experiment:
            continue  # config.yaml, summary.json
        for cell in storage.children(f"{layout.stage('train')}/{experiment}"):
            match = SEED.fullmatch(cell)
            if not match or not storage.exists(layout.train_model(experiment, int(match[1]))):
                continue
            seed = int(match[1])
            metrics = None
            try:
                metrics = storage.read_json_or_none(layout.train_metrics(experiment, seed))
            except (ValueError, StorageError):
                pass
            test = (metrics or {}).get("test", {}) if isinstance(metrics, dict) else {}
            accuracy = {d: round(float(m["accuracy"]), 4) for d, m in test.items() if isinstance(m, dict) and "accuracy" in m}
            models.append({"key": f"{run}/{experiment}/seed-{seed}", "run": run, "experiment": experiment, "seed": seed, "test_accuracy": accuracy})
    return models


def parse_model_key(key: Any) -> tuple[str, str, int]:
    """``"<run>/<experiment>/seed-S"`` -> (run, experiment, seed), each checked."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 3 or not SEED.fullmatch(parts[2]):
        raise WebError(f"model {str(key)[:80]!r} is not a model key. Fix: give '<run>/<experiment>/seed-<n>' from /api/models")
    return check_name(parts[0], "run"), check_name(parts[1], "experiment"), int(parts[2][len("seed-") :])


@dataclasses.dataclass
class LoadedModel:
    net: Any  # synth.model.Net in eval mode
    classes: list[str]
    image_size: int
    tta_level: int
    precision: str


class Classifier:
    """Trained models from storage, loaded once each (a few MB), scored like the train stage scores."""

    def __init__(self, storage: Storage, cfg: Config):
        self.storage = storage
        self.cfg = cfg
        self._models = LRU(4)
        self._lock = threading.Lock()  # one forward pass at a time: torch uses every core for each

    def model(self, key: str) -> LoadedModel:
        run, experiment, seed = parse_model_key(key)
        path = Layout(run).train_model(experiment, seed)
        if not self.storage.exists(path):
            raise WebError(f"there is no trained model {key!r}. Fix: pick one from /api/models", 404)
        return self._models.get((key, self.storage.sizes(path).get(path, 0)), lambda: self._load(run, path))

    def _load(self, run: str, path: str) -> LoadedModel:
        from synth.model import load_model

        net, classes = load_model(self.storage.read_bytes(path))
        stored = stored_config(self.storage, run, "train")  # the run's own evaluation settings
        pick = lambda key, default: OmegaConf.select(stored, key, default=default) if stored is not None else default  # noqa: E731
        return LoadedModel(
            net, classes, int(pick("dataset.image_size", self.cfg.dataset.image_size)), int(pick("train.tta_level", self.cfg.train.tta_level)),
            str(pick("train.precision", self.cfg.train.precision)),
        )  # fmt: skip

    def classify(self, key: str, data: bytes) -> dict:
        """The class probabilities of one uploaded image under model ``key``."""
        import torch

        from synth.dataset import Item, normalize_image
        from synth.images import decode_png
        from synth.recipe import logits

        img = read_upload(data, self.cfg.web)  # checks format, size and integrity before the dataset code decodes it
        loaded = self.model(key)
        png = normalize_image(Item(id="upload", label=0, class_name="", source="upload", data=data), loaded.image_size)
        if png is None:
            raise WebError("the upload could not be decoded. Fix: export it again as PNG or JPEG")
        pixels = decode_png(png)[None]
        with self._lock:
            out = logits(loaded.net, pixels, 1, loaded.tta_level, torch.device("cpu"), loaded.precision)
        probs = torch.softmax(out[0], dim=0).tolist()
        ranked = sorted(zip(loaded.classes, probs), key=lambda cp: -cp[1])
        return {
            "model": key, "predicted": ranked[0][0],
            "classes": [{"name": c, "probability": round(p, 6)} for c, p in ranked],
            "input": {"format": img.format, "width": img.width, "height": img.height},
            "preprocessing": f"centre crop to a square, bilinear resize to {loaded.image_size} px (as the dataset stage), "
                             f"test-time augmentation level {loaded.tta_level} (as the train stage)",
            "image_png_base64": base64.b64encode(png).decode("ascii"),
        }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    guidance: Optional[list] = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: bool = False
    result: Optional[GeneratedImages] = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


class GenerationQueue:
    """The one generator behind a bounded queue, served by one worker thread.

    ``submit`` waits at most ``timeout`` seconds; a full queue answers 503 at once, with a
    Retry-After from the recent time per image. A request that timed out before its turn is
    skipped, so a backlog never outlives the clients that asked for it.
    """

    def __init__(self, factory: Callable[[], Any], size: int, timeout: float):
        self.factory = factory
        self.timeout = timeout
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=size)
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._seconds_per_job = 5.0  # until measured
        self.generated = 0

    @property
    def queued(self) -> int:
        """Requests waiting for the generator (the one it is drawing not counted)."""
        return self._jobs.qsize()

    def _retry_after(self) -> int:
        return max(1, int(round(self._seconds_per_job * (self._jobs.qsize() + 1))))

    def submit(self, prompts: list[str], negatives: list[str], seeds: list[int], guidance: Optional[list] = None) -> GeneratedImages:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="synth-web-generator", daemon=True)
                self._thread.start()
        job = _Job(prompts, negatives, seeds, guidance)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise WebError("the generator is busy: every place in its queue is taken. Fix: retry after the time in Retry-After", 503, self._retry_after()) from None
        if not job.done.wait(self.timeout):
            job.cancelled = True
            raise WebError(f"no image within {self.timeout:g} s: the generator is busy. Fix: retry after the time in Retry-After", 503, self._retry_after())
        if isinstance(job.error, ValueError):  # the generator refused this input (the test generators do)
            raise WebError(f"the generator refused this request: {job.error}. Fix: change the prompt", 400)
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self) -> None:
        generator = None
        while True:
            job = self._jobs.get()
            if job.cancelled:
                continue
            start = time.perf_counter()
            try:
                if generator is None:
                    generator = self.factory()
                if job.guidance and any(g is not None for g in job.guidance):
                    job.result = generator.generate(job.prompts, job.negatives, job.seeds, guidance_scales=job.guidance)
                else:
                    job.result = generator.generate(job.prompts, job.negatives, job.seeds)
                self.generated += len(job.prompts)
            except BaseException as exc:  # handed to the request's thread; this one keeps serving
                log.exception("web: generation failed")
                job.error = exc
            finally:
                job.seconds = time.perf_counter() - start
                self._seconds_per_job = 0.7 * self._seconds_per_job + 0.3 * job.seconds
                job.done.set()


class Generation:
    """The generate page's work: a prompt (typed, or a class and technique from the run's prompt
    machinery) through :class:`GenerationQueue`, optionally saved into a run's storage."""

    def __init__(self, storage: Storage, cfg: Config, factory: Optional[Callable[[], Any]] = None):
        from synth.generate import build_generator, generator_class

        self.storage = storage
        self.cfg = cfg
        # The batch stage's generator, keeping the full-resolution image a person wants to see.
        gen_cfg = dataclasses.replace(cfg.generate, keep_full_resolution=True)
        self.queue = GenerationQueue(factory or (lambda: build_generator(gen_cfg, list(cfg.prompts.classes))), cfg.web.queue_size, cfg.web.generate_timeout_s)
        self._needs_model = bool(getattr(generator_class(cfg.generate.generator), "needs_model", False))
        self._count_tokens: Optional[Callable[[str], int]] = None
        self._table: Optional[pa.Table] = None
        self._lock = threading.Lock()

    def options(self) -> dict:
        table = self.prompt_table()
        techniques = sorted(set(table.column("technique").to_pylist()), key=lambda t: (PROMPT_TECHNIQUES + (HOSTILE,)).index(t) if t in PROMPT_TECHNIQUES + (HOSTILE,) else 99)
        return {"classes": list(self.cfg.prompts.classes), "techniques": techniques, "model": self._model_name(), "max_tokens": CLIP_TOKENS}

    def _model_name(self) -> str:
        from synth.generate import model_name

        return model_name(self.cfg.generate)

    def prompt_table(self) -> pa.Table:
        """The config's whole prompt table (pure; built once): class + technique picks a real row of it."""
        from synth.prompts import build_prompt_table

        with self._lock:
            if self._table is None:
                self._table = build_prompt_table(self.cfg)
            return self._table

    def check_prompt(self, prompt: Any) -> str:
        """The prompt, stripped; refused (never cut) when empty or over the text encoder's 77 tokens."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise WebError("the prompt is empty. Fix: type a prompt, or choose a class and a technique")
        prompt = " ".join(prompt.split())
        # Cs: a lone surrogate (a JSON "\ud800" escape) is no text; the tokenizer would fail on it.
        if len(prompt) > MAX_PROMPT_CHARS or any(unicodedata.category(c) in ("Cc", "Cs") for c in prompt):
            raise WebError(f"the prompt is over {MAX_PROMPT_CHARS} characters or holds control characters or unpaired surrogates. Fix: shorten it, type plain text")
        tokens = self._tokens(prompt)
        if tokens is not None and tokens > CLIP_TOKENS:
            raise WebError(f"the prompt is {tokens} CLIP tokens; the text encoder reads {CLIP_TOKENS} (start and end included) and would cut the rest. Fix: shorten it")
        return prompt

    def _tokens(self, prompt: str) -> Optional[int]:
        if not self._needs_model:
            return None  # a generator without a text encoder (the test generators) reads the prompt whole
        if self._count_tokens is None:
            from synth.llm import load_token_counter, tokenizer_source

            self._count_tokens = load_token_counter(*tokenizer_source(self.cfg))
        return self._count_tokens(prompt)

    def pick(self, class_name: Any, technique: Any, seed: Optional[int]) -> dict:
        """A row of the prompt table of that class and technique: at ``seed`` (mod the count) with that
        seed, or, without one, a random row with its own seed (the very image the batch stage made)."""
        check_choice(class_name, list(self.cfg.prompts.classes), "class")
        table = self.prompt_table()
        rows = [r for r in table.select(["id", "class_name", "technique", "prompt", "negative", "seed", "guidance_scale"]).to_pylist()
                if r["class_name"] == class_name and r["technique"] == technique]  # fmt: skip
        if not rows:
            available = sorted({t for c, t in zip(table.column("class_name").to_pylist(), table.column("technique").to_pylist()) if c == class_name})
            raise WebError(f"this config makes no {str(technique)[:40]!r} prompts for {class_name!r}. Fix: choose one of {', '.join(available)}")
        if seed is None:
            return dict(random.choice(rows))
        return {**rows[seed % len(rows)], "seed": seed, "id": None}

    def generate(self, form: Mapping[str, Any]) -> dict:
        seed = parse_int(form.get("seed"), "seed", 0, MAX_SEED)
        save = form.get("save_run") or None
        if save is not None:
            check_name(save, "run to save into")
        typed = form.get("prompt")
        if typed not in (None, "") and form.get("class") not in (None, ""):
            raise WebError("give either a prompt or a class (with a technique), not both")
        if typed not in (None, ""):
            row = {"id": None, "class_name": None, "technique": "typed", "prompt": self.check_prompt(typed),
                   "negative": self.cfg.prompts.negative_prompt, "seed": seed if seed is not None else random.randrange(2**31), "guidance_scale": None}  # fmt: skip
        elif form.get("class") not in (None, ""):
            row = self.pick(form.get("class"), form.get("technique") or "environment", seed)
        else:
            raise WebError("nothing to generate. Fix: type a prompt, or choose a class and a technique")
        start = time.perf_counter()
        images = self.queue.submit([row["prompt"]], [row["negative"]], [int(row["seed"])], [row["guidance_scale"]])
        seconds = time.perf_counter() - start
        full = images.full[0] if images.full is not None else images.small[0]
        out = {
            "prompt": row["prompt"], "negative": row["negative"], "seed": int(row["seed"]), "class_name": row["class_name"],
            "technique": row["technique"], "batch_id": row["id"], "model": self._model_name(), "seconds": round(seconds, 3),
            "width": int(full.shape[1]), "height": int(full.shape[0]), "image_size": int(images.small.shape[1]),
            "image_png_base64": base64.b64encode(encode_png(full)).decode("ascii"),
            "small_png_base64": base64.b64encode(encode_png(images.small[0])).decode("ascii"),
        }  # fmt: skip
        if save:
            out["saved"] = self._save(save, out, encode_png(full), encode_png(images.small[0]))
        return out

    def _save(self, run: str, meta: dict, full_png: bytes, small_png: bytes) -> dict:
        """``<run>/web/generated/<id>.png`` (+ ``-small.png``, ``.json``), each created once, atomically."""
        image_id = f"web-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        prefix = generated_prefix(run)
        record = {k: v for k, v in meta.items() if not k.endswith("_png_base64")} | {"id": image_id, "run": run, "time": datetime.now(timezone.utc).isoformat()}
        for name, data in ((f"{image_id}.png", full_png), (f"{image_id}-small.png", small_png), (f"{image_id}.json", json.dumps(record, indent=1).encode())):
            if not self.storage.create(f"{prefix}/{name}", data):
                raise WebError(f"{self.storage.uri(prefix + '/' + name)} exists already. Fix: generate again", 409)
        return {"run": run, "id": image_id, "url": f"/api/runs/{run}/generated/{image_id}.png", "uri": self.storage.uri(f"{prefix}/{image_id}.png")}


def generated_prefix(run: str) -> str:
    return f"{Layout(run).stage('web')}/generated"


def saved_image(storage: Storage, run: str, image_id: str) -> bytes:
    check_name(run, "run")
    check_name(image_id, "image id")
    key = f"{generated_prefix(run)}/{image_id}.png"
    if not storage.exists(key):
        raise WebError(f"run {run!r} has no saved image {image_id!r}", 404)
    return storage.read_bytes(key)


def list_saved(storage: Storage, run: str) -> list[dict]:
    out = []
    for name in storage.children(generated_prefix(run)):
        if name.endswith(".json"):
            try:
                out.append(json.loads(storage.read_bytes(f"{generated_prefix(run)}/{name}")))
            except (ValueError, StorageError):
                continue
    return sorted(out, key=lambda r: str(r.get("time", "")), reverse=True)


# --------------------------------------------------------------------------------------------
# Review
# --------------------------------------------------------------------------------------------


class Review:
    """The curation review queue with the decision log (:mod:`synth.review`) underneath."""

    def __init__(self, storage: Storage, cfg: Config):
        self.storage = storage
        self.cfg = cfg
        self._thumbs = LRU(4096)

    def _scores(self, run: str, columns: Optional[list[str]] = None) -> pa.Table:
        from synth.curate import read_scores

        check_name(run, "run")
        scores = read_scores(self.storage, run, columns)
        if scores is None:
            raise WebError(f"run {run!r} has no curate scores, so there is nothing to review. Fix: run the curate stage for it", 404)
        return scores

    def classes(self, run: str) -> list[str]:
        check_name(run, "run")  # before it becomes a storage key
        return run_classes(self.storage, run, self.cfg.prompts.classes)

    def queue(self, run: str, order: str, class_name: Optional[str], offset: int, limit: int, undecided: bool = False) -> dict:
        """One page of the queue (per class, in ``order``), each image with its verdict, last decision and thumbnail."""
        from synth.review import ORDERS, QUEUE_SCORE_COLUMNS, build_queue, effective_decisions, read_decisions

        check_choice(order, ORDERS, "order")
        classes = self.classes(run)
        if class_name:
            check_choice(class_name, classes, "class")
        scores = self._scores(run, QUEUE_SCORE_COLUMNS + (["embedding"] if order == "diverse" else []))
        last = effective_decisions(read_decisions(self.storage, run))
        queued = build_queue(scores, order, classes, only=[class_name] if class_name else None, skip=last if undecided else ())
        rows = queued.to_pylist()
        page = rows[offset : offset + limit]
        stage_of = dict(zip(scores.column("id").to_pylist(), scores.column("stage").to_pylist()))
        thumbs = self.thumbnails(run, {r["id"]: stage_of[r["id"]] for r in page})
        items = []
        for r in page:
            d = last.get(r["id"])
            state = {"decision": d.decision, "class": d.cls, "reviewer": d.reviewer} if d else None
            items.append({**r, "similarity": round(float(r["similarity"]), 4), "prob_own": round(float(r["prob_own"]), 4),
                          "entropy": round(float(r["entropy"]), 4), "decision": state, "thumbnail": thumbs.get(r["id"])})  # fmt: skip
        return {"run": run, "order": order, "class": class_name, "classes": classes, "total": len(rows), "offset": offset,
                "decided": len(last), "items": items}  # fmt: skip

    def thumbnails(self, run: str, stage_of: Mapping[str, str]) -> dict[str, str]:
        """``{id: data URI}`` of the stored images (read from the stage shards once, then cached)."""
        from synth.review import read_images

        out = {i: self._thumbs.peek((run, i)) for i in stage_of}
        missing = {i: s for i, s in stage_of.items() if out[i] is None}
        if missing:
            for image_id, data in read_images(self.storage, run, missing).items():
                out[image_id] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                self._thumbs.put((run, image_id), out[image_id])
        return {i: uri for i, uri in out.items() if uri is not None}

    def decide(self, run: str, body: Any) -> dict:
        """Record ``{"reviewer", "decisions": [{"id", "decision", "class"?}, ...]}`` as one log submission."""
        from synth.review import ReviewError, record_decisions

        reviewer, entries = self._body(body)
        for n, e in enumerate(entries, 1):
            if not isinstance(e, dict) or set(e) - {"id", "decision", "class"}:
                raise WebError(f"decision {n} must be an object with id, decision and (for relabel) class")
        self._scores(run, ["id"])
        try:
            key = record_decisions(self.storage, run, self.classes(run), entries, reviewer, source="the web app")
        except ReviewError as exc:
            raise WebError(str(exc)) from None
        return {"recorded": len(entries), "submission": key.rsplit("/", 1)[-1]}

    def undo(self, run: str, body: Any) -> dict:
        """Undo one submission: each of its ids gets back the decision it had before (or the filter's
        verdict), as a new submission (the log is append-only). An id decided otherwise since keeps
        that later decision; one still as this submission left it (undos undone in stack order) is restored."""
        from synth.review import ReviewError, effective_decisions, read_decisions, record_decisions

        check_name(run, "run")  # before it becomes a storage key
        if not isinstance(body, dict):
            raise WebError("send a JSON object: {\"reviewer\": ..., \"submission\": ...}")
        reviewer = body.get("reviewer")
        submission = body.get("submission")
        if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > 100:
            raise WebError("the reviewer name is missing. Fix: give your name (at most 100 characters)")
        if not isinstance(submission, str) or not re.fullmatch(r"[0-9TZ]+-[0-9a-f]{8}\.jsonl", submission):
            raise WebError("submission must be the name a decision request returned, e.g. 20261129T101500123456Z-1a2b3c4d.jsonl")
        decisions = read_decisions(self.storage, run)
        mine = [d for d in decisions if d.source.rsplit("/", 1)[-1] == submission]
        if not mine:
            raise WebError(f"run {run!r} has no decision submission {submission!r}", 404)
        start = min(d.sort_key() for d in mine)
        before = effective_decisions([d for d in decisions if d.sort_key() < start])
        now = effective_decisions(decisions)
        scores = self._scores(run, ["id", "accepted"])
        verdict = dict(zip(scores.column("id").to_pylist(), scores.column("accepted").to_pylist()))
        entries, kept = [], []
        for d in mine:
            current = now[d.id]
            if (current.decision, current.cls) != (d.decision, d.cls):
                kept.append(d.id)  # decided otherwise since: that later decision stands
                continue
            if any(e["id"] == d.id for e in entries):
                continue
            prior = before.get(d.id)
            if prior is not None:
                entries.append({"id": d.id, "decision": prior.decision, **({"class": prior.cls} if prior.decision == "relabel" else {})})
            else:
                entries.append({"id": d.id, "decision": "accept" if verdict.get(d.id) else "reject"})
        if not entries:
            return {"restored": 0, "kept": kept, "submission": None}
        try:
            key = record_decisions(self.storage, run, self.classes(run), entries, reviewer.strip(), source="the web app (undo)")
        except ReviewError as exc:
            raise WebError(str(exc)) from None
        return {"restored": len(entries), "kept": kept, "submission": key.rsplit("/", 1)[-1]}

    def log(self, run: str, limit: int) -> dict:
        from synth.review import effective_decisions, read_decisions

        self._scores(run, ["id"])
        decisions = read_decisions(self.storage, run)
        recent = sorted(decisions, key=lambda d: d.sort_key(), reverse=True)[:limit]
        return {"run": run, "total": len(decisions), "effective": len(effective_decisions(decisions)),
                "recent": [{**d.to_json(), "submission": d.source.rsplit("/", 1)[-1]} for d in recent]}  # fmt: skip

    @staticmethod
    def _body(body: Any) -> tuple[str, list]:
        if not isinstance(body, dict):
            raise WebError("send a JSON object: {\"reviewer\": ..., \"decisions\": [{\"id\", \"decision\", \"class\"}]}")
        reviewer, entries = body.get("reviewer"), body.get("decisions")
        if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > 100:
            raise WebError("the reviewer name is missing. Fix: give your name (at most 100 characters)")
        if not isinstance(entries, list) or not entries or len(entries) > 10_000:
            raise WebError("decisions must be a list of 1 to 10000 objects {id, decision, class}")
        return reviewer, entries

