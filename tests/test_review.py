"""The review queue (three orders, checked exactly), its contact sheet, and the append-only decision log.

The curate stage's scores.parquet is written here by hand, per the contract, with known
similarities, entropies and embeddings; the images behind it are real 32 px PNGs in real
generate and derive shards, reached through the stages' manifests as the queue reads them.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import REPO, make_bucket
from ray_jobs.review import review_main
from synth.images import encode_png
from synth.review import (
    Decision,
    ReviewError,
    build_queue,
    curation_state,
    decisions_prefix,
    effective_decisions,
    order_diverse,
    order_score,
    order_uncertainty,
    read_decisions,
    record_decisions,
    scores_key,
    write_queue,
)
from synth.shards import MANIFEST_COLUMNS, shard_table
from synth.storage import Layout, Storage

RUN = "smoke"  # the smoke preset's run, so the README's commands find the fixture
CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]  # configs/smoke.yaml's classes
T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)


def _unit(*v: float) -> list[float]:
    a = np.asarray(v, dtype=np.float64)
    return (a / np.linalg.norm(a)).tolist()


# id, class, technique, stage, similarity, rank, entropy, embedding, accepted, reason
ROWS = [
    ("cat-000000", "cat", "vanilla", "generate", 0.30, 1, 0.10, _unit(1, 0, 0, 0), True, ""),
    ("cat-000001", "cat", "environment", "generate", 0.25, 2, 0.90, _unit(0, 1, 0, 0), True, ""),
    ("cat-000002", "cat", "domain", "generate", 0.20, 4, 0.50, _unit(0, 0, 1, 0.1), True, ""),  # cos 0.995 to cat-000004
    ("cat-000003", "cat", "hard", "generate", 0.24, 3, 0.90, _unit(0, 0, 0, 1), True, ""),
    ("cat-000004", "cat", "vanilla", "generate", 0.10, 5, 0.20, _unit(0, 0, 1, 0), False, "similarity"),
    ("dog-000000", "dog", "vanilla", "generate", 0.28, 1, 0.30, _unit(1, 1, 0, 0), True, ""),
    ("dog-hostile-00000", "dog", "hostile", "generate", 0.05, 3, 1.00, _unit(1, 0, 1, 0), False, "probability"),
    ("dog-variation-000000", "dog", "variation", "derive", 0.22, 2, 0.40, _unit(1, 1, 0.05, 0), True, ""),  # cos 0.999 to dog-000000
]  # fmt: skip
IDS = [r[0] for r in ROWS]


def pixels(i: int) -> np.ndarray:
    """A distinct 32 px image per fixture row (a flat colour with a bar)."""
    img = np.full((32, 32, 3), (40 * i) % 256, dtype=np.uint8)
    img[:, i * 3 : i * 3 + 3, 0] = 255
    return img


def scores_table() -> pa.Table:
    k = len(CLASSES)
    cols = {
        "id": [r[0] for r in ROWS],
        "class_name": [r[1] for r in ROWS],
        "label": pa.array([CLASSES.index(r[1]) for r in ROWS], pa.int32()),
        "technique": [r[2] for r in ROWS],
        "stage": [r[3] for r in ROWS],
        "similarity": pa.array([r[4] for r in ROWS], pa.float32()),
        "probabilities": pa.array([[1.0 / k] * k for _ in ROWS], pa.list_(pa.float32())),
        "prob_own": pa.array([1.0 / k for _ in ROWS], pa.float32()),
        "entropy": pa.array([r[6] for r in ROWS], pa.float32()),
        "rank": pa.array([r[5] for r in ROWS], pa.int32()),
        "embedding": pa.array([r[7] for r in ROWS], pa.list_(pa.float32())),
        "accepted": [r[8] for r in ROWS],
        "reason": [r[9] for r in ROWS],
    }
    return pa.table(cols).sort_by("id")


def write_run(storage: Storage, run: str = RUN) -> None:
    """scores.parquet plus generate and derive manifests and shards holding each row's image."""
    layout = Layout(run)
    storage.write_parquet(scores_key(run), scores_table())
    for stage in ("generate", "derive"):
        rows = [
            {"id": r[0], "label": CLASSES.index(r[1]), "class_name": r[1], "prompt": "p", "negative": "", "seed": i,
             "technique": r[2]}
            for i, r in enumerate(ROWS) if r[3] == stage
        ]  # fmt: skip
        pngs = [encode_png(pixels(IDS.index(r["id"]))) for r in rows]
        half = (len(rows) + 1) // 2  # two shards where there are enough rows
        tables = [shard_table(part, pngs[a:b], k, "test", (32, 32), "plan") for k, (part, a, b) in
                  enumerate([(rows[:half], 0, half), (rows[half:], half, len(rows))]) if part]  # fmt: skip
        for k, table in enumerate(tables):
            storage.write_parquet(layout.shard(stage, k), table)
        storage.write_parquet(layout.manifest(stage), pa.concat_tables(tables).select(MANIFEST_COLUMNS).sort_by("id"))


