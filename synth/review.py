"""The review queue and the decision log: a person looks at the worst-scored images first and decides.

Reads the curate stage's ``<run>/curate/scores.parquet`` (one row per synthetic image: its CLIP
similarity to its own class prompt, class probabilities, entropy, rank within its class,
embedding, and the filter's verdict) and writes, under ``<run>/curate/review/``:

- ``queue-<order>.parquet``: per class, the images in review order (``position`` 1 = look first);
- ``queue-<order>.html``: the same as one self-contained contact sheet (thumbnails as base64 PNG
  data URIs, inline CSS, nothing fetched), each captioned with its id, similarity, rank, the
  filter's verdict and the last review decision.

Three orders, each a pure function of the scores (:func:`order_score`, :func:`order_uncertainty`,
:func:`order_diverse`):

- ``score``: lowest similarity first (``rank`` descending: the last-ranked image of its class);
- ``uncertainty``: highest entropy of the class probabilities first (CLIP cannot tell the class);
- ``diverse``: the score order, skipping an image whose embedding cosine to one already queued in
  its class is >= ``threshold``, so a run of near-identical images takes one slot, not twenty.

Decisions (accept / reject / relabel to another class) are an append-only log: each submission is
one new object ``<run>/curate/decisions/<utc-time>-<uuid8>.jsonl``, created atomically and never
modified, one JSON object a line: ``{"id", "decision", "class" (relabel only), "reviewer",
"time"}``. A submission is validated whole before anything is written. The latest decision for an
id wins (by time, then file name, then line), so "undo" is simply a later decision.
:func:`curation_state` is what the dataset stage applies: the filter's verdicts with the
decisions on top.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional

import numpy as np
import pyarrow as pa
from PIL import Image

from synth.config import HOSTILE, Config, class_slug
from synth.curate import embeddings as curate_embeddings
from synth.curate import read_scores, scores_key
from synth.storage import Layout, Storage

log = logging.getLogger(__name__)

ORDERS = ("score", "uncertainty", "diverse")
DECISIONS = ("accept", "reject", "relabel")
DEFAULT_THRESHOLD = 0.9  # embedding cosine at or above which two images count as near-identical
THUMBNAIL_PX = 128  # the longer side of a contact-sheet thumbnail
# The columns of scores.parquet the queue reads (the contract's; probabilities are not needed).
QUEUE_SCORE_COLUMNS = ["id", "class_name", "technique", "stage", "similarity", "prob_own", "entropy", "rank", "accepted", "reason"]
QUEUE_SCHEMA = pa.schema(
    [
        ("position", pa.int32()),  # 1 = review first, within its class
        ("id", pa.string()),
        ("class_name", pa.string()),
        ("technique", pa.string()),
        ("similarity", pa.float32()),
        ("prob_own", pa.float32()),
        ("entropy", pa.float32()),
        ("rank", pa.int32()),
        ("accepted", pa.bool_()),  # the filter's verdict, before review
        ("reason", pa.string()),
    ]
)
DECISION_FILE_KEYS = ("id", "decision", "class")  # what one line of a CSV or JSONL submission holds
MAX_ERRORS_SHOWN = 5


class ReviewError(ValueError):
    """A review input (decision, decision file, stored log, queue option) is wrong; the message names the fix."""


# --------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------


def decisions_prefix(run: str) -> str:
    return f"{Layout(run).stage('curate')}/decisions"


def queue_key(run: str, order: str, ext: str) -> str:
    """``<run>/curate/review/queue-<order>.<parquet|html>``."""
    return f"{Layout(run).stage('curate')}/review/queue-{order}.{ext}"


def _require_scores(storage: Storage, run: str, columns: Optional[list[str]] = None) -> pa.Table:
    scores = read_scores(storage, run, columns)
    if scores is None:
        raise ReviewError(
            f"run {run!r} has no curate scores at {storage.uri(scores_key(run))}, so there is nothing to review. "
            "Fix: run the curate stage first (python -m ray_jobs.curate <config>) with this run and storage.root"
        )
    return scores


def _canonical_class(name: str, classes: Sequence[str]) -> Optional[str]:
    """``name`` as spelled in ``classes`` (matched exactly, else by slug: 'Oil Painting' = 'oil painting'), or None."""
    if name in classes:
        return name
    slug = class_slug(name)
    return next((c for c in classes if class_slug(c) == slug), None)


# --------------------------------------------------------------------------------------------
# 1. The orders: pure functions of one class's scores, returning row indices in review order
# --------------------------------------------------------------------------------------------


def order_score(ids: Sequence[str], rank: Sequence[int]) -> list[int]:
    """Lowest similarity first: ``rank`` descending (rank 1 is the class's best image); ties by id."""
    return sorted(range(len(ids)), key=lambda i: (-int(rank[i]), ids[i]))


def order_uncertainty(ids: Sequence[str], entropy: Sequence[float], rank: Sequence[int]) -> list[int]:
    """Highest entropy of the class probabilities first; ties by the score order."""
    return sorted(range(len(ids)), key=lambda i: (-float(entropy[i]), -int(rank[i]), ids[i]))


def order_diverse(
    ids: Sequence[str], rank: Sequence[int], embeddings: np.ndarray, threshold: float = DEFAULT_THRESHOLD, limit: Optional[int] = None
) -> list[int]:
    """The score order, skipping an image whose cosine to one already queued is >= ``threshold``.

    ``embeddings`` is (N, D); rows are normalised here, so unnormalised input gives cosines too.
    Stops after ``limit`` queued images (the skip depends on what is queued, so the limit is
    applied here rather than by cutting the result).
    """
    unit = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = unit / np.where(norms > 0, norms, 1.0)
    queued: list[int] = []
    for i in order_score(ids, rank):
        if limit is not None and len(queued) >= limit:
            break
        if queued and float(np.max(unit[queued] @ unit[i])) >= threshold:
            continue
        queued.append(i)
    return queued


def _check_options(order: str, per_class: Optional[int], threshold: float) -> None:
    if order not in ORDERS:
        raise ReviewError(f"unknown queue order {order!r}. Fix: choose one of {', '.join(ORDERS)}")
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise ReviewError(f"per-class limit {per_class!r} must be a whole number >= 1 (or none for every image)")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ReviewError(f"diverse threshold {threshold!r} must be a cosine in (0, 1]; the default is {DEFAULT_THRESHOLD}")


def queue_classes(scores_classes: Iterable[str], classes: Sequence[str], only: Optional[Sequence[str]] = None) -> list[str]:
    """The classes to queue, in the config's order (then any other class the scores hold, sorted)."""
    present = set(scores_classes)
    if only:
        chosen = []
        for name in only:
            canonical = _canonical_class(name, list(classes) + sorted(present - set(classes)))
            if canonical is None:
                raise ReviewError(f"unknown class {name!r} for the review queue. Fix: choose among {list(classes)}")
            if canonical not in chosen:
                chosen.append(canonical)
        return chosen
    return [c for c in classes if c in present] + sorted(present - set(classes))


def build_queue(
    scores: pa.Table,
    order: str,
    classes: Sequence[str],
    per_class: Optional[int] = None,
    threshold: float = DEFAULT_THRESHOLD,
    skip: Iterable[str] = (),
    only: Optional[Sequence[str]] = None,
) -> pa.Table:
    """The review queue as a table (:data:`QUEUE_SCHEMA`): per class in ``classes`` order, ``order``'s order.

    ``skip``: ids left out (those already decided); ``only``: a subset of the classes.
    """
    _check_options(order, per_class, threshold)
    skip = set(skip)
    names = scores.column("class_name").to_pylist()
    ids = scores.column("id").to_pylist()
    rank = scores.column("rank").to_numpy()
    entropy = scores.column("entropy").to_numpy(zero_copy_only=False)
    embeddings = curate_embeddings(scores.column("embedding")) if order == "diverse" else None
    techniques = scores.column("technique").to_pylist()
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, (image_id, name, technique) in enumerate(zip(ids, names, techniques)):
        # Hostile examples imitate the class without being it: nothing to accept or reject for it.
        if image_id not in skip and technique != HOSTILE:
            by_class[name].append(i)

    picked: list[int] = []
    positions: list[int] = []
    for name in queue_classes(names, classes, only):
        rows = by_class.get(name, [])
        class_ids = [ids[i] for i in rows]
        if order == "score":
            local = order_score(class_ids, rank[rows])[:per_class]
        elif order == "uncertainty":
            local = order_uncertainty(class_ids, entropy[rows], rank[rows])[:per_class]
        else:
            local = order_diverse(class_ids, rank[rows], embeddings[rows], threshold, per_class)
        picked.extend(rows[j] for j in local)
        positions.extend(range(1, len(local) + 1))
    taken = scores.take(pa.array(picked, pa.int64()))
    columns = {"position": pa.array(positions, pa.int32())}
    for f in QUEUE_SCHEMA:
        if f.name != "position":
            columns[f.name] = taken.column(f.name).cast(f.type)
    return pa.table(columns, schema=QUEUE_SCHEMA)


# --------------------------------------------------------------------------------------------
# 2. Decisions: validate a whole submission, write it as one new object; read the log back
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One line of the decision log, and where it is stored."""

    id: str
    decision: str  # accept | reject | relabel
    cls: Optional[str]  # the new class (relabel only)
    reviewer: str
    time: datetime  # UTC
    source: str = ""  # the log object's key
    line: int = 0  # 1-based line in it

    def sort_key(self) -> tuple:
        """Later decisions win: ordered by time, then file name, then line."""
        return (self.time, self.source.rsplit("/", 1)[-1], self.line)

    def to_json(self) -> dict:
        obj = {"id": self.id, "decision": self.decision}
        if self.decision == "relabel":
            obj["class"] = self.cls
        obj.update(reviewer=self.reviewer, time=format_time(self.time))
        return obj


def format_time(t: datetime) -> str:
    """ISO-8601 UTC with microseconds and a Z: ``2026-11-29T04:25:23.123456Z``."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value) -> Optional[datetime]:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t.astimezone(timezone.utc) if t.tzinfo is not None else None


def _problem(entry: Mapping, known: Optional[Mapping[str, str]], classes: Optional[Sequence[str]]) -> tuple[Optional[str], Optional[str]]:
    """(what is wrong with one decision, or None; its class as spelled in ``classes``).

    ``known``: {id: class name} of the scored images (None: ids are not checked); ``classes``:
    the classes a relabel may name (None: any non-empty name).
    """
    image_id, decision, cls = entry.get("id"), entry.get("decision"), entry.get("class")
    if not isinstance(image_id, str) or not image_id.strip():
        return f"the id is {image_id!r}; give the image id as a non-empty string", None
    if decision not in DECISIONS:
        return f"unknown decision {decision!r} for {image_id!r}; use one of {', '.join(DECISIONS)}", None
    if cls is not None and not isinstance(cls, str):
        return f"the class of {image_id!r} is {cls!r}; give a class name as a string", None
    cls = (cls or "").strip() or None
    if known is not None and image_id not in known:
        return f"no image {image_id!r} in this run's curate scores; check the id (the queue's table lists them)", None
    if decision != "relabel":
        if cls is not None:
            return f"{decision} of {image_id!r} names a class ({cls!r}); only relabel takes one (leave it empty)", None
        return None, None
    if cls is None:
        which = f", one of {list(classes)}" if classes is not None else ""
        return f"relabel of {image_id!r} names no class; give the class to relabel it to{which}", None
    canonical = cls if classes is None else _canonical_class(cls, classes)
    if canonical is None:
        return f"relabel of {image_id!r} to unknown class {cls!r}; choose one of prompts.classes {list(classes)}", None
    if known is not None and class_slug(known[image_id]) == class_slug(canonical):
        return f"relabel of {image_id!r} to its own class {canonical!r}; use accept instead", None
    return None, canonical


def _raise_all(problems: list[str], what: str, fix: str) -> None:
    shown = "; ".join(problems[:MAX_ERRORS_SHOWN])
    more = f" (and {len(problems) - MAX_ERRORS_SHOWN} more)" if len(problems) > MAX_ERRORS_SHOWN else ""
    raise ReviewError(f"{what}: {shown}{more}. {fix}")


def record_decisions(
    storage: Storage,
    run: str,
    classes: Sequence[str],
    entries: Sequence[Mapping],
    reviewer: str,
    now: Optional[datetime] = None,
    source: str = "",
) -> str:
    """Validate every decision, then store them as one new log object; returns its key.

    ``entries``: ``{"id", "decision", "class" (relabel only), "line" (optional: where it came
    from, for messages)}``. Nothing is written if any entry is wrong; the error lists them.
    """
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ReviewError("the reviewer name is empty. Fix: give your name, e.g. --reviewer alice")
    if not entries:
        raise ReviewError(f"no decisions to record{' in ' + source if source else ''}. Fix: give at least one")
    scores = _require_scores(storage, run, ["id", "class_name"])
    known = dict(zip(scores.column("id").to_pylist(), scores.column("class_name").to_pylist()))
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    problems, lines = [], []
    for n, entry in enumerate(entries, 1):
        problem, cls = _problem(entry, known, classes)
        where = f"line {entry['line']}" if "line" in entry else f"decision {n}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        lines.append(Decision(entry["id"], entry["decision"], cls, reviewer.strip(), now).to_json())
    if problems:
        _raise_all(problems, f"refused {len(entries)} decision(s){' from ' + source if source else ''}", "Nothing was recorded; fix them and submit again")
    key = f"{decisions_prefix(run)}/{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.jsonl"
    data = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode()
    if not storage.create(key, data):  # a fresh uuid: only a broken store says it exists
        raise ReviewError(f"cannot record decisions: {storage.uri(key)} exists already. Fix: submit again")
    return key


def parse_decision_file(path: str | Path) -> list[dict]:
    """The decisions of a local CSV (header ``id,decision,class``) or JSONL file, each with its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReviewError(f"decision file {path} does not exist. Fix: give the path of a .csv or .jsonl file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReviewError(f"cannot read decision file {path}: {exc}. Fix: give a UTF-8 .csv or .jsonl file") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        entries = _parse_csv(text, path)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        entries = _parse_jsonl(text, path)
    else:
        raise ReviewError(f"decision file {path}: unknown format {suffix or '(no suffix)'!r}. Fix: use a .csv (id,decision,class) or .jsonl file")
    if not entries:
        raise ReviewError(f"decision file {path} holds no decisions. Fix: add lines (id,decision,class)")
    return entries


def _parse_csv(text: str, path: Path) -> list[dict]:
    reader = csv.reader(io.StringIO(text), strict=True)
    entries: list[dict] = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip().lower() for h in header]
        missing = [c for c in ("id", "decision") if c not in header]
        unknown = [c for c in header if c not in DECISION_FILE_KEYS]
        if missing or unknown or len(set(header)) != len(header):
            raise ReviewError(
                f"decision file {path} line 1: the header is {header}; it must name the columns id, decision "
                f"and (for relabels) class{f', lacks {missing}' if missing else ''}{f', has unknown {unknown}' if unknown else ''}. "
                "Fix: make the first line id,decision,class"
            )
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ReviewError(
                    f"decision file {path} line {reader.line_num}: {len(row)} fields where the header has {len(header)} "
                    f"({','.join(header)}). Fix: one decision a line, e.g. cat-000001,relabel,dog or cat-000002,reject,"
                )
            entry = {k: v.strip() for k, v in zip(header, row)}
            entry["class"] = entry.get("class") or None
            entry["line"] = reader.line_num
            entries.append(entry)
    except csv.Error as exc:
        raise ReviewError(f"decision file {path} line {reader.line_num}: malformed CSV ({exc}). Fix: check the quoting on that line") from None
    return entries


def _parse_jsonl(text: str, path: Path) -> list[dict]:
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReviewError(f"decision file {path} line {n}: not JSON ({exc.msg}). Fix: one JSON object a line, e.g. "
                              '{"id": "cat-000001", "decision": "relabel", "class": "dog"}') from None  # fmt: skip
        if not isinstance(obj, dict):
            raise ReviewError(f"decision file {path} line {n}: a {type(obj).__name__}, not a JSON object. Fix: one object a line")
        unknown = sorted(set(obj) - set(DECISION_FILE_KEYS))
        if unknown:
            raise ReviewError(f"decision file {path} line {n}: unknown keys {unknown}. Fix: a line holds only id, decision and (relabel) class")
        for key in DECISION_FILE_KEYS:
            value = obj.get(key)
            if key in ("id", "decision") and key not in obj:
                raise ReviewError(f"decision file {path} line {n}: no {key!r}. Fix: give id and decision on every line")
            if value is not None and not isinstance(value, str):
                raise ReviewError(f"decision file {path} line {n}: {key} is {value!r} ({type(value).__name__}). Fix: give it as a string")
        entries.append({"id": obj["id"], "decision": obj["decision"], "class": obj.get("class"), "line": n})
    return entries


def read_decisions(storage: Storage, run: str) -> list[Decision]:
    """Every stored decision, oldest first (time, file name, line); a malformed log object is an error naming it."""
    decisions: list[Decision] = []
    for key in storage.list(decisions_prefix(run)):
        if not key.endswith(".jsonl"):
            log.warning("review: ignoring %s in the decision log (not a .jsonl object)", storage.uri(key))
            continue
        decisions.extend(_read_log_object(storage, run, key))
    return sorted(decisions, key=Decision.sort_key)


def _read_log_object(storage: Storage, run: str, key: str) -> list[Decision]:
    def bad(n: int, problem: str) -> ReviewError:
        return ReviewError(
            f"decision log {storage.uri(key)} line {n}: {problem}. Fix: log objects are written only by "
            "`python -m ray_jobs.review ... decide` and never edited; restore this one, or move it out of "
            f"{storage.uri(decisions_prefix(run))} and record its decisions again"
        )

    try:
        text = storage.read_bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise bad(1, "not UTF-8 text") from None
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(n, f"not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise bad(n, "not a JSON object")
        problem, cls = _problem(obj, None, None)
        if problem:
            raise bad(n, problem)
        reviewer, when = obj.get("reviewer"), _parse_time(obj.get("time"))
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise bad(n, f"the reviewer is {reviewer!r}")
        if when is None:
            raise bad(n, f"the time {obj.get('time')!r} is not ISO-8601 with a time zone")
        found.append(Decision(obj["id"], obj["decision"], cls, reviewer, when, key, n))
    return found


def effective_decisions(decisions: Iterable[Decision]) -> dict[str, Decision]:
    """The decision that counts for each id: the latest (time, then file name, then line)."""
    latest: dict[str, Decision] = {}
    for d in sorted(decisions, key=Decision.sort_key):
        latest[d.id] = d
    return latest


@dataclass
class CurationState:
    """The filter's verdicts with the review decisions applied, for the dataset stage."""

    accepted: dict[str, bool] = field(default_factory=dict)  # every scored id
    relabel: dict[str, str] = field(default_factory=dict)  # id -> its new class name
    decisions: int = 0  # effective decisions applied (on ids that are scored)


def curation_state(
    storage: Storage, run: str, classes: Sequence[str], decisions: Optional[Sequence[Decision]] = None
) -> Optional[CurationState]:
    """The accepted set after review (None when the curate stage has not run); ``decisions``: the
    log as :func:`read_decisions` returns it, when the caller has read it already.

    accept -> True, reject -> False, relabel -> True with the new class; the latest decision per
    id wins. Decisions on ids the scores no longer hold (the curate stage was rerun on other
    images) are left out with a warning.
    """
    scores = read_scores(storage, run, ["id", "accepted"])
    if scores is None:
        return None
    accepted = dict(zip(scores.column("id").to_pylist(), scores.column("accepted").to_pylist()))
    state = CurationState(accepted={k: bool(v) for k, v in accepted.items()})
    stale = 0
    for image_id, d in effective_decisions(read_decisions(storage, run) if decisions is None else decisions).items():
        if image_id not in state.accepted:
            stale += 1
            continue
        state.accepted[image_id] = d.decision != "reject"
        if d.decision == "relabel":
            cls = _canonical_class(d.cls, classes)
            if cls is None:
                raise ReviewError(
                    f"decision log {storage.uri(d.source)} line {d.line} relabels {image_id!r} to {d.cls!r}, which is not "
                    f"in prompts.classes {list(classes)}. Fix: add the class to prompts.classes, or record a new "
                    "decision for that id (python -m ray_jobs.review <config> decide ...)"
                )
            state.relabel[image_id] = cls
        state.decisions += 1
    if stale:
        log.warning("review: %d decision(s) in run %r name ids the curate scores do not hold; left out", stale, run)
    return state


# --------------------------------------------------------------------------------------------
# 3. The contact sheet
# --------------------------------------------------------------------------------------------

Thumbnails = Callable[[Mapping[str, str]], dict[str, bytes]]  # {id: stage} -> {id: image bytes}


def read_images(storage: Storage, run: str, stage_of: Mapping[str, str]) -> dict[str, bytes]:
    """The stored image bytes of ``stage_of``'s ids ({id: generate|derive}), via each stage's manifest and shards.

    Ids whose manifest, shard or row is missing or unreadable are left out (the sheet shows a
    placeholder and the summary counts them).
    """
    layout = Layout(run)
    wanted: dict[str, set[str]] = defaultdict(set)
    for image_id, stage in stage_of.items():
        wanted[stage].add(image_id)
    found: dict[str, bytes] = {}
    for stage, ids in sorted(wanted.items()):
        try:
            manifest = storage.read_parquet(layout.manifest(stage), columns=["id", "shard"])
        except (FileNotFoundError, OSError, pa.ArrowException) as exc:
            log.warning("review: no thumbnails from the %s stage (%s: %s)", stage, type(exc).__name__, exc)
            continue
        shards = {int(s) for i, s in zip(manifest.column("id").to_pylist(), manifest.column("shard").to_pylist()) if i in ids}
        for shard in sorted(shards):
            try:
                table = storage.read_parquet(layout.shard(stage, shard), columns=["id", "image"])
            except (FileNotFoundError, OSError, pa.ArrowException) as exc:
                log.warning("review: cannot read %s shard %d for thumbnails (%s)", stage, shard, exc)
                continue
            for image_id, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
                if image_id in ids:
                    found[image_id] = data
    return found


def thumbnail_png(data: bytes, size: int = THUMBNAIL_PX) -> bytes:
    """PNG of an image scaled to ``size`` px on its longer side: small ones upscaled nearest-neighbour (crisp pixels)."""
    with Image.open(io.BytesIO(data)) as stored:
        img = stored.convert("RGB")
    longest = max(img.size)
    if longest < size:
        factor = max(1, size // longest)
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    elif longest > size:
        img.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{margin-top:1.5em;border-bottom:1px solid #ccc}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:150px;font-size:11px;line-height:1.3}
figure img,.missing{width:128px;height:128px;image-rendering:pixelated;display:block;border:3px solid #9c9}
figure.rejected img,figure.rejected .missing{border-color:#d88}
.missing{background:#eee;color:#888;display:flex;align-items:center;justify-content:center}
.id{font-family:monospace;font-weight:600;word-break:break-all}
.decision{color:#036}
"""


def render_contact_sheet(title: str, queue: pa.Table, images: Mapping[str, bytes], last: Mapping[str, Decision]) -> str:
    """The queue as one self-contained HTML page: per class a grid of captioned base64 PNG thumbnails."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_CSS}</style></head><body>',
        f"<h1>{esc(title)}</h1>",
        (
            "<p>Per class, in review order. Border: green = passed the filter, red = rejected by it. "
            "Record decisions with <code>python -m ray_jobs.review &lt;config&gt; decide</code>.</p>"
        ),
    ]
    rows = queue.to_pylist()
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row["class_name"]].append(row)
    if not rows:
        out.append("<p>Nothing to review.</p>")
    for name, members in by_class.items():
        out.append(f'<h2>{esc(name)} ({len(members)})</h2><div class="grid">')
        for row in members:
            verdict = "accepted" if row["accepted"] else f"rejected: {row['reason'] or '?'}"
            data = images.get(row["id"])
            picture = '<div class="missing">no image</div>'
            if data is not None:
                try:
                    encoded = base64.b64encode(thumbnail_png(data)).decode("ascii")
                    picture = f'<img src="data:image/png;base64,{encoded}" alt="{esc(row["id"])}">'
                except (OSError, ValueError):
                    picture = '<div class="missing">unreadable image</div>'
            caption = [
                f'<span class="id">{row["position"]}. {esc(row["id"])}</span>',
                f"{esc(row['technique'])} · sim {row['similarity']:.3f} · rank {row['rank']}",
                f"p(own) {row['prob_own']:.2f} · H {row['entropy']:.2f}",
                f"filter: {esc(verdict)}",
            ]
            d = last.get(row["id"])
            if d is not None:
                what = f"{d.decision} → {d.cls}" if d.decision == "relabel" else d.decision
                caption.append(f'<span class="decision">review: {esc(what)} by {esc(d.reviewer)}, {esc(format_time(d.time)[:16])}Z</span>')
            css = "" if row["accepted"] else ' class="rejected"'
            out.append(f"<figure{css}>{picture}<figcaption>{'<br>'.join(caption)}</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_queue(
    storage: Storage,
    run: str,
    classes: Sequence[str],
    order: str = "score",
    per_class: Optional[int] = None,
    only: Optional[Sequence[str]] = None,
    include_decided: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    thumbnails: Optional[Thumbnails] = None,
) -> dict:
    """Build the queue and write its table and contact sheet; returns where they went and the counts.

    ``thumbnails`` maps {id: stage} to {id: image bytes}; default: read from the run's shards.
    """
    _check_options(order, per_class, threshold)
    columns = QUEUE_SCORE_COLUMNS + (["embedding"] if order == "diverse" else [])
    scores = _require_scores(storage, run, columns)
    last = effective_decisions(read_decisions(storage, run))
    skip = () if include_decided else set(last)
    queue = build_queue(scores, order, classes, per_class, threshold, skip, only)
    ids = scores.column("id").to_pylist()
    stage = dict(zip(ids, scores.column("stage").to_pylist()))
    queued_classes = set(queue_classes(scores.column("class_name").to_pylist(), classes, only))
    decided = sum(1 for i, c in zip(ids, scores.column("class_name").to_pylist()) if i in last and c in queued_classes)
    wanted = {i: stage[i] for i in queue.column("id").to_pylist()}
    images = (thumbnails or (lambda s: read_images(storage, run, s)))(wanted)
    table_key, html_key = queue_key(run, order, "parquet"), queue_key(run, order, "html")
    storage.write_parquet(table_key, queue)
    title = f"Review queue of run {run}: {order} order"
    storage.write_text(html_key, render_contact_sheet(title, queue, images, last))
    per = defaultdict(int)
    for name in queue.column("class_name").to_pylist():
        per[name] += 1
    return {
        "order": order,
        "images": queue.num_rows,
        "per_class": dict(per),
        "skipped_decided": 0 if include_decided else decided,
        "missing_thumbnails": sum(1 for i in wanted if i not in images),
        "table": storage.uri(table_key),
        "html": storage.uri(html_key),
    }


# --------------------------------------------------------------------------------------------
# 4. What the command line calls
# --------------------------------------------------------------------------------------------


def run_queue(cfg: Config, order: str = "score", per_class: Optional[int] = None, only: Optional[Sequence[str]] = None,
              include_decided: bool = False, threshold: float = DEFAULT_THRESHOLD) -> dict:  # fmt: skip
    """``review queue``: write the queue table and contact sheet of ``cfg.run``."""
    storage = Storage.from_config(cfg.storage)
    return write_queue(storage, cfg.run, list(cfg.prompts.classes), order, per_class, only, include_decided, threshold)


def run_decide(cfg: Config, reviewer: str, entries: Sequence[Mapping], source: str = "") -> dict:
    """``review decide``: record one submission of decisions."""
    storage = Storage.from_config(cfg.storage)
    key = record_decisions(storage, cfg.run, list(cfg.prompts.classes), entries, reviewer, source=source)
    return {"decisions": len(entries), "log": storage.uri(key)}


def run_log(cfg: Config) -> dict:
    """``review log``: the effective decisions (the latest per id) and what they make of the accepted set."""
    storage = Storage.from_config(cfg.storage)
    classes = list(cfg.prompts.classes)
    decisions = read_decisions(storage, cfg.run)
    latest = effective_decisions(decisions)
    state = curation_state(storage, cfg.run, classes, decisions)
    return {
        "effective": [latest[k] for k in sorted(latest, key=lambda k: latest[k].sort_key())],
        "accepted": sum(state.accepted.values()) if state else None,
        "scored": len(state.accepted) if state else None,
        "log": storage.uri(decisions_prefix(cfg.run)),
    }


__all__ = [
    "CurationState", "Decision", "ReviewError", "ORDERS", "DECISIONS", "build_queue", "curation_state",
    "effective_decisions", "order_diverse", "order_score", "order_uncertainty", "parse_decision_file",
    "read_decisions", "read_images", "read_scores", "record_decisions", "render_contact_sheet", "write_queue",
    "run_queue", "run_decide", "run_log",
]  # fmt: skip
