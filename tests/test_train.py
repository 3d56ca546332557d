"""synth.train: the experiment matrix on learnable class-pattern data, through Ray Train on CPU.

One local Ray instance serves the module. The data: small real/synthetic tables in the dataset
stage's format, drawn with ``class_pattern_image`` (colour and stripe direction encode the
class), so a tiny CNN learns them in a few dozen steps and anything near chance means labels,
shards or evaluation went wrong.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chaos import KillWhen
from conftest import ray_processes, train_unfaulted, without_timings
from synth.config import load_config, to_dict
from synth.model import ArchitectureMismatchError, architecture, build_model, load_model
from synth.recipe import STATE_FILE, Budget, budget, classification_metrics, flip_and_crop, lr_factor, predict, restore_state
from synth.records import TrainMetrics
from synth.splits import Split, SplitCache, ablation_draw, mix, needed_splits, read_split, resolve_synthetic_source
from synth.storage import Layout, Storage
from synth.testkit import class_pattern_image, tag_dataset_split, write_class_aware_dataset, write_dataset_split
from synth.train import ablation_train_set, plan_ablation, run_train, train_experiment

PER_CLASS = {"train": 32, "val": 8, "test": 16}
# Width 1/8 (33k parameters), 3 steps per epoch, 8 epochs: seconds on a CPU, >90% accuracy.
TINY = ["train.width=0.125", "train.batch_size=64", "train.steps=24", "train.eval_batch_size=256", "train.seeds=[0]"]
CHANCE = 1 / 6


def write_dataset(storage: Storage, run: str, classes: list[str]) -> None:
    """Real and synthetic train/val/test tables in the dataset stage's own format (test kit writer)."""
    write_class_aware_dataset(storage, run, classes, PER_CLASS)


