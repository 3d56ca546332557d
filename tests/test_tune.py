"""synth.tune: the mixing-ratio sweep on data whose answer is known, its resume, and its guards.

The data: real images from the class-aware CIFAR-10 fixture (through the dataset stage), and
synthetic tables written directly whose images show the *next* class's pattern under each label
(a bird labelled bird looks like the fixture's cat). Trained on real images, the CNN is right on
real validation images and wrong on synthetic ones; trained on synthetic images, the reverse. So
in fixed-budget mode real-val accuracy must fall from ~1 at r=0 to ~0 (below chance) at r=1,
and synthetic-test accuracy must rise the same way: that is the shape the tests assert.

One local Ray instance (conftest) serves the module; the killed driver joins it, as a second
`ray job submit` would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from chaos import KillWhen
from conftest import REPO, ray_processes, train_unfaulted, without_timings
from ray_jobs._cli import main as cli_main
from synth.config import ConfigError, TuneConfig, load_config, to_dict
from synth.records import TrialRecord
from synth.storage import Layout, Storage
from synth.splits import Split, SplitCache, composition, mix
from synth.testkit import class_pattern_image, write_cifar10_fixture, write_dataset_split
from synth.tune import (
    SWEEP_SPLITS,
    TEST_DOMAINS,
    best_ratio,
    experiment_name,
    make_scheduler,
    max_concurrent_trials,
    ratio_table,
    run_tune,
    sweep_plan,
)

CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]
CHANCE = 1 / len(CLASSES)
# The fixture gives 40 train images per class, of which dataset.val_fraction=0.2 go to val:
# 192 real train, 48 real val, 60 real test. Synthetic: 32 train, 8 val and 10 test per class
# (the val split only for the train stage's mixture cell; tune validates on real images).
SYNTHETIC_PER_CLASS = {"train": 32, "val": 8, "test": 10}
# Width 1/8, 3 steps per epoch, 8 epochs: a few seconds per trial on a CPU, ~100% when learnable.
TINY = ["train.width=0.125", "train.batch_size=64", "train.steps=24", "train.eval_batch_size=256", "dataset.val_fraction=0.2"]


def write_wrong_class_synthetic(storage: Storage, run: str) -> None:
    """Synthetic train/val/test tables whose image under label y shows class (y + 1)'s pattern."""
    for s, (split, n) in enumerate(SYNTHETIC_PER_CLASS.items()):
        rows = [(label, i) for label in range(len(CLASSES)) for i in range(n)]
        images = np.stack([class_pattern_image((y + 1) % len(CLASSES), 7_000_000 + 500_000 * s + 1_000 * y + i) for y, i in rows])
        write_dataset_split(storage, run, "synthetic", split, images, [y for y, _ in rows], CLASSES)


