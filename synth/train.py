"""The train stage: the train-domain x test-domain matrix, one CNN, one budget, several seeds.

Three layers, in Ray's idiom, top to bottom in this file:

1. :func:`train_loop_per_worker` -- run by every Ray Train worker (DDP rank): the training core
   (:class:`synth.recipe.Run`) plus the few Ray lines, marked ``# [ray]``: where the data comes
   from, the checkpoint to resume from, the report after each epoch. After the last step rank 0
   scores the final model on the validation split and every test split (full test-time
   augmentation, one batched pass) and returns the scores with the model.
2. :func:`train_experiment` -- the driver for one (train domain, seed) cell: a ``TorchTrainer``
   whose run name and storage folder are deterministic, so rerunning the same config resumes
   the same Ray Train run (Train V2 restores the latest checkpoint by itself).
3. :func:`run_train` -- every cell of ``train.experiments x train.seeds``; cells whose
   ``metrics.json`` already holds the same result hash are skipped; writes ``summary.json``.

Experiments and storage (``<run>/train/<experiment>/seed-<seed>/``):

- experiments ``train-real``, ``train-synthetic``, ``train-mixture``: train on that domain's
  train split; the mixture is :func:`synth.splits.mix` of the two train splits at
  ``train.mixture_synthetic_fraction`` with the cell's seed (the same images tune's trial at
  that ratio and seed trains on); validation uses the same domain (the mixture: the two val
  splits mixed by the same rule);
- every model is tested on ``real``, ``synthetic``, ``mixture`` (the union of both tests) and
  ``adversarial`` (the hostile images: accuracy there is the fooling rate; skipped with a
  warning when the run has none);
- synthetic train/val images are read as ``dataset.synthetic_source`` resolves (all | curated,
  :func:`synth.splits.resolve_synthetic_source`); metrics and summary record which;
- ablation cells (``train.ablation``, :func:`plan_ablation`): ``ablate-technique-<t>`` trains on
  technique t's synthetic train images only, ``ablate-curated`` / ``ablate-uncurated`` on the
  accepted images / as many drawn from all of them; every ablation cell trains on the same
  number of images per class (:func:`synth.splits.ablation_draw`, drawn per seed) and validates
  on the whole synthetic val split (the same yardstick for every cell, whatever its selection);
  same seeds, network, recipe, steps and worker path as every other cell;
- ``metrics.json`` (:class:`synth.records.TrainMetrics`), ``model.pt``
  (:func:`synth.model.load_model`), ``ray/<name>/`` (Ray Train's run folder: checkpoints, of
  which the 2 newest are kept).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from synth.config import HOSTILE, TRAIN_TECHNIQUES, Config, TrainConfig, label_classes, to_dict
from synth.model import architecture, model_bytes
from synth.progress import ProgressRelay, say
from synth.recipe import STATE_FILE, Run, budget, result_hash
from synth.records import TrainMetrics
from synth.splits import (
    UNIONS,
    Split,
    SplitCache,
    ablation_draw,
    class_counts,
    needed_splits,
    present_test_domains,
    read_split,
    resolve_synthetic_source,
)
from synth.storage import Layout, Storage

log = logging.getLogger(__name__)

CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"  # see make_trainer


def experiment_name(train_domain: str) -> str:
    return f"train-{train_domain}"


# ============================================================================================
# 0. Ablation: which synthetic train images each ablation cell gets
# ============================================================================================

SYNTHETIC_READERS = ("synthetic", "mixture")  # train domains that read the synthetic train split


@dataclass(frozen=True)
class AblationCell:
    """One ablation experiment: its name, which synthetic train images, and how many per class."""

    experiment: str  # ablate-technique-<t> | ablate-curated | ablate-uncurated
    selection: str  # technique:<t> | curated | uncurated
    images_per_class: int


@dataclass
class AblationPlan:
    images_per_class: int
    images_per_class_from: str  # "train.ablation.images_per_class" or "smallest available"
    cells: list[AblationCell]
    available: dict[str, list[int]]  # experiment -> images per class its selection offers


def ablation_pool(synthetic_train: Split, selection: str, source: str) -> Split:
    """The synthetic train images an ablation selection draws from.

    Technique cells read the synthetic source as every synthetic cell does (accepted images only
    when it resolved to curated); the curation pair compares the accepted images with all of them.
    """
    # Hostile examples (the class "other" with dataset.hostile=other_class) are no technique of a class.
    hostile = synthetic_train.techniques == HOSTILE
    if hostile.any():  # a copy only where there are some
        synthetic_train = synthetic_train.take(np.flatnonzero(~hostile))
    if selection == "curated":
        return synthetic_train.accepted_only()
    if selection == "uncurated":
        return synthetic_train
    technique = selection.removeprefix("technique:")
    pool = synthetic_train.accepted_only() if source == "curated" else synthetic_train
    return pool.take(np.flatnonzero(pool.techniques == technique))


def plan_ablation(cfg: Config, catalog: Split, source: str) -> Optional[AblationPlan]:
    """The ablation cells of ``train.ablation`` and their common images per class; None when it is off.

    ``catalog``: the synthetic train split (images need not be decoded). Raises naming the fix
    when a compared set has too few images of a class for the quota (no cell is silently skipped:
    a missing row would make the table compare unequal things).
    """
    a, k = cfg.train.ablation, len(cfg.prompts.classes)  # the K classes: "other" is in no ablation cell
    if a.techniques is None and not a.curation:
        return None
    techniques: list[str] = []
    if a.techniques == ["all"]:
        present = {str(t) for t in catalog.techniques} - {"", HOSTILE}
        techniques = [t for t in TRAIN_TECHNIQUES if t in present] + sorted(present - set(TRAIN_TECHNIQUES))
        if not techniques:
            raise ValueError(
                "train.ablation.techniques=[all], but the synthetic train split has no technique column values. "
                "Fix: rebuild the dataset (python -m ray_jobs.dataset <config>) so it records each image's technique"
            )
    elif a.techniques:
        techniques = list(a.techniques)
    if a.curation and not catalog.judged():
        raise ValueError(
            "train.ablation.curation=true compares curated with uncurated images, but the synthetic train split holds no "
            "curate verdicts. Fix: run the curate stage and then the dataset stage, or set train.ablation.curation=false"
        )
    selections = {f"ablate-technique-{t}": f"technique:{t}" for t in techniques}
    if a.curation:
        selections.update({"ablate-curated": "curated", "ablate-uncurated": "uncurated"})
    available = {e: class_counts(ablation_pool(catalog, sel, source), k) for e, sel in selections.items()}
    n = a.images_per_class if a.images_per_class is not None else min(min(c) for c in available.values())
    for e, counts in available.items():
        short = [cfg.prompts.classes[y] for y, c in enumerate(counts) if c < max(n, 1)]
        if short:
            asked = f"train.ablation.images_per_class={n}" if a.images_per_class is not None else "at least 1 per class"
            raise ValueError(
                f"ablation cell {e} has too few synthetic train images of class {short[0]!r} "
                f"({counts[cfg.prompts.classes.index(short[0])]}; {asked} needed{'' if source == 'all' else ', curated ones only'}). "
                f"Fix: lower train.ablation.images_per_class (null: the smallest available count), drop "
                f"{selections[e].removeprefix('technique:')!r} from train.ablation.techniques, or make more images of it"
            )
    return AblationPlan(
        images_per_class=n,
        images_per_class_from="train.ablation.images_per_class" if a.images_per_class is not None else "smallest available",
        cells=[AblationCell(e, sel, n) for e, sel in selections.items()],
        available=available,
    )


def ablation_train_set(synthetic_train: Split, cell: AblationCell, source: str, num_classes: int, seed: int) -> Split:
    """The exact training set of an ablation cell for one seed."""
    pool = ablation_pool(synthetic_train, cell.selection, source)
    return ablation_draw(pool, num_classes, cell.images_per_class, seed, name=f"ablation cell {cell.experiment}")


# ============================================================================================
# 1. Worker: the training core plus the few Ray lines
# ============================================================================================


def train_loop_per_worker(config: dict) -> Optional[dict]:
    """One Ray Train worker (DDP rank): train, validate and checkpoint each epoch, score at the end.

    ``config`` (built by :func:`worker_config`): ``hp`` (TrainConfig as a dict), ``seed``,
    ``classes``, ``config_hash``, ``train`` / ``val``: object refs to ``(images uint8 (N, H, W, 3),
    labels int64 (N,))``, ``tests``: ``{domain: ref}`` of the test splits, and ``progress``: an
    optional :class:`synth.progress.ProgressRelay` sink, to which rank 0 puts each epoch's record
    and, after restoring a checkpoint, ``{"resumed_from_epoch": epoch}``. Rank 0 returns (Ray
    keeps rank 0's value) the scores, the model's bytes, its progress and its timings (steps,
    scoring, when it started and finished); other ranks return None.
    """
    import ray
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    started_at = time.time()
    hp, seed, classes = config["hp"], config["seed"], config["classes"]
    context = ray.train.get_context()  # [ray]
    rank, world = context.get_world_rank(), context.get_world_size()  # [ray]
    run = Run(
        hp, len(classes), seed, ray.train.torch.get_device(),  # [ray]
        train=ray.get(config["train"]), val=ray.get(config["val"]),  # [ray] zero-copy from the object store
        config_hash=config["config_hash"], rank=rank, world=world, threads=config.get("threads"),
    )  # fmt: skip

    checkpoint = ray.train.get_checkpoint()  # [ray] the latest one, after a worker or driver failure
    sink = config.get("progress")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.restore(os.path.join(folder, STATE_FILE))
        if rank == 0 and sink is not None:
            sink.put({"resumed_from_epoch": run.progress.epoch})
    for record in run.fit(wrap=ray.train.torch.prepare_model):  # [ray] DDP when world > 1
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:  # one copy of the (identical) DDP weights is enough
                run.save(os.path.join(folder, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(folder)  # [ray]
            ray.train.report(record, checkpoint=checkpoint)  # [ray] every rank: it is a barrier
        if rank == 0 and sink is not None:
            sink.put({**record, "steps": hp["steps"]})
    if rank != 0:
        return None
    sets = {"val": ray.get(config["val"]), **{d: ray.get(ref) for d, ref in config["tests"].items()}}  # [ray]
    unions = {name: parts for name, parts in UNIONS.items() if name in config["test_domains"]}
    tick = time.perf_counter()
    scores = run.scores(sets, classes, unions)
    return {
        "scores": scores,
        "score_seconds": time.perf_counter() - tick,
        "model": model_bytes(run.net.cpu(), classes),
        "progress": dataclasses.asdict(run.progress),
        "train_seconds": run.train_seconds,
        "device": run.device.type,
        "started_at": started_at,  # when this worker began: the driver's start-up and tear-down follow from it
        "finished_at": time.time(),
    }


# ============================================================================================
# 2. Driver: one (train domain, seed) cell through Ray Train
# ============================================================================================


def config_hash(
    cfg: Config, train_domain: str, seed: int, synthetic_source: Optional[str] = None, ablation: Optional[AblationCell] = None
) -> str:  # fmt: skip
    """What decides a cell's result (:func:`synth.recipe.result_hash`); the fraction only for the mixture.

    ``synthetic_source`` (resolved: all | curated) counts for cells that read synthetic train
    images; an ablation cell adds its selection and images per class.
    """
    fraction = cfg.train.mixture_synthetic_fraction if train_domain == "mixture" else None
    what: dict = {}
    if synthetic_source is not None and (train_domain in SYNTHETIC_READERS or ablation is not None):
        what["synthetic_source"] = synthetic_source
    if ablation is not None:
        what["ablation"] = {"selection": ablation.selection, "images_per_class": ablation.images_per_class}
    return result_hash(cfg, kind="train", train_domain=train_domain, seed=seed, synthetic_fraction=fraction, **what)


def worker_config(
    hp: TrainConfig | dict, seed: int, classes: list[str], train_ref, val_ref, tests: dict, test_domains: list[str],
    cfg_hash: str = "", progress=None, threads: Optional[int] = None,
) -> dict:  # fmt: skip
    """The ``train_loop_config`` :func:`train_loop_per_worker` expects (refs from ``ray.put``).

    ``tests``: ``{domain: ref}`` of the stored test splits that ``test_domains`` need (a union
    domain such as "mixture" is scored from its parts).
    """
    hp = to_dict(hp) if dataclasses.is_dataclass(hp) else dict(hp)
    return {
        "hp": hp, "seed": seed, "classes": list(classes), "config_hash": cfg_hash, "train": train_ref, "val": val_ref,
        "tests": tests, "test_domains": list(test_domains), "progress": progress, "threads": threads,
    }  # fmt: skip


def _resolve_use_gpu(use_gpu: Optional[bool]) -> bool:
    import ray

    return bool(use_gpu) if use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1


def _check_train_v2() -> None:
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise ValueError(
            f"synth.train needs Ray Train V2 (its resume-by-run-name semantics). Fix: unset {V2_ENABLED_ENV_VAR} or set it to 1"
        )


def make_trainer(
    train_loop_config: dict,
    num_workers: int,
    use_gpu: bool,
    name: str,
    storage_path: str,
    storage_filesystem=None,
    max_failures: int = 0,
    cpus_per_worker: float = 1.0,
):
    """The ``TorchTrainer`` for :func:`train_loop_per_worker` (also used by the benchmark)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_train_v2()
    # Train V2's controller collects reports by polling workers, every 2 s by default, and a
    # worker's second unconsumed report blocks: epochs shorter than the poll interval (seconds
    # on a GPU) would all stretch to 2 s. Poll faster; an explicit setting still wins.
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


class _CellProgress:
    """The driver's side of one cell's progress relay: a line per epoch and per restore, and what a restart cost.

    A restarted worker (Ray Train's ``FailureConfig``) continues from the last checkpoint Ray
    Train registered; epochs its predecessor finished after that checkpoint arrive a second time.
    ``epochs_recomputed`` counts them (epochs a driver killed before this one trained are not
    seen here; the partly trained epoch a worker died in is not counted).
    """

    def __init__(self, experiment: str, seed: int):
        self.name = f"{experiment} seed {seed}"
        self.epochs_seen: set[int] = set()
        self.epochs_recomputed = 0

    def __call__(self, item: dict) -> None:
        if "resumed_from_epoch" in item:  # a worker restored a checkpoint (after a worker or driver failure)
            say("train", f"{self.name}: resumed from the checkpoint of epoch {item['resumed_from_epoch']}")
            return
        self.epochs_recomputed += item["epoch"] in self.epochs_seen
        self.epochs_seen.add(item["epoch"])
        say("train", (
            f"{self.name}: epoch {item['epoch']}, step {item['step']}/{item['steps']}, "
            f"train loss {item['train_loss']:.3f}, val accuracy {100 * item['val_accuracy']:.1f}%"
        ), progress=True)  # fmt: skip


def train_experiment(
    cfg: Config, storage: Storage, train_domain: str, seed: int, data: Optional[SplitCache] = None,
    relay: Optional[ProgressRelay] = None, refs: Optional[dict] = None, ablation: Optional[AblationCell] = None,
    test_domains: Optional[list[str]] = None,
) -> dict:  # fmt: skip
    """Train one cell (or resume it), score it, store ``model.pt`` and ``metrics.json``; returns the metrics.

    ``data``, ``relay`` (the progress queue from the worker) and ``refs`` (the arrays already in
    Ray's object store, by split) may be shared by the cells of a stage. ``ablation``: an
    ablation cell (``train_domain`` is then "synthetic"); ``test_domains``: the ones present
    (:func:`synth.splits.present_test_domains`; worked out here when not given).
    """
    import ray

    from synth.runtime import code_version

    start = time.perf_counter()
    t = cfg.train
    classes = label_classes(cfg)
    if ablation is not None:
        train_domain = "synthetic"
    layout = Layout(cfg.run)
    experiment = ablation.experiment if ablation is not None else experiment_name(train_domain)
    tested = list(test_domains) if test_domains is not None else present_test_domains(storage, cfg.run, t.test_domains)
    reads_synthetic = train_domain in SYNTHETIC_READERS
    if data is not None:
        source = data.synthetic_source
    else:
        source = resolve_synthetic_source(cfg.dataset.synthetic_source, storage, cfg.run) if reads_synthetic else "all"
    cfg_hash = config_hash(cfg, train_domain, seed, source, ablation)

    # 1. Data, checked against the budget before any worker starts.
    if data is None:
        data = SplitCache(storage, cfg.run, classes, synthetic_source=source).load(needed_splits([train_domain], tested))
    if ablation is not None:
        # Ablation cells compare the K classes' techniques; "other" (hostile examples) is in none of them.
        train = ablation_train_set(data.get("synthetic", "train"), ablation, source, len(cfg.prompts.classes), seed)
        val = data.get("synthetic", "val")  # the whole split: one yardstick for every ablation cell
    else:
        train, val = data.train_val(train_domain, t.mixture_synthetic_fraction, seed)
    if len(val) == 0:
        raise ValueError(
            f"the {train_domain} validation split is empty. Fix: set dataset.val_fraction > 0 and rebuild the dataset"
        )
    budget(len(train), t.batch_size, t.steps, t.num_workers)

    # 2. Ray Train. Same name + storage path on a rerun: Train V2 restores the run's latest
    #    checkpoint and get_checkpoint() hands it to the workers, so a killed driver resumes.
    use_gpu = _resolve_use_gpu(t.use_gpu)
    storage_path, filesystem = storage.ray_storage(layout.train_ray_results(experiment, seed))
    refs = {} if refs is None else refs

    def put(key: tuple, split) -> "ray.ObjectRef":  # each array set goes to the object store once a stage
        if key not in refs:
            refs[key] = ray.put(split.arrays())
        return refs[key]

    drawn = (seed,) if train_domain in UNIONS else ()  # the mixture's sets are drawn per seed
    train_key = (experiment, "train", seed) if ablation is not None else (train_domain, "train", *drawn)
    val_key = ("ablation", "val") if ablation is not None else (train_domain, "val", *drawn)
    tests = {d: put((d, split), data.get(d, split)) for d, split in sorted(needed_splits([], tested))}
    own_relay = relay is None
    relay = relay or ProgressRelay()
    trainer = make_trainer(
        worker_config(t, seed, classes, put(train_key, train), put(val_key, val),
                      tests, tested, cfg_hash, relay.sink, threads=max(1, int(t.cpus_per_worker))),
        num_workers=t.num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=t.cpus_per_worker,
        # The hash keeps a changed recipe from resuming an old run's checkpoints.
        name=f"{cfg.run}.{experiment}.seed-{seed}.{cfg_hash}",
        storage_path=storage_path,
        storage_filesystem=filesystem,
        max_failures=t.max_failures,
    )
    log.debug("train: %s seed %d on %d worker(s), gpu=%s -> %s", experiment, seed, t.num_workers, use_gpu, storage_path)
    fit_called = time.time()
    cell_progress = _CellProgress(experiment, seed)
    try:
        result = relay.run(trainer.fit, cell_progress)
    finally:
        if own_relay:
            relay.close()
    fit_returned = time.time()
    if result.error is not None:
        raise result.error
    out = result.return_value
    if not out:
        raise RuntimeError(f"Ray Train finished {experiment} seed {seed} without a result; see {result.path}")

    # 3. The final model and its scores, as rank 0 measured them.
    storage.write_bytes(layout.train_model(experiment, seed), out["model"])
    progress, scores = out["progress"], out["scores"]
    metrics = TrainMetrics(
        experiment=experiment,
        train_domain=train_domain,
        seed=seed,
        classes=classes,
        test={d: scores[d] for d in tested},
        val=scores["val"],
        architecture=architecture(len(classes), t.width),
        steps=t.steps,
        batch_size=t.batch_size,
        train_images=len(train),
        train_ids_sha256=train.ids_digest(),
        synthetic_fraction=t.mixture_synthetic_fraction if train_domain == "mixture" else None,
        num_workers=t.num_workers,
        history=progress["history"],
        wall_seconds=round(time.perf_counter() - start, 3),
        train_seconds=round(out["train_seconds"], 3),
        score_seconds=round(out["score_seconds"], 3),
        ray_startup_seconds=round(out["started_at"] - fit_called, 3),
        ray_teardown_seconds=round(fit_returned - out["finished_at"], 3),
        train_images_per_second=round(progress["step"] * t.batch_size / out["train_seconds"], 2) if out["train_seconds"] else 0.0,
        code_version=code_version(),
        config_hash=cfg_hash,
        resumed_from_epochs=list(progress["resumed_from_epochs"]),
        epochs_recomputed=cell_progress.epochs_recomputed,
        device=out["device"],
        synthetic_source=source if reads_synthetic else None,
        ablation=None if ablation is None else {
            "selection": ablation.selection,
            "technique": ablation.selection.removeprefix("technique:") if ablation.selection.startswith("technique:") else None,
            "curated": {"curated": True, "uncurated": False}.get(ablation.selection),
            "images_per_class": ablation.images_per_class,
            "validation": "synthetic/val (whole split)",
        },
    )  # fmt: skip
    storage.write_json(layout.train_metrics(experiment, seed), metrics.to_json())
    tested = ", ".join(f"{d} {100 * s['accuracy']:.1f}%" for d, s in metrics.test.items())
    say("train", f"{experiment} seed {seed}: val {100 * metrics.val['accuracy']:.1f}%, test {tested} "
        f"({metrics.wall_seconds:.1f} s, of which training steps {metrics.train_seconds:.1f} s)")  # fmt: skip
    return metrics.to_json()


# ============================================================================================
# 3. Stage: the experiment matrix, resumable cell by cell
# ============================================================================================


def _done(storage: Storage, key: str, cfg_hash: str, test_domains: list[str]) -> Optional[dict]:
    """The stored metrics of a finished cell made with this config, else None."""
    metrics = storage.read_json_or_none(key)
    if not isinstance(metrics, dict) or metrics.get("config_hash") != cfg_hash or not set(test_domains) <= set(metrics.get("test", {})):
        return None
    return metrics


def _matrix(cells: list[dict]) -> dict:
    """Mean and spread over seeds of test accuracy, per experiment and test domain."""
    from synth.stats import mean_std

    out: dict[str, dict] = {}
    for m in cells:
        for test_domain, scores in m["test"].items():
            out.setdefault(m["experiment"], {}).setdefault(test_domain, []).append(scores["accuracy"])
    return {
        exp: {d: dict(zip(("mean", "std"), mean_std(a)), n=len(a), accuracies=a) for d, a in row.items()}
        for exp, row in out.items()
    }


def run_train(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or resume) every cell of ``train.experiments x train.seeds`` and the ablation's; returns the summary.

    Writes ``<run>/train/config.yaml`` and ``<run>/train/summary.json``: per-cell status and
    accuracies, the accuracy matrix (mean/std over seeds), the data counts, the synthetic source
    read and, when it ran, the ablation (its cells and images per class).
    """
    from synth.runtime import init_ray, write_stage_config, write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout, t = Layout(cfg.run), cfg.train
    classes = label_classes(cfg)

    # 1. Fail fast on storage; note the config; clear interrupted writes.
    storage.check_writable()
    write_stage_config(storage, cfg, "train")
    removed = storage.remove_partials(layout.stage("train"))

    # 2. What the cells read: the synthetic source, the test domains present, the ablation's selections.
    ablating = t.ablation.techniques is not None or t.ablation.curation
    reads_synthetic = ablating or any(d in SYNTHETIC_READERS for d in t.experiments)
    source = resolve_synthetic_source(cfg.dataset.synthetic_source, storage, cfg.run) if reads_synthetic else "all"
    tested = present_test_domains(storage, cfg.run, t.test_domains)
    plan = None
    if ablating:
        catalog = read_split(storage, cfg.run, "synthetic", "train", classes, images=False)
        plan = plan_ablation(cfg, catalog, source)

    # 3. Which cells are already done with this exact config.
    cells: list[tuple[str, int, Optional[AblationCell]]] = [(d, s, None) for d in t.experiments for s in t.seeds]
    cells += [("synthetic", s, a) for a in (plan.cells if plan else []) for s in t.seeds]

    def name(d: str, a: Optional[AblationCell]) -> str:
        return a.experiment if a is not None else experiment_name(d)

    done = {}
    for d, s, a in cells:
        m = _done(storage, layout.train_metrics(name(d, a), s), config_hash(cfg, d, s, source, a), tested)
        if m is not None:
            done[(name(d, a), s)] = m
    todo = [c for c in cells if (name(c[0], c[2]), c[1]) not in done]
    experiments = list(dict.fromkeys(name(d, a) for d, _, a in cells))
    say("train", f"{len(cells)} cells ({', '.join(experiments)} x seeds {list(t.seeds)}): {len(done)} done, {len(todo)} to train")

    # 4. Train the rest; the data is decoded once and shared.
    data: Optional[SplitCache] = None
    results: dict[tuple[str, int], dict] = dict(done)
    if todo:
        pairs = needed_splits({"synthetic" if a else d for d, _, a in todo}, tested)
        data = SplitCache(storage, cfg.run, classes, synthetic_source=source).load(pairs)
        init_ray(cfg.ray)
        relay, refs = ProgressRelay(), {}  # one queue actor for every cell; each split put once
        try:
            for d, s, a in todo:
                results[(name(d, a), s)] = train_experiment(
                    cfg, storage, d, s, data=data, relay=relay, refs=refs, ablation=a, test_domains=tested
                )
        finally:
            relay.close()

    # 5. Summary.
    keys = [(name(d, a), s) for d, s, a in cells]
    ordered = [results[k] for k in keys]
    summary = {
        "cells": [
            {
                "experiment": m["experiment"],
                "seed": m["seed"],
                "status": "skipped (already done)" if k in done else "trained",
                "metrics": storage.uri(layout.train_metrics(m["experiment"], m["seed"])),
                "val_accuracy": m["val"]["accuracy"],
                "test_accuracy": {d: x["accuracy"] for d, x in m["test"].items()},
                "train_images": m.get("train_images"),
                "resumed_from_epochs": m.get("resumed_from_epochs", []),
                "epochs_recomputed": m.get("epochs_recomputed", 0),
                "wall_seconds": m["wall_seconds"],
            }
            for k, m in zip(keys, ordered)
        ],
        "accuracy": _matrix(ordered),
        "cells_total": len(cells),
        "cells_already_done": len(done),
        "cells_trained": len(todo),
        "synthetic_source": {"setting": cfg.dataset.synthetic_source, "resolved": source} if reads_synthetic else None,
        "test_domains": tested,
        "test_domains_skipped": [d for d in t.test_domains if d not in tested],
        "ablation": None if plan is None else {
            "images_per_class": plan.images_per_class,
            "images_per_class_from": plan.images_per_class_from,
            "validation": "the whole synthetic val split, the same for every ablation cell",
            "cells": {c.experiment: {"selection": c.selection, "available_per_class": plan.available[c.experiment]} for c in plan.cells},
        },
        "data": data.counts() if data else None,
        "partial_writes_removed": removed,
        "wall_seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip
    if plan is not None:
        say("train", f"ablation: {len(plan.cells)} cells, {plan.images_per_class} synthetic images per class each "
            f"({plan.images_per_class_from}), synthetic source {source}")  # fmt: skip
    return write_stage_summary(storage, cfg, "train", summary)