@pytest.fixture
def local(tmp_path) -> Storage:
    storage = Storage(str(tmp_path / "outputs"))
    write_run(storage)
    return storage


def log_keys(storage: Storage) -> list[str]:
    return storage.list(decisions_prefix(RUN))


# -- 1. The orders ---------------------------------------------------------------------------


def test_pure_orders_exactly():
    ids = ["a", "b", "c", "d"]
    assert order_score(ids, [1, 3, 2, 4]) == [3, 1, 2, 0]
    assert order_uncertainty(ids, [0.5, 0.9, 0.9, 0.1], [1, 3, 2, 4]) == [1, 2, 0, 3]  # tie: worse rank first
    emb = np.array([[1, 0], [0, 1], [1, 0.05], [0.6, 0.8]], dtype=np.float32)  # c ~ a; d is 0.8 from b
    assert order_diverse(ids, [1, 3, 2, 4], emb, threshold=0.9) == [3, 1, 2]  # a skipped: 0.999 to c
    assert order_diverse(ids, [1, 3, 2, 4], emb, threshold=0.75) == [3, 2]  # b: cos 0.8 to d
    assert order_diverse(ids, [1, 3, 2, 4], emb, threshold=0.9, limit=2) == [3, 1]


def _queue(order: str, **kw) -> list[str]:
    return build_queue(scores_table(), order, CLASSES, **kw).column("id").to_pylist()


def test_queue_orders_per_class():
    assert _queue("score") == [
        "cat-000004", "cat-000002", "cat-000003", "cat-000001", "cat-000000",
        "dog-variation-000000", "dog-000000",  # never the hostile example: it is not a dog to accept or reject
    ]  # fmt: skip
    assert _queue("uncertainty") == [
        "cat-000003", "cat-000001", "cat-000002", "cat-000004", "cat-000000",
        "dog-variation-000000", "dog-000000",
    ]  # fmt: skip
    # cat-000002 is near-identical to cat-000004 and dog-000000 to dog-variation-000000: skipped.
    assert _queue("diverse") == ["cat-000004", "cat-000003", "cat-000001", "cat-000000", "dog-variation-000000"]
    assert _queue("diverse", threshold=1.0) == _queue("score")  # nothing is identical


def test_queue_limit_classes_and_skip():
    table = build_queue(scores_table(), "score", CLASSES, per_class=2)
    assert table.column("id").to_pylist() == ["cat-000004", "cat-000002", "dog-variation-000000", "dog-000000"]
    assert table.column("position").to_pylist() == [1, 2, 1, 2]
    assert table.column_names == ["position", "id", "class_name", "technique", "similarity", "prob_own", "entropy", "rank", "accepted", "reason"]  # fmt: skip
    assert _queue("diverse", per_class=2, only=["Dog"]) == ["dog-variation-000000"]  # dog-000000: a near-duplicate
    assert _queue("score", skip={"cat-000004", "dog-variation-000000"}, per_class=1) == ["cat-000002", "dog-000000"]
    with pytest.raises(ReviewError, match="unknown class 'cow'"):
        _queue("score", only=["cow"])
    with pytest.raises(ReviewError, match="choose one of score, uncertainty, diverse"):
        _queue("random")
    with pytest.raises(ReviewError, match="per-class limit"):
        _queue("score", per_class=0)


