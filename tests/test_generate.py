"""The generate stage on a local Ray instance: completeness, determinism, exactly-once, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_bucket, synth_imports
from synth.config import GENERATOR_NAMES, ConfigError, load_config
from synth.generate import GENERATORS, generator_class
from synth.imagejob import existing_shards
from synth.storage import PARTIAL_MARK, Layout, Storage

CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]
RAY_STARTED = "Started a local Ray instance"  # what ray.init logs when it starts one
CLASS_AWARE = "synth.testkit:ClassAwareTestGenerator"


def tiny_config(root, *extra):
    # No hostile examples unless a test asks for them: the counts below are per_class images per class.
    return load_config(REPO / "configs" / "smoke.yaml", [f"storage.root={root}", "run=t", "prompts.hostile_per_class=0", *extra])


def read_generated(storage: Storage, run: str = "t") -> tuple[list[dict], dict[str, bytes]]:
    """(manifest rows, {id: png bytes} from every shard object)."""
    layout = Layout(run)
    manifest = storage.read_parquet(layout.generate_manifest).to_pylist()
    images: dict[str, bytes] = {}
    for key in storage.list(layout.generate_shards):
        table = storage.read_parquet(key, columns=["id", "image"])
        for image_id, png in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            assert image_id not in images, f"{image_id} stored twice"
            images[image_id] = png
    return manifest, images


def assert_complete(storage: Storage, per_class: int, run: str = "t") -> list[dict]:
    manifest, images = read_generated(storage, run)
    ids = [r["id"] for r in manifest]
    assert len(ids) == len(set(ids)) == per_class * len(CLASSES)
    assert set(ids) == set(images), "every manifest row has its image and every image its row"
    for c in CLASSES:
        assert sum(r["class_name"] == c for r in manifest) == per_class
    for r in manifest:
        assert CLASSES[r["label"]] == r["class_name"] and r["class_name"] in r["prompt"]
        assert r["id"].startswith(r["class_name"] + "-")
    if not storage.is_s3:
        assert not [p for p in Path(storage.root).rglob("*") if PARTIAL_MARK in p.name], "no stray partial objects"
    return manifest


def test_tiny_pipeline_run_is_complete_and_deterministic(tmp_path, tiny_sd, ray_local):
    from synth.generate import run_generate

    extra = (f"generate.model={tiny_sd}", "prompts.per_class=40", "generate.shard_size=32")
    # b: the same plan through an autoscaling pool (2 to 3 actors of 1 CPU each) and one writer at a time.
    pool = ("generate.max_actors=3", "generate.cpus_per_actor=1", "generate.writer_concurrency=1")
    cfgs = [tiny_config(tmp_path / "a", *extra), tiny_config(tmp_path / "b", *extra, *pool)]
    summaries = [run_generate(cfg) for cfg in cfgs]
    assert summaries[0]["images_generated"] == 240 and summaries[0]["shards_total"] == 8
    assert summaries[0]["plan"] == summaries[1]["plan"], "pool settings are not part of the plan"
    manifest = assert_complete(Storage(str(tmp_path / "a")), 40)
    assert {r["width"] for r in manifest} == {32}
    # Same plan, same machine: byte-identical images, whichever actor (and prompt cache) made them.
    _, a = read_generated(Storage(str(tmp_path / "a")))
    _, b = read_generated(Storage(str(tmp_path / "b")))
    assert a == b
    # Random weights render noise, but each seed renders different noise.
    assert len(set(a.values())) == len(a)
    # A finished run rerun generates nothing.
    again = run_generate(cfgs[0])
    assert again["shards_generated"] == 0 and again["images_generated"] == 0
    assert again["images_total"] == 240


def test_class_aware_generator_draws_the_prompted_class(tmp_path, ray_local):
    import io

    from PIL import Image

    from synth.generate import run_generate
    from synth.testkit import _PALETTE

    # It loads no model, so generate.model is neither checked nor recorded (this folder does not exist).
    cfg = tiny_config(tmp_path, f"generate.generator={CLASS_AWARE}", "generate.model=/no/such/folder", "prompts.per_class=8")
    summary = run_generate(cfg)
    # A generator given as module:Class is recorded as given, in the plan and in every manifest row.
    assert summary["plan"]["generator"] == summary["plan"]["model"] == CLASS_AWARE
    manifest, images = read_generated(Storage(str(tmp_path)))
    assert {r["model"] for r in manifest} == {CLASS_AWARE}
    for r in manifest:
        img = np.asarray(Image.open(io.BytesIO(images[r["id"]])), dtype=np.float32)
        mean = img.reshape(-1, 3).mean(0)
        nearest = int(np.argmin(np.linalg.norm(_PALETTE[: len(CLASSES)] * 0.8 - mean, axis=1)))
        assert nearest == r["label"], f"{r['id']} looks like class {nearest}"


def test_plan_records_a_tiny_decoder_and_no_speed_switch(tmp_path):
    """A tiny decoder changes the images: the plan names it. Switches that do not (or only round
    differently, like batch_size) leave the plan, and so earlier runs' plans, as they were."""
    from synth.generate import plan_for
    from synth.prompts import build_prompt_table

    cfg = tiny_config(tmp_path, "prompts.per_class=2")
    plan = plan_for(cfg, build_prompt_table(cfg))
    assert "decoder" not in plan
    fast = tiny_config(tmp_path, "prompts.per_class=2", "generate.channels_last=true", "generate.compile=true",
                       "generate.prompt_cache=0", "generate.max_actors=4", "generate.batch_size=3")  # fmt: skip
    assert plan_for(fast, build_prompt_table(fast)) == plan
    tiny = tiny_config(tmp_path, "prompts.per_class=2", "generate.decoder=madebyollin/taesd")
    assert plan_for(tiny, build_prompt_table(tiny)) == {**plan, "decoder": "madebyollin/taesd"}


