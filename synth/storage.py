"""Object storage: the only module that knows URIs, the run layout and how writes are made atomic.

A :class:`Storage` is rooted at a local folder or at ``s3://bucket/prefix``; every other module
speaks in keys relative to that root (``<run>/generate/shards/shard-00003.parquet``).

Atomicity:
- local: write to ``<key>.partial-<host>-<pid>-<uuid>`` in the same folder, fsync, then
  ``os.replace``; an interrupted write leaves only a ``.partial-`` file, which
  :meth:`Storage.list` never returns and :meth:`Storage.remove_partials` deletes once its writer
  is gone (its process dead on this host, or the file untouched for an hour): a second driver
  starting on the same run never deletes a write still in flight.
- S3: a single ``PutObject`` is atomic (readers see the old object or the new one, never a part).

Claims (:meth:`Storage.create`): write only if nothing is there, as one atomic step, so two
drivers racing for the same key cannot both win:
- local: the fsynced partial file is hard-linked to the key (``link`` fails if the key exists);
- S3: ``PutObject`` with ``If-None-Match: *`` (AWS S3, MinIO, moto); a server that ignores or
  refuses the condition (found by :meth:`Storage.check_writable`'s probe) gets the weaker
  fallback: check, write, read back and compare, which catches most races but not all.

Transient S3 failures (connection refused or reset, timeouts, 5xx, throttling) are retried with
exponential backoff for ``storage.retry_seconds`` per operation, on top of botocore's own
standard retry mode; after that the operation raises :class:`StorageError` with one line that
names the fix. Local folders are not retried: their errors (a full disk, a read-only mount) do
not go away by waiting.

A ``Storage`` is picklable (it holds the root and endpoint, and creates its client lazily), so it
can be shipped to Ray workers.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial-"
# A partial file whose writer runs on another host (a shared folder) is taken as abandoned once it
# is this old: no single write of this system takes minutes, let alone an hour.
PARTIAL_ABANDONED_SECONDS = 3600.0
PROBE_PREFIX = ".synth-write-probe-"
DEFAULT_RETRY_SECONDS = 120.0
# In the message of every StorageError that gave up on a transient failure: what Ray Data's
# retried_map_errors matches, so only those (not a refused credential) are retried as a task.
TRANSIENT_MARK = "kept failing for"

# S3 error codes worth waiting out: the server is overloaded, restarting or briefly unreachable.
TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "ConditionalRequestConflict",  # 409: another conditional write to the key is in flight
}  # fmt: skip


class StorageError(RuntimeError):
    """Storage is unreachable, unwritable or refuses our credentials; the message says the fix."""


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _is_transient(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True  # refused, reset, DNS, read/connect timeouts, a body cut short
    return _error_code(exc) in TRANSIENT_CODES


def local_root(root: str) -> str:
    """A local storage root as an absolute path (``~`` expanded), against this process's working directory."""
    return os.path.abspath(os.path.expanduser(root))


