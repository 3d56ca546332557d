"""The dataset stage: real imports (CIFAR-10 archive / folder / S3, image folders), synthetic splits, errors."""

from __future__ import annotations

import json
import pickle
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import REPO, synth_imports
from ray_jobs._cli import main as cli_main
from synth.config import DERIVE_TECHNIQUES, TECHNIQUES, ConfigError, load_config
from synth.dataset import (
    SPLITS, Item, carve_val, lineage_groups, load_split, load_split_table, run_dataset, seeded_order, split_groups,
    synthetic_split_sizes, val_size,
)  # fmt: skip
from synth.curate import scores_key
from synth.generate import model_name, plan_for, shard_rows
from synth.imagejob import build_manifest, claim_plan, cut_shards, scan_shards
from synth.images import encode_png
from synth.shards import META_PLAN, plan_sha256, shard_table
from synth.prompts import build_prompt_table
from synth.review import decisions_prefix
from synth.storage import Layout, Storage
from synth.testkit import ClassAwareTestGenerator, class_pattern_image, write_cifar10_fixture, write_image_folder_fixture

# Not CIFAR's order (bird=2, cat=3, dog=5 there): labels must be mapped by name.
CLASSES = ["bird", "cat", "dog"]
RUN = "t"


def make_cfg(root, *overrides: str):
    return load_config(
        None,
        [f"storage.root={root}", f"run={RUN}", f"prompts.classes=[{','.join(CLASSES)}]", "dataset.domains=[real]", *overrides],
    )


def tables(storage: Storage, domain: str) -> dict:
    return {split: load_split_table(storage, RUN, domain, split) for split in SPLITS}


def colour_labels(images: np.ndarray) -> np.ndarray:
    """The label a class pattern encodes: labels 0, 1, 2 are red, green, blue (synth.testkit's palette)."""
    return images.reshape(len(images), -1, 3).mean(axis=1).argmax(axis=1)


def check_split_tables(storage: Storage, domain: str) -> dict:
    """Shared invariants: schema, one label space, no id in two splits, images match their labels."""
    ts = tables(storage, domain)
    seen: set[str] = set()
    for split, t in ts.items():
        assert t.column_names == ["id", "label", "class_name", "image", "domain", "source", "technique", "accepted"]
        assert str(t.schema.field("label").type) == "int32"
        ids = set(t.column("id").to_pylist())
        assert len(ids) == t.num_rows and not ids & seen, f"{split} repeats ids"
        seen |= ids
        assert set(t.column("domain").to_pylist()) <= {domain}
        assert [CLASSES[i] for i in t.column("label").to_pylist()] == t.column("class_name").to_pylist()
        images, labels = load_split(storage, RUN, domain, split)
        assert images.shape == (t.num_rows, 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(colour_labels(images), labels)
    return ts


def per_class(summary: dict, domain: str, split: str) -> dict:
    return summary["domains"][domain]["per_class"][split]


# --------------------------------------------------------------------------------------------
# Real: CIFAR-10
# --------------------------------------------------------------------------------------------


def test_cifar_folder_and_archive_import_is_deterministic(tmp_path):
    folder = write_cifar10_fixture(tmp_path / "fx", per_class_train=10, per_class_test=4, classes=CLASSES)
    archive = write_cifar10_fixture(tmp_path / "fxa", per_class_train=10, per_class_test=4, classes=CLASSES, archive=True)
    assert folder.name == "cifar-10-batches-py" and archive.name == "cifar-10-python.tar.gz"

    summary = run_dataset(make_cfg(tmp_path / "a", f"dataset.real_path={folder}", "dataset.val_fraction=0.2"))
    a = Storage(str(tmp_path / "a"))
    ts = check_split_tables(a, "real")
    # Official split kept: 10 classes x 10 train / x 4 test in the fixture, 3 configured classes kept.
    assert per_class(summary, "real", "train") == {c: 8 for c in CLASSES}
    assert per_class(summary, "real", "val") == {c: 2 for c in CLASSES}
    assert per_class(summary, "real", "test") == {c: 4 for c in CLASSES}
    assert summary["domains"]["real"]["skipped_corrupt"] == {"train": 0, "val": 0, "test": 0}
    for split, prefix in (("train", "cifar10-train-"), ("val", "cifar10-train-"), ("test", "cifar10-test-")):
        ids = ts[split].column("id").to_pylist()
        assert all(i.startswith(prefix) for i in ids)
    assert max(int(i.rsplit("-", 1)[1]) for i in ts["test"].column("id").to_pylist()) < 40  # index in CIFAR's test batch
    assert a.exists(f"{RUN}/dataset/config.yaml") and a.read_json(f"{RUN}/dataset/summary.json")["stage"] == "dataset"

    # The archive, the folder's parent, and a rerun all give identical tables.
    run_dataset(make_cfg(tmp_path / "b", f"dataset.real_path={archive}", "dataset.val_fraction=0.2"))
    run_dataset(make_cfg(tmp_path / "c", f"dataset.real_path={folder.parent}", "dataset.val_fraction=0.2"))
    run_dataset(make_cfg(tmp_path / "a", f"dataset.real_path={folder}", "dataset.val_fraction=0.2"))
    for root in ("b", "c", "a"):
        other = tables(Storage(str(tmp_path / root)), "real")
        assert all(other[s].equals(ts[s]) for s in SPLITS), root

    # Another image size is a resize of the same images.
    run_dataset(make_cfg(tmp_path / "d", f"dataset.real_path={archive}", "dataset.image_size=16"))
    images, labels = load_split(Storage(str(tmp_path / "d")), RUN, "real", "test")
    assert images.shape == (12, 16, 16, 3)
    np.testing.assert_array_equal(colour_labels(images), labels)


def test_cifar_from_s3_archive_and_folder(tmp_path, s3_server):
    import boto3

    bucket = f"data-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    archive = write_cifar10_fixture(tmp_path / "fx", 6, 3, classes=CLASSES, archive=True)
    folder = write_cifar10_fixture(tmp_path / "fx", 6, 3, classes=CLASSES)
    client.upload_file(str(archive), bucket, "cifar/cifar-10-python.tar.gz")
    for f in folder.iterdir():
        client.upload_file(str(f), bucket, f"extracted/cifar-10-batches-py/{f.name}")

    common = [f"storage.s3_endpoint_url={s3_server}"]
    results = []
    for prefix, real_path in (("out1", "cifar/cifar-10-python.tar.gz"), ("out2", "extracted")):
        cfg = make_cfg(f"s3://{bucket}/{prefix}", f"dataset.real_path=s3://{bucket}/{real_path}", *common)
        summary = run_dataset(cfg)
        assert summary["domains"]["real"]["images"] == {"train": 15, "val": 3, "test": 9}
        storage = Storage(f"s3://{bucket}/{prefix}", s3_server)
        results.append(check_split_tables(storage, "real"))
    assert all(results[0][s].equals(results[1][s]) for s in SPLITS)

    with pytest.raises(ConfigError, match="does not exist"):
        run_dataset(make_cfg(f"s3://{bucket}/out3", f"dataset.real_path=s3://{bucket}/nope.tar.gz", *common))
    with pytest.raises(ConfigError, match="lacks the CIFAR-10 files"):
        run_dataset(make_cfg(f"s3://{bucket}/out3", f"dataset.real_path=s3://{bucket}/empty-prefix", *common))


def test_cifar_errors_name_the_fix(tmp_path):
    folder = write_cifar10_fixture(tmp_path / "fx", 2, 1)
    with pytest.raises(ConfigError, match=r"unicorn.*not CIFAR-10 classes"):
        run_dataset(make_cfg(tmp_path / "o", f"dataset.real_path={folder}", "prompts.classes=[cat,unicorn]"))

    # A pickle that would run code is refused, not executed.
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": Evil()}))
    with pytest.raises(ConfigError, match="not allowed"):
        run_dataset(make_cfg(tmp_path / "o", f"dataset.real_path={folder}"))

    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="not a readable tar archive"):
        run_dataset(make_cfg(tmp_path / "o", f"dataset.real_path={tmp_path / 'junk.tar.gz'}"))