@pytest.fixture(scope="module")
def real_fixture(tmp_path_factory) -> Path:
    return write_cifar10_fixture(tmp_path_factory.mktemp("cifar"), per_class_train=40, per_class_test=10, classes=CLASSES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune")


def make_config(root: Path, real: Path, run: str, *overrides: str):
    return load_config(
        None,
        [f"run={run}", f"storage.root={root}", f"dataset.real_path={real}", "dataset.domains=[real]",
         f"prompts.classes=[{','.join(CLASSES)}]", *TINY, *overrides],
    )  # fmt: skip


def prepare(root: Path, real: Path, run: str, *overrides: str):
    """Config, storage and the run's dataset: fixture real splits + wrong-class synthetic ones."""
    from synth.dataset import run_dataset

    cfg = make_config(root, real, run, *overrides)
    storage = Storage.from_config(cfg.storage)
    run_dataset(cfg, storage)
    write_wrong_class_synthetic(storage, run)
    return cfg, storage


@pytest.fixture(scope="module")
def sweep(root, real_fixture, ray_local):
    """The shape sweep: fixed budget, r in {0, 0.25, 0.75, 1}, one seed."""
    cfg, storage = prepare(root, real_fixture, "shape", "tune.ratios=[0,0.25,0.75,1]", "tune.seeds=[0]")
    return cfg, storage, run_tune(cfg, storage)


# -- building blocks (no Ray) ------------------------------------------------------------------


def test_composition_and_augment_mix():
    assert composition(100, 80, 0.25, "fixed_budget") == (60, 20)  # N = min(100, 80)
    assert composition(100, 80, 0.0, "fixed_budget") == (80, 0)
    assert composition(100, 80, 1.0, "fixed_budget") == (0, 80)
    assert composition(100, 80, 0.5, "augment") == (100, 50)
    with pytest.raises(ValueError, match=r"adds 100 synthetic images.*lower the largest of tune.ratios to 0.80"):
        composition(100, 80, 1.0, "augment")

    real = Split(np.zeros((100, 4, 4, 3), np.uint8), np.arange(100) % 6, np.array([f"r{i}" for i in range(100)]))
    synthetic = Split(np.ones((80, 4, 4, 3), np.uint8), np.arange(80) % 6, np.array([f"s{i}" for i in range(80)]))
    # fixed_budget draws are tested with the rule itself (test_train); augment keeps every real image.
    augmented = mix(real, synthetic, 0.5, seed=3, mode="augment")
    assert len(augmented) == 150 and int(augmented.images[:, 0, 0, 0].sum()) == 50
    assert {i for i in augmented.ids if i.startswith("r")} == {f"r{i}" for i in range(100)}


def test_plan_resources_scheduler_and_table():
    cfg = load_config(None, ["train.batch_size=64", "train.steps=40", "tune.ratios=[0,0.5,1]", "tune.mode=augment"])
    with pytest.raises(ValueError, match=r"r=1 adds 192 synthetic.*has 100.*tune.mode=fixed_budget"):
        sweep_plan(192, 100, cfg)
    cfg.tune.ratios = [0.0, 0.5]
    assert [p["train_images"] for p in sweep_plan(192, 100, cfg)] == [192, 288]
    small = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, mode="fixed_budget"))
    with pytest.raises(ValueError, match=r"r=0 trains on 50 images.*lower train.batch_size"):
        sweep_plan(192, 50, small)

    u = TuneConfig()
    assert max_concurrent_trials(u, {"cpu": 1.0, "gpu": 0.0}, {"CPU": 4}, trials=33) == 4
    assert max_concurrent_trials(u, {"cpu": 1.0, "gpu": 1.0}, {"CPU": 64, "GPU": 8}, trials=33) == 8
    assert max_concurrent_trials(u, {"cpu": 1.0, "gpu": 0.5}, {"CPU": 64, "GPU": 8}, trials=3) == 3
    assert max_concurrent_trials(u, {"cpu": 8.0, "gpu": 0.0}, {"CPU": 4}, trials=3) == 1
    assert max_concurrent_trials(TuneConfig(max_concurrent_trials=2), {"cpu": 1.0, "gpu": 0.0}, {"CPU": 64}, 33) == 2

    assert make_scheduler(cfg) is None  # FIFO: every trial runs its whole budget (ASHA's rungs: test_asha_stops...)

    def row(ratio, seed, status, val=None):
        return {"ratio": ratio, "seed": seed, "status": status, "val_real_accuracy": val, "test_real_accuracy": val,
                "test_synthetic_accuracy": val, "test_mixture_accuracy": val, "real_images": 1, "synthetic_images": 1}  # fmt: skip

    table = ratio_table(
        [row(0.0, 0, "completed", 0.8), row(0.0, 1, "completed", 0.6), row(0.5, 0, "completed", 0.9),
         row(0.5, 1, "stopped_early", 0.1), row(1.0, 0, "error")]
    )  # fmt: skip
    assert [e["n"] for e in table] == [2, 1, 0] and table[1]["stopped_early"] == 1 and table[2]["errors"] == 1
    assert table[0]["val_real"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1414, abs=1e-4)}
    assert table[2]["val_real"] is None  # a stopped or failed trial never enters a mean
    assert best_ratio(table)["ratio"] == 0.5


