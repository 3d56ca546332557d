"""The fault campaign, generation side: faults injected while shards land, then the run audited.

Each test records its figures (``fault_figures``): images missing, duplicated, corrupt and
foreign afterwards, and how many images differ from what an unfaulted run makes (the
class-aware test generator is deterministic, so the unfaulted images are computed here).
Injectors are in ``tests/chaos.py``. The training side is in ``test_train.py`` and ``test_tune.py``
(killed workers, trials and drivers).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest
import yaml

from chaos import TcpProxy, wait_for
from conftest import REPO, make_bucket, ray_processes
from synth.config import load_config
from synth.generate import run_generate
from synth.imagejob import existing_shards
from synth.images import encode_png
from synth.shards import META_PLAN, shard_number
from synth.storage import Layout, Storage
from synth.testkit import ClassAwareTestGenerator
from synth.verify import check_generate, run_verify

SLOW = "synth.testkit:SlowClassAwareTestGenerator"
CLASS_AWARE = "synth.testkit:ClassAwareTestGenerator"
GENERATION_ACTOR = "ray::MapWorker(MapBatches(ShardMaker))"  # Ray's title for the actor process


def config(root, *extra, run="f"):
    return load_config(REPO / "configs" / "smoke.yaml", [f"storage.root={root}", f"run={run}", f"generate.generator={CLASS_AWARE}", "prompts.hostile_per_class=0", *extra])


def audit(cfg, storage: Storage) -> dict:
    """Missing, duplicated, corrupt, foreign and wrong images of a finished run, against the plan."""
    layout = Layout(cfg.run)
    check = check_generate(cfg, storage)
    kinds = [f.kind for f in check.findings]
    seen: dict[str, int] = {}
    wrong = 0
    generator = ClassAwareTestGenerator(cfg.generate, cfg.prompts.classes)
    for key in storage.list(layout.generate_shards):
        if shard_number(key.rsplit("/", 1)[-1]) is None:
            continue  # a stray name: reported by verify, never read as images
        rows = storage.read_parquet(key).to_pylist()
        expected = generator.generate([r["prompt"] for r in rows], [r["negative"] for r in rows], [r["seed"] for r in rows])
        for row, img in zip(rows, expected.small):
            seen[row["id"]] = seen.get(row["id"], 0) + 1
            wrong += row["image"] != encode_png(img)
    manifest = storage.read_parquet(layout.generate_manifest, columns=["id"]).column("id").to_pylist()
    planned = len(cfg.prompts.classes) * cfg.prompts.per_class
    return {
        "images": len(seen),
        "missing": planned - len(set(manifest) & set(seen)),
        "duplicated": sum(n - 1 for n in seen.values()),
        "corrupt": kinds.count("corrupt"),
        "foreign": kinds.count("foreign"),
        "not_as_unfaulted": wrong,
    }


def clean(figures: dict, images: int) -> bool:
    return figures["images"] == images and not any(figures[k] for k in ("missing", "duplicated", "corrupt", "foreign", "not_as_unfaulted"))


def job(*args: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ray_jobs.generate", str(REPO / "configs" / "smoke.yaml"), "prompts.hostile_per_class=0", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# --------------------------------------------------------------------------------------------
# Generation actors killed again and again
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generation_actors_killed_repeatedly_over_a_thousand_images(tmp_path, ray_local, fault_figures):
    cfg = config(tmp_path, f"generate.generator={SLOW}", "prompts.per_class=168", "generate.shard_size=24")
    storage, layout = Storage(str(tmp_path)), Layout(cfg.run)
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(run_generate(cfg)))
    driver.start()
    assert wait_for(lambda: existing_shards(storage, layout), timeout=120), "no shard landed"
    kills, rng = 0, random.Random(0)
    while driver.is_alive() and len(existing_shards(storage, layout)) < 36:  # 42 shards; stop before the last few
        actors = ray_processes(GENERATION_ACTOR)
        if actors:
            rng.choice(actors).kill()
            kills += 1
        time.sleep(1.5)
    driver.join(timeout=600)
    assert not driver.is_alive() and result, "the stage did not finish"
    assert kills >= 3, f"only {kills} kills landed before the run ended: the campaign proves little"
    figures = audit(cfg, storage)
    fault_figures(actor_kills=kills, **figures)
    assert clean(figures, 1008), figures
    assert result["images_total"] == 1008


# --------------------------------------------------------------------------------------------
# Storage faults: corrupt, truncated, copied, stray, foreign and vanishing shards
# --------------------------------------------------------------------------------------------


def test_damaged_shards_are_found_quarantined_and_remade(tmp_path, ray_local, fault_figures, capsys):
    cfg = config(tmp_path, "prompts.per_class=8", "generate.shard_size=2")  # 24 shards
    storage, layout = Storage(str(tmp_path)), Layout(cfg.run)
    run_generate(cfg)
    shards = tmp_path / layout.generate_shards
    original = {p.name: p.read_bytes() for p in shards.iterdir()}
    (shards / "shard-00003.parquet").write_bytes(b"garbage, not Parquet")
    (shards / "shard-00005.parquet").write_bytes(original["shard-00005.parquet"][:-100])  # truncated
    (shards / "shard-00007.parquet").write_bytes(original["shard-00001.parquet"])  # a copy of another
    # Readable, with its metadata intact, but one image changed (bit rot that still parses).
    table = storage.read_parquet(layout.generate_shard(11))
    images = table.column("image").to_pylist()
    images[0] = images[1]
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.binary()))
    storage.write_parquet(layout.generate_shard(11), table)
    (shards / "shard-00009.parquet").unlink()
    (shards / "shard-00003 (copy).parquet").write_bytes(original["shard-00003.parquet"])  # a stray name

    # The dataset stage names the bad file and the fix instead of a Parquet traceback.
    from synth.dataset import run_dataset

    with pytest.raises(Exception, match=r"shard-0000[3579].parquet.*Fix: rerun the generate stage"):
        run_dataset(config(tmp_path, "prompts.per_class=8", "generate.shard_size=2", "dataset.domains=[synthetic]"))

    found = run_verify(cfg, storage)
    kinds = [f["kind"] for f in found["stages"]["generate"]["findings"]]
    assert sorted(kinds) == ["corrupt"] * 4 + ["extra"] + ["missing"], kinds
    assert found["problems"] == 5

    capsys.readouterr()
    summary = run_generate(cfg)
    said = capsys.readouterr().out
    assert summary["shards_generated"] == 5 and len(summary["shards_quarantined"]) == 4
    assert "ignoring 1 stray object under" in said and "shard 3 is corrupt" in said
    remade = {p.name: p.read_bytes() for p in shards.iterdir() if p.name != "shard-00003 (copy).parquet"}
    assert remade == original, "remade shards are byte-identical to the ones first made"
    figures = audit(cfg, storage)
    fault_figures(damaged=4, deleted=1, stray=1, remade=summary["shards_generated"], **figures)
    assert clean(figures, 48), figures
    assert run_verify(cfg, storage)["problems"] == 0


def test_foreign_plan_shards_stop_the_run_and_repair_remakes_them(tmp_path, ray_local, fault_figures):
    ours, theirs = config(tmp_path, "prompts.per_class=4", "generate.shard_size=4"), config(
        tmp_path, "prompts.per_class=4", "generate.shard_size=4", "generate.steps=3", run="other"
    )
    storage, layout = Storage(str(tmp_path)), Layout(ours.run)
    run_generate(ours)
    run_generate(theirs)
    # A shard of the other run (same ids, same position, another plan) copied over one of ours.
    shutil.copy(tmp_path / Layout("other").generate_shard(2), tmp_path / layout.generate_shard(2))
    with pytest.raises(Exception, match=r"made under another plan.*Fix: choose a new run name.*--repair"):
        run_generate(ours)
    repaired = run_verify(ours, storage, repair=True)
    assert repaired["problems_found"] == 1 and repaired["problems"] == 0
    assert len(repaired["repaired"]["generate"]) == 1
    figures = audit(ours, storage)
    fault_figures(foreign_injected=1, **figures)
    assert clean(figures, 24), figures


def test_shards_deleted_mid_run_are_made_again(tmp_path, ray_local, fault_figures):
    cfg = config(tmp_path, f"generate.generator={SLOW}", "prompts.per_class=16", "generate.shard_size=8")  # 12 shards
    storage, layout = Storage(str(tmp_path)), Layout(cfg.run)
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(run_generate(cfg)))
    driver.start()
    assert wait_for(lambda: len(existing_shards(storage, layout)) >= 2, timeout=120)
    landed = sorted(existing_shards(storage, layout))
    for k in landed[:2]:
        storage.delete(layout.generate_shard(k))
    driver.join(timeout=300)
    assert result, "the stage did not finish"
    figures = audit(cfg, storage)
    fault_figures(deleted_mid_run=2, shards_made=result["shards_generated"], **figures)
    assert len(existing_shards(storage, layout)) == 12 and result["shards_generated"] >= 12
    assert clean(figures, 96), figures


# --------------------------------------------------------------------------------------------
# Two drivers at once
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_with_different_plans_never_mix(tmp_path, s3_server, where, fault_figures):
    if where == "s3":
        make_bucket(s3_server, "race")
        root = ["storage.root=s3://race/runs", f"storage.s3_endpoint_url={s3_server}"]
        storage = Storage("s3://race/runs", s3_endpoint_url=s3_server)
    else:
        root, storage = [f"storage.root={tmp_path}"], Storage(str(tmp_path))
    common = [*root, "run=race", f"generate.generator={CLASS_AWARE}", "prompts.per_class=8", "generate.shard_size=4"]
    drivers = [job(*common, f"generate.steps={steps}") for steps in (1, 2)]
    outs = [d.communicate(timeout=300) for d in drivers]
    codes = [d.returncode for d in drivers]
    assert sorted(codes) == [0, 2], (codes, [err[-1500:] for _, err in outs])
    loser_err = outs[codes.index(2)][1].strip().splitlines()
    assert len(loser_err) == 1 and "different plan" in loser_err[0] and "Fix:" in loser_err[0], loser_err
    winner = load_config(REPO / "configs" / "smoke.yaml", ["prompts.hostile_per_class=0", *common, f"generate.steps={1 + codes.index(0)}"])
    plan = storage.read_parquet(Layout("race").generate_manifest).schema.metadata[META_PLAN].decode()
    assert storage.read_json(Layout("race").summary("generate"))["plan_sha256"] == plan
    # The stage's config.yaml is the winner's: the loser stopped at the claim, before writing anything.
    stored_config = yaml.safe_load(storage.read_bytes(Layout("race").config_file("generate")))
    assert stored_config["generate"]["steps"] == winner.generate.steps, stored_config["generate"]
    figures = audit(winner, storage)
    fault_figures(where=where, **figures)
    assert clean(figures, 48), figures


# --------------------------------------------------------------------------------------------
# The S3 server unreachable for a while
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_outage_is_waited_out_and_a_long_one_ends_in_one_line(s3_server, fault_figures):
    port = int(s3_server.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    make_bucket(s3_server, "outage")
    storage = Storage("s3://outage/runs", s3_endpoint_url=s3_server)
    args = [
        "storage.root=s3://outage/runs", f"storage.s3_endpoint_url={proxy.url}", "run=o", f"generate.generator={SLOW}",
        "prompts.per_class=32", "generate.shard_size=8",
    ]  # fmt: skip
    layout = Layout("o")
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["prompts.hostile_per_class=0", *args[:1], f"storage.s3_endpoint_url={s3_server}", *args[2:]])

    # Two drivers, not three: the long outage's rerun is the run that waits out the short one.
    # 1. Down mid-run for longer than storage.retry_seconds: one clear line, exit 2.
    driver = job(*args, "storage.retry_seconds=1")
    assert wait_for(lambda: len(existing_shards(storage, layout)) >= 2, timeout=180), "no shard landed"
    proxy.down()
    out, err = driver.communicate(timeout=300)
    proxy.up()
    lines = err.strip().splitlines()
    assert driver.returncode == 2 and len(lines) == 1, err[-3000:]
    assert "kept failing for 1 s" in lines[0] and "rerun the same command" in lines[0]
    stored = len(existing_shards(storage, layout))
    assert stored < 24, "the outage must land mid-run"

    # 2. The rerun resumes, and ~9 s down mid-run (the default storage.retry_seconds) is waited out.
    rerun = job(*args)
    assert wait_for(lambda: len(existing_shards(storage, layout)) > stored, timeout=180), "the rerun made no shard"
    proxy.down()
    down_at = len(existing_shards(storage, layout))
    time.sleep(9)
    proxy.up()
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert down_at < 24, "the outage must land mid-run"
    assert storage.read_json(layout.summary("generate"))["shards_already_stored"] >= stored, "the first run's shards are kept"
    figures = audit(cfg, storage)
    fault_figures(long_outage="exit 2, one line", shards_before_long_outage=stored, outage_seconds=9, shards_before_outage=down_at, **figures)
    assert clean(figures, 192), figures


def test_two_drivers_with_the_same_plan_split_the_work(tmp_path, ray_local, fault_figures):
    cfg = config(tmp_path, f"generate.generator={SLOW}", "prompts.per_class=16", "generate.shard_size=4")  # 24 shards
    storage = Storage(str(tmp_path))
    results: list[dict] = [{}, {}]
    drivers = [threading.Thread(target=lambda i=i: results[i].update(run_generate(cfg))) for i in range(2)]
    for d in drivers:
        d.start()
        time.sleep(1.0)
    for d in drivers:
        d.join(timeout=300)
    assert all(results), "both drivers finish"
    written = [r["shards_generated"] for r in results]
    by_other = [r["shards_found_stored_meanwhile"] for r in results]
    figures = audit(cfg, storage)
    fault_figures(shards_written=written, found_stored_by_the_other=by_other, **figures)
    assert sum(written) == 24, "every shard is written exactly once, by one of the two"
    assert clean(figures, 96), figures
