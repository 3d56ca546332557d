"""The export stage: each format loads with its own library and round-trips ids, labels and bytes exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from synth.config import ConfigError, load_config
from synth.dataset import SPLITS
from synth.export import CARD_KEY, class_folders, file_stem, run_export
from synth.storage import Layout, Storage
from synth.testkit import class_pattern_image, tag_dataset_split, write_class_aware_dataset, write_dataset_split

CLASSES = ["airplane", "cat", "dog"]
PER_CLASS = {"train": 5, "val": 2, "test": 3}
FOLDERS = class_folders(CLASSES)


def make_run(storage: Storage, run: str = "exp") -> None:
    """Real and synthetic splits, tagged with techniques and curate verdicts, and an adversarial test split
    of two classes (so the third keeps an empty ImageFolder class folder)."""
    write_class_aware_dataset(storage, run, CLASSES, PER_CLASS)
    for split in SPLITS:
        n = PER_CLASS[split] * len(CLASSES)
        tag_dataset_split(storage, run, "synthetic", split, [("environment", "variation")[i % 2] for i in range(n)],
                          [i % 3 != 0 for i in range(n)])  # fmt: skip
    images = np.stack([class_pattern_image(y, 900 + i, 32) for i, y in enumerate([0, 0, 1])])
    write_dataset_split(storage, run, "adversarial", "test", images, [0, 0, 1], CLASSES)
    tag_dataset_split(storage, run, "adversarial", "test", ["hostile"] * 3, [True, False, True])


def config(root, *overrides: str, run: str = "exp"):
    return load_config(None, [f"run={run}", f"storage.root={root}", f"prompts.classes=[{','.join(CLASSES)}]", *overrides])


def expected(storage: Storage, run: str, domain: str, split: str, keep=lambda row: True) -> dict[str, tuple[int, bytes]]:
    """{id: (label, png bytes)} of a stored split's rows that ``keep`` keeps."""
    table = storage.read_parquet(Layout(run).dataset_split(domain, split))
    return {r["id"]: (r["label"], r["image"]) for r in table.to_pylist() if keep(r)}


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- one loader per format, each with its own library ---------------------------------------------


def load_imagefolder(root: Path, split: str) -> dict[str, tuple[int, bytes]]:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "imagefolder" / split), allow_empty=True)
    assert ds.class_to_idx == {f: i for i, f in enumerate(FOLDERS)}  # synth's labels, no user code
    return {Path(path).stem: (idx, Path(path).read_bytes()) for path, idx in ds.samples}


def load_hf(root: Path) -> dict[str, dict[str, tuple[int, bytes]]]:
    import datasets

    hf = root / "huggingface"
    # The folder with its card, and the bare Parquet files: both carry the ClassLabel and Image features.
    whole = datasets.load_dataset(str(hf))
    splits = sorted({re.sub(r"-\d{5}-of-\d{5}\.parquet$", "", p.name) for p in (hf / "data").glob("*.parquet")})
    files = datasets.load_dataset("parquet", data_files={s: str(hf / "data" / f"{s}-*.parquet") for s in splits})
    assert sorted(whole) == sorted(files) == splits
    out = {}
    for split in splits:
        ds = whole[split]
        assert ds.features["label"].names == CLASSES
        assert files[split].features == ds.features
        first = ds[0]
        assert first["image"].size == (32, 32) and ds.features["label"].int2str(first["label"]) in CLASSES  # PIL image
        raw = ds.cast_column("image", datasets.Image(decode=False))
        out[split] = {r["id"]: (r["label"], r["image"]["bytes"]) for r in raw}
        assert out[split] == {r["id"]: (r["label"], r["image"]["bytes"]) for r in files[split].cast_column("image", datasets.Image(decode=False))}
    return out


def load_wds(root: Path, split: str) -> dict[str, tuple[int, bytes]]:
    import webdataset as wds

    urls = sorted(str(p) for p in (root / "webdataset").glob(f"{split}-*.tar"))
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample["__key__"] == file_stem(meta["id"]) and int(sample["cls"]) == meta["label"]
        assert meta["class_name"] == CLASSES[meta["label"]]
        assert meta["id"] not in out  # no duplicates
        out[meta["id"]] = (meta["label"], sample["png"])
    return out