def test_gather_holds_each_cell_once_and_keeps_failures(tmp_path):
    from types import SimpleNamespace

    from synth.tune import gather

    cfg = load_config(None, [f"storage.root={tmp_path}", "tune.ratios=[0,1]", "tune.seeds=[0]"])
    storage = Storage(str(tmp_path))
    plan = [{"ratio": r, "real_images": 1, "synthetic_images": 1, "train_images": 2, "epochs": 1} for r in (0.0, 1.0)]

    def result(ratio, error=None, **metrics):
        return SimpleNamespace(config={"ratio": ratio, "seed": 0}, metrics={"trial_id": f"t{ratio}", **metrics}, error=error)

    rows = gather(cfg, storage, [result(0.0, step=3, val_accuracy=0.5), result(1.0, RuntimeError("boom\nOOM"))], plan)
    assert [(r["ratio"], r["status"], r["trial_id"]) for r in rows] == [(0.0, "stopped_early", "t0.0"), (1.0, "error", "t1.0")]
    assert rows[1]["error"] == "OOM" and rows[0]["test_real_accuracy"] is None and rows[0]["val_real_accuracy"] == 0.5
    with pytest.raises(RuntimeError, match=r"missing \[\(1.0, 0\)\], repeated \[\(0.0, 0\)\].*Fix: delete"):
        gather(cfg, storage, [result(0.0), result(0.0)], plan)


# -- bad input: a clear error before any trial starts ------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("tune.ratios=[0,1.5]", "tune.ratios=[0.0, 1.5] is invalid: 1.5 is outside [0, 1]"),
        ("tune.ratios=[]", "tune.ratios=[] is invalid: give at least one synthetic fraction"),
        ("tune.seeds=[]", "tune.seeds=[] is invalid"),
        ("tune.mode=foo", "tune.mode='foo' is invalid: choose one of fixed_budget, augment"),
        ("tune.ratios=[0.5,0.5]", "give distinct ratios"),
    ],
)
def test_bad_input_fails_before_any_trial(tmp_path, capsys, override, needle):
    code = cli_main("tune", run_tune, [str(REPO / "configs" / "smoke.yaml"), f"storage.root={tmp_path}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("synth tune: error:") and needle in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written, no Tune experiment


def test_bad_config_built_in_code_and_short_data_fail_before_any_trial(root, real_fixture):
    cfg = make_config(root, real_fixture, "short", "tune.mode=augment", "tune.ratios=[0,0.5,1]", "tune.seeds=[0]")
    with pytest.raises(ConfigError, match="tune.mode='foo' is invalid"):  # a Config built in code is checked too
        run_tune(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, mode="foo")))
    with pytest.raises(ConfigError, match="tune.ratios=.* is invalid: -0.1 is outside"):
        run_tune(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, ratios=[-0.1, 0.5])))
    # val_fraction 0.1 leaves 216 real train images; augment at r=1 would add 216 synthetic ones, and there are 192.
    cfg, storage = prepare(root, real_fixture, "short", "tune.mode=augment", "tune.ratios=[0,0.5,1]", "tune.seeds=[0]",
                           "dataset.val_fraction=0.1")  # fmt: skip
    with pytest.raises(ValueError, match=r"r=1 adds 216 synthetic images.*has 192.*Fix:"):
        run_tune(cfg, storage)
    assert not (root / "short" / "tune" / "ray").exists()  # no Tuner was made, no trial started


# -- the sweep ---------------------------------------------------------------------------------