class Storage:
    def __init__(
        self,
        root: str,
        s3_endpoint_url: Optional[str] = None,
        s3_region: Optional[str] = None,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ):
        self.root = root.rstrip("/") if root != "/" else root
        self.s3_endpoint_url = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.s3_region = s3_region
        self.retry_seconds = float(retry_seconds)
        # Whether the server honours If-None-Match on PutObject; None until a probe or a refusal says.
        self.conditional_writes: Optional[bool] = None
        self.is_s3 = self.root.startswith("s3://")
        if self.is_s3:
            bucket, _, prefix = self.root[len("s3://") :].partition("/")
            if not bucket:
                raise StorageError(f"storage root {root!r} names no bucket; use s3://bucket/prefix")
            self.bucket, self.prefix = bucket, prefix.strip("/")
        elif "://" in self.root:
            raise StorageError(f"storage root {root!r}: only local folders and s3:// URIs are supported")
        else:
            # Absolute from here on: a Ray worker, actor or Tune trial runs in another working
            # directory, and a pickled Storage must still mean the folder the user named.
            self.root = local_root(self.root)
        self._client = None

    @classmethod
    def from_config(cls, cfg) -> "Storage":
        """From a :class:`synth.config.StorageConfig`."""
        return cls(cfg.root, cfg.s3_endpoint_url, cfg.s3_region, cfg.retry_seconds)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def ray_storage(self, key: str):
        """``(storage_path, storage_filesystem)`` for Ray Train and Tune: a local absolute path, or S3."""
        if not self.is_s3:
            return self.uri(key), None
        if self.s3_endpoint_url:  # MinIO and friends: pyarrow needs the endpoint explicitly
            import pyarrow.fs

            scheme, _, host = self.s3_endpoint_url.partition("://")
            fs = pyarrow.fs.S3FileSystem(
                endpoint_override=host or scheme, scheme=scheme if host else "https", region=self.s3_region or "us-east-1"
            )
            return self.uri(key)[len("s3://") :], fs
        return self.uri(key), None

    # -- addressing ---------------------------------------------------------------------------

    def uri(self, key: str = "") -> str:
        """The full URI of a key, for humans and for tools that take URIs."""
        key = key.strip("/")
        if self.is_s3:
            return "s3://" + "/".join(p for p in (self.bucket, self.prefix, key) if p)
        return str(Path(self.root).resolve() / key) if key else str(Path(self.root).resolve())

    def _s3_key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def _path(self, key: str) -> Path:
        return Path(self.root) / key.strip("/")

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            self._client = boto3.client(
                "s3",
                endpoint_url=self.s3_endpoint_url,
                region_name=self.s3_region,
                # botocore's standard mode retries a blip at once; _s3 waits out longer outages.
                config=BotoConfig(
                    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60, max_pool_connections=32
                ),
            )
        return self._client

    def _s3_error(self, exc: Exception, action: str, key: str) -> StorageError:
        from botocore.exceptions import ClientError, NoCredentialsError

        where = self.uri(key)
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"cannot {action} {where}: no AWS credentials found. Fix: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or use a local storage.root"
            )
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"):
                return StorageError(
                    f"cannot {action} {where}: S3 refused the credentials ({code}). Fix: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy"
                )
            if code == "NoSuchBucket" and action != "read":  # a 404 never gets here: _s3 makes it FileNotFoundError
                return StorageError(f"cannot {action} {where}: bucket {self.bucket!r} does not exist. Fix: create it or change storage.root")
            if code not in TRANSIENT_CODES:
                return StorageError(f"cannot {action} {where}: {code or exc}")
        if not _is_transient(exc):
            return StorageError(f"cannot {action} {where}: {exc}")
        return StorageError(
            f"cannot {action} {where}: S3 at {self.s3_endpoint_url or 'the AWS default endpoint'} {TRANSIENT_MARK} "
            f"{self.retry_seconds:.0f} s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Fix: check storage.s3_endpoint_url and the network, then rerun the same command: it resumes "
            "where it stopped (storage.retry_seconds sets how long to wait)"
        )

    def _s3(self, action: str, key: str, call):
        """``call()`` with retries of transient failures for ``retry_seconds``; a StorageError after that."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.25
        while True:
            try:
                return call()
            except Exception as exc:
                if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                    raise FileNotFoundError(self.uri(key)) from exc
                if not _is_transient(exc) or time.monotonic() + delay > deadline:
                    raise self._s3_error(exc, action, key) from exc
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 8.0)

    # -- bytes --------------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically: readers never see a partial object."""
        if self.is_s3:
            self._s3("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data))
            return
        path = self._path(key)
        tmp = self._write_partial(path, data)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise self._local_error(exc, path) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _write_partial(self, path: Path, data: bytes) -> Path:
        """``data`` in a fsynced ``.partial-`` file beside ``path``; its name is returned."""
        tmp = path.with_name(f"{path.name}{PARTIAL_MARK}{_writer_tag()}-{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise self._local_error(exc, path) from exc
        return tmp

    @staticmethod
    def _local_error(exc: OSError, path: Path) -> StorageError:
        return StorageError(f"cannot write {path}: {exc.strerror or exc}. Fix: choose a writable storage.root")

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if no object is there, atomically; True if this call created it.

        False means another writer got there first; the object there is left as it is, and the
        caller reads it to decide whether it is the same thing (a claim of a plan, a shard made by
        a concurrent driver with the same plan) or a conflict.
        """
        if self.is_s3:
            if self.conditional_writes is False:
                return self._create_by_read_back(key, data)
            put = lambda: self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data, IfNoneMatch="*")  # noqa: E731
            try:
                self._s3("write", key, put)
                return True
            except StorageError as exc:
                cause = exc.__cause__
                if _error_code(cause) in ("PreconditionFailed", "412"):
                    return False
                if _error_code(cause) in ("NotImplemented", "501"):  # a server without conditional writes
                    self.conditional_writes = False
                    return self._create_by_read_back(key, data)
                raise
        path = self._path(key)
        tmp = self._write_partial(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the key exists: the content is complete when it appears
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: the weaker fallback
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise self._local_error(exc, path) from exc
            return self._create_by_read_back(key, data)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _create_by_read_back(self, key: str, data: bytes) -> bool:
        """Check, write, read back: the best a store without an atomic create-if-absent allows."""
        if self.exists(key):
            return False
        self.write_bytes(key, data)
        return self.read_bytes(key) == data

    def read_bytes(self, key: str) -> bytes:
        if self.is_s3:
            return self._s3("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key))["Body"].read())
        return self._path(key).read_bytes()

    def open_read(self, key: str, buffer_size: int = 1 << 20):
        """A seekable binary file of the object at ``key``: a local file, or ranged GETs on S3.

        For readers that take only part of a large object (a few rows of a Parquet table), so
        they never hold the whole of it.
        """
        if not self.is_s3:
            return open(self._path(key), "rb")
        head = self._s3("read", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key)))
        return io.BufferedReader(_S3RangeFile(self, key, int(head["ContentLength"])), buffer_size=buffer_size)

    def exists(self, key: str) -> bool:
        if self.is_s3:
            try:
                self._s3("read", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key)))
                return True
            except FileNotFoundError:
                return False
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted; never lists partial writes."""
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        """``{key: size in bytes}`` under ``prefix`` (one listing; partial writes left out)."""
        return {k: n for k, n in self._list_all(prefix) if PARTIAL_MARK not in k.rsplit("/", 1)[-1]}

    def _list_all(self, prefix: str) -> list[tuple[str, int]]:
        prefix = prefix.strip("/")
        if self.is_s3:
            base = self._s3_key(prefix) + "/" if self._s3_key(prefix) else ""  # "": the whole bucket
            strip = len(self.prefix) + 1 if self.prefix else 0

            def listing() -> list[tuple[str, int]]:
                pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
                return [(obj["Key"][strip:], int(obj["Size"])) for page in pages for obj in page.get("Contents", [])]

            try:
                return self._s3("list", prefix, listing)
            except FileNotFoundError:  # NoSuchKey cannot come from a listing; a missing bucket is a StorageError
                return []
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        root = Path(self.root)
        found = []
        for path in folder.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # deleted between the walk and the stat
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path.stat().st_size))
        return found

    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (folders and objects alike), sorted; one listing
        that never walks deeper, so a run's thousands of shards cost nothing to list runs."""
        prefix = prefix.strip("/")
        if self.is_s3:
            base = self._s3_key(prefix) + "/" if self._s3_key(prefix) else ""

            def listing() -> list[str]:
                pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
                names = []
                for page in pages:
                    names += [p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
                    names += [o["Key"][len(base) :] for o in page.get("Contents", [])]
                return names

            try:
                found = self._s3("list", prefix, listing)
            except FileNotFoundError:
                return []
        else:
            folder = self._path(prefix)
            found = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
        return sorted(n for n in found if n and PARTIAL_MARK not in n)

    def delete(self, key: str) -> None:
        if self.is_s3:
            with contextlib.suppress(FileNotFoundError):
                self._s3("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._s3_key(key)))
        else:
            self._path(key).unlink(missing_ok=True)

    def move(self, src: str, dst: str) -> None:
        """Move one object to another key (quarantine); raises FileNotFoundError if ``src`` is gone."""
        if self.is_s3:
            source = {"Bucket": self.bucket, "Key": self._s3_key(src)}
            self._s3("move", src, lambda: self.client.copy_object(Bucket=self.bucket, Key=self._s3_key(dst), CopySource=source))
            self.delete(src)
            return
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), target)

    def remove_partials(self, prefix: str) -> int:
        """Delete leftovers of interrupted local writes under ``prefix``; returns how many.

        Only abandoned ones: a partial file whose writer is still alive (another driver or worker
        on the same run, mid-write) is left alone, or that writer's rename would fail.
        """
        stale = [k for k, _ in self._list_all(prefix) if PARTIAL_MARK in k.rsplit("/", 1)[-1] and self._abandoned(k)]
        for key in stale:
            self.delete(key)
        return len(stale)

    def _abandoned(self, key: str) -> bool:
        """Whether the writer of the partial file ``key`` can no longer finish it."""
        host, pid = _partial_writer(key)
        if host == _HOST and pid is not None:
            return not _process_alive(pid)
        try:
            age = time.time() - self._path(key).stat().st_mtime
        except FileNotFoundError:  # its writer just finished (or gave up) after all
            return False
        return host is None or age > PARTIAL_ABANDONED_SECONDS

    def check_writable(self) -> None:
        """Fail fast, before any work, if the root cannot be written (bad folder, bucket or keys).

        The probe is a claim made twice: on S3 the second must be refused, or the server ignores
        ``If-None-Match`` and :meth:`create` falls back to reading back what it wrote. It leaves
        nothing behind (no folder either: it sits in the root itself).
        """
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            first = self.create(probe, b"ok")
            second = self.create(probe, b"ok")
        finally:
            with contextlib.suppress(OSError, StorageError):  # the create's own error is the one to see
                self.delete(probe)
        if not first:
            raise StorageError(f"cannot claim a fresh key in {self.uri()}: the write probe found an object already there")
        if self.is_s3 and self.conditional_writes is None:
            self.conditional_writes = not second
            if second:
                log.warning(
                    "S3 at %s ignores conditional writes (If-None-Match); claims fall back to read-back checks, "
                    "which do not stop every race between two drivers on one run",
                    self.s3_endpoint_url or "AWS",
                )

    # -- structured objects ---------------------------------------------------------------------

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, _json_bytes(obj))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def create_json(self, key: str, obj: Any) -> bool:
        """Claim ``key`` with a JSON document (see :meth:`create`)."""
        return self.create(key, _json_bytes(obj))

    def read_json_or_none(self, key: str) -> Any:
        """The JSON document at ``key``, or None when it is absent or unreadable (one request)."""
        try:
            return json.loads(self.read_bytes(key))
        except (FileNotFoundError, ValueError):
            return None

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def write_parquet(self, key: str, table: pa.Table) -> None:
        self.write_bytes(key, parquet_bytes(table))

    def read_parquet(self, key: str, columns: Optional[list[str]] = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(key)), columns=columns)

    def claim_table(self, key: str, table: pa.Table, data: Optional[bytes] = None) -> tuple[bool, Optional[bool]]:
        """Store ``table`` (``data``: its Parquet bytes, if made already) at ``key`` unless something is
        there (see :meth:`create`): ``(True, None)`` when this call stored it, else ``(False, same)``
        with ``same`` whether the stored table equals it, None when the stored one is unreadable."""
        if self.create(key, parquet_bytes(table) if data is None else data):
            return True, None
        try:
            return False, self.read_parquet(key).equals(table)
        except (pa.ArrowException, OSError):
            return False, None


