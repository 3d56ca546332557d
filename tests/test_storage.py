import os
import time

import pyarrow as pa
import pytest
from conftest import make_bucket

from synth.storage import PARTIAL_MARK, Storage, StorageError


def _roundtrip(storage: Storage):
    storage.write_bytes("run/a/x.bin", b"hello")
    storage.write_json("run/a/b/y.json", {"k": 1})
    storage.write_parquet("run/t.parquet", pa.table({"id": ["a", "b"]}))
    assert storage.read_bytes("run/a/x.bin") == b"hello"
    assert storage.read_json("run/a/b/y.json") == {"k": 1}
    assert storage.read_parquet("run/t.parquet").column("id").to_pylist() == ["a", "b"]
    assert storage.list("run/a") == ["run/a/b/y.json", "run/a/x.bin"]
    assert storage.exists("run/a/x.bin") and not storage.exists("run/a/nope")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("run/a/nope")
    storage.delete("run/a/x.bin")
    assert storage.list("run/a") == ["run/a/b/y.json"]


def test_local_roundtrip(tmp_path):
    _roundtrip(Storage(str(tmp_path)))


def test_s3_roundtrip(s3_server):
    make_bucket(s3_server, "roundtrip")
    storage = Storage("s3://roundtrip/some/prefix", s3_endpoint_url=s3_server)
    _roundtrip(storage)
    assert storage.uri("run/t.parquet") == "s3://roundtrip/some/prefix/run/t.parquet"


def test_partial_local_writes_are_invisible_and_removable(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("run/s/shard-00000.parquet", b"done")
    (tmp_path / "run/s" / f"shard-00001.parquet{PARTIAL_MARK}dead").write_bytes(b"half")
    assert storage.list("run/s") == ["run/s/shard-00000.parquet"]
    assert storage.remove_partials("run") == 1
    assert sorted(p.name for p in (tmp_path / "run/s").iterdir()) == ["shard-00000.parquet"]


def test_remove_partials_spares_a_write_still_in_flight(tmp_path):
    """A second driver starting on a run deletes only partial files whose writer is gone: a live
    writer's rename must not fail under it (the race two drivers on one run used to lose)."""
    import socket
    import subprocess
    import sys

    storage = Storage(str(tmp_path))
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run/s"
    folder.mkdir(parents=True)
    names = {
        "live": f"a.parquet{PARTIAL_MARK}{host}-{os.getpid()}-0f",
        "dead": f"b.parquet{PARTIAL_MARK}{host}-{dead.pid}-0f",
        "elsewhere_fresh": f"c.parquet{PARTIAL_MARK}other-host-7-0f",
        "elsewhere_old": f"d.parquet{PARTIAL_MARK}other-host-7-0f",
    }
    for name in names.values():
        (folder / name).write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(folder / names["elsewhere_old"], (old, old))
    assert storage.remove_partials("run") == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted([names["live"], names["elsewhere_fresh"]])
    # A real write of this process, caught between its fsync and its rename by another driver's remove.
    target = folder / "e.parquet"
    tmp = storage._write_partial(target, b"whole")
    storage.remove_partials("run")
    os.replace(tmp, target)
    assert storage.read_bytes("run/s/e.parquet") == b"whole"


def test_storage_is_picklable_without_a_client(s3_server):
    import pickle

    make_bucket(s3_server, "pickled")
    storage = Storage("s3://pickled", s3_endpoint_url=s3_server)
    storage.check_writable()  # creates a client
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._client is None and clone.exists("nothing") is False


def test_unwritable_and_bad_roots(tmp_path, s3_server, s3_server_with_auth):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="choose a writable storage.root"):
        Storage(str(blocker / "root")).check_writable()
    with pytest.raises(StorageError, match="does not exist"):
        Storage("s3://no-such-bucket/x", s3_endpoint_url=s3_server).check_writable()
    with pytest.raises(StorageError, match="refused the credentials"):
        Storage("s3://any/x", s3_endpoint_url=s3_server_with_auth).check_writable()
    with pytest.raises(StorageError, match="only local folders and s3://"):
        Storage("gs://bucket/x")


def _claims(storage: Storage):
    assert storage.create("run/plan.json", b"first") is True
    assert storage.create("run/plan.json", b"second") is False, "a second claim of a key is refused"
    assert storage.read_bytes("run/plan.json") == b"first", "and leaves the first claim's content"
    assert storage.list("run") == ["run/plan.json"]


def test_create_is_an_atomic_claim_locally(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    storage.check_writable()
    assert not any((tmp_path / "root").iterdir()), "the write probe leaves nothing behind, not even a folder"
    _claims(storage)
    assert not [p for p in (tmp_path / "root").rglob("*") if PARTIAL_MARK in p.name]


def test_create_is_an_atomic_claim_on_s3(s3_server):
    make_bucket(s3_server, "claims")
    storage = Storage("s3://claims/p", s3_endpoint_url=s3_server)
    storage.check_writable()
    assert storage.conditional_writes is True, "moto honours If-None-Match: the probe must say so"
    _claims(storage)
    fallback = Storage("s3://claims/q", s3_endpoint_url=s3_server)
    fallback.conditional_writes = False  # what the probe decides for a server that ignores the condition
    _claims(fallback)


def test_s3_outage_shorter_than_the_window_is_waited_out_and_a_longer_one_is_one_error(s3_server):
    import threading
    import time

    from chaos import TcpProxy

    make_bucket(s3_server, "flaky")
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    storage = Storage("s3://flaky", s3_endpoint_url=proxy.url, retry_seconds=30)
    storage.write_bytes("k", b"v")
    proxy.down()
    threading.Timer(2.0, proxy.up).start()
    start = time.monotonic()
    assert storage.read_bytes("k") == b"v"  # refused for ~2 s, then served
    assert time.monotonic() - start >= 1.5
    proxy.down()
    impatient = Storage("s3://flaky", s3_endpoint_url=proxy.url, retry_seconds=1)
    with pytest.raises(StorageError, match=r"kept failing for 1 s .*rerun the same command"):
        impatient.read_bytes("k")
    proxy.up()
    assert impatient.list("") == ["k"]