def test_curve_has_the_shape_the_data_dictates(sweep):
    cfg, storage, summary = sweep
    assert summary["status"] == "new" and summary["trials_completed"] == summary["trials_trained"] == 4
    by_ratio = {e["ratio"]: e for e in summary["table"]}
    val = [by_ratio[r]["val_real"]["mean"] for r in (0.0, 0.25, 0.75, 1.0)]
    synthetic_test = [by_ratio[r]["test_synthetic"]["mean"] for r in (0.0, 0.25, 0.75, 1.0)]
    # Real images only: right on real images. Wrong-class synthetic images only: wrong on them,
    # below chance. In between the majority wins; never does more synthetic data help.
    assert val[0] > 0.8 and val[1] > 0.8, val
    assert val[2] < CHANCE and val[3] < CHANCE, val
    assert all(b <= a + 0.1 for a, b in zip(val, val[1:])), val
    assert synthetic_test[0] < CHANCE and synthetic_test[3] > 0.8, synthetic_test  # the mirror image
    for e in summary["table"]:  # mixture test = the union of both test splits
        assert e["test_mixture"]["mean"] == pytest.approx((e["test_real"]["mean"] + e["test_synthetic"]["mean"]) / 2)
        assert e["real_images"] + e["synthetic_images"] == 192 and e["synthetic_images"] == round(192 * e["ratio"])
    assert summary["best"]["ratio"] == 0.0  # chosen on real validation accuracy (ties: the smaller ratio)


def test_results_table_and_records(sweep):
    cfg, storage, summary = sweep
    layout = Layout(cfg.run)
    rows = pq.read_table(storage.uri(f"{layout.tune_results}.parquet")).to_pylist()
    assert sorted((r["ratio"], r["seed"]) for r in rows) == [(0.0, 0), (0.25, 0), (0.75, 0), (1.0, 0)]
    assert all(r["status"] == "completed" and r["step"] == 24 and r["epochs"] == 8 for r in rows)
    assert len({r["trial_id"] for r in rows}) == 4
    document = storage.read_json(f"{layout.tune_results}.json")
    assert document["experiment"] == experiment_name(cfg) == summary["experiment"]
    assert document["metric"] == "val_real_accuracy" and document["best"]["ratio"] == 0.0
    record = storage.read_json(layout.tune_trial(experiment_name(cfg), 0.25, 0))
    assert [h["epoch"] for h in record["history"]] == list(range(1, 9)) and record["synthetic_images"] == 48
    assert set(record["test"]) == {"real", "synthetic", "mixture"} and record["test"]["real"]["n"] == 60
    assert record["val"]["n"] == 48  # the objective is the real validation split
    assert storage.exists(layout.config_file("tune")) and storage.read_json(layout.summary("tune"))["trials_total"] == 4


def test_trial_at_r_is_the_train_stages_mixture_cell_at_r(sweep):
    """One training core and one mixing rule: tune at r = f, seed s == the train stage's mixture at f, seed s."""
    from synth.train import run_train

    cfg, storage, _ = sweep
    train_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, experiments=["mixture"], mixture_synthetic_fraction=0.25, seeds=[0])
    )
    run_train(train_cfg, storage)
    cell = storage.read_json(Layout(cfg.run).train_metrics("train-mixture", 0))
    trial = storage.read_json(Layout(cfg.run).tune_trial(experiment_name(cfg), 0.25, 0))
    assert cell["train_ids_sha256"] == trial["train_ids_sha256"] and cell["train_images"] == trial["train_images"] == 192
    assert [h["train_loss"] for h in cell["history"]] == [h["train_loss"] for h in trial["history"]]  # step for step
    for domain in ("real", "synthetic", "mixture"):
        assert cell["test"][domain] == trial["test"][domain]  # accuracy, per class, confusion: identical


def test_rerun_of_a_finished_sweep_trains_nothing(sweep):
    cfg, storage, _ = sweep
    before = storage.read_json(Layout(cfg.run).tune_trial(experiment_name(cfg), 0.0, 0))
    summary = run_tune(cfg, storage)
    assert summary["status"] == "skipped (already done)" and summary["trials_trained"] == 0
    assert storage.read_json(Layout(cfg.run).tune_trial(experiment_name(cfg), 0.0, 0)) == before