def test_plan_change_is_refused(tmp_path, ray_local):
    from synth.generate import run_generate

    base = (f"generate.generator={CLASS_AWARE}", "prompts.per_class=4")
    run_generate(tiny_config(tmp_path, *base))
    with pytest.raises(ConfigError, match=r"different plan \(image_size"):
        run_generate(tiny_config(tmp_path, *base, "generate.image_size=16"))


def test_s3_root_gives_the_same_result_as_local(tmp_path, tiny_sd, s3_server, ray_local):
    from synth.generate import run_generate

    make_bucket(s3_server, "synth")
    extra = (f"generate.model={tiny_sd}", "prompts.per_class=12", "generate.shard_size=8")
    run_generate(tiny_config(tmp_path, *extra))
    s3_cfg = tiny_config("s3://synth/runs", *extra, f"storage.s3_endpoint_url={s3_server}")
    summary = run_generate(s3_cfg)
    assert summary["manifest"] == "s3://synth/runs/t/generate/manifest.parquet"
    s3 = Storage("s3://synth/runs", s3_endpoint_url=s3_server)
    assert_complete(s3, 12)
    local_manifest, local_images = read_generated(Storage(str(tmp_path)))
    s3_manifest, s3_images = read_generated(s3)
    assert local_manifest == s3_manifest and local_images == s3_images


def _settled_shard_count(storage: Storage, layout: Layout, quiet_seconds: float = 3.0) -> int:
    count, since = len(existing_shards(storage, layout)), time.time()
    while time.time() - since < quiet_seconds:
        time.sleep(0.2)
        now = len(existing_shards(storage, layout))
        if now != count:
            count, since = now, time.time()
    return count


@pytest.mark.slow
def test_killed_driver_then_rerun_completes_exactly_once(tmp_path, tiny_sd, fault_figures):
    # 24 shards of 2 images at the preset's 64 px, about a second each on a CPU: the kill follows the first 2.
    args = [
        f"storage.root={tmp_path}", "prompts.hostile_per_class=0", f"generate.model={tiny_sd}", "run=t", "prompts.per_class=8",
        "generate.shard_size=2",
    ]  # fmt: skip
    storage, layout = Storage(str(tmp_path)), Layout("t")
    cmd = [sys.executable, "-m", "ray_jobs.generate", str(REPO / "configs" / "smoke.yaml"), *args]
    driver = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(existing_shards(storage, layout)) < 2:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
    driver.wait()
    done_before = _settled_shard_count(storage, layout)  # orphaned workers may finish a write or two
    assert 2 <= done_before < 24, "the kill must land mid-run"
    assert not storage.exists(layout.generate_manifest)

    loud = {**os.environ, "SYNTH_VERBOSE": "1"}  # Ray's own lines shown: whether it started can be read off them
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=loud)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert RAY_STARTED in rerun.stderr + rerun.stdout  # so its absence below means something
    summary = storage.read_json(layout.summary("generate"))
    assert summary["shards_already_stored"] == done_before
    assert summary["shards_generated"] == 24 - done_before
    manifest, stored = read_generated(storage)  # fails on an id stored twice
    manifest_ids = [r["id"] for r in manifest]
    fault_figures(
        shards_before_kill=done_before, remade_after=summary["shards_generated"], images=len(stored),
        missing=48 - len(set(manifest_ids) & set(stored)), duplicated=len(manifest_ids) - len(set(manifest_ids)),
    )  # fmt: skip
    assert_complete(storage, 8)

    finished = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=loud)
    assert finished.returncode == 0
    summary = storage.read_json(layout.summary("generate"))
    assert summary["shards_generated"] == 0 and summary["images_generated"] == 0
    assert RAY_STARTED not in finished.stderr + finished.stdout  # no Ray, no generator