def make_config(root: Path, run: str, *overrides: str):
    return load_config(None, [f"run={run}", f"storage.root={root}", *TINY, *overrides])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def ray_cluster(ray_local) -> str:
    """The session's local Ray instance (conftest), by its GCS address."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def matrix(root, ray_cluster):
    """Every experiment once (seed 0), 1 worker; returns (config, storage, summary)."""
    cfg = make_config(root, "matrix")
    storage = Storage.from_config(cfg.storage)
    write_dataset(storage, cfg.run, cfg.prompts.classes)
    return cfg, storage, run_train(cfg, storage)


# -- building blocks (no Ray) ----------------------------------------------------------------


def test_schedule_and_budget():
    assert lr_factor(0, 100, 0.25) == pytest.approx(0.2)
    assert lr_factor(25, 100, 0.25) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0.25) == pytest.approx(0.07)
    plan = budget(train_images=1000, batch_size=100, steps=25, world_size=2)
    assert plan == Budget(per_rank_batch=50, steps_per_epoch=10, epochs=3)
    with pytest.raises(ValueError, match="Fix: lower train.batch_size"):
        budget(train_images=50, batch_size=64, steps=10, world_size=1)


def test_flip_and_crop_moves_pixels_but_keeps_them():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    flipped = flip_and_crop(x, translate=0)
    for a, b in zip(x, flipped):  # translate=0: each image is itself or its mirror
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    out = flip_and_crop(x.repeat(32, 1, 1, 1), translate=2)
    assert out.shape == (64, 3, 8, 8)
    # Reflect padding only reuses pixels of the image; some crops must differ from the original.
    assert set(out.unique().tolist()) <= set(x.unique().tolist())
    assert not all(torch.equal(o, x[i % 2]) or torch.equal(o, x[i % 2].flip(-1)) for i, o in enumerate(out))


def _split(value: int, n: int) -> Split:
    return Split(np.full((n, 4, 4, 3), value, np.uint8), np.full(n, value, np.int64), np.array([f"{value}-{i}" for i in range(n)]))


def test_mix_has_fixed_size_the_asked_fraction_and_nested_draws():
    real, synthetic = _split(0, 100), _split(1, 80)
    mixes = {f: mix(real, synthetic, f, seed=3) for f in (0.0, 0.25, 0.5, 1.0)}
    for f, m in mixes.items():
        assert len(m) == 80 and m.labels.sum() == round(80 * f)
        assert np.array_equal(m.images[:, 0, 0, 0], m.labels)  # images kept their labels
        assert all(i.startswith(f"{y}-") for i, y in zip(m.ids, m.labels))  # and their ids
    assert set(mixes[0.25].ids[mixes[0.25].labels == 1]) <= set(mixes[0.5].ids)  # nested for one seed
    again, other = mix(real, synthetic, 0.25, seed=3), mix(real, synthetic, 0.25, seed=4)
    assert np.array_equal(again.ids, mixes[0.25].ids) and not np.array_equal(other.ids, again.ids)  # the seed draws


def test_classification_metrics_by_hand():
    m = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
    assert m["accuracy"] == 0.5 and m["n"] == 4 and m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "f1": pytest.approx(0.5), "support": 1}
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_read_split_refuses_a_dataset_built_for_other_classes(tmp_path):
    storage = Storage(str(tmp_path))
    write_dataset(storage, "r", ["bird", "cat"])
    split = read_split(storage, "r", "real", "val", ["bird", "cat"])
    assert split.images.shape == (16, 32, 32, 3) and split.images.dtype == np.uint8 and len(set(split.ids)) == 16
    with pytest.raises(ValueError, match="do not match prompts.classes"):
        read_split(storage, "r", "real", "val", ["cat", "bird"])


# -- the stage through Ray Train ---------------------------------------------------------------


def test_matrix_learns_and_writes_the_schema(matrix):
    cfg, storage, summary = matrix
    layout, classes = Layout(cfg.run), cfg.prompts.classes
    expected_n = {"real": 6 * 16, "synthetic": 6 * 16, "mixture": 2 * 6 * 16}
    for experiment in ("train-real", "train-synthetic", "train-mixture"):
        m = storage.read_json(layout.train_metrics(experiment, 0))
        assert {
            "experiment", "train_domain", "seed", "classes", "architecture", "steps", "batch_size", "train_images",
            "num_workers", "history", "val", "test", "wall_seconds", "train_images_per_second", "code_version",
        } <= set(m)  # fmt: skip
        assert m["experiment"] == experiment and m["train_domain"] == experiment[len("train-") :] and m["seed"] == 0
        assert m["classes"] == classes and m["architecture"] == architecture(6, 0.125)
        assert (m["steps"], m["batch_size"], m["num_workers"], m["train_images"]) == (24, 64, 1, 6 * 32)
        assert [h["epoch"] for h in m["history"]] == list(range(1, 9)) and m["history"][-1]["step"] == 24
        assert set(m["history"][0]) == {"epoch", "step", "train_loss", "val_accuracy", "val_loss", "seconds", "val_seconds"}
        assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
        assert m["val"]["accuracy"] > 0.8 and m["train_images_per_second"] > 0 and m["wall_seconds"] > 0
        assert set(m["test"]) == {"real", "synthetic", "mixture"}
        for domain, t in m["test"].items():
            cm = np.array(t["confusion_matrix"])
            assert t["n"] == expected_n[domain] == cm.sum() and cm.shape == (6, 6)
            assert np.trace(cm) / cm.sum() == pytest.approx(t["accuracy"])
            assert cm.sum(axis=1).tolist() == [t["per_class"][c]["support"] for c in classes]  # rows: true labels
            assert set(t["per_class"][classes[0]]) == {"precision", "recall", "f1", "support"}
            assert t["accuracy"] > 0.8 > 3 * CHANCE, (experiment, domain, t["accuracy"])
        # model.pt reproduces the stored real-test accuracy.
        model, stored_classes = load_model(storage.read_bytes(layout.train_model(experiment, 0)), expected=architecture(6, 0.125))
        test = read_split(storage, cfg.run, "real", "test", classes)
        accuracy = (predict(model, test.images, 256, cfg.train.tta_level, torch.device("cpu")) == test.labels).mean()
        assert stored_classes == classes and accuracy == pytest.approx(m["test"]["real"]["accuracy"])
    assert summary["cells_trained"] == 3 and set(summary["accuracy"]) == {"train-real", "train-synthetic", "train-mixture"}
    assert storage.read_json(layout.summary("train"))["cells_total"] == 3


def test_rerun_skips_finished_cells(matrix):
    cfg, storage, _ = matrix
    before = storage.read_json(Layout(cfg.run).train_metrics("train-real", 0))
    summary = run_train(cfg, storage)
    assert summary["cells_already_done"] == 3 and summary["cells_trained"] == 0
    assert storage.read_json(Layout(cfg.run).train_metrics("train-real", 0)) == before


def test_two_workers_match_one_worker(matrix, root):
    cfg1, storage, _ = matrix
    one = storage.read_json(Layout(cfg1.run).train_metrics("train-real", 0))
    cfg = make_config(root, "two-workers", "train.num_workers=2", "train.experiments=[real]", "train.test_domains=[real]")
    write_dataset(storage, cfg.run, cfg.prompts.classes)
    two = train_experiment(cfg, storage, "real", 0)
    # Same global batch and step budget: each rank takes half of every batch.
    assert two["num_workers"] == 2 and two["history"][-1]["step"] == one["history"][-1]["step"] == 24
    assert len(two["history"]) == len(one["history"])
    assert two["test"]["real"]["accuracy"] > 0.8
    assert abs(two["test"]["real"]["accuracy"] - one["test"]["real"]["accuracy"]) < 0.15


def test_checkpoint_from_another_width_is_refused(matrix):
    cfg, _, _ = matrix
    folder = Path(cfg.storage.root) / Layout(cfg.run).train_ray_results("train-real", 0)
    checkpoint = sorted(glob.glob(str(folder / "*" / "checkpoint_*" / STATE_FILE)))[-1]
    restore_state(checkpoint, build_model(6, 0.125))  # the matching network loads
    with pytest.raises(ArchitectureMismatchError, match=r"width: 0\.125 there, 0\.25 here.*widths"):
        restore_state(checkpoint, build_model(6, 0.25))


def test_other_class_trains_k_plus_1_outputs_and_refuses_hostile_images(root, ray_cluster):
    """dataset.hostile=other_class: the synthetic splits hold a class "other" (label K), real ones none."""
    from synth.config import label_classes
    from synth.report import run_report
    from synth.runtime import write_stage_summary

    cfg = make_config(root, "other", "dataset.hostile=other_class", "prompts.hostile_per_class=3", "train.experiments=[synthetic]")
    storage = Storage.from_config(cfg.storage)
    classes = label_classes(cfg)
    k = len(cfg.prompts.classes)
    assert classes == [*cfg.prompts.classes, "other"]
    write_class_aware_dataset(storage, cfg.run, classes, PER_CLASS, domains=("synthetic",))
    for s, (split, n) in enumerate(PER_CLASS.items()):  # real: the K classes only, in the same label space
        labels = [y for y in range(k) for _ in range(n)]
        images = np.stack([class_pattern_image(y, 500_000 + 10_000 * s + i, 32) for i, y in enumerate(labels)])
        write_dataset_split(storage, cfg.run, "real", split, images, labels, classes)
    # Hostile test images: the look of "other", labelled with the class each imitates.
    imitated = [i % k for i in range(2 * k)]
    hostile = np.stack([class_pattern_image(k, 900_000 + i, 32) for i in range(len(imitated))])
    write_dataset_split(storage, cfg.run, "adversarial", "test", hostile, imitated, classes)

    m = train_experiment(cfg, storage, "synthetic", 0)
    assert m["classes"] == classes and set(m["test"]) == {"real", "synthetic", "mixture", "adversarial"}
    model, stored = load_model(storage.read_bytes(Layout(cfg.run).train_model("train-synthetic", 0)), expected=architecture(k + 1, 0.125))
    assert stored == classes
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, k + 1)  # the head has K+1 outputs
    for t in m["test"].values():
        assert np.array(t["confusion_matrix"]).shape == (k + 1, k + 1) and "other" in t["per_class"]
    real = m["test"]["real"]
    assert real["per_class"]["other"]["support"] == 0 and real["n"] == k * PER_CLASS["test"]
    # An "other" prediction on a real image is wrong: accuracy is the trace over every real image.
    cm = np.array(real["confusion_matrix"])
    assert real["accuracy"] == pytest.approx(np.trace(cm) / cm.sum()) and real["accuracy"] > 0.8
    assert m["test"]["synthetic"]["per_class"]["other"]["recall"] > 0.8
    # The model refuses hostile images: its fooling rate (accuracy on them) is low.
    assert m["test"]["adversarial"]["accuracy"] < 0.2

    # The report lists "other" in the per-class numbers and says what it is.
    write_stage_summary(storage, cfg, "dataset", {"classes": classes, "hostile": "other_class", "domains": {}})
    run_report(cfg, storage)
    report = storage.read_json(f"{cfg.run}/report/report.json")
    assert report["classes"] == classes and "other" in report["per_class"]["synthetic"]["real"]
    assert any("dataset.hostile=other_class" in n for n in report["notes"])


# -- faults: a killed worker, a killed driver ------------------------------------------------------

WORKER = "ray::RayTrainWorker"  # a Ray Train worker's process title (".<method>" added while it runs one)


def cell_folder(cfg, experiment: str = "train-real", seed: int = 0) -> Path:
    return Path(cfg.storage.root) / Layout(cfg.run).train_ray_results(experiment, seed)


def registered_epochs(cfg) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered for the cell (its checkpoint manager's snapshot)."""
    for path in glob.glob(str(cell_folder(cfg) / "*" / "checkpoint_manager_snapshot.json")):
        try:
            results = json.loads(Path(path).read_text() or "{}").get("checkpoint_results") or []
        except ValueError:  # read while being written: as if not there yet
            return []
        return [r["metrics"]["epoch"] for r in results]
    return []