def test_report_shows_the_sweep(sweep):
    from synth.report import run_report

    cfg, storage, _ = sweep
    # The report needs the train stage's metrics; one minimal model stands in for them here.
    storage.write_json(
        Layout(cfg.run).train_metrics("train-real", 0),
        {"experiment": "train-real", "train_domain": "real", "seed": 0, "classes": CLASSES, "val": {"accuracy": 1.0},
         "test": {"real": {"accuracy": 1.0}}},
    )  # fmt: skip
    summary = run_report(cfg, storage)
    report = storage.read_json(f"{cfg.run}/report/report.json")
    assert "tune-accuracy-vs-ratio.png" in report["plots"] and report["tune"]["best"]["ratio"] == 0.0
    assert [e["ratio"] for e in report["tune"]["table"]] == [0.0, 0.25, 0.75, 1.0]
    html = Path(summary["html"]).read_text()
    markdown = Path(summary["markdown"]).read_text()
    for text in (html, markdown):
        assert "Mixing ratio: how much synthetic data to use" in text and "Best synthetic fraction" in text
    assert "| 0.25 | 144 + 48 | 100.0 (n=1) |" in markdown
    assert storage.exists(f"{cfg.run}/report/tune-accuracy-vs-ratio.png")


def test_asha_stops_trials_below_the_rung(root, real_fixture, ray_local):
    # One trial at a time in grid order: r=0 sets the rungs, r=1 (below chance) falls under them.
    cfg, storage = prepare(root, real_fixture, "asha", "tune.ratios=[0,1]", "tune.seeds=[0]", "tune.asha=true",
                           "tune.asha_grace_steps=3", "tune.asha_reduction_factor=2", "tune.max_concurrent_trials=1")  # fmt: skip
    summary = run_tune(cfg, storage)
    rows = {r["ratio"]: r for r in storage.read_json(f"{Layout(cfg.run).tune_results}.json")["rows"]}
    assert rows[0.0]["status"] == "completed" and rows[0.0]["step"] == 24
    # Rungs in optimizer steps (epochs vary with r in augment mode): grace 3, then x2.
    assert rows[1.0]["status"] == "stopped_early" and rows[1.0]["step"] in (3, 6, 12) and rows[1.0]["test_real_accuracy"] is None
    assert summary["trials_stopped_early"] == 1 and summary["best"]["ratio"] == 0.0
    assert [e["n"] for e in summary["table"]] == [1, 0]


@pytest.mark.slow
def test_sweep_on_s3_restores_from_s3(tmp_path, real_fixture, s3_server, ray_local):
    from conftest import make_bucket

    make_bucket(s3_server, "tune")
    # Three epochs per trial: this is about storage, the shape test is about learning.
    extra = [f"storage.s3_endpoint_url={s3_server}", "tune.ratios=[0,1]", "tune.seeds=[0]", "train.steps=9"]
    cfg, storage = prepare("s3://tune/root", real_fixture, "s3", *extra)
    summary = run_tune(cfg, storage)
    assert summary["status"] == "new" and summary["trials_completed"] == 2
    assert summary["results"].startswith("s3://tune/root/s3/tune/")
    assert storage.list(f"{Layout(cfg.run).tune_ray_results}/{experiment_name(cfg)}")  # Tune's folder is on S3
    # Without the gathered results the rerun must go through Tuner.restore, on S3, and train nothing.
    storage.delete(f"{Layout(cfg.run).tune_results}.json")
    again = run_tune(cfg, storage)
    assert again["status"] == "restored" and again["trials_trained"] == 0 and again["trials_completed"] == 2


# -- resume --------------------------------------------------------------------------------------

TRIAL = "ray::ImplicitFunc"  # a Tune function trial's process title (".train" added while it runs)


def logged_epochs(result_file: Path) -> list[int]:
    """The epoch of each report Tune logged for a trial: its result.json, appended to across restarts."""
    epochs = []
    for line in result_file.read_text().splitlines() if result_file.exists() else []:
        try:
            epochs.append(json.loads(line)["epoch"])
        except ValueError:  # the last line, mid-write
            pass
    return epochs