def check_all_formats(root: Path, want: dict[str, dict[str, tuple[int, bytes]]]) -> None:
    """Every format in ``root`` holds exactly ``want`` ({split: {id: (label, bytes)}})."""
    for split, rows in want.items():
        stems = {file_stem(i): v for i, v in rows.items()}
        assert load_imagefolder(root, split) == stems, split
        assert load_wds(root, split) == rows, split
    assert load_hf(root) == want
    check_card(root, want)


def check_card(root: Path, want: dict) -> None:
    text = (root / CARD_KEY).read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["task_categories"] == ["image-classification"] and meta["license"] == "other"
    assert meta["size_categories"] == ["n<1K"]
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {s: len(r) for s, r in want.items()}
    names = meta["dataset_info"]["features"][2]["dtype"]["class_label"]["names"]
    assert [names[str(i)] for i in range(len(CLASSES))] == CLASSES
    # The per-class table matches the files, class by class.
    header = next(line for line in text.splitlines() if line.startswith("| class |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    for label, name in enumerate(CLASSES):
        line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        counts = [int(c.replace(",", "")) for c in line.strip("|").split("|")[1:]]
        assert counts == [sum(1 for y, _ in want[s].values() if y == label) for s in columns]
    assert "code version" in text


# -- the tests ----------------------------------------------------------------------------------


def test_every_format_round_trips_ids_labels_and_bytes(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    make_run(storage)
    dest = tmp_path / "out"
    cfg = config(storage.root, f"export.dest={dest}", "export.include_real=true", "export.include_adversarial=true",
                 "export.shard_size=4")  # fmt: skip
    summary = run_export(cfg)
    want = {s: expected(storage, "exp", "synthetic", s) for s in SPLITS}
    want.update({f"real_{s}": expected(storage, "exp", "real", s) for s in SPLITS})
    want["adversarial_test"] = expected(storage, "exp", "adversarial", "test")
    check_all_formats(dest, want)
    assert summary["images"] == {s: len(r) for s, r in want.items()} and summary["mode"] == "in-process"
    assert (dest / "imagefolder" / "adversarial_test" / FOLDERS[2] / ".keep").is_file()  # the class it lacks
    assert len(list((dest / "webdataset").glob("train-*.tar"))) == 4  # 15 images, 4 a shard
    assert (dest / "huggingface" / "data" / "train-00003-of-00004.parquet").is_file()
    card = (dest / CARD_KEY).read_text()
    assert "source's own licence" in card and "fooling rate" in card


def test_default_export_is_synthetic_only_and_selects_by_technique_and_curation(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    make_run(storage)
    run_export(config(storage.root, "export.formats=[webdataset,huggingface]"))
    dest = Path(storage.uri("exp/export"))  # the default destination
    assert not (dest / "imagefolder").exists()
    assert not list(dest.rglob("real_*")) and not list(dest.rglob("adversarial_*"))
    assert load_hf(dest) == {s: expected(storage, "exp", "synthetic", s) for s in SPLITS}

    picked = tmp_path / "picked"
    run_export(config(storage.root, f"export.dest={picked}", "export.techniques=[variation]", "export.curation=accepted"))
    keep = lambda r: r["technique"] == "variation" and r["accepted"]  # noqa: E731
    want = {s: expected(storage, "exp", "synthetic", s, keep) for s in SPLITS}
    want = {s: rows for s, rows in want.items() if rows}
    assert want and sum(map(len, want.values())) < sum(len(expected(storage, "exp", "synthetic", s)) for s in SPLITS)
    check_all_formats(picked, want)
    assert "curation `accepted`" in (picked / CARD_KEY).read_text()


def test_another_runs_export_in_the_destination_is_refused(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    make_run(storage, "first")
    make_run(storage, "second")
    dest = tmp_path / "out"
    run_export(config(storage.root, f"export.dest={dest}", "export.formats=[webdataset]", run="first"))
    with pytest.raises(ConfigError, match=r"already holds an export of run 'first'.*Fix: choose another export.dest"):
        run_export(config(storage.root, f"export.dest={dest}", "export.formats=[webdataset]", run="second"))
    with pytest.raises(ConfigError, match=r"another export of run 'first' \(it differs in export.include_real: False there, True now; splits"):
        run_export(config(storage.root, f"export.dest={dest}", "export.formats=[webdataset]", "export.include_real=true", run="first"))
    # The same export again is no conflict: nothing is rewritten.
    again = run_export(config(storage.root, f"export.dest={dest}", "export.formats=[webdataset]", run="first"))
    assert again["shards_written"] == 0 and again["plan_claimed_now"] is False


def test_a_killed_export_rerun_completes_without_duplicates_or_partial_files(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    make_run(storage)
    args = ("export.include_real=true", "export.shard_size=4")
    clean = tmp_path / "clean"
    run_export(config(storage.root, f"export.dest={clean}", *args))

    killed = tmp_path / "killed"
    finished = []

    def die_after_three(result):
        finished.append(result)
        if len(finished) == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_export(config(storage.root, f"export.dest={killed}", *args), after_unit=die_after_three)
    assert not (killed / CARD_KEY).exists()
    # What a kill in the middle of a write leaves: a partial file, and a unit with some of its images.
    (killed / "webdataset" / "test-000000.tar.partial-deadbeef").write_bytes(b"half a tar")
    some = sorted((killed / "imagefolder" / "train").rglob("*.png"))
    for path in some[1:3]:
        path.unlink()

    summary = run_export(config(storage.root, f"export.dest={killed}", *args))
    assert summary["partial_writes_removed"] == 1 and summary["units_already_stored"] > 0
    assert 0 < summary["shards_written"] < sum(1 for _ in (clean / "webdataset").glob("*.tar"))
    assert files_of(killed) == files_of(clean)  # the same names and the same bytes: no duplicate, nothing partial
    check_all_formats(killed, {**{s: expected(storage, "exp", "synthetic", s) for s in SPLITS},
                               **{f"real_{s}": expected(storage, "exp", "real", s) for s in SPLITS}})  # fmt: skip


def test_s3_run_and_destination(tmp_path, s3_server):
    import boto3

    from conftest import make_bucket

    make_bucket(s3_server, "export-test")
    storage = Storage("s3://export-test/runs", s3_endpoint_url=s3_server)
    make_run(storage)
    cfg = config("s3://export-test/runs", f"storage.s3_endpoint_url={s3_server}", "export.dest=s3://export-test/shared/exp",
                 "export.shard_size=4")  # fmt: skip
    run_export(cfg)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    local = tmp_path / "downloaded"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="export-test", Prefix="shared/exp/"):
        for obj in page["Contents"]:
            path = local / obj["Key"][len("shared/exp/") :]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("export-test", obj["Key"], str(path))
    check_all_formats(local, {s: expected(storage, "exp", "synthetic", s) for s in SPLITS})
    assert json.loads((local / "export-plan.json").read_text())["storage_root"] == "s3://export-test/runs"


def test_ray_data_job_writes_the_same_files(tmp_path, ray_local):
    storage = Storage(str(tmp_path / "store"))
    make_run(storage)
    small = tmp_path / "small"
    run_export(config(storage.root, f"export.dest={small}", "export.shard_size=8"))
    big = tmp_path / "big"
    summary = run_export(config(storage.root, f"export.dest={big}", "export.shard_size=8", "export.in_process_max_images=0"))
    assert summary["mode"] == "ray"
    assert files_of(big) == files_of(small)


def test_readme_command(tmp_path, monkeypatch):
    """`python -m ray_jobs.export <config> export.formats=[...]` as the README gives it, from a project folder."""
    from ray_jobs._cli import main
    from synth.export import run_export as fn

    monkeypatch.chdir(tmp_path)
    storage = Storage("out")
    make_run(storage)
    Path("my.yaml").write_text(f"run: exp\nstorage:\n  root: out\nprompts:\n  classes: [{', '.join(CLASSES)}]\n")
    assert main("export", fn, ["my.yaml", "export.formats=[imagefolder,huggingface]"]) == 0
    assert Path("out/exp/export/huggingface/README.md").is_file() and Path("out/exp/export/imagefolder/train").is_dir()
    assert main("export", fn, ["my.yaml", "export.formats=[webdataset]", "export.dest=elsewhere"]) == 0
    assert sorted(p.name for p in Path("elsewhere/webdataset").glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert main("export", fn, ["my.yaml", "export.formats=[webdataset]"]) == 2  # another selection in the default dest: refused


def test_full_resolution_images_where_the_generate_stage_kept_them(tmp_path):
    import pyarrow as pa

    from synth.config import class_slug
    from synth.images import encode_png

    storage = Storage(str(tmp_path / "store"))
    make_run(storage)
    layout = Layout("exp")
    key = layout.dataset_split("synthetic", "train")
    table = storage.read_parquet(key)
    table = table.set_column(table.column_names.index("source"), "source", pa.array([layout.generate_shard(0)] * table.num_rows))
    storage.write_parquet(key, table)
    ids, names = table.column("id").to_pylist(), table.column("class_name").to_pylist()
    storage.write_json(layout.generate_plan, {"model": "tiny", "keep_full_resolution": True})
    storage.write_parquet(layout.generate_manifest, pa.table({"id": ids, "class_name": names}))
    full = {}
    for i, (image_id, name) in enumerate(zip(ids[:3], names)):
        full[image_id] = encode_png(class_pattern_image(0, 7000 + i, 64))
        storage.write_bytes(layout.generate_full_image(class_slug(name), image_id), full[image_id])

    dest = tmp_path / "out"
    summary = run_export(config(storage.root, f"export.dest={dest}", "export.full_resolution=true", "export.formats=[webdataset]"))
    assert summary["full_resolution_images"] == 3
    got = load_wds(dest, "train")
    assert {i: got[i][1] for i in full} == full  # 64 px, as the generate stage kept them
    small = expected(storage, "exp", "synthetic", "train")
    assert all(got[i] == small[i] for i in ids[3:])  # the stored dataset-size image where no full one exists


def test_the_card_says_how_the_set_was_made(tmp_path):
    """The card reads the stages' records: models, technique shares, seeds, curation rules and review decisions."""
    storage = Storage(str(tmp_path / "store"))
    make_run(storage)
    layout = Layout("exp")
    storage.write_json(layout.generate_plan, {"model": "stabilityai/sd-turbo", "generator": "diffusers", "prior": None, "steps": 1,
                                              "guidance_scale": 0.0, "width": 512, "height": 512, "image_size": 32,
                                              "dtype": "bfloat16", "images": 60})  # fmt: skip
    storage.write_json(layout.plan("derive"), {"model": "stabilityai/sd-turbo", "generator": "diffusers", "images": 20})
    storage.write_json(layout.summary("prompts"), {"rows": 60, "distinct_prompts": 58, "techniques": {"environment": 45, "hard": 15}})
    storage.write_json(layout.summary("curate"), {"model": "openai/clip-vit-base-patch32", "prompt": "a photo of a {cls}", "scored": 80,
                                                  "accepted": 61, "rules": {"min_similarity": 0.2, "top_per_class": None},
                                                  "rejected_by": {"similarity": 19, "dedup": 0}})  # fmt: skip
    storage.write_json(layout.summary("dataset"), {"seed": 3, "code_version": "0.1.0+gabc",
                                                   "domains": {"synthetic": {"curation": {"decisions_applied": 4, "relabelled": 1}}}})
    dest = tmp_path / "out"
    run_export(config(storage.root, f"export.dest={dest}", "export.formats=[huggingface]", "export.license=openrail++"))
    card = (dest / CARD_KEY).read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "openrail++"
    for needle in ("model `stabilityai/sd-turbo`", "**derive**", "environment 45 (75%), hard 15 (25%)", "58 distinct",
                   "derive_seed", "dataset seed 3", '{"min_similarity": 0.2}', "61 of 80 accepted", '{"similarity": 19}',
                   "4 review decisions applied (1 relabels)", "dataset built by `0.1.0+gabc`", "| environment |", "| variation |"):
        assert needle in card, needle