class _S3RangeFile(io.RawIOBase):
    """A read-only, seekable view of one S3 object; each read is one ranged GET (retried like every call)."""

    def __init__(self, storage: Storage, key: str, size: int):
        self.storage, self.key, self.size, self.pos = storage, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        s = self.storage
        bytes_range = f"bytes={self.pos}-{self.pos + n - 1}"
        data = s._s3(
            "read", self.key,
            lambda: s.client.get_object(Bucket=s.bucket, Key=s._s3_key(self.key), Range=bytes_range)["Body"].read(),
        )  # fmt: skip
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


_HOST = socket.gethostname().replace("/", "_") or "host"


def _writer_tag() -> str:
    """Who writes a partial file: ``<host>-<pid>``, so a later driver can tell a live write from a dead one."""
    return f"{_HOST}-{os.getpid()}"


def _partial_writer(key: str) -> tuple[Optional[str], Optional[int]]:
    """``(host, pid)`` from a partial file's name, or ``(None, None)`` for a name without them."""
    tail = key.rsplit("/", 1)[-1].split(PARTIAL_MARK, 1)[-1]
    parts = tail.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return False
    return True


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)  # CRC per page, checked on read
    return buf.getvalue()


def quarantine(storage: Storage, layout: "Layout", key: str, stage: str) -> str:
    """Move a bad object out of its stage's way, kept for a look (:meth:`Layout.quarantine`); returns where it went."""
    target = layout.quarantine(stage, key.rsplit("/", 1)[-1])
    with contextlib.suppress(FileNotFoundError):  # gone already: nothing to keep
        storage.move(key, target)
    return target