def test_write_queue_table_and_self_contained_sheet(local):
    record_decisions(local, RUN, CLASSES, [{"id": "cat-000004", "decision": "relabel", "class": "dog"}], "alice", now=T0)
    summary = write_queue(local, RUN, CLASSES, "score")
    assert summary["images"] == 6 and summary["skipped_decided"] == 1 and summary["missing_thumbnails"] == 0  # no hostile example
    table = local.read_parquet("smoke/curate/review/queue-score.parquet")
    assert table.column("id").to_pylist()[0] == "cat-000002"  # the decided cat-000004 is left out
    page = local.read_bytes("smoke/curate/review/queue-score.html").decode()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    for image_id in table.column("id").to_pylist():
        assert image_id in page
    # The thumbnails are the stored images, upscaled 4x nearest-neighbour: every pixel a 4x4 block.
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1]))).convert("RGB"))
    assert first.shape == (128, 128, 3)
    assert np.array_equal(first[::4, ::4], pixels(IDS.index("cat-000002")))

    write_queue(local, RUN, CLASSES, "score", include_decided=True)
    page = local.read_bytes("smoke/curate/review/queue-score.html").decode()
    assert "cat-000004" in page and "relabel → dog by alice" in page and "rejected: similarity" in page


def test_thumbnail_lookup_is_injectable(local):
    asked = {}

    def lookup(stage_of):
        asked.update(stage_of)
        return {}

    summary = write_queue(local, RUN, CLASSES, "diverse", per_class=1, thumbnails=lookup)
    assert asked == {"cat-000004": "generate", "dog-variation-000000": "derive"}
    assert summary["missing_thumbnails"] == 2
    assert local.read_bytes("smoke/curate/review/queue-diverse.html").decode().count("no image") == 2


# -- 2. Decisions and the state ------------------------------------------------------------------


def test_log_round_trip_later_wins(local):
    assert curation_state(local, RUN, CLASSES).decisions == 0
    record_decisions(local, RUN, CLASSES, [
        {"id": "cat-000004", "decision": "accept"},
        {"id": "cat-000000", "decision": "reject"},
        {"id": "dog-000000", "decision": "relabel", "class": "Cat"},
    ], "alice", now=T0 + timedelta(minutes=5))  # fmt: skip
    # Written later, but an earlier time: superseded where it overlaps.
    record_decisions(local, RUN, CLASSES, [{"id": "cat-000000", "decision": "accept"}], "bob", now=T0)
    # A later submission supersedes (an undo): dog-000000 back to its own class.
    record_decisions(local, RUN, CLASSES, [{"id": "dog-000000", "decision": "accept"}], "carol", now=T0 + timedelta(minutes=9))
    state = curation_state(local, RUN, CLASSES)
    assert state.decisions == 3
    assert state.accepted["cat-000004"] is True and state.accepted["cat-000000"] is False
    assert state.accepted["dog-hostile-00000"] is False and state.accepted["cat-000001"] is True
    assert state.relabel == {} and len(state.accepted) == len(ROWS)
    decisions = read_decisions(local, RUN)
    assert [d.reviewer for d in decisions] == ["bob", "alice", "alice", "alice", "carol"]
    line = json.loads(local.read_bytes(decisions[-2].source).decode().splitlines()[2])
    assert line == {"id": "dog-000000", "decision": "relabel", "class": "cat", "reviewer": "alice", "time": "2026-11-29T12:05:00.000000Z"}
    record_decisions(local, RUN, CLASSES, [{"id": "dog-000000", "decision": "relabel", "class": "cat"}], "dan", now=T0 + timedelta(hours=1))
    assert curation_state(local, RUN, CLASSES).relabel == {"dog-000000": "cat"}
    assert len(log_keys(local)) == 4  # one new object per submission, none rewritten


def test_ties_broken_by_file_name_then_line():
    def d(decision, source, line):
        return Decision("x", decision, None, "r", T0, source, line)

    assert effective_decisions([d("reject", "log/b.jsonl", 1), d("accept", "log/a.jsonl", 2)])["x"].decision == "reject"
    assert effective_decisions([d("reject", "log/a.jsonl", 2), d("accept", "log/a.jsonl", 1)])["x"].decision == "reject"


def test_state_is_none_before_curate(tmp_path):
    assert curation_state(Storage(str(tmp_path)), RUN, CLASSES) is None
    with pytest.raises(ReviewError, match="run the curate stage first"):
        record_decisions(Storage(str(tmp_path)), RUN, CLASSES, [{"id": "a", "decision": "accept"}], "alice")