def unfaulted_trial(cfg, storage: Storage, ratio: float, seed: int) -> dict:
    """The trial trained by the training core alone (conftest.train_unfaulted), with the trial's inputs and threads.

    Returns ``history``, ``val`` and ``test`` as the trial's record has them.
    """
    data = SplitCache(storage, cfg.run, CLASSES).load(SWEEP_SPLITS)
    train = mix(data.get("real", "train"), data.get("synthetic", "train"), ratio, seed, cfg.tune.mode)
    real_val = data.get("real", "val").arrays()
    sets = {"val": real_val, "real": data.get("real", "test").arrays(), "synthetic": data.get("synthetic", "test").arrays()}
    history, scores = train_unfaulted(
        to_dict(cfg.train), CLASSES, seed, train.arrays(), real_val, sets, {"mixture": ("real", "synthetic")},
        threads=max(1, int(cfg.tune.cpus_per_trial)),
    )  # fmt: skip
    return {"history": history, "val": scores["val"], "test": {d: scores[d] for d in TEST_DOMAINS}}


@pytest.mark.slow
def test_killed_trial_resumes_from_its_checkpoint(root, real_fixture, ray_local, fault_figures):
    """SIGKILL a trial's process mid-trial; Tune restarts the trial from its last checkpoint (tune.max_failures).

    The sweep finishes with one completed row and the trial's record, resumed once, and the
    trial equals an unfaulted run of the training core exactly (resuming is exact: see
    test_train's killed-worker test). A kill that finds no trial, or lands before its second
    report, fails the test.
    """
    # 20 epochs of ~0.1 s; the kill follows the second report Tune logged, early in the trial.
    overrides = ["tune.ratios=[0.25]", "tune.seeds=[0]", "train.steps=60", "tune.max_failures=1"]
    cfg, storage = prepare(root, real_fixture, "killed-trial", *overrides)
    layout, experiment = Layout(cfg.run), experiment_name(cfg)
    result_file = root / layout.tune_ray_results / experiment / "ratio-0.25-seed-0" / "result.json"
    # The trial trains on after its second report: the kill lands in a later epoch.
    second_report = lambda: max(logged) if len(logged := logged_epochs(result_file)) >= 2 else None  # noqa: E731
    with KillWhen(second_report, lambda: ray_processes(TRIAL), timeout=180) as kill:
        summary = run_tune(cfg, storage)
    assert len(kill.killed) == 1, f"the kill must find the sweep's one trial mid-run: {kill}"

    assert summary["trials_completed"] == summary["trials_trained"] == 1 and summary["trials_failed"] == 0
    rows = storage.read_json(f"{layout.tune_results}.json")["rows"]
    assert [(r["ratio"], r["seed"], r["status"]) for r in rows] == [(0.25, 0, "completed")]
    record = TrialRecord.from_json(storage.read_json(layout.tune_trial(experiment, 0.25, 0)))
    assert len(record.resumed_from_epochs) == 1 and 1 <= record.resumed_from_epochs[0] <= 10, record.resumed_from_epochs
    assert rows[0]["resumed_from_epochs"] == record.resumed_from_epochs
    logged = logged_epochs(result_file)
    recomputed = len(logged) - len(set(logged))  # epochs Tune logged twice: trained before the kill and after
    assert sorted(set(logged)) == list(range(1, 21)) and recomputed <= 2, logged
    assert [h["epoch"] for h in record.history] == list(range(1, 21)) and record.history[-1]["step"] == 60
    reference = unfaulted_trial(cfg, storage, 0.25, 0)
    assert without_timings(record.history) == without_timings(reference["history"])
    assert record.val == reference["val"] and record.test == reference["test"]
    fault_figures(
        killed_after_epoch=kill.mark, restores=len(record.resumed_from_epochs),
        resumed_from_epoch=record.resumed_from_epochs[0], epochs_recomputed=recomputed,
        accuracy=record.test["real"]["accuracy"], accuracy_unfaulted=reference["test"]["real"]["accuracy"],
    )  # fmt: skip