def saved_epochs(cfg) -> list[int]:
    """Epochs of every checkpoint file in the cell's folder, registered or not (a killed run's last ones are not)."""
    epochs = []
    for path in glob.glob(str(cell_folder(cfg) / "*" / "checkpoint_*" / STATE_FILE)):
        try:
            epochs.append(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        except (RuntimeError, EOFError, OSError):  # a write the kill cut short
            pass
    return sorted(epochs)


def unfaulted(cfg, storage: Storage, train_domain: str = "real", seed: int = 0) -> dict:
    """The cell trained by the training core alone (conftest.train_unfaulted), with the worker's inputs and threads.

    Returns ``history``, ``val`` and ``test`` as metrics.json has them.
    """
    from synth.splits import UNIONS

    t, classes = cfg.train, list(cfg.prompts.classes)
    data = SplitCache(storage, cfg.run, classes).load(needed_splits([train_domain], t.test_domains))
    train, val = data.train_val(train_domain, t.mixture_synthetic_fraction, seed)
    tests = {d: data.get(d, split).arrays() for d, split in sorted(needed_splits([], t.test_domains))}
    history, scores = train_unfaulted(
        to_dict(t), classes, seed, train.arrays(), val.arrays(), {"val": val.arrays(), **tests},
        {n: p for n, p in UNIONS.items() if n in t.test_domains}, threads=max(1, int(t.cpus_per_worker)),
    )  # fmt: skip
    return {"history": history, "val": scores["val"], "test": {d: scores[d] for d in t.test_domains}}


@pytest.mark.slow
def test_killed_worker_resumes_exactly_from_last_checkpoint(root, ray_cluster, capsys, fault_figures):
    """SIGKILL the Ray Train worker inside an epoch; Ray Train restarts it from its last checkpoint, in the same run.

    Resuming is exact: each epoch reseeds data order and augmentation from (seed, epoch, rank),
    and the checkpoint holds model, optimizer, schedule and history. So the faulted cell must
    equal an unfaulted run of the training core loss for loss and score for score, with no
    tolerance. A kill that finds no worker, or lands before the first checkpoint, fails the test.
    """
    # 20 epochs of ~0.1 s; the kill follows the first registered checkpoint, early in the run.
    overrides = ["train.experiments=[real]", "train.test_domains=[real]", "train.steps=60", "train.max_failures=1"]
    cfg = make_config(root, "killed-worker", *overrides)
    storage = Storage.from_config(cfg.storage)
    write_dataset(storage, cfg.run, cfg.prompts.classes)
    # The worker trains on after its first registered checkpoint: the kill lands in a later epoch.
    first_checkpoint = lambda: max(registered_epochs(cfg), default=None)  # noqa: E731
    with KillWhen(first_checkpoint, lambda: ray_processes(WORKER), timeout=240) as kill:
        summary = run_train(cfg, storage)
    assert len(kill.killed) == 1, f"the kill must find the cell's one worker mid-run: {kill}"

    m = TrainMetrics.from_json(storage.read_json(Layout(cfg.run).train_metrics("train-real", 0)))  # a valid metrics.json
    assert summary["cells_trained"] == 1 and len(m.resumed_from_epochs) == 1, m.resumed_from_epochs
    resumed = m.resumed_from_epochs[0]
    assert kill.mark <= resumed <= 10, (kill, resumed)  # its last checkpoint, not scratch, well before the end
    assert m.epochs_recomputed <= 1  # at most the epoch reported but not yet registered when it died
    assert [h["epoch"] for h in m.history] == list(range(1, 21)) and m.history[-1]["step"] == 60
    assert f"[train] train-real seed 0: resumed from the checkpoint of epoch {resumed}" in capsys.readouterr().out
    reference = unfaulted(cfg, storage)
    assert without_timings(m.history) == without_timings(reference["history"])
    assert m.val == reference["val"] and m.test == reference["test"]
    fault_figures(
        killed_after_epoch=kill.mark, restores=len(m.resumed_from_epochs), resumed_from_epoch=resumed,
        epochs_recomputed=m.epochs_recomputed, accuracy=m.test["real"]["accuracy"],
        accuracy_unfaulted=reference["test"]["real"]["accuracy"],
    )  # fmt: skip


@pytest.mark.slow
def test_killed_driver_resumes_from_last_checkpoint(matrix, root, ray_cluster, fault_figures):
    """Kill the driver (SIGKILL) after its first checkpoint; a rerun continues, not from epoch 0.

    The rerun resumes from the last checkpoint Ray Train registered, and ends as the matrix's
    unfaulted train-real cell (same data, recipe and seed) ends: resuming is exact (see
    test_killed_worker_resumes_exactly_from_last_checkpoint).
    """
    overrides = ["train.experiments=[real]", "train.test_domains=[real]"]
    cfg = make_config(root, "killed", *overrides)
    storage = Storage.from_config(cfg.storage)
    write_dataset(storage, cfg.run, cfg.prompts.classes)
    # The killed driver joins this module's cluster, as a second `ray job submit` would.
    argv = [f"run={cfg.run}", f"storage.root={root}", *TINY, *overrides, f"ray.address={ray_cluster}"]
    code = "import sys; from ray_jobs._cli import main; from synth.train import run_train; "
    code += f"sys.exit(main('train', run_train, {argv!r}))"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    driver = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, **quiet)
    deadline, at_kill = time.monotonic() + 240, []
    try:
        while time.monotonic() < deadline and driver.poll() is None and not at_kill:
            at_kill = registered_epochs(cfg)  # until Ray Train has registered at least one checkpoint
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished (or failed) before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's own process group: only what we started
        driver.wait()
    assert not storage.exists(Layout(cfg.run).train_metrics("train-real", 0))
    # Ray ends the dead driver's worker; until then it trains on, and what it saves past the
    # last registered checkpoint is what the rerun computes again.
    deadline = time.monotonic() + 60
    while ray_processes(WORKER) and time.monotonic() < deadline:
        time.sleep(0.1)
    registered, saved = registered_epochs(cfg), saved_epochs(cfg)
    assert registered and not ray_processes(WORKER), (registered, "the dead driver's worker outlived it")

    summary = run_train(cfg, storage)
    m = storage.read_json(Layout(cfg.run).train_metrics("train-real", 0))
    assert summary["cells_trained"] == 1 and m["resumed_from_epochs"] == [max(registered)] and max(registered) < 8
    assert [h["epoch"] for h in m["history"]] == list(range(1, 9)) and m["history"][-1]["step"] == 24
    unfaulted_cell = storage.read_json(Layout(matrix[0].run).train_metrics("train-real", 0))
    assert without_timings(m["history"]) == without_timings(unfaulted_cell["history"])  # trained identically
    assert m["test"]["real"]["accuracy"] == unfaulted_cell["test"]["real"]["accuracy"] > 0.8
    fault_figures(
        killed_after_epoch=max(at_kill), restores=len(m["resumed_from_epochs"]), resumed_from_epoch=max(registered),
        epochs_recomputed=max(saved) - max(registered) + m["epochs_recomputed"], accuracy=m["test"]["real"]["accuracy"],
        accuracy_unfaulted=unfaulted_cell["test"]["real"]["accuracy"],
    )  # fmt: skip