def test_missing_real_dataset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        run_dataset(make_cfg(tmp_path / "o"))
    assert "dataset.real_path" in str(err.value) and "dataset.download=true" in str(err.value)
    with pytest.raises(ConfigError, match=r"does not exist.*dataset.download=true"):
        run_dataset(make_cfg(tmp_path / "o", f"dataset.real_path={tmp_path / 'missing'}"))
    with pytest.raises(ConfigError, match="dataset.real_source=folder needs dataset.real_path"):
        run_dataset(make_cfg(tmp_path / "o", "dataset.real_source=folder"))
    # The entrypoint turns it into one line and exit code 2.
    code = cli_main("dataset", run_dataset, [f"storage.root={tmp_path / 'o'}", "dataset.domains=[real]"])
    assert code == 2 and "dataset.real_path" in capsys.readouterr().err


def test_config_validation():
    for bad in ("dataset.val_fraction=0.9", "dataset.real_source=imagenet", "dataset.domains=[fake]",
                "dataset.image_size=2", "dataset.synthetic_test_per_class=0"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


# --------------------------------------------------------------------------------------------
# Real: image folders
# --------------------------------------------------------------------------------------------


def _write_odd_files(root: Path) -> None:
    """One unreadable and one truncated image, stray files, and images needing conversion."""
    good = (root / "test" / "dog" / "dog-0000.png").read_bytes()
    (root / "train" / "cat" / "broken.png").write_bytes(b"this is not a png")
    (root / "test" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "README.txt").write_text("stray file")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    # RGBA, not square, larger: converted, centre-cropped and resized.
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 230, 255
    Image.fromarray(rgba).save(root / "train" / "bird" / "big-rgba.png")
    blue = np.zeros((50, 50, 3), np.uint8)
    blue[..., 2] = 220
    Image.fromarray(blue).save(root / "test" / "dog" / "photo.JPG", quality=95)


def test_image_folders_local_and_s3_with_corrupt_files(tmp_path, s3_server):
    import boto3

    root = write_image_folder_fixture(tmp_path / "photos", CLASSES, per_class=6)
    _write_odd_files(root)
    folder_args = ["dataset.real_source=folder", "dataset.val_fraction=0.2"]
    summary = run_dataset(make_cfg(tmp_path / "out", f"dataset.real_path={root}", *folder_args))
    real = summary["domains"]["real"]
    # train lists bird 7, cat 7 (one broken), dog 6; val takes 1 of each; test dog has 6 + 2.
    assert real["skipped_corrupt"]["train"] + real["skipped_corrupt"]["val"] == 1
    assert real["skipped_corrupt"]["test"] == 1
    assert real["images"]["train"] + real["images"]["val"] == 19
    assert per_class(summary, "real", "test") == {"bird": 6, "cat": 6, "dog": 7}
    assert real["ignored_files"] == {"train": 2, "test": 0}
    local = check_split_tables(Storage(str(tmp_path / "out")), "real")
    assert "folder-test-dog-photo.JPG" in local["test"].column("id").to_pylist()

    # The same folders on S3 give the same tables (up to the source column, which names where).
    bucket = f"photos-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for f in root.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"set/{f.relative_to(root).as_posix()}")
    run_dataset(
        make_cfg(
            tmp_path / "out-s3", f"dataset.real_path=s3://{bucket}/set", f"storage.s3_endpoint_url={s3_server}", *folder_args
        )
    )
    remote = tables(Storage(str(tmp_path / "out-s3")), "real")
    for split in SPLITS:
        assert remote[split].drop_columns(["source"]).equals(local[split].drop_columns(["source"]))
    assert remote["test"].column("source")[0].as_py().startswith(f"s3://{bucket}/set/test/")


def test_image_folders_must_match_the_classes(tmp_path):
    extra = write_image_folder_fixture(tmp_path / "extra", [*CLASSES, "horse"], per_class=1)
    with pytest.raises(ConfigError, match=r"\['horse'\] are not in prompts.classes"):
        run_dataset(make_cfg(tmp_path / "o", "dataset.real_source=folder", f"dataset.real_path={extra}"))
    short = write_image_folder_fixture(tmp_path / "short", CLASSES, per_class=1)
    for f in (short / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match=r"\['dog'\] have no images under .*test/"):
        run_dataset(make_cfg(tmp_path / "o", "dataset.real_source=folder", f"dataset.real_path={short}"))


# --------------------------------------------------------------------------------------------
# Synthetic: splits of the generate stage's output
# --------------------------------------------------------------------------------------------


def write_generate_run(cfg, storage: Storage, corrupt_ids: set[str] = frozenset()) -> None:
    """The generate stage's stored output (plan, shards, manifest) without Ray: the same objects, faster."""
    layout = Layout(cfg.run)
    prompts = build_prompt_table(cfg)
    plan = plan_for(cfg, prompts)
    claim_plan(storage, layout, plan)
    generator = ClassAwareTestGenerator(cfg.generate, cfg.prompts.classes)
    shards = shard_rows(prompts, cfg.generate.shard_size)
    for k, rows in enumerate(shards):
        images = generator.generate([r["prompt"] for r in rows], [r["negative"] for r in rows], [r["seed"] for r in rows])
        # Undecodable images inside an intact shard: the dataset stage must count and drop them.
        pngs = [b"\x89PNG\r\n\x1a\n garbage" if r["id"] in corrupt_ids else encode_png(img) for r, img in zip(rows, images.small)]
        table = shard_table(rows, pngs, k, model_name(cfg.generate), images.small.shape[1:3], plan_sha256(plan))
        storage.write_parquet(layout.generate_shard(k), table)
    ids = [[r["id"] for r in rows] for rows in shards]
    scan = scan_shards(storage, layout, ids, plan_sha256(plan))
    storage.write_parquet(layout.generate_manifest, build_manifest(scan, prompts.column("id").to_pylist(), plan_sha256(plan)))


def synthetic_cfg(root, *overrides: str):
    return make_cfg(
        root,
        "dataset.domains=[synthetic]",
        "generate.generator=synth.testkit:ClassAwareTestGenerator",
        "prompts.per_class=12",
        "generate.shard_size=8",
        *overrides,
    )


def test_synthetic_proportional_split(tmp_path):
    cfg = synthetic_cfg(tmp_path)  # default 5000 / 1000 per class, but only 12 images per class
    storage = Storage(str(tmp_path))
    write_generate_run(cfg, storage)
    summary = run_dataset(cfg)
    syn = summary["domains"]["synthetic"]
    # 12 images at 5:1 -> 10 train / 2 test; val_fraction 0.1 moves 1 of the 10 to val.
    assert syn["images"] == {"train": 27, "val": 3, "test": 6}
    assert per_class(summary, "synthetic", "test") == {c: 2 for c in CLASSES}
    assert set(syn["proportional_split"]) == set(CLASSES) and "10 train / 2 test" in syn["proportional_split"]["cat"]
    ts = check_split_tables(storage, "synthetic")
    assert all(s.startswith(f"{RUN}/generate/shards/shard-") for s in ts["train"].column("source").to_pylist())
    # Ids are the manifest's, and every image of a class is used.
    manifest_ids = set(storage.read_parquet(Layout(RUN).generate_manifest).column("id").to_pylist())
    assert set().union(*(set(t.column("id").to_pylist()) for t in ts.values())) == manifest_ids

    # Deterministic for a seed; another seed draws other test images.
    run_dataset(cfg)
    assert all(tables(storage, "synthetic")[s].equals(ts[s]) for s in SPLITS)
    run_dataset(synthetic_cfg(tmp_path, "dataset.seed=1"))
    assert tables(storage, "synthetic")["test"].column("id").to_pylist() != ts["test"].column("id").to_pylist()


def test_synthetic_corrupt_images_are_counted_and_move_nothing(tmp_path):
    overrides = ("dataset.synthetic_train_per_class=6", "dataset.synthetic_test_per_class=3")
    cfg = synthetic_cfg(tmp_path, *overrides)
    storage = Storage(str(tmp_path))
    write_generate_run(cfg, storage)
    summary = run_dataset(cfg)
    syn = summary["domains"]["synthetic"]
    assert syn["proportional_split"] == {} and syn["unused_per_class"] == {c: 3 for c in CLASSES}
    assert per_class(summary, "synthetic", "train") == {c: 5 for c in CLASSES}
    assert per_class(summary, "synthetic", "val") == {c: 1 for c in CLASSES}
    before = {s: t.column("id").to_pylist() for s, t in tables(storage, "synthetic").items()}

    victim = before["test"][0]
    write_generate_run(cfg, storage, corrupt_ids={victim})
    summary = run_dataset(cfg)
    assert summary["domains"]["synthetic"]["skipped_corrupt"] == {"train": 0, "val": 0, "test": 1}
    after = {s: t.column("id").to_pylist() for s, t in tables(storage, "synthetic").items()}
    assert after["test"] == [i for i in before["test"] if i != victim]
    assert after["train"] == before["train"] and after["val"] == before["val"]


def test_synthetic_needs_a_generate_run_with_every_class(tmp_path):
    with pytest.raises(ConfigError, match=r"no generate manifest.*ray_jobs.generate"):
        run_dataset(synthetic_cfg(tmp_path))
    storage = Storage(str(tmp_path))
    write_generate_run(synthetic_cfg(tmp_path, "prompts.classes=[bird,cat]"), storage)
    with pytest.raises(ConfigError, match=r"\['dog'\] have no images in the generate run"):
        run_dataset(synthetic_cfg(tmp_path))


def test_split_size_rules():
    assert synthetic_split_sizes(6000, 5000, 1000)[:2] == (5000, 1000)
    assert synthetic_split_sizes(12, 5000, 1000)[:2] == (10, 2)
    assert synthetic_split_sizes(3, 5000, 1000)[:2] == (2, 1)  # at least one test image
    assert synthetic_split_sizes(1, 5000, 1000)[:2] == (0, 1)
    assert [val_size(n, 0.1) for n in (0, 1, 2, 10, 5000)] == [0, 0, 1, 1, 500]
    assert val_size(10, 0.0) == 0


@pytest.mark.slow
def test_generate_then_dataset_share_one_label_space(tmp_path, ray_local):
    """The real chain: generate on Ray (the class-aware generator), then both domains from one config."""
    from synth.generate import run_generate

    real = write_cifar10_fixture(tmp_path / "fx", 5, 2, classes=CLASSES, archive=True)
    cfg = synthetic_cfg(tmp_path / "out", "dataset.domains=[real,synthetic]", f"dataset.real_path={real}")
    run_generate(cfg)
    summary = run_dataset(cfg)
    assert summary["domains"]["real"]["images"] == {"train": 12, "val": 3, "test": 6}
    assert summary["domains"]["synthetic"]["images"] == {"train": 27, "val": 3, "test": 6}
    storage = Storage(str(tmp_path / "out"))
    for domain in ("real", "synthetic"):
        check_split_tables(storage, domain)  # colours match labels in both: the same label space


def test_dataset_imports_no_later_stage():
    # Data flows generate -> dataset through storage; the code must not flow back through imports.
    assert synth_imports(REPO / "synth" / "dataset.py") <= {
        "synth.config", "synth.images", "synth.progress", "synth.storage", "synth.runtime", "synth.shards",
        "synth.review", "synth.curate", "synth.imagejob",  # the image stages, the curate verdicts and review decisions (earlier stages) it applies
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Synthetic: lineage (derive stage), technique selection
# --------------------------------------------------------------------------------------------


def write_image_stage(storage: Storage, stage: str, rows: list[dict], shard_size: int = 64) -> None:
    """A generate or derive stage's stored output (shards and manifest, as the stage writes them) from
    rows of id, label, class_name, technique and parents; each image is its class's pattern."""
    layout = Layout(RUN)
    plan = plan_sha256({"stage": stage, "ids": [r["id"] for r in rows]})
    manifests = []
    rows = [{"prompt": "", "negative": "", "seed": seed, **r} for seed, r in enumerate(rows)]
    for k, chunk in enumerate(cut_shards(rows, shard_size)):  # id-sorted rows, cut as the stages cut them
        pngs = [encode_png(class_pattern_image(r["label"], r["seed"])) for r in chunk]
        table = shard_table(chunk, pngs, k, "test-model", (32, 32), plan)
        storage.write_parquet(layout.shard(stage, k), table)
        manifests.append(table.drop_columns(["image"]))
    manifest = pa.concat_tables(manifests).sort_by("id").replace_schema_metadata({META_PLAN: plan.encode()})
    storage.write_parquet(layout.manifest(stage), manifest)


def row(image_id: str, class_name: str, technique: str, parents=()) -> dict:
    return {"id": image_id, "label": CLASSES.index(class_name), "class_name": class_name, "technique": technique,
            "parents": list(parents)}  # fmt: skip


def derived_rows(parents_by_class: dict[str, list[str]], variations: int, fusions: int, seed: int = 0) -> list[dict]:
    """Per parent ``variations`` variations and one inpainting; per class ``fusions`` fusions of seeded pairs."""
    rng = np.random.default_rng(seed)
    rows = []
    for class_name, parents in parents_by_class.items():
        for parent in parents:
            rows += [row(f"{parent}-v{k}", class_name, "variation", [parent]) for k in range(variations)]
            rows.append(row(f"{parent}-i0", class_name, "inpainting", [parent]))
        for k in range(fusions):
            a, b = rng.choice(len(parents), size=2, replace=False)
            rows.append(row(f"fusion-{class_name}-{k:03d}", class_name, "fusion", [parents[a], parents[b]]))
    return rows


def write_lineage_run(storage: Storage, parents_per_class: int = 24, variations: int = 3, fusions: int = 12) -> None:
    """Text-to-image parents (environment and hard) in generate; variations, inpaintings, fusions in derive."""
    generated = [
        row(f"gen-{c}-{i:04d}", c, "hard" if i % 4 == 0 else "environment") for c in CLASSES for i in range(parents_per_class)
    ]
    write_image_stage(storage, "generate", generated)
    parents = {c: [r["id"] for r in generated if r["class_name"] == c] for c in CLASSES}
    write_image_stage(storage, "derive", derived_rows(parents, variations, fusions))


def manifest_rows(storage: Storage) -> dict[str, dict]:
    """id -> manifest row over both stages' manifests."""
    out = {}
    for stage in ("generate", "derive"):
        key = Layout(RUN).manifest(stage)
        if storage.exists(key):
            out.update({r["id"]: r for r in storage.read_parquet(key).to_pylist()})
    return out


def groups_by_search(rows: dict[str, dict]) -> dict[str, int]:
    """id -> group number: connected components of the parent links, by breadth-first search."""
    neighbours: dict[str, set] = {}
    for image_id, r in rows.items():
        neighbours.setdefault(image_id, set())
        for parent in r["parents"]:
            neighbours[image_id].add(parent)
            neighbours.setdefault(parent, set()).add(image_id)
    group: dict[str, int] = {}
    for start in sorted(neighbours):
        if start in group:
            continue
        group[start], queue = len(group), [start]
        number = group[start]
        while queue:
            for other in neighbours[queue.pop()]:
                if other not in group:
                    group[other] = number
                    queue.append(other)
    return group


def assert_no_group_spans_splits(storage: Storage) -> dict[str, list[str]]:
    """Every lineage group (found independently of synth.dataset) lies in one split; returns the split ids."""
    group = groups_by_search(manifest_rows(storage))
    split_ids = {split: t.column("id").to_pylist() for split, t in tables(storage, "synthetic").items()}
    split_of_group: dict[int, str] = {}
    for split, ids in split_ids.items():
        for image_id in ids:
            other = split_of_group.setdefault(group[image_id], split)
            assert other == split, f"the lineage group of {image_id!r} is in {other} and {split}"
    return split_ids


def lineage_cfg(root, *overrides: str):
    return make_cfg(root, "dataset.domains=[synthetic]", *overrides)


def test_lineage_groups_never_span_splits(tmp_path):
    storage = Storage(str(tmp_path))
    write_lineage_run(storage)
    rows = manifest_rows(storage)
    group = groups_by_search(rows)
    sizes = Counter(group.values())
    assert max(sizes.values()) > 10  # fusions chain parents into large groups: a real test of the split

    # Enough images for the quotas (some unused), then too few (split proportionally), then another seed.
    for overrides in (
        ["dataset.synthetic_train_per_class=80", "dataset.synthetic_test_per_class=30", "dataset.val_fraction=0.2"],
        ["dataset.val_fraction=0.2"],
        ["dataset.val_fraction=0.3", "dataset.seed=5"],
    ):
        summary = run_dataset(lineage_cfg(tmp_path, *overrides))
        split_ids = assert_no_group_spans_splits(storage)
        check_split_tables(storage, "synthetic")
        syn = summary["domains"]["synthetic"]
        assert all(n > 0 for n in syn["images"].values()), syn["images"]
        assert syn["source"] == "generate+derive" and syn["techniques"] == [t for t in TECHNIQUES if t in {"environment", "hard", *DERIVE_TECHNIQUES}]
        for split in SPLITS:
            ids = split_ids[split]
            per_technique = syn["per_technique"][split]
            assert sum(v["images"] for v in per_technique.values()) == len(ids) == syn["images"][split]
            for technique, counts in per_technique.items():
                of_technique = [i for i in ids if rows[i]["technique"] == technique]
                assert counts == {"images": len(of_technique), "groups": len({group[i] for i in of_technique})}
            assert syn["groups"][split] == len({group[i] for i in ids})
        # An image's source is the shard of the stage that made it.
        train = tables(storage, "synthetic")["train"]
        for image_id, source in zip(train.column("id").to_pylist(), train.column("source").to_pylist()):
            stage = "generate" if rows[image_id]["technique"] in ("environment", "hard") else "derive"
            assert source.startswith(f"{RUN}/{stage}/shards/shard-"), (image_id, source)
    # The quotas hold in images, test passing its quota by less than one group.
    first = run_dataset(lineage_cfg(tmp_path, "dataset.synthetic_train_per_class=80", "dataset.synthetic_test_per_class=30"))
    for c in CLASSES:
        assert 30 <= per_class(first, "synthetic", "test")[c] < 30 + max(sizes.values())
        assert per_class(first, "synthetic", "train")[c] + per_class(first, "synthetic", "val")[c] <= 80
    # Deterministic: a rerun gives the same tables.
    before = tables(storage, "synthetic")
    run_dataset(lineage_cfg(tmp_path, "dataset.synthetic_train_per_class=80", "dataset.synthetic_test_per_class=30"))
    assert all(tables(storage, "synthetic")[s].equals(before[s]) for s in SPLITS)


def test_technique_selection_keeps_exactly_the_listed_techniques(tmp_path, capsys):
    storage = Storage(str(tmp_path))
    write_lineage_run(storage)
    rows = manifest_rows(storage)
    summary = run_dataset(lineage_cfg(tmp_path, "dataset.techniques=[variation,fusion]"))
    split_ids = assert_no_group_spans_splits(storage)
    used = {rows[i]["technique"] for ids in split_ids.values() for i in ids}
    assert used == {"variation", "fusion"}
    assert sum(len(ids) for ids in split_ids.values()) == sum(r["technique"] in used for r in rows.values())
    syn = summary["domains"]["synthetic"]
    assert syn["techniques"] == ["variation", "fusion"]
    assert all(set(syn["per_technique"][s]) == {"variation", "fusion"} for s in SPLITS)
    assert syn["unselected_techniques"] == {
        t: sum(r["technique"] == t for r in rows.values()) for t in ("hard", "inpainting", "environment")
    }
    assert "variation " in capsys.readouterr().out  # the stage's line says what each technique gave

    # Text-to-image only: exactly the generate manifest's images, every one used (proportional split).
    run_dataset(lineage_cfg(tmp_path, "dataset.techniques=[environment,hard]"))
    split_ids = assert_no_group_spans_splits(storage)
    assert sorted(i for ids in split_ids.values() for i in ids) == sorted(
        i for i, r in rows.items() if r["technique"] in ("environment", "hard")
    )
    # A class with no images of the chosen techniques is a clear error.
    write_image_stage(storage, "derive", [r for r in rows.values() if r["technique"] == "variation" and r["class_name"] != "dog"])
    with pytest.raises(ConfigError, match=r"\['dog'\] have no images of the techniques \['variation'\].*dataset.techniques"):
        run_dataset(lineage_cfg(tmp_path, "dataset.techniques=[variation]"))


def test_derive_only_run_from_user_photos(tmp_path):
    storage = Storage(str(tmp_path))
    layout = Layout(RUN)
    photos = {c: [f"photo-{c}-{i:03d}" for i in range(8)] for c in CLASSES}
    # The user's photos: lineage roots, never synthetic images (one of them unused by the derive stage).
    photos["cat"].append("photo-cat-unused")
    storage.write_parquet(
        layout.derive_parents,
        pa.table({
            "id": [p for ps in photos.values() for p in ps],
            "label": pa.array([CLASSES.index(c) for c, ps in photos.items() for _ in ps], pa.int32()),
            "class_name": [c for c, ps in photos.items() for _ in ps],
            "source": [f"photos/{c}/{p}.png" for c, ps in photos.items() for p in ps],
            "image": [encode_png(class_pattern_image(CLASSES.index(c), 0)) for c, ps in photos.items() for _ in ps],
        }),
    )  # fmt: skip
    used = {c: [p for p in ps if p != "photo-cat-unused"] for c, ps in photos.items()}
    write_image_stage(storage, "derive", derived_rows(used, variations=2, fusions=3), shard_size=16)
    assert not storage.exists(layout.manifest("generate"))
    summary = run_dataset(lineage_cfg(tmp_path, "dataset.val_fraction=0.2"))
    syn = summary["domains"]["synthetic"]
    assert syn["source"] == "derive" and syn["techniques"] == ["variation", "fusion", "inpainting"]
    split_ids = assert_no_group_spans_splits(storage)
    ts = check_split_tables(storage, "synthetic")
    all_ids = {i for ids in split_ids.values() for i in ids}
    assert all_ids == set(manifest_rows(storage))  # every derived image, and no photo
    assert all(s.startswith(f"{RUN}/derive/shards/shard-") for t in ts.values() for s in t.column("source").to_pylist())

    # Without either manifest: one error naming both stages.
    storage.delete(layout.manifest("derive"))
    with pytest.raises(ConfigError, match=r"no generate manifest.*no derive manifest.*ray_jobs.generate.*derive stage"):
        run_dataset(lineage_cfg(tmp_path))


def ungrouped_splits(ids: list[str], class_name: str, seed: int, fraction: float) -> dict[str, str]:
    """id -> split as the stage chose before lineage groups: a seeded order of ids, train first, then test, then val."""
    order = seeded_order(ids, seed, "synthetic", class_name)
    n_train, n_test, _ = synthetic_split_sizes(len(order), 5000, 1000)
    train = [Item(id=i, label=0, class_name=class_name, source="") for i in order[:n_train]]
    keep, val = carve_val(train, fraction, seed, "synthetic")
    out = {item.id: "train" for item in keep} | {item.id: "val" for item in val}
    return out | {i: "test" for i in order[n_train : n_train + n_test]}


def test_fused_image_lands_with_both_parents(tmp_path):
    storage = Storage(str(tmp_path))
    generated = [row(f"gen-{c}-{i:02d}", c, "environment") for c in CLASSES for i in range(6)]
    write_image_stage(storage, "generate", generated)
    fused = [row(f"fusion-{c}", c, "fusion", [f"gen-{c}-01", f"gen-{c}-04"]) for c in CLASSES]
    write_image_stage(storage, "derive", fused)
    ids = [r["id"] for r in generated + fused if r["class_name"] == "cat"]
    # A seed where a split of single images would part the two parents.
    seed = next(s for s in range(100) if len({ungrouped_splits(ids, "cat", s, 0.2)[p] for p in fused[1]["parents"]}) > 1)
    run_dataset(lineage_cfg(tmp_path, f"dataset.seed={seed}", "dataset.val_fraction=0.2"))
    split_ids = assert_no_group_spans_splits(storage)
    split_of = {i: split for split, ids in split_ids.items() for i in ids}
    assert split_of["fusion-cat"] == split_of["gen-cat-01"] == split_of["gen-cat-04"]


def test_hostile_examples_are_never_synthetic_split_images(tmp_path):
    storage = Storage(str(tmp_path))
    generated = [row(f"gen-{c}-{i:02d}", c, "environment") for c in CLASSES for i in range(6)]
    hostile = [row(f"{c}-hostile-00000", c, "hostile") for c in CLASSES]
    write_image_stage(storage, "generate", generated + hostile)
    summary = run_dataset(lineage_cfg(tmp_path))
    split_ids = assert_no_group_spans_splits(storage)
    assert sorted(i for ids in split_ids.values() for i in ids) == sorted(r["id"] for r in generated)
    assert summary["domains"]["synthetic"]["unselected_techniques"] == {"hostile": len(CLASSES)}


def test_a_lineage_group_of_two_classes_is_a_clear_error(tmp_path):
    storage = Storage(str(tmp_path))
    write_image_stage(storage, "generate", [row(f"gen-{c}-0", c, "environment") for c in CLASSES])
    write_image_stage(storage, "derive", [row("gen-bird-0-v0", "cat", "variation", ["gen-bird-0"])])
    with pytest.raises(ConfigError, match=r"'gen-bird-0'.*spans several classes.*rerun the derive stage"):
        run_dataset(lineage_cfg(tmp_path))


def test_lineage_rules():
    # Groups are named by their smallest id; fusion joins two groups, chains join across steps.
    links = [("b-v0", ["b"]), ("c", []), ("z", ["b-v0"]), ("f", ["c", "z"]), ("lone", [])]
    assert lineage_groups(links) == {i: "b" for i in ("b", "b-v0", "c", "z", "f")} | {"lone": "lone"}
    # Test takes whole groups until its quota is reached; train takes what fits.
    train, test = split_groups({"a": 3, "b": 1, "c": 1, "d": 2}, 3, 2, 0, "x")
    sizes = {"a": 3, "b": 1, "c": 1, "d": 2}
    assert not set(train) & set(test) and sum(sizes[k] for k in test) >= 2 and sum(sizes[k] for k in train) <= 3
    # Single-image groups: the same split as a seeded choice of images.
    assert split_groups({i: 1 for i in "abcdef"}, 4, 2, 7, "x") == (
        seeded_order(list("abcdef"), 7, "x")[2:], seeded_order(list("abcdef"), 7, "x")[:2]
    )  # fmt: skip


def test_real_domain_val_carve_is_a_seeded_choice_of_images():
    """Real photos are each their own group: val is exactly the first val_size ids of the seeded order."""
    items = [Item(id=f"cifar10-train-{i:06d}", label=i % 3, class_name=CLASSES[i % 3], source="") for i in range(60)]
    keep, val = carve_val(items, 0.1, 3, "real")
    for c in CLASSES:
        ids = [item.id for item in items if item.class_name == c]
        order = seeded_order(ids, 3, "real", "val", c)
        n_val = val_size(len(ids), 0.1)
        assert sorted(i.id for i in val if i.class_name == c) == sorted(order[:n_val])
        assert sorted(i.id for i in keep if i.class_name == c) == sorted(order[n_val:])
    assert carve_val(items, 0.1, 3, "real", {item.id: item.id for item in items}) == (keep, val)


def test_techniques_config_validation():
    assert load_config(None, ["dataset.techniques=[environment,variation]"]).dataset.techniques == ["environment", "variation"]
    assert load_config(None, ["dataset.techniques=null"]).dataset.techniques is None
    assert load_config(None, []).dataset.techniques is None
    for bad in ("dataset.techniques=[]", "dataset.techniques=[warp]", "dataset.techniques=[fusion,fusion]",
                "dataset.techniques=fusion"):  # fmt: skip
        with pytest.raises(ConfigError, match=r"dataset\.techniques.*(environment|\[first,second\])") as err:
            load_config(None, [bad])
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Hostile examples and curation verdicts
# --------------------------------------------------------------------------------------------


def write_scores(storage: Storage, verdicts: dict[str, bool]) -> None:
    """A curate stage's scores.parquet (the contract's columns) with the given filter verdicts."""
    rows = manifest_rows(storage)
    ids = sorted(verdicts)
    k = len(CLASSES)
    table = pa.table(
        {
            "id": ids,
            "class_name": [rows[i]["class_name"] for i in ids],
            "label": pa.array([CLASSES.index(rows[i]["class_name"]) for i in ids], pa.int32()),
            "technique": [rows[i]["technique"] for i in ids],
            "stage": ["generate"] * len(ids),
            "similarity": pa.array([0.5] * len(ids), pa.float32()),
            "probabilities": pa.array([[1.0 / k] * k] * len(ids), pa.list_(pa.float32())),
            "prob_own": pa.array([1.0 / k] * len(ids), pa.float32()),
            "entropy": pa.array([float(np.log(k))] * len(ids), pa.float32()),
            "rank": pa.array([1] * len(ids), pa.int32()),
            "embedding": pa.array([[1.0, 0.0]] * len(ids), pa.list_(pa.float32())),
            "accepted": [verdicts[i] for i in ids],
            "reason": ["" if verdicts[i] else "similarity" for i in ids],
        }
    )
    storage.write_parquet(scores_key(RUN), table)


def write_decisions(storage: Storage, name: str, decisions: list[dict], minute: int = 0) -> None:
    lines = [{"reviewer": "ana", "time": f"2026-11-29T05:{minute:02d}:0{n}Z", **d} for n, d in enumerate(decisions)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    storage.write_bytes(f"{decisions_prefix(RUN)}/{name}.jsonl", data)


def hostile_run(storage: Storage) -> list[dict]:
    rows = [row(f"{c}-{i:06d}", c, "environment") for c in CLASSES for i in range(10)]
    rows += [row(f"{c}-hostile-{i:05d}", c, "hostile") for c in CLASSES for i in range(3)]
    write_image_stage(storage, "generate", rows, shard_size=16)
    return rows


def test_hostile_images_make_the_test_only_adversarial_domain(tmp_path, capsys):
    storage = Storage(str(tmp_path))
    rows = hostile_run(storage)
    summary = run_dataset(lineage_cfg(tmp_path))
    adversarial = load_split_table(storage, RUN, "adversarial", "test")
    hostile = sorted(r["id"] for r in rows if r["technique"] == "hostile")
    assert adversarial.column("id").to_pylist() == hostile
    # Labelled with the class each imitates, so a model's accuracy there is its fooling rate.
    assert adversarial.column("class_name").to_pylist() == [i.split("-")[0] for i in hostile]
    assert [CLASSES[i] for i in adversarial.column("label").to_pylist()] == adversarial.column("class_name").to_pylist()
    assert set(adversarial.column("technique").to_pylist()) == {"hostile"}
    for split in ("train", "val"):
        assert not storage.exists(Layout(RUN).dataset_split("adversarial", split))
    synthetic = check_split_tables(storage, "synthetic")
    used = [i for t in synthetic.values() for i in t.column("id").to_pylist()]
    assert not set(used) & set(hostile) and len(used) == 30
    assert {t for s in synthetic.values() for t in s.column("technique").to_pylist()} == {"environment"}
    assert all(a is None for s in synthetic.values() for a in s.column("accepted").to_pylist())
    syn = summary["domains"]["synthetic"]
    assert syn["techniques"] == ["environment"] and syn["hostile_images"] == 9 and syn["synthetic_source"] == "all"
    assert summary["domains"]["adversarial"]["images"] == {"test": 9}
    assert "fooling rate" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="dataset.techniques"):
        lineage_cfg(tmp_path, "dataset.techniques=[hostile]")


def test_hostile_examples_train_the_class_other(tmp_path, capsys):
    storage = Storage(str(tmp_path))
    rows = hostile_run(storage)
    hostile = sorted(r["id"] for r in rows if r["technique"] == "hostile")
    quotas = ["dataset.synthetic_train_per_class=6", "dataset.synthetic_test_per_class=3", "dataset.val_fraction=0.2"]
    cfg = lineage_cfg(tmp_path, "dataset.hostile=other_class", "prompts.hostile_per_class=3", *quotas)
    summary = run_dataset(cfg)
    classes = [*CLASSES, "other"]
    synthetic = tables(storage, "synthetic")
    ids = {split: t.column("id").to_pylist() for split, t in synthetic.items()}
    for split, t in synthetic.items():
        assert [classes[y] for y in t.column("label").to_pylist()] == t.column("class_name").to_pylist()
        assert t.schema.metadata[b"synth.classes"] == "\x1f".join(classes).encode()
    # "other" is split like a class (each hostile image its own lineage group): a seeded choice of
    # synthetic_test_per_class images to test, then val_fraction of the rest to val.
    other = {split: [i for i, n in zip(ids[split], t.column("class_name").to_pylist()) if n == "other"] for split, t in synthetic.items()}
    test = sorted(seeded_order(hostile, 0, "synthetic", "other")[:3])
    rest = [i for i in hostile if i not in test]
    val = sorted(seeded_order(rest, 0, "synthetic", "val", "other")[:1])
    assert other == {"train": [i for i in rest if i not in val], "val": val, "test": test}
    for split, t in synthetic.items():
        techniques = dict(zip(t.column("id").to_pylist(), t.column("technique").to_pylist()))
        assert {techniques[i] for i in other[split]} == {"hostile"}
        assert {techniques[i] for i in ids[split] if i not in other[split]} == {"environment"}
    # The K classes keep their quotas: 6 train (1 to val) and 3 test of their 10 images each.
    counts = summary["domains"]["synthetic"]["per_class"]
    assert counts == {"train": {c: 5 for c in classes}, "val": {c: 1 for c in classes}, "test": {c: 3 for c in classes}}
    assert summary["hostile"] == "other_class"
    assert summary["domains"]["synthetic"]["other_images"] == {"train": 5, "val": 1, "test": 3}
    # The adversarial domain: the hostile test images only, labelled with the class each imitates,
    # so the fooling rate stays comparable and no image there was seen in training or validation.
    adversarial = load_split_table(storage, RUN, "adversarial", "test")
    assert adversarial.column("id").to_pylist() == test
    assert adversarial.column("class_name").to_pylist() == [i.split("-")[0] for i in test]
    assert [classes[y] for y in adversarial.column("label").to_pylist()] == adversarial.column("class_name").to_pylist()
    assert not set(test) & (set(ids["train"]) | set(ids["val"]))
    assert summary["domains"]["adversarial"]["images"] == {"test": 3}
    # The same pixels in both domains.
    assert adversarial.column("image").to_pylist() == [synthetic["test"].column("image")[ids["test"].index(i)].as_py() for i in test]
    out = capsys.readouterr().out
    assert "class 'other' (hostile examples) 5/1/3 train/val/test" in out and "hostile 5/1/3" in out
    # A rerun gives the same tables; the default mode keeps hostile examples out of training.
    run_dataset(cfg)
    assert {split: t.column("id").to_pylist() for split, t in tables(storage, "synthetic").items()} == ids
    default = run_dataset(lineage_cfg(tmp_path, *quotas))
    assert default["hostile"] == "evaluate" and "other_images" not in default["domains"]["synthetic"]
    assert load_split_table(storage, RUN, "adversarial", "test").column("id").to_pylist() == hostile
    assert not {i for t in tables(storage, "synthetic").values() for i in t.column("id").to_pylist()} & set(hostile)


def test_other_class_needs_hostile_examples(tmp_path):
    storage = Storage(str(tmp_path))
    write_image_stage(storage, "generate", [row(f"{c}-{i:06d}", c, "environment") for c in CLASSES for i in range(4)])
    with pytest.raises(ConfigError, match="no hostile examples.*prompts.hostile_per_class >= 1.*dataset.hostile=evaluate"):
        run_dataset(lineage_cfg(tmp_path, "dataset.hostile=other_class", "prompts.hostile_per_class=3"))


def test_curate_verdicts_and_review_decisions_reach_the_splits(tmp_path, capsys):
    storage = Storage(str(tmp_path))
    rows = hostile_run(storage)
    with pytest.raises(ConfigError, match="synthetic_source=curated.*no curate scores.*ray_jobs.curate"):
        run_dataset(lineage_cfg(tmp_path, "dataset.synthetic_source=curated"))
    ids = sorted(r["id"] for r in rows)
    verdicts = {i: n % 3 != 0 for n, i in enumerate(ids)}  # a third rejected by the filter
    write_scores(storage, verdicts)
    rejected_by_filter = next(i for i in ids if not verdicts[i] and "hostile" not in i)
    accepted_by_filter = [i for i in ids if verdicts[i] and "hostile" not in i]
    write_decisions(storage, "20261129T050000Z-aaaaaaaa", [
        {"id": rejected_by_filter, "decision": "accept"},
        {"id": accepted_by_filter[0], "decision": "reject"},
        {"id": accepted_by_filter[1], "decision": "relabel", "class": "dog"},
        {"id": accepted_by_filter[2], "decision": "reject"},
    ])  # fmt: skip
    # A later decision supersedes an earlier one: the reviewer's undo.
    write_decisions(storage, "20261129T050100Z-bbbbbbbb", [{"id": accepted_by_filter[2], "decision": "accept"}], minute=1)
    expected = dict(verdicts)
    expected.update({rejected_by_filter: True, accepted_by_filter[0]: False, accepted_by_filter[1]: True})
    for source in ("auto", "all"):
        summary = run_dataset(lineage_cfg(tmp_path, f"dataset.synthetic_source={source}"))
        stored = {}
        for domain, splits in (("synthetic", SPLITS), ("adversarial", ("test",))):
            for split in splits:
                t = load_split_table(storage, RUN, domain, split)
                stored.update(zip(t.column("id").to_pylist(), t.column("accepted").to_pylist()))
                labels = dict(zip(t.column("id").to_pylist(), t.column("class_name").to_pylist()))
                if accepted_by_filter[1] in labels:
                    assert labels[accepted_by_filter[1]] == "dog"  # relabelled in place
        assert stored == expected  # every image kept, with its verdict after review
        syn = summary["domains"]["synthetic"]
        assert syn["synthetic_source"] == ("curated" if source == "auto" else "all")
        assert syn["curation"] == {"scored": 39, "accepted": sum(expected.values()), "decisions_applied": 4,
                                   "relabelled": 1, "unscored": 0}  # fmt: skip
        assert sum(syn["accepted"].values()) == sum(v for i, v in expected.items() if "hostile" not in i)
    assert "accepted by the curate stage and review" in capsys.readouterr().out