@pytest.mark.parametrize(
    "entries, reviewer, message",
    [
        ([{"id": "cat-999999", "decision": "accept"}], "alice", "no image 'cat-999999'"),
        ([{"id": "cat-000000", "decision": "relabel", "class": "cow"}], "alice", "unknown class 'cow'"),
        ([{"id": "cat-000000", "decision": "relabel"}], "alice", "names no class"),
        ([{"id": "cat-000000", "decision": "relabel", "class": "cat"}], "alice", "its own class 'cat'; use accept"),
        ([{"id": "cat-000000", "decision": "maybe"}], "alice", "unknown decision 'maybe'"),
        ([{"id": "cat-000000", "decision": "accept", "class": "dog"}], "alice", "only relabel takes one"),
        ([{"id": "cat-000000", "decision": "accept"}], "  ", "reviewer name is empty"),
        ([{"id": "cat-000000", "decision": "accept"}, {"id": "nope", "decision": "reject"}], "alice", "decision 2: no image 'nope'"),
    ],
)
def test_bad_decisions_are_refused_and_nothing_is_written(local, entries, reviewer, message):
    with pytest.raises(ReviewError, match=re.escape(message)):
        record_decisions(local, RUN, CLASSES, entries, reviewer)
    assert log_keys(local) == []


def test_malformed_stored_log_names_file_and_line(local):
    record_decisions(local, RUN, CLASSES, [{"id": "cat-000000", "decision": "reject"}], "alice", now=T0)
    good = json.dumps({"id": "cat-000001", "decision": "accept", "reviewer": "x", "time": "2026-11-29T12:00:00Z"})
    for bad, problem in [
        ("{not json", "line 2: not JSON"),
        (json.dumps({"id": "cat-000001", "decision": "accept", "reviewer": "x", "time": "yesterday"}), "line 2: the time 'yesterday'"),
        (json.dumps({"id": "cat-000001", "decision": "relabel", "reviewer": "x", "time": "2026-11-29T12:00:00Z"}), "line 2: relabel"),
    ]:
        local.write_text(f"{decisions_prefix(RUN)}/20261129T000000000000Z-edited00.jsonl", good + "\n" + bad + "\n")
        with pytest.raises(ReviewError, match=rf"decision log .*edited00\.jsonl {re.escape(problem)}"):
            curation_state(local, RUN, CLASSES)
        with pytest.raises(ReviewError, match="edited00.jsonl"):
            write_queue(local, RUN, CLASSES)
    # A relabel stored before its class left prompts.classes: named, with the fix.
    local.delete(f"{decisions_prefix(RUN)}/20261129T000000000000Z-edited00.jsonl")
    record_decisions(local, RUN, CLASSES, [{"id": "cat-000000", "decision": "relabel", "class": "frog"}], "alice", now=T0 + timedelta(1))
    with pytest.raises(ReviewError, match="relabels 'cat-000000' to 'frog'.*add the class to prompts.classes"):
        curation_state(local, RUN, ["cat", "dog"])


# -- 3. Decision files and the command line --------------------------------------------------------