# -- issue 12: curated reads, the adversarial domain, the ablation cells -----------------------


def tag_synthetic(storage: Storage, run: str, accepted_of, technique_of=lambda y, i: ("vanilla", "domain")[i % 2]) -> None:
    """Tag every synthetic split: row ``i`` of class ``y`` (stored id order) gets ``technique_of(y, i)`` and ``accepted_of(y, i)``."""
    for split in PER_CLASS:
        table = storage.read_parquet(Layout(run).dataset_split("synthetic", split), columns=["label"])
        seen: dict[int, int] = {}
        rows = []
        for y in table.column("label").to_pylist():
            rows.append((y, seen.get(y, 0)))
            seen[y] = seen.get(y, 0) + 1
        tag_dataset_split(storage, run, "synthetic", split, [technique_of(y, i) for y, i in rows], [accepted_of(y, i) for y, i in rows])


def write_hostile(storage: Storage, run: str, classes: list[str], per_class: int = 8) -> None:
    """The adversarial test split: images labelled with the class they imitate (here: they look like it)."""
    rows = [(y, i) for y in range(len(classes)) for i in range(per_class)]
    images = np.stack([class_pattern_image(y, 900_000 + 100 * y + i) for y, i in rows])
    write_dataset_split(storage, run, "adversarial", "test", images, [y for y, _ in rows], classes)
    tag_dataset_split(storage, run, "adversarial", "test", ["hostile"] * len(rows), [None] * len(rows))