@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(root, real_fixture, ray_local, fault_figures):
    """SIGKILL the driver while its second trial trains; a rerun restores the sweep and finishes it.

    One trial at a time, in grid order: r=0 finishes, r=0.5 is killed after a few epochs (it
    must continue from its checkpoint), r=1 has not started. A kill that lands elsewhere fails
    the test rather than passing it untested.
    """
    import ray

    # 50 epochs a trial: after the second trial's third report, the kill lands with ~47 epochs to spare.
    overrides = ["tune.ratios=[0,0.5,1]", "tune.seeds=[0]", "tune.max_concurrent_trials=1", "train.steps=150"]
    cfg, storage = prepare(root, real_fixture, "resume", *overrides)
    layout, experiment = Layout(cfg.run), experiment_name(cfg)
    argv = [f"run={cfg.run}", f"storage.root={root}", f"dataset.real_path={real_fixture}", "dataset.domains=[real]",
            f"prompts.classes=[{','.join(CLASSES)}]", *TINY, *overrides,
            f"ray.address={ray.get_runtime_context().gcs_address}"]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    driver = subprocess.Popen([sys.executable, "-m", "ray_jobs.tune", *argv], cwd=REPO, start_new_session=True, **quiet)
    records = root / layout.stage("tune") / "trials" / experiment
    experiment_dir = root / layout.tune_ray_results / experiment
    second = experiment_dir / "ratio-0.5-seed-0" / "result.json"

    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and driver.poll() is None and len(logged_epochs(second)) < 3:
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished (or failed) before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's own process group: only what we started
        driver.wait()
    time.sleep(2)  # Ray ends the dead driver's trial actor; let a straggling write land first
    finished = {p.name: json.loads(p.read_text()) for p in records.glob("*.json")}
    # The kill must land while the second trial trains, or this test proves nothing: fail if it did not.
    assert set(finished) == {"ratio-0-seed-0.json"}, sorted(finished)
    assert not storage.exists(f"{layout.tune_results}.json")

    summary = run_tune(cfg, storage)
    assert summary["status"] == "restored" and summary["trials_completed"] == 3
    assert summary["trials_already_finished"] == len(finished) and summary["trials_trained"] == 3 - len(finished)
    rows = pq.read_table(storage.uri(f"{layout.tune_results}.parquet")).to_pylist()
    assert sorted((r["ratio"], r["seed"]) for r in rows) == [(0.0, 0), (0.5, 0), (1.0, 0)]  # each exactly once
    assert len({r["trial_id"] for r in rows}) == 3 and all(r["status"] == "completed" for r in rows)
    redone = [name for name, record in finished.items() if json.loads((records / name).read_text()) != record]
    assert not redone  # not retrained: the same record, down to its attempt id
    # Killed mid-way: continued from a checkpoint, not from scratch.
    record = json.loads((records / "ratio-0.5-seed-0.json").read_text())
    assert len(record["resumed_from_epochs"]) == 1 and 1 <= record["resumed_from_epochs"][0] < 50, record
    assert [h["epoch"] for h in record["history"]] == list(range(1, 51)) and record["history"][-1]["step"] == 150
    logged = logged_epochs(second)  # the killed driver's reports, then the rerun's
    assert sorted(set(logged)) == list(range(1, 51)), logged
    # No unfaulted 50-epoch run of this trial is at hand (one would cost more than the test): accuracy alone.
    fault_figures(
        trials_redone=len(redone), restores=len(record["resumed_from_epochs"]),
        resumed_from_epoch=record["resumed_from_epochs"][0], epochs_recomputed=len(logged) - len(set(logged)),
        accuracy=record["test"]["real"]["accuracy"],
    )  # fmt: skip
    # Tune's own view agrees: one trial folder per (ratio, seed) in the one experiment folder.
    assert sorted(p.name for p in experiment_dir.iterdir() if p.is_dir()) == [
        "ratio-0-seed-0", "ratio-0.5-seed-0", "ratio-1-seed-0"
    ]  # fmt: skip


def test_a_cut_experiment_state_starts_the_sweep_anew(tmp_path, capsys):
    """A driver killed while Tune wrote its experiment state leaves an empty file that Tuner.restore
    cannot rebuild trials from: the sweep is started anew (finished trials replay their records)."""
    from synth.tune import _state_readable

    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert _state_readable(str(tmp_path), None)
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text("")  # the newest, cut to nothing
    assert not _state_readable(str(tmp_path), None)
    assert "unreadable" in capsys.readouterr().out