def test_full_resolution_images_are_kept_when_asked(tmp_path, ray_local):
    import io

    from PIL import Image

    from synth.generate import run_generate

    cfg = tiny_config(tmp_path, f"generate.generator={CLASS_AWARE}", "prompts.per_class=3", "generate.keep_full_resolution=true")
    run_generate(cfg)
    storage = Storage(str(tmp_path))
    manifest, _ = read_generated(storage)
    full = storage.list("t/generate/full")
    assert len(full) == len(manifest) == 18
    for r in manifest:
        png = storage.read_bytes(f"t/generate/full/{r['class_name']}/{r['id']}.png")
        assert Image.open(io.BytesIO(png)).size == (64, 64)


# --------------------------------------------------------------------------------------------
# Choosing the generator: registered names and module:Class paths
# --------------------------------------------------------------------------------------------


def test_registry_matches_the_names_the_config_accepts():
    from synth.derive import DERIVERS, deriver_class

    assert set(GENERATORS) == set(GENERATOR_NAMES) == set(DERIVERS)
    for name in GENERATORS:
        cls = generator_class(name)
        assert isinstance(cls.needs_model, bool) and callable(cls.model_name) and callable(cls.generate)
        cls = deriver_class(name)
        assert isinstance(cls.needs_model, bool) and callable(cls.model_name) and callable(cls.derive)


def test_generate_imports_no_test_double():
    assert "synth.testkit" not in synth_imports(REPO / "synth" / "generate.py")


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nope.module:Thing", r"'nope.module:Thing' cannot be imported \(No module named 'nope'\)\. Fix: install"),
        ("synth.testkit:NoSuchGenerator", r"module 'synth.testkit' has no attribute 'NoSuchGenerator'\. Fix:"),
        ("synth.testkit:class_pattern_image", r"is a function, not a class\. Fix: give a class with needs_model"),
        ("synth.storage:Layout", r"lacks needs_model, model_name, generate\. Fix:"),
        ("notregistered", r"'notregistered' is not registered\. Fix: choose one of diffusers"),
    ],
)
def test_bad_generator_names_the_fix(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        generator_class(spec)


def test_bad_generator_path_fails_before_anything_is_written(tmp_path):
    from synth.generate import run_generate

    # Valid syntax passes config validation; the import is tried when the stage starts.
    cfg = tiny_config(tmp_path, "generate.generator=nope.module:Thing")
    with pytest.raises(ConfigError, match=r"cannot be imported .*Fix:"):
        run_generate(cfg)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing written for a run that cannot start"


class NoGuidanceGenerator:
    """A generator without per-image guidance (no guidance_scales argument)."""

    needs_model = False

    @classmethod
    def model_name(cls, cfg):
        return "none"

    def __init__(self, cfg, classes):
        pass

    def generate(self, prompts, negatives, seeds):
        raise AssertionError("never called")


def test_hostile_rows_and_per_image_guidance_reach_the_manifest(tmp_path, ray_local):
    from synth.generate import run_generate

    base = (f"generate.generator={CLASS_AWARE}", "prompts.per_class=4", "prompts.hostile_per_class=2", "prompts.classes=[cat,dog]")
    cfg = tiny_config(tmp_path, *base, "prompts.guidance_scale_range=[1.0,4.0]")
    summary = run_generate(cfg)
    manifest, images = read_generated(Storage(str(tmp_path)))
    assert summary["images_total"] == len(images) == 2 * (4 + 2)
    rows = {r["id"]: r for r in manifest}
    hostile = rows["dog-hostile-00001"]
    params = json.loads(hostile["params"])
    assert hostile["technique"] == "hostile" and hostile["label"] == 1 and params["imitates"] == "dog"
    prompts = {r["id"]: r for r in Storage(str(tmp_path)).read_parquet(Layout("t").prompts_table).to_pylist()}
    for image_id, r in rows.items():
        assert json.loads(r["params"])["guidance_scale"] == prompts[image_id]["guidance_scale"]
    # Another range is another prompt table (refused for this run) and another plan.
    from synth.generate import plan_for
    from synth.prompts import build_prompt_table

    other = tiny_config(tmp_path, *base, "prompts.guidance_scale_range=[1.0,5.0]")
    with pytest.raises(ValueError, match=r"different prompts config"):
        run_generate(other)
    assert plan_for(cfg, build_prompt_table(cfg)) != plan_for(other, build_prompt_table(other))
    # Without a range the plan hashes the prompt table exactly as before the guidance column existed.
    plain = tiny_config(tmp_path, *base)
    table = build_prompt_table(plain)
    assert plan_for(plain, table) == plan_for(plain, table.drop_columns(["guidance_scale", "params"]))


def test_a_guidance_range_needs_a_generator_that_takes_it(tmp_path):
    from synth.generate import run_generate

    cfg = tiny_config(tmp_path, "generate.generator=test_generate:NoGuidanceGenerator", "prompts.guidance_scale_range=[1,2]")
    with pytest.raises(ConfigError, match=r"no guidance_scales argument. Fix: set prompts.guidance_scale_range=null"):
        run_generate(cfg)
