"""The derive stage: variations, fusion and inpainting of parent images through the exactly-once image job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO
from synth.config import ConfigError, load_config
from synth.derive import child_rows, folder_parents, generated_parents
from synth.images import decode_png, encode_png, inpaint_mask
from synth.imagejob import existing_shards
from synth.storage import Layout, Storage
from synth.testkit import ClassAwareTestDeriver, class_pattern_image

CLASS_AWARE = "synth.testkit:ClassAwareTestGenerator"
DERIVER = "synth.testkit:ClassAwareTestDeriver"
SLOW_DERIVER = "synth.testkit:SlowClassAwareTestDeriver"
# The smoke preset derives a variation and an edit of 4 parents per class; each test asks for its own.
NO_DERIVE = ["derive.variations.count=0", "derive.inpainting.count=0", "derive.fusion.per_class=0", "derive.parents_per_class=null"]


def config(root, *extra, run="d"):
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [f"storage.root={root}", f"run={run}", f"generate.generator={CLASS_AWARE}", f"derive.generator={DERIVER}", *NO_DERIVE, *extra],
    )


def read_stage(storage: Storage, run: str, stage: str) -> tuple[list[dict], dict[str, bytes]]:
    """(manifest rows, {id: png} from every shard object), failing on an id stored twice."""
    layout = Layout(run)
    manifest = storage.read_parquet(layout.manifest(stage)).to_pylist()
    images: dict[str, bytes] = {}
    for key in storage.list(layout.shards(stage)):
        table = storage.read_parquet(key, columns=["id", "image"])
        for image_id, png in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            assert image_id not in images, f"{image_id} stored twice"
            images[image_id] = png
    return manifest, images


def test_children_are_a_pure_function_of_parents_and_config(tmp_path):
    import pyarrow as pa

    from synth.derive import PARENT_SCHEMA

    cfg = config(tmp_path, "derive.variations.count=3", "derive.inpainting.count=4", "derive.fusion.per_class=5",
                 "prompts.classes=[cat,dog]")  # fmt: skip
    ids = ["cat-a", "cat-b", "cat-c", "dog-a"]
    parents = pa.table(
        {"id": ids, "label": pa.array([0, 0, 0, 1], pa.int32()), "class_name": ["cat", "cat", "cat", "dog"],
         "prompt": ["a cat", "", "", "a dog"], "source": ids, "image": [b""] * 4},
        schema=PARENT_SCHEMA,
    )  # fmt: skip
    rows = child_rows(cfg, parents)
    assert rows == child_rows(cfg, parents), "the same inputs give the same children"
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows) == 4 * 3 + 4 * 4 + 5  # dog has one parent: no fusion pair for it
    assert {f"cat-a-v{k}" for k in range(3)} <= set(by_id) and {f"dog-a-i{k}" for k in range(4)} <= set(by_id)
    assert [by_id[f"cat-a-i{k}"]["params"]["mask"] for k in range(4)] == ["border", "box", "center", "border"]
    assert by_id["cat-a-v0"]["prompt"] == "a cat" and by_id["cat-b-v0"]["prompt"] == "a photo of a cat"
    assert all(r["class_name"] in r["prompt"] for r in rows if r["technique"] == "inpainting")
    assert len({r["seed"] for r in rows}) == len(rows), "every child has its own seed"
    fusions = [r for r in rows if r["technique"] == "fusion"]
    assert all(r["class_name"] == "cat" and len(set(r["parents"])) == 2 and set(r["parents"]) <= {"cat-a", "cat-b", "cat-c"}
               for r in fusions)  # fmt: skip
    assert all(0.3 <= r["params"]["weight"] <= 0.7 for r in fusions)
    for r in rows:
        if r["technique"] != "fusion":
            assert r["parents"] == [r["id"].rsplit("-", 1)[0]] and r["label"] == parents.column("label")[ids.index(r["parents"][0])].as_py()
    # Another run name draws other seeds, pairs and environments; the ids stay.
    other = child_rows(config(tmp_path, "derive.variations.count=3", "derive.inpainting.count=4", "derive.fusion.per_class=5",
                              "prompts.classes=[cat,dog]", run="e"), parents)  # fmt: skip
    assert [r["id"] for r in other] == [r["id"] for r in rows] and [r["seed"] for r in other] != [r["seed"] for r in rows]


DERIVE_ARGS = ("prompts.per_class=4", "prompts.classes=[cat,dog,frog]", "derive.variations.count=2", "derive.inpainting.count=3",
               "derive.fusion.per_class=3", "generate.shard_size=8")  # fmt: skip


def test_derived_from_generated_parents_complete_lineage_exactly_once(tmp_path, ray_local):
    from synth.derive import run_derive
    from synth.generate import run_generate

    cfg = config(tmp_path, *DERIVE_ARGS)
    storage = Storage(str(tmp_path))
    run_generate(cfg)
    summary = run_derive(cfg)
    assert summary["images_per_technique"] == {"variation": 24, "inpainting": 36, "fusion": 9}
    assert summary["shards_generated"] == summary["shards_total"] == 9

    generated, _ = read_stage(storage, "d", "generate")
    manifest, images = read_stage(storage, "d", "derive")
    gen_by_id = {r["id"]: r for r in generated}
    assert set(images) == {r["id"] for r in manifest} and len(manifest) == 69
    deriver = ClassAwareTestDeriver(cfg.derive, cfg.generate, cfg.prompts.classes)
    parents = {pid: decode_png(png) for pid, png in zip(*(storage.read_parquet(Layout("d").derive_parents).column(c).to_pylist()
                                                          for c in ("id", "image")))}  # fmt: skip
    for row in manifest:
        row["params"] = json.loads(row["params"])
        # Lineage: every parent exists among the generated images, of the child's class and label.
        assert row["parents"] and all(p in gen_by_id for p in row["parents"]), row
        assert all(gen_by_id[p]["class_name"] == row["class_name"] and gen_by_id[p]["label"] == row["label"] for p in row["parents"])
        # Each stored image is exactly what its own row makes, alone (not of its batch).
        assert images[row["id"]] == encode_png(deriver.derive([row], parents).small[0]), row["id"]
    # An inpainting edit keeps its parent outside the mask and draws its own class inside.
    edit = next(r for r in manifest if r["technique"] == "inpainting" and r["params"]["mask"] == "center")
    img, parent = decode_png(images[edit["id"]]), parents[edit["parents"][0]]
    keep = ~inpaint_mask("center", 32, 32, edit["seed"])
    assert (img[keep] == parent[keep]).all()
    assert (img[~keep] == class_pattern_image(edit["label"], edit["seed"], 32)[~keep]).all()

    again = run_derive(cfg)
    assert again["shards_generated"] == 0 and again["images_generated"] == 0 and again["shards_already_stored"] == 9
    assert read_stage(storage, "d", "derive")[1] == images, "a rerun changes nothing"

    # A run moved to another storage root is the same run: its parents and plan still match.
    import shutil

    shutil.copytree(tmp_path / "d", tmp_path / "moved" / "d")
    moved = run_derive(config(tmp_path / "moved", *DERIVE_ARGS))
    assert moved["shards_generated"] == 0 and moved["shards_already_stored"] == 9

    # verify sees the derive stage; a damaged child shard is quarantined and remade, byte for byte.
    from synth.verify import run_verify

    assert run_verify(cfg, storage)["stages"]["derive"]["problems"] == 0
    key = Layout("d").shard("derive", 4)
    storage.write_bytes(key, storage.read_bytes(key)[:-100])
    summary = run_verify(cfg, storage, repair=True)
    assert summary["problems_found"] == 1 and summary["problems"] == 0 and list(summary["repaired"]) == ["derive"]
    assert read_stage(storage, "d", "derive")[1] == images


def _photo_folder(root, classes: dict[str, int]):
    for label, (name, n) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(class_pattern_image(label, i, 48)).save(folder / f"img {i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_a_folder_of_your_own_photos_as_parents(tmp_path, ray_local):
    from synth.derive import run_derive

    photos = _photo_folder(tmp_path / "photos", {"oil painting": 3, "pencil drawing": 2})
    (photos / "oil painting" / "broken.png").write_bytes(b"\x89PNG not really")
    (photos / "notes.txt").write_text("not a class folder")
    cfg = config(tmp_path / "out", "prompts.classes=[oil painting,pencil drawing]", f"derive.parents={photos}",
                 "derive.variations.count=3")  # fmt: skip
    summary = run_derive(cfg)
    assert summary["parents_per_class"] == {"oil painting": 3, "pencil drawing": 2}
    assert summary["parents_skipped_unreadable"] == {"oil painting": 1} and summary["files_ignored"] == 1
    manifest, images = read_stage(Storage(str(tmp_path / "out")), "d", "derive")
    assert len(manifest) == len(images) == 15
    assert {r["parents"][0] for r in manifest} == {"oil-painting-img-0-jpg", "oil-painting-img-1-png", "oil-painting-img-2-jpg",
                                                   "pencil-drawing-img-0-jpg", "pencil-drawing-img-1-png"}  # fmt: skip
    for r in manifest:
        assert r["id"].startswith(r["parents"][0] + "-v") and r["parents"][0].startswith(r["class_name"].replace(" ", "-"))
        assert r["prompt"] == f"a photo of a {r['class_name']}"


def test_photo_parents_from_s3(tmp_path, s3_server):
    from conftest import make_bucket

    photos = _photo_folder(tmp_path / "photos", {"cat": 2, "dog": 1})
    make_bucket(s3_server, "photos")
    bucket = Storage("s3://photos/mine", s3_endpoint_url=s3_server)
    for path in sorted(photos.rglob("*.*")):
        bucket.write_bytes(str(path.relative_to(photos)), path.read_bytes())
    bucket.write_bytes("cat/broken.jpg", b"nope")
    cfg = config(tmp_path, "prompts.classes=[cat,dog]", "derive.parents=s3://photos/mine", f"storage.s3_endpoint_url={s3_server}")
    scan = folder_parents(cfg, cfg.storage)
    assert scan.table.column("id").to_pylist() == ["cat-img-0-jpg", "cat-img-1-png", "dog-img-0-jpg"]
    assert scan.skipped == {"cat": ["s3://photos/mine/cat/broken.jpg"]}
    assert scan.table.column("source").to_pylist()[0] == "s3://photos/mine/cat/img 0.jpg"
    first = decode_png(scan.table.column("image")[0].as_py())
    assert first.shape == (48, 48, 3)  # photos at most the render size keep their own size


def test_bad_parents_and_settings_are_refused_with_the_fix(tmp_path):
    from synth.derive import run_derive

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no images in class folders .*Fix: put the photos in one folder per class"):
        folder_parents(config(tmp_path, f"derive.parents={tmp_path / 'empty'}"), config(tmp_path).storage)
    (tmp_path / "junk" / "cat").mkdir(parents=True)
    (tmp_path / "junk" / "cat" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"none of its 1 image file could be read as an image .*Fix: give PNG or JPEG"):
        folder_parents(config(tmp_path, f"derive.parents={tmp_path / 'junk'}"), config(tmp_path).storage)
    with pytest.raises(ConfigError, match=r"no generate manifest .*Fix: run the generate stage first"):
        generated_parents(config(tmp_path), Storage(str(tmp_path)))
    with pytest.raises(ConfigError, match=r"nothing to make.*Fix: set one"):
        run_derive(config(tmp_path))
    for override, message in (
        ("derive.variations.strength=0", r"derive.variations.strength=0.0 is invalid: must be in \(0, 1\]"),
        ("derive.variations.strength=1.5", r"must be in \(0, 1\]"),
        ("derive.variations.count=-1", r"derive.variations.count=-1 is invalid"),
        ("derive.fusion.per_class=-2", r"derive.fusion.per_class=-2 is invalid"),
        ("derive.inpainting.masks=[ring]", r"give masks from \['border', 'box', 'center'\]"),
        ("derive.parents_per_class=0", r"must be at least 1, or null"),
    ):
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, override)


@pytest.mark.slow
def test_killed_derive_driver_then_rerun_leaves_each_child_once(tmp_path, ray_local, fault_figures):
    from synth.generate import run_generate

    args = [f"storage.root={tmp_path}", "run=d", f"generate.generator={CLASS_AWARE}", f"derive.generator={SLOW_DERIVER}",
            *NO_DERIVE, "prompts.per_class=4", "derive.variations.count=4", "generate.shard_size=4"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "smoke.yaml", args)
    storage, layout = Storage(str(tmp_path)), Layout("d")
    # The parents, in the session's Ray instance (left running: shutting it down made the next test start another).
    run_generate(cfg)
    cmd = [sys.executable, "-m", "ray_jobs.derive", str(REPO / "configs" / "smoke.yaml"), *args]
    driver = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(existing_shards(storage, layout, "derive")) < 3:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
    driver.wait()
    time.sleep(2)  # orphaned workers may finish a write
    done_before = len(existing_shards(storage, layout, "derive"))
    assert 3 <= done_before < 24, "the kill must land mid-run"
    assert not storage.exists(layout.manifest("derive"))

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = storage.read_json(layout.summary("derive"))
    manifest, images = read_stage(storage, "d", "derive")  # fails on a child stored twice
    ids = [r["id"] for r in manifest]
    fault_figures(shards_before_kill=done_before, remade_after=summary["shards_generated"], images=len(images),
                  missing=96 - len(set(ids) & set(images)), duplicated=len(ids) - len(set(ids)))  # fmt: skip
    assert summary["shards_already_stored"] + summary["shards_generated"] == 24
    assert len(ids) == len(set(ids)) == len(images) == 96
    parents = set(storage.read_parquet(layout.generate_manifest, columns=["id"]).column("id").to_pylist())
    assert all(r["parents"][0] in parents and r["id"] == f"{r['parents'][0]}-v{r['id'][-1]}" for r in manifest)


def test_real_pipelines_through_the_stages(tmp_path, tiny_sd, ray_local):
    """Random-weight Kandinsky 2.2 prior + decoder and SD inpainting (9-channel UNet) through Ray."""
    from synth.derive import run_derive
    from synth.generate import run_generate
    from synth.testkit import build_tiny_random_kandinsky, build_tiny_random_sd_inpaint_pipeline

    prior, decoder = build_tiny_random_kandinsky(tmp_path / "kandinsky")
    inpaint = build_tiny_random_sd_inpaint_pipeline(tmp_path / "inpaint")
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        *NO_DERIVE, f"storage.root={tmp_path / 'out'}", "run=k", "prompts.per_class=2", "prompts.classes=[cat,dog]",
        f"generate.model={decoder}", f"generate.prior={prior}", "generate.steps=2", "generate.shard_size=4",
        "derive.variations.count=1", "derive.variations.method=embedding", "derive.fusion.per_class=1",
        "derive.inpainting.count=1", f"derive.inpainting.model={inpaint}",
    ])  # fmt: skip
    generated = run_generate(cfg)
    assert generated["plan"]["model"] == f"{prior} -> {decoder}"
    storage = Storage(str(tmp_path / "out"))
    manifest = storage.read_parquet(Layout("k").generate_manifest).to_pylist()
    assert {r["model"] for r in manifest} == {f"{prior} -> {decoder}"}, "the manifest records both models"
    derived = run_derive(cfg)
    assert derived["images_per_technique"] == {"fusion": 2, "inpainting": 4, "variation": 4}
    rows, images = read_stage(storage, "k", "derive")
    assert len(images) == 10 and all(decode_png(png).shape == (32, 32, 3) for png in images.values())
    assert all(set(r["parents"]) <= {m["id"] for m in manifest} for r in rows)
    assert {r["model"] for r in rows} == {derived["plan"]["model"]} and str(inpaint) in derived["plan"]["model"]


@pytest.mark.slow
def test_worked_example_two_classes_of_your_own_from_a_handful_of_photos(tmp_path):
    """The README's worked example, as written (relative paths, from the folder the photos are in),
    with the class-aware deriver standing in for SD-Turbo and a CPU-sized network."""
    run = lambda *cmd: subprocess.run([sys.executable, "-m", *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # noqa: E731
    made = run("synth.testkit", "photo-folder", "photos", "oil painting", "pencil drawing")
    assert made.returncode == 0, made.stderr
    done = run("ray_jobs.pipeline", str(REPO / "configs" / "photos.yaml"), f"derive.generator={DERIVER}",
               "generate.height=64", "generate.width=64", "train.width=0.25", "train.steps=40", "train.seeds=[0]",
               "tune.seeds=[0]", "train.eval_batch_size=256")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[pipeline] run 'photos': derive -> dataset -> train -> tune -> report" in done.stdout
    out = tmp_path / "outputs" / "photos"
    assert json.loads(done.stdout[done.stdout.index("{"):])["report"] == str(out / "report" / "report.html")
    derive = json.loads((out / "derive" / "summary.json").read_text())
    assert derive["parents_per_class"] == {"oil painting": 6, "pencil drawing": 6} and derive["images_total"] == 1200
    # Children of the training photos only: the held-out photos are never parents, and no
    # photo's children are split between synthetic train, val and test.
    storage = Storage(str(tmp_path / "outputs"))
    parents = storage.read_parquet(Layout("photos").derive_parents, columns=["source"]).column("source").to_pylist()
    assert all("/photos/train/" in p for p in parents)
    manifest = {r["id"]: r["parents"][0] for r in storage.read_parquet(Layout("photos").manifest("derive"), columns=["id", "parents"]).to_pylist()}
    split_of_group: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for image_id in storage.read_parquet(Layout("photos").dataset_split("synthetic", split), columns=["id"]).column("id").to_pylist():
            assert split_of_group.setdefault(manifest[image_id], split) == split, f"{manifest[image_id]}'s children span splits"
    metrics = json.loads((out / "train" / "train-synthetic" / "seed-0" / "metrics.json").read_text())
    assert metrics["test"]["real"]["accuracy"] >= 0.75, "children of the right photos teach the right classes"