def test_read_split_techniques_accepted_and_source_resolution(tmp_path):
    storage, classes = Storage(str(tmp_path)), ["bird", "cat"]
    write_dataset(storage, "r", classes)
    old = read_split(storage, "r", "synthetic", "train", classes)  # a table from before curation
    assert set(old.techniques) == {""} and set(old.accepted) == {None} and not old.judged()
    assert len(read_split(storage, "r", "synthetic", "train", classes).accepted_only()) == 0
    assert resolve_synthetic_source("auto", storage, "r") == "all" and resolve_synthetic_source("all", storage, "r") == "all"
    with pytest.raises(ValueError, match="Fix: run the curate stage .*or set dataset.synthetic_source=all"):
        resolve_synthetic_source("curated", storage, "r")

    tag_synthetic(storage, "r", lambda y, i: None if i == 0 else i % 3 == 0)
    split = read_split(storage, "r", "synthetic", "train", classes)
    assert split.images.shape == (64, 32, 32, 3) and set(split.techniques) == {"vanilla", "domain"} and split.judged()
    kept = read_split(storage, "r", "synthetic", "train", classes).accepted_only()
    expected = [i for i, a in zip(split.ids, split.accepted) if a is True]
    assert list(kept.ids) == expected == list(split.accepted_only().ids) and len(kept) == 2 * 10
    assert resolve_synthetic_source("auto", storage, "r") == resolve_synthetic_source("curated", storage, "r") == "curated"
    assert resolve_synthetic_source("all", storage, "r") == "all"
    catalog = read_split(storage, "r", "synthetic", "train", classes, images=False)  # planning: no decoding
    assert catalog.images.shape == (64, 0, 0, 3) and list(catalog.ids) == list(split.ids)
    # The train stage reads the curated images for synthetic train/val, never filters a test split.
    data = SplitCache(storage, "r", classes, synthetic_source="curated")
    assert len(data.selected("synthetic", "train")) == 20 and len(data.selected("synthetic", "test")) == 32
    assert len(data.train_val("synthetic", 0.5, 0)[0]) == 20