def cli(tmp_path, *args) -> int:
    return review_main([str(REPO / "configs" / "smoke.yaml"), f"storage.root={tmp_path / 'outputs'}", *args])


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("d.csv", "id,verdict\ncat-000000,accept\n", "d.csv line 1: the header"),
        ("d.csv", "id,decision,class\ncat-000000,accept,\ncat-000001,reject\n", "d.csv line 3: 2 fields"),
        ("d.csv", 'id,decision,class\ncat-000000,accept,\n"cat-000001,reject,\n', "d.csv line 3: malformed CSV"),
        ("d.csv", "id,decision,class\ncat-000000,accept,\ncat-000009,reject,\n", "line 3: no image 'cat-000009'"),
        ("d.csv", "id,decision,class\n", "holds no decisions"),
        ("d.jsonl", '{"id": "cat-000000", "decision": "accept"}\n{"id": "cat-000001", "decision": \n', "d.jsonl line 2: not JSON"),
        ("d.jsonl", '["cat-000000", "accept"]\n', "d.jsonl line 1: a list, not a JSON object"),
        ("d.jsonl", '{"id": 5, "decision": "accept"}\n', "d.jsonl line 1: id is 5 (int)"),
        ("d.jsonl", '{"id": "cat-000000"}\n', "d.jsonl line 1: no 'decision'"),
        ("d.jsonl", '\n\n{"id": "cat-000000", "decision": "accept", "note": "x"}\n', "d.jsonl line 3: unknown keys ['note']"),
        ("d.txt", "cat-000000 accept\n", "unknown format '.txt'"),
    ],
)
def test_malformed_decision_files_are_refused(local, tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert cli(tmp_path, "decide", "--reviewer", "alice", "--file", str(path)) == 2
    assert message in capsys.readouterr().err
    assert log_keys(local) == []


def test_cli_queue_decide_log(local, tmp_path, capsys):
    assert cli(tmp_path, "queue", "--order", "diverse", "--per-class", "2") == 0
    out = capsys.readouterr().out
    assert "diverse queue of run 'smoke': 3 images (cat 2, dog 1)" in out
    assert str(tmp_path / "outputs/smoke/curate/review/queue-diverse.html") in out

    assert cli(tmp_path, "decide", "--reviewer", "alice", "cat-000004", "relabel", "dog") == 0
    assert "recorded 1 decision(s)" in capsys.readouterr().out
    (tmp_path / "d.csv").write_text("id,decision,class\ncat-000002,reject,\ndog-000000,accept,\n")
    assert cli(tmp_path, "decide", "--reviewer", "bob", "--file", str(tmp_path / "d.csv")) == 0
    (tmp_path / "d.jsonl").write_text('{"id": "cat-000002", "decision": "accept"}\n')
    assert cli(tmp_path, "decide", "--reviewer", "carol", "--file", str(tmp_path / "d.jsonl")) == 0
    capsys.readouterr()
    assert cli(tmp_path, "log") == 0
    out = capsys.readouterr().out
    assert re.search(r"alice\s+cat-000004\s+relabel dog", out) and re.search(r"carol\s+cat-000002\s+accept", out)
    assert "3 effective decision(s)" in out and "7 of 8 scored images accepted" in out

    assert cli(tmp_path, "decide", "--reviewer", "alice", "cat-000004", "relabel", "cow") == 2
    assert "unknown class 'cow'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a decision needs ID and verdict
        cli(tmp_path, "decide", "--reviewer", "alice", "cat-000004")
    assert len(log_keys(local)) == 3


def test_readme_commands_as_written(tmp_path):
    """The README's commands, run from a fresh directory with the smoke preset's relative storage root."""
    work = tmp_path / "work"
    shutil.copytree(REPO / "configs", work / "configs")
    write_run(Storage(str(work / "outputs")))
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Review queue", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^python -m ray_jobs\.review .*$", section, re.MULTILINE)
    assert len(commands) >= 4
    (work / "decisions.csv").write_text("id,decision,class\ncat-000000,reject,\ndog-000000,relabel,cat\n")
    for command in commands:
        argv = command.split()[1:]
        result = subprocess.run([sys.executable, *argv], check=False, cwd=work, capture_output=True, text=True, timeout=120,
                                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)
    assert (work / "outputs/smoke/curate/review/queue-diverse.html").is_file()
    state = curation_state(Storage(str(work / "outputs")), RUN, CLASSES)
    assert state.decisions >= 2 and state.relabel.get("dog-000000") == "cat"


# -- 4. S3 ---------------------------------------------------------------------------------------


def test_on_s3(s3_server):
    make_bucket(s3_server, "review")
    storage = Storage("s3://review/root", s3_endpoint_url=s3_server)
    write_run(storage)
    record_decisions(storage, RUN, CLASSES, [{"id": "dog-000000", "decision": "relabel", "class": "bird"}], "alice", now=T0)
    with pytest.raises(ReviewError, match="no image 'nope'"):
        record_decisions(storage, RUN, CLASSES, [{"id": "nope", "decision": "reject"}], "alice")
    assert len(storage.list(decisions_prefix(RUN))) == 1
    summary = write_queue(storage, RUN, CLASSES, "uncertainty", per_class=2, include_decided=True)
    assert summary["html"] == "s3://review/root/smoke/curate/review/queue-uncertainty.html"
    assert summary["missing_thumbnails"] == 0 and summary["images"] == 4
    page = storage.read_bytes("smoke/curate/review/queue-uncertainty.html").decode()
    assert page.count('src="data:image/png;base64,') == 4
    state = curation_state(storage, RUN, CLASSES)
    assert state.relabel == {"dog-000000": "bird"} and state.decisions == 1
