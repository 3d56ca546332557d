"""A new user's first run: the README's own command from a fresh directory, and every stage job alone.

Both run as subprocesses from a working directory of their own with a *relative* storage root,
the way a person runs them, so any worker, actor or Tune trial that resolved a path against its
own working directory would write outside it (the tune stage once lost its trial records that
way). They also hold the default output to what a person reads: one line per stage event,
progress, no Ray internals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

STAGE_TAGS = ("[pipeline]", "[prompts]", "[generate]", "[derive]", "[curate]", "[review]", "[dataset]", "[train]", "[tune]", "[report]")
# Lines Ray prints from its internals when its output is not kept in its own logs.
RAY_INTERNALS = re.compile(
    r"PlacementGroupCleaner|Failed to query Ray Train Controller|Checkpoint successfully created|Reporting training result"
    r"|constructor arguments in the object store|Trial status|View detailed results here|Started a local Ray instance"
    r"|streaming_executor|\(RayTrainWorker|\(TrainController|\(MapWorker|core_worker\.cc|legend"
)


def fresh_directory(tmp_path: Path, tiny_sd: Path) -> Path:
    """A working directory holding what `make setup` leaves: configs/ and the .cache test models.

    ``tiny_sd`` is the session's tiny SD pipeline, the one `make setup` builds (same builder, same
    seed): copied, not built again, since building it is most of the setup's time.
    """
    from synth.testkit import build_tiny_random_clip, write_cifar10_fixture

    work = tmp_path / "work"
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(tiny_sd, work / ".cache" / "models" / "tiny-sd")
    build_tiny_random_clip(work / ".cache" / "models" / "tiny-clip")
    write_cifar10_fixture(work / ".cache" / "data" / "cifar10-fixture", per_class_train=40, per_class_test=10)
    return work


def run_job(work: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SYNTH_VERBOSE", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def check_tune_results(root: Path, trials: int) -> dict:
    results = json.loads((root / "smoke" / "tune" / "results.json").read_text())
    assert [r["status"] for r in results["rows"]] == ["completed"] * trials, results["rows"]
    assert results["best"] is not None and "Best synthetic fraction" in results["best_sentence"]
    return results


@pytest.mark.slow
def test_readme_first_command_from_a_fresh_directory(tmp_path, tiny_sd):
    """`make smoke` runs `python -m ray_jobs.pipeline configs/smoke.yaml`: default root `outputs`, relative."""
    work = fresh_directory(tmp_path, tiny_sd)
    repo_outputs_before = files_under(REPO / "outputs")
    result = run_job(work, "ray_jobs.pipeline", "configs/smoke.yaml")
    out = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(out[-60:])

    # What a person reads: short, one line per stage event, no Ray internals.
    assert len(out) < 60, "\n".join(out)
    internals = [line for line in out if RAY_INTERNALS.search(line)]
    assert not internals, "\n".join(internals)
    for tag in STAGE_TAGS:
        assert any(line.startswith(tag) for line in out), (tag, "\n".join(out))
    assert any(line.startswith("[tune] Best synthetic fraction") for line in out)

    # Everything under <work>/outputs, nothing beside it or in the checkout.
    root = work / "outputs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == [".cache", "configs", "outputs"]
    assert files_under(REPO / "outputs") == repo_outputs_before
    summary = json.loads(result.stdout[result.stdout.index("{\n") :])  # the pipeline's own summary closes its output
    assert Path(summary["report"]) == root / "smoke" / "report" / "report.html"
    check_tune_results(root, 3)
    report = (root / "smoke" / "report" / "report.md").read_text()
    assert "Best synthetic fraction" in report and "No trial of the sweep finished" not in report
    config = (root / "smoke" / "tune" / "config.yaml").read_text()
    assert f"root: {root}" in config  # the resolved root is what the stage records


@pytest.mark.slow
def test_every_stage_job_alone_keeps_a_relative_root(tmp_path, tiny_sd):
    """Each stage as its own job, in order, with storage.root=runs/here (relative, not the default).

    One train cell and one tune trial: every cell and trial runs the same code and each costs
    seconds of start-up; the pipeline test above runs the smoke preset's three of each.
    """
    work = fresh_directory(tmp_path, tiny_sd)
    args = ["configs/smoke.yaml", "storage.root=runs/here", "generate.generator=synth.testkit:ClassAwareTestGenerator",
            "derive.generator=synth.testkit:ClassAwareTestDeriver", "train.experiments=[synthetic]", "tune.ratios=[0.5]"]  # fmt: skip
    for stage in ("prompts", "generate", "derive", "dataset", "train", "tune", "report"):
        result = run_job(work, f"ray_jobs.{stage}", *args)
        out = (result.stdout + result.stderr).splitlines()
        assert result.returncode == 0, (stage, "\n".join(out[-40:]))
        assert out and out[-1].startswith(f"[{stage}] done in"), (stage, out)
        assert not [line for line in out if RAY_INTERNALS.search(line)], (stage, "\n".join(out))
    root = work / "runs" / "here"
    assert sorted(p.name for p in work.iterdir()) == [".cache", "configs", "runs"]
    assert sorted(p.name for p in (root / "smoke").iterdir()) == ["dataset", "derive", "generate", "prompts", "report", "train", "tune"]
    check_tune_results(root, 1)
    # The class-aware generator draws what the prompt names: a model trained on it reads real fixture images.
    metrics = json.loads((root / "smoke" / "train" / "train-synthetic" / "seed-0" / "metrics.json").read_text())
    assert metrics["test"]["real"]["accuracy"] > 0.5, metrics["test"]["real"]
