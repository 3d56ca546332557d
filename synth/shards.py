"""The generate stage's stored form: shards that say which plan made them and carry a checksum.

A shard is one Parquet object, ``<run>/<stage>/shards/shard-0000k.parquet`` (``generate`` for
text-to-image, ``derive`` for images made from parent images): the manifest columns of its
images plus their PNG bytes. Its footer's key-value metadata says what it is,
recorded when it is written:

- ``synth.shard``: ``k``, so a copy of another shard under this name is caught;
- ``synth.plan_sha256``: the hash of the plan it was made under (``plan.json``), so a shard from
  another plan is caught;
- ``synth.content_sha256``: a sha256 over every value of every row, so a flipped byte in a page is
  caught even where Parquet's own decoding would not notice it.

:func:`check_shard` reads one stored object against what the plan expects there; everything
that reads shards (the generate stage's resume, the dataset stage, the verify stage) goes
through it. This module sits on the ground floor: it imports nothing else of synth's.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_COLUMNS = [
    "id", "label", "class_name", "prompt", "negative", "seed", "technique", "parents", "params", "model", "width",
    "height", "shard",
]  # fmt: skip
SHARD_COLUMNS = MANIFEST_COLUMNS + ["image"]
META_SHARD, META_PLAN, META_CONTENT = b"synth.shard", b"synth.plan_sha256", b"synth.content_sha256"
SHARD_NAME = re.compile(r"^shard-(\d{5,})\.parquet$")

OK, CORRUPT, FOREIGN = "ok", "corrupt", "foreign"


def plan_sha256(plan: dict) -> str:
    """The hash a plan is known by in its shards and its manifest (canonical JSON)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def shard_number(name: str) -> Optional[int]:
    """``k`` for the object name ``shard-0000k.parquet``; None for any other (stray) name."""
    match = SHARD_NAME.match(name)
    return int(match.group(1)) if match else None


def content_sha256(table: pa.Table, columns: Sequence[str] = SHARD_COLUMNS) -> str:
    """sha256 over every column of every row, in the stored column order (length-prefixed).

    ``columns``: the columns a shard of this kind stores (image shards by default; the curate
    stage's score shards name their own).
    """
    digest = hashlib.sha256()
    for name in columns:
        digest.update(name.encode() + b"\x00")
        for value in table.column(name).to_pylist():
            data = value if isinstance(value, bytes) else repr(value).encode()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def shard_table(rows: Sequence[dict], pngs: Sequence[bytes], shard: int, model: str, size: tuple[int, int], plan: str) -> pa.Table:
    """The stored form of one shard: the manifest columns, the PNG bytes, and the metadata above.

    ``rows`` are input rows (id, label, class_name, prompt, negative, seed, technique, and for
    images made from other images ``parents``, their ids, and ``params``, what the technique used:
    strength, mask, weight...), ``size`` the images' (height, width), ``plan`` the plan's
    :func:`plan_sha256`.
    """
    n = len(rows)
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "label": pa.array([int(r["label"]) for r in rows], pa.int32()),
            "class_name": [r["class_name"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "negative": [r["negative"] for r in rows],
            "seed": pa.array([int(r["seed"]) for r in rows], pa.int64()),
            "technique": [r["technique"] for r in rows],
            "parents": pa.array([list(r.get("parents") or []) for r in rows], pa.list_(pa.string())),
            "params": [json.dumps(r.get("params") or {}, sort_keys=True) for r in rows],
            "model": [model] * n,
            "width": pa.array([size[1]] * n, pa.int32()),
            "height": pa.array([size[0]] * n, pa.int32()),
            "shard": pa.array([shard] * n, pa.int32()),
            "image": pa.array(list(pngs), pa.binary()),
        }
    )
    return table.replace_schema_metadata(
        {META_SHARD: str(shard).encode(), META_PLAN: plan.encode(), META_CONTENT: content_sha256(table).encode()}
    )


@dataclass
class ShardCheck:
    status: str  # OK, CORRUPT or FOREIGN
    reason: str = ""  # why it is not OK, in a few words
    table: Optional[pa.Table] = None  # the whole shard, when it could be read and its checksum holds

    @property
    def ok(self) -> bool:
        return self.status == OK


def check_shard(
    data: bytes, shard: int, plan: str, ids: Optional[Sequence[str]] = None, columns: Sequence[str] = SHARD_COLUMNS
) -> ShardCheck:
    """Is ``data`` the shard ``k`` of the plan ``plan`` (holding exactly ``ids``, in order, if given)?

    ``columns``: what the checksum covers (see :func:`content_sha256`).

    CORRUPT: unreadable or truncated, no or a wrong checksum, another shard's images, other ids.
    FOREIGN: intact, but made under another plan.
    """
    try:
        table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0].replace("Could not open Parquet input source '<Buffer>': ", "")
        return ShardCheck(CORRUPT, f"not readable as Parquet ({detail}): truncated or overwritten")
    meta = table.schema.metadata or {}
    if META_CONTENT not in meta or META_PLAN not in meta or META_SHARD not in meta:
        return ShardCheck(CORRUPT, "carries no checksum (written by an older synth or another tool)")
    try:
        intact = content_sha256(table, columns) == meta[META_CONTENT].decode()
    except (KeyError, pa.ArrowException):
        intact = False
    if not intact:
        return ShardCheck(CORRUPT, "its content does not match the checksum recorded when it was written")
    if meta[META_SHARD].decode() != str(shard):
        return ShardCheck(CORRUPT, f"holds shard {meta[META_SHARD].decode()}'s images (a copy under the wrong name)")
    if meta[META_PLAN].decode() != plan:
        return ShardCheck(FOREIGN, f"made under another plan ({meta[META_PLAN].decode()[:12]}, not {plan[:12]})", table)
    if ids is not None and table.column("id").to_pylist() != list(ids):
        return ShardCheck(CORRUPT, "holds other ids than the plan puts in this shard")
    return ShardCheck(OK, "", table)
