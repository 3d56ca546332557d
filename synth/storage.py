"""Object storage: the only module that knows URIs, the run layout and how writes are made atomic.

A :class:`Storage` is rooted at a local folder or at ``s3://bucket/prefix``; every other module
speaks in keys relative to that root (``<run>/generate/shards/shard-00003.parquet``).

Atomicity:
- local: write to ``<key>.partial-<uuid>`` in the same folder, fsync, then ``os.replace``; an
  interrupted write leaves only a ``.partial-`` file, which :meth:`Storage.remove_partials` deletes
  and :meth:`Storage.list` never returns.
- S3: a single ``PutObject`` is atomic (readers see the old object or the new one, never a part).

A ``Storage`` is picklable (it holds the root and endpoint, and creates its client lazily), so it
can be shipped to Ray workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

PARTIAL_MARK = ".partial-"


class StorageError(RuntimeError):
    """Storage is unreachable, unwritable or refuses our credentials; the message says the fix."""


def local_root(root: str) -> str:
    """A local storage root as an absolute path (``~`` expanded), against this process's working directory."""
    return os.path.abspath(os.path.expanduser(root))


class Storage:
    def __init__(self, root: str, s3_endpoint_url: Optional[str] = None, s3_region: Optional[str] = None):
        self.root = root.rstrip("/") if root != "/" else root
        self.s3_endpoint_url = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.s3_region = s3_region
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
        return cls(cfg.root, cfg.s3_endpoint_url, cfg.s3_region)

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
                config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60),
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
            if code in ("NoSuchBucket", "404") and action != "read":
                return StorageError(f"cannot {action} {where}: bucket {self.bucket!r} does not exist. Fix: create it or change storage.root")
            return StorageError(f"cannot {action} {where}: {code or exc}")
        return StorageError(
            f"cannot {action} {where}: {exc}. Fix: check storage.s3_endpoint_url "
            f"({self.s3_endpoint_url or 'AWS default'}) and the network"
        )

    # -- bytes --------------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically: readers never see a partial object."""
        if self.is_s3:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)
            except Exception as exc:
                raise self._s3_error(exc, "write", key) from exc
            return
        path = self._path(key)
        tmp = path.with_name(f"{path.name}{PARTIAL_MARK}{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}. Fix: choose a writable storage.root") from exc

    def read_bytes(self, key: str) -> bytes:
        if self.is_s3:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key))["Body"].read()
            except Exception as exc:
                if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise FileNotFoundError(self.uri(key)) from exc
                raise self._s3_error(exc, "read", key) from exc
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        if self.is_s3:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))
                return True
            except Exception as exc:
                if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return False
                raise self._s3_error(exc, "read", key) from exc
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted; never lists partial writes."""
        return sorted(k for k in self._list_all(prefix) if PARTIAL_MARK not in k.rsplit("/", 1)[-1])

    def _list_all(self, prefix: str) -> Iterator[str]:
        prefix = prefix.strip("/")
        if self.is_s3:
            base = self._s3_key(prefix) + "/"
            strip = len(self.prefix) + 1 if self.prefix else 0
            try:
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                    for obj in page.get("Contents", []):
                        yield obj["Key"][strip:]
            except Exception as exc:
                raise self._s3_error(exc, "list", prefix) from exc
            return
        folder = self._path(prefix)
        if not folder.is_dir():
            return
        root = Path(self.root)
        for path in folder.rglob("*"):
            if path.is_file():
                yield path.relative_to(root).as_posix()

    def delete(self, key: str) -> None:
        if self.is_s3:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._s3_key(key))
            except Exception as exc:
                raise self._s3_error(exc, "delete", key) from exc
        else:
            self._path(key).unlink(missing_ok=True)

    def remove_partials(self, prefix: str) -> int:
        """Delete leftovers of interrupted local writes under ``prefix``; returns how many."""
        stale = [k for k in self._list_all(prefix) if PARTIAL_MARK in k.rsplit("/", 1)[-1]]
        for key in stale:
            self.delete(key)
        return len(stale)

    def check_writable(self) -> None:
        """Fail fast, before any work, if the root cannot be written (bad folder, bucket or keys)."""
        probe = f"_synth_write_probe/{uuid.uuid4().hex}"
        self.write_bytes(probe, b"ok")
        self.delete(probe)

    # -- structured objects ---------------------------------------------------------------------

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_json_or_none(self, key: str) -> Any:
        """The JSON document at ``key``, or None when it is absent or unreadable (one request)."""
        try:
            return json.loads(self.read_bytes(key))
        except (FileNotFoundError, ValueError):
            return None

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def write_parquet(self, key: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(key, buf.getvalue())

    def read_parquet(self, key: str, columns: Optional[list[str]] = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(key)), columns=columns)


def trial_tag(ratio: float, seed: int) -> str:
    """The name of a tune trial: ``ratio-0.25-seed-1`` (ratios are distinct to 6 digits)."""
    return f"ratio-{ratio:.6g}-seed-{seed}"


class Layout:
    """Where each stage of a run keeps its outputs, relative to the storage root."""

    def __init__(self, run: str):
        self.run = run

    def stage(self, name: str) -> str:
        return f"{self.run}/{name}"

    # prompts
    @property
    def prompts_table(self) -> str:
        return f"{self.run}/prompts/prompts.parquet"

    # generate
    def generate_shard(self, shard: int) -> str:
        return f"{self.run}/generate/shards/shard-{shard:05d}.parquet"

    @property
    def generate_shards(self) -> str:
        return f"{self.run}/generate/shards"

    def generate_full_image(self, class_slug: str, image_id: str) -> str:
        return f"{self.run}/generate/full/{class_slug}/{image_id}.png"

    @property
    def generate_plan(self) -> str:
        return f"{self.run}/generate/plan.json"

    @property
    def generate_manifest(self) -> str:
        return f"{self.run}/generate/manifest.parquet"

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