def test_ablation_config_is_validated():
    from synth.config import ConfigError

    cfg = load_config(None, ["train.ablation.techniques=[all]", "train.ablation.curation=true", "train.ablation.images_per_class=4"])
    assert cfg.train.ablation.techniques == ["all"] and cfg.train.ablation.curation and cfg.train.ablation.images_per_class == 4
    for bad, match in (
        ("train.ablation.techniques=[vanilla,hostile]", "train.ablation.techniques"),
        ("train.ablation.techniques=[]", "train.ablation.techniques"),
        ("train.ablation.images_per_class=0", "train.ablation.images_per_class"),
        ("dataset.synthetic_source=some", "dataset.synthetic_source"),
        ("train.test_domains=[real,hostile]", "train.test_domains"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    assert "adversarial" in load_config(None, []).train.test_domains


def test_ablation_cells_draw_equal_images_per_class_by_seed(tmp_path):
    storage = Storage(str(tmp_path))
    cfg = make_config(tmp_path, "r", "train.ablation.techniques=[all]", "train.ablation.curation=true")
    classes, k = cfg.prompts.classes, len(cfg.prompts.classes)
    write_dataset(storage, "r", classes)
    # vanilla: even rows (16 per class); domain: odd rows; accepted: rows 0-11 of each class (12 per class).
    tag_synthetic(storage, "r", lambda y, i: i < 12)
    catalog = read_split(storage, "r", "synthetic", "train", classes, images=False)
    plan = plan_ablation(cfg, catalog, "all")
    assert [c.experiment for c in plan.cells] == ["ablate-technique-vanilla", "ablate-technique-domain", "ablate-curated", "ablate-uncurated"]
    assert plan.images_per_class == 12 and plan.images_per_class_from == "smallest available"
    assert plan.available["ablate-technique-vanilla"] == [16] * k and plan.available["ablate-curated"] == [12] * k
    cells = {c.experiment: c for c in plan.cells}
    for cell in plan.cells:
        drawn = ablation_train_set(catalog, cell, "all", k, seed=0)
        assert np.bincount(drawn.labels, minlength=k).tolist() == [12] * k  # the same per class in every cell
        again, other = ablation_train_set(catalog, cell, "all", k, seed=0), ablation_train_set(catalog, cell, "all", k, seed=1)
        assert list(again.ids) == list(drawn.ids) and list(other.ids) != list(drawn.ids)  # exact ids by seed
    vanilla = ablation_train_set(catalog, cells["ablate-technique-vanilla"], "all", k, 0)
    assert set(vanilla.techniques) == {"vanilla"}
    curated, uncurated = (ablation_train_set(catalog, cells[e], "all", k, 0) for e in ("ablate-curated", "ablate-uncurated"))
    assert len(curated) == len(uncurated) == 12 * k and set(curated.accepted) == {True}
    assert False in set(uncurated.accepted)  # drawn from all images, rejected ones included
    # Under a curated source the technique cells draw from accepted images only: 6 per class each.
    assert plan_ablation(cfg, catalog, "curated").images_per_class == 6
    # Too many asked for: a clear error naming the fix.
    big = make_config(tmp_path, "r", "train.ablation.techniques=[vanilla]", "train.ablation.images_per_class=17")
    with pytest.raises(ValueError, match="ablate-technique-vanilla has too few .*Fix: lower train.ablation.images_per_class"):
        plan_ablation(big, catalog, "all")
    missing = make_config(tmp_path, "r", "train.ablation.techniques=[llm]")
    with pytest.raises(ValueError, match="ablate-technique-llm has too few"):
        plan_ablation(missing, catalog, "all")
    with pytest.raises(ValueError, match="train.ablation.images_per_class"):
        ablation_draw(catalog, k, 33, seed=0)
    untagged = read_split(storage, "r", "real", "train", classes, images=False)
    with pytest.raises(ValueError, match="no curate verdicts.*train.ablation.curation=false"):
        plan_ablation(make_config(tmp_path, "r", "train.ablation.curation=true"), untagged, "all")


def test_filter_keeping_one_class_changes_the_model(root, ray_cluster):
    """Only class 0's synthetic images accepted: the curated model calls (nearly) everything class 0; all images: it does not."""
    cells = {}
    for run, source in (("one-class-curated", "auto"), ("one-class-all", "all")):
        cfg = make_config(root, run, "train.experiments=[synthetic]", "train.batch_size=32", f"dataset.synthetic_source={source}")
        storage = Storage.from_config(cfg.storage)
        write_dataset(storage, run, cfg.prompts.classes)
        tag_synthetic(storage, run, lambda y, i: y == 0)
        write_hostile(storage, run, cfg.prompts.classes)
        summary = run_train(cfg, storage)
        cells[source] = storage.read_json(Layout(run).train_metrics("train-synthetic", 0))
        assert summary["synthetic_source"] == {"setting": source, "resolved": "curated" if source == "auto" else "all"}
        assert summary["test_domains"] == ["real", "synthetic", "mixture", "adversarial"] and not summary["test_domains_skipped"]
    curated, everything = cells["auto"], cells["all"]
    assert curated["synthetic_source"] == "curated" and everything["synthetic_source"] == "all"
    assert curated["train_images"] == 32 and everything["train_images"] == 6 * 32
    predicted = np.array(curated["test"]["real"]["confusion_matrix"]).sum(axis=0)  # columns: predicted class
    assert predicted[0] >= 0.95 * predicted.sum(), predicted
    spread = np.array(everything["test"]["real"]["confusion_matrix"]).sum(axis=0)
    assert spread[0] < 0.5 * spread.sum() and everything["test"]["real"]["accuracy"] > 0.8
    # The fooling rate is the accuracy on hostile images, stored like any test domain.
    # The one-class model calls nearly every hostile image class 0, so it is fooled by at most class 0's share.
    assert everything["test"]["adversarial"]["n"] == curated["test"]["adversarial"]["n"] == 6 * 8
    assert curated["test"]["adversarial"]["accuracy"] < 0.5


def test_ablation_cells_leave_out_the_other_class(tmp_path):
    """With dataset.hostile=other_class the synthetic train split holds hostile images (label K):
    ablation cells compare the K classes' techniques and curation, so none of them draws those."""
    cfg = make_config(tmp_path, "r", "dataset.hostile=other_class", "prompts.hostile_per_class=3",
                      "train.ablation.techniques=[all]", "train.ablation.curation=true")  # fmt: skip
    k = len(cfg.prompts.classes)
    labels = np.repeat(np.arange(k + 1), 8)
    catalog = Split(
        np.zeros((len(labels), 0, 0, 3), np.uint8), labels, np.array([f"{y}-{i}" for i, y in enumerate(labels)], dtype=object),
        np.array(["hostile" if y == k else "vanilla" for y in labels], dtype=object), np.full(len(labels), True, dtype=object),
    )  # fmt: skip
    plan = plan_ablation(cfg, catalog, "all")
    assert [c.experiment for c in plan.cells] == ["ablate-technique-vanilla", "ablate-curated", "ablate-uncurated"]
    assert all(counts == [8] * k for counts in plan.available.values()) and plan.images_per_class == 8
    for cell in plan.cells:
        drawn = ablation_train_set(catalog, cell, "all", k, seed=0)
        assert len(drawn) == 8 * k and k not in set(drawn.labels) and "hostile" not in set(drawn.techniques)


@pytest.fixture(scope="module")
def ablation(root, ray_cluster):
    # Batch 16: an ablation cell's 48 images make 3 steps an epoch, so 24 steps are 8 epochs (8 checkpoints
    # and reports, each waiting on Ray Train's controller), not 24 as at batch 32.
    cfg = make_config(
        root, "ablation", "train.experiments=[real]", "train.ablation.techniques=[vanilla]", "train.ablation.curation=true",
        "train.batch_size=16",
    )  # fmt: skip
    storage = Storage.from_config(cfg.storage)
    write_dataset(storage, cfg.run, cfg.prompts.classes)
    # 16 accepted per class, 8 of each technique: the source resolves to curated, so 8 per class in every cell.
    tag_synthetic(storage, cfg.run, lambda y, i: i % 4 in (0, 3))
    return cfg, storage, run_train(cfg, storage)


@pytest.mark.slow  # 4 cells through Ray Train, then the rerun
def test_ablation_cells_train_through_the_one_core_and_resume(ablation, capsys):
    cfg, storage, summary = ablation
    layout, k = Layout(cfg.run), len(cfg.prompts.classes)
    experiments = ["ablate-technique-vanilla", "ablate-curated", "ablate-uncurated"]
    assert summary["cells_trained"] == 4 and summary["ablation"]["images_per_class"] == 8
    assert summary["synthetic_source"]["resolved"] == "curated"
    assert summary["test_domains_skipped"] == ["adversarial"]  # no hostile images in this run: skipped, no crash
    catalog = read_split(storage, cfg.run, "synthetic", "train", cfg.prompts.classes)
    plan = plan_ablation(cfg, catalog, "curated")
    for cell in plan.cells:
        m = storage.read_json(layout.train_metrics(cell.experiment, 0))
        assert m["train_domain"] == "synthetic" and m["ablation"]["selection"] == cell.selection
        assert m["train_images"] == 8 * k and m["steps"] == cfg.train.steps and m["architecture"] == architecture(k, 0.125)
        assert m["train_ids_sha256"] == ablation_train_set(catalog, cell, "curated", k, 0).ids_digest()
        assert set(m["test"]) == {"real", "synthetic", "mixture"} and m["test"]["real"]["accuracy"] > 0.5
    assert [c.experiment for c in plan.cells] == experiments
    again = run_train(cfg, storage)
    assert again["cells_trained"] == 0 and again["cells_already_done"] == 4
    assert "test domain 'adversarial' skipped" in capsys.readouterr().out
