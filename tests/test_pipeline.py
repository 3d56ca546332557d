"""The whole chain with class-aware images: labels and ids survive prompts -> ... -> report."""

from __future__ import annotations

import pytest

from conftest import REPO
from synth.config import load_config
from synth.storage import Storage

CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]


@pytest.mark.slow
def test_class_aware_chain_transfers_from_synthetic_to_real(tmp_path, ray_local):
    from synth.pipeline import run_pipeline
    from synth.testkit import write_cifar10_fixture

    real = write_cifar10_fixture(tmp_path / "cifar", per_class_train=40, per_class_test=10, classes=CLASSES)
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"storage.root={tmp_path / 'out'}",
            f"dataset.real_path={real}",
            "generate.generator=synth.testkit:ClassAwareTestGenerator",
            "derive.generator=synth.testkit:ClassAwareTestDeriver",  # children keep their parents' classes
            "curate.scorer=synth.testkit:ColourTestScorer",  # exact scores; no CLIP to build
            "train.experiments=[synthetic,real]",
            "train.test_domains=[real,synthetic]",
            # The 57 accepted synthetic train images make 3 steps an epoch at batch 16, one at the
            # preset's 32: 10 epochs of checkpoints and reports per cell and trial instead of 30.
            "train.batch_size=16",
        ],
    )
    summary = run_pipeline(cfg)
    storage = Storage(str(tmp_path / "out"))
    report = storage.read_json("smoke/report/report.json")
    synthetic_to_real = report["matrix"]["synthetic"]["real"]["mean"]
    real_to_synthetic = report["matrix"]["real"]["synthetic"]["mean"]
    # Six classes: chance is 1/6. Any label or id mix-up along the chain drags these to chance.
    assert synthetic_to_real > 0.8, report["matrix"]
    assert real_to_synthetic > 0.8, report["matrix"]
    # Class-aware synthetic images look like the real ones, so the mixing ratio barely matters:
    # the sweep's curve is flat and high, from real-only (r=0) to synthetic-only (r=1).
    table = report["tune"]["table"]
    assert [e["ratio"] for e in table] == [0.0, 0.5, 1.0] and all(e["n"] == 1 for e in table)
    val = [e["val_real"]["mean"] for e in table]
    assert min(val) > 0.8 and max(val) - min(val) < 0.2, table
    assert "tune-accuracy-vs-ratio.png" in report["plots"] and summary["stages"]["tune"] is not None
    assert summary["report"].endswith("smoke/report/report.html")

    # The finished run verifies whole; damage in three stages is found, then repaired by
    # quarantining it and rerunning those stages, which remake only what was lost.
    from synth.storage import Layout
    from synth.verify import run_verify

    clean = run_verify(cfg, storage)
    ran = {stage for stage, s in clean["stages"].items() if s["ran"]}
    assert clean["problems"] == 0 and ran == {"prompts", "generate", "derive", "curate", "dataset", "train", "tune"}, clean["stages"]
    layout, out = Layout("smoke"), tmp_path / "out"
    (out / layout.dataset_split("synthetic", "test")).write_bytes(b"not parquet")
    (out / layout.train_metrics("train-real", 0)).write_text("{ truncated")
    trial = next((out / "smoke/tune/trials").rglob("*.json"))
    trial.unlink()
    found = run_verify(cfg, storage)
    kinds = {stage: sorted(f["kind"] for f in s["findings"]) for stage, s in found["stages"].items() if s["findings"]}
    assert kinds == {"dataset": ["corrupt"], "train": ["corrupt"], "tune": ["missing"]}, kinds
    repaired = run_verify(cfg, storage, repair=True)
    assert repaired["problems_found"] == 3 and repaired["problems"] == 0, repaired["stages"]
    assert sorted(repaired["repaired"]) == ["dataset", "train", "tune"]
    train = storage.read_json(layout.summary("train"))
    assert [c["status"] for c in train["cells"]].count("trained") == 1, "only the damaged cell trains again"