def trial_tag(ratio: float, seed: int) -> str:
    """The name of a tune trial: ``ratio-0.25-seed-1`` (ratios are distinct to 6 digits)."""
    return f"ratio-{ratio:.6g}-seed-{seed}"


class Layout:
    """Where each stage of a run keeps its outputs, relative to the storage root."""

    def __init__(self, run: str):
        self.run = run

    def stage(self, name: str) -> str:
        return f"{self.run}/{name}"

    def quarantine(self, stage: str, name: str) -> str:
        """Where a bad object of ``stage`` is kept for inspection: ``<run>/quarantine/<stage>/<time>-<id>-<name>``."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return f"{self.run}/quarantine/{stage}/{stamp}-{uuid.uuid4().hex[:6]}-{name}"

    # prompts
    @property
    def prompts_table(self) -> str:
        return f"{self.run}/prompts/prompts.parquet"

    @property
    def llm_texts(self) -> str:
        return f"{self.run}/prompts/llm.parquet"

    # image jobs: generate (text-to-image) and derive (from parent images) keep the same layout
    def shard(self, stage: str, shard: int) -> str:
        return f"{self.run}/{stage}/shards/shard-{shard:05d}.parquet"

    def shards(self, stage: str) -> str:
        return f"{self.run}/{stage}/shards"

    def full_image(self, stage: str, class_slug: str, image_id: str) -> str:
        return f"{self.run}/{stage}/full/{class_slug}/{image_id}.png"

    def plan(self, stage: str) -> str:
        return f"{self.run}/{stage}/plan.json"

    def manifest(self, stage: str) -> str:
        return f"{self.run}/{stage}/manifest.parquet"

    def generate_shard(self, shard: int) -> str:
        return self.shard("generate", shard)

    @property
    def generate_shards(self) -> str:
        return self.shards("generate")

    def generate_full_image(self, class_slug: str, image_id: str) -> str:
        return self.full_image("generate", class_slug, image_id)

    @property
    def generate_plan(self) -> str:
        return self.plan("generate")

    @property
    def generate_manifest(self) -> str:
        return self.manifest("generate")

    # derive: the parent images it was given, as one table
    @property
    def derive_parents(self) -> str:
        return f"{self.run}/derive/parents.parquet"

    # dataset
    def dataset_split(self, domain: str, split: str) -> str:
        """One split of one domain: ``<run>/dataset/<real|synthetic>/<train|val|test>.parquet``."""
        return f"{self.run}/dataset/{domain}/{split}.parquet"

    # train: one folder per (experiment, seed), e.g. <run>/train/train-real/seed-0/
    def train_cell(self, experiment: str, seed: int) -> str:
        return f"{self.run}/train/{experiment}/seed-{seed}"

    def train_metrics(self, experiment: str, seed: int) -> str:
        return f"{self.train_cell(experiment, seed)}/metrics.json"

    def train_model(self, experiment: str, seed: int) -> str:
        return f"{self.train_cell(experiment, seed)}/model.pt"

    def train_ray_results(self, experiment: str, seed: int) -> str:
        """Ray Train's storage_path for the cell: its run folder, checkpoints and snapshot."""
        return f"{self.train_cell(experiment, seed)}/ray"

    # tune: Ray Tune's experiment folders, one record per finished trial, the gathered results
    @property
    def tune_ray_results(self) -> str:
        """Ray Tune's storage_path: one experiment folder per sweep config (trials, checkpoints, state)."""
        return f"{self.run}/tune/ray"

    def tune_trial(self, experiment: str, ratio: float, seed: int) -> str:
        """The record a trial writes when it finishes: ``<run>/tune/trials/<experiment>/ratio-0.5-seed-0.json``."""
        return f"{self.run}/tune/trials/{experiment}/{trial_tag(ratio, seed)}.json"

    @property
    def tune_results(self) -> str:
        """One row per (ratio, seed); ``.parquet`` and ``.json`` beside each other."""
        return f"{self.run}/tune/results"

    def config_file(self, stage: str) -> str:
        return f"{self.run}/{stage}/config.yaml"

    def summary(self, stage: str) -> str:
        return f"{self.run}/{stage}/summary.json"
