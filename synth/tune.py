"""The tune stage: a Ray Tune sweep of the synthetic:real mixing ratio r, crossed with seeds.

The question (experiment 3): what mixture of synthetic and real images trains the best
classifier? Every trial trains the train stage's CNN with the train stage's recipe and step
budget (``train.*``); only the composition of its training set changes:

- ``tune.mode=fixed_budget``: N = min(real train, synthetic train) images, round(r x N) of them
  synthetic and the rest real -- the train stage's mixture at every r, so only the composition
  changes (r=0 is real-only, r=1 synthetic-only, at the same size);
- ``tune.mode=augment``: every real train image plus round(r x real train) synthetic ones.

Which images a trial takes is :func:`synth.splits.mix`, the train stage's mixing rule: the draw
varies with the seed, and for one seed the synthetic images at r=0.3 are a subset of those at
r=0.4. A ``fixed_budget`` trial at r = f with seed s is the train stage's mixture cell at f with
seed s: same images, same network, same steps (a test holds them equal).

The objective is accuracy on the **real validation split**: each epoch with one view per image
(what ASHA reads when ``tune.asha`` is on), and at the last step with the full test-time
augmentation (what chooses the best ratio). Test splits (real, synthetic, and their union
"mixture") are scored once, at a trial's last step, for the final table only: nothing selects
on them.

Three layers, in Ray's idiom, top to bottom in this file:

1. :func:`train_trial` -- the Tune function trainable: the training core
   (:class:`synth.recipe.Run`: the train stage's network, optimizer, schedule, augmentation and
   evaluation) on the trial's device (a GPU when the trial has one); the few Ray lines are
   marked ``# [ray]``. It reports and checkpoints every epoch, and writes a record of the
   finished trial to storage before its last report.
2. :func:`make_tuner` -- the ``Tuner``: a grid over ``tune.ratios x tune.seeds``; a deterministic
   experiment name (run, mode and a hash of everything that decides the results); storage under
   ``<run>/tune/ray/``; ``Tuner.restore`` when that experiment already exists, so a killed sweep
   continues and finished trials are not rerun.
3. :func:`run_tune` -- the stage: checks data and plan before any trial starts, runs (or skips)
   the sweep, gathers exactly one row per (ratio, seed), writes the table and summary (the
   report draws the accuracy-vs-ratio plot).

Why a trial trains in its own process instead of launching a ``TorchTrainer``: a CIFAR-sized
CNN trains on one device in seconds, and a nested Ray Train run (controller + worker group per
trial) costs ~20 s of start-up per trial on a 2-core machine -- many times the training itself.
A trial is one model on one device; parallelism comes from running trials side by side
(``tune.max_concurrent_trials``), and Tune reuses trial processes between trials.

Storage (``<run>/tune/``): ``ray/<experiment>/`` (Tune's experiment folder: per-trial results
and the latest per-epoch checkpoint), ``trials/<experiment>/ratio-R-seed-S.json`` (one record per
finished trial), ``results.parquet`` / ``results.json`` (one row per (ratio, seed), the table by
ratio, the best ratio), ``config.yaml``, ``summary.json``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import json
import os
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

from synth.config import Config, TuneConfig, label_classes, to_dict, validate
from synth.progress import say, verbose
from synth.recipe import STATE_FILE, Run, budget, result_hash
from synth.records import RecordError, TrialRecord, TuneRow
from synth.splits import UNIONS, SplitCache, composition, mix, resolve_synthetic_source
from synth.stats import mean_std
from synth.storage import Layout, Storage, trial_tag

log = logging.getLogger(__name__)

STAGE = "tune"
METRIC = "val_accuracy"  # the objective, reported every epoch: accuracy on the real validation split, maximised
TEST_DOMAINS = ("real", "synthetic", "mixture")  # "mixture": the union of the two test splits
# tune.* keys that decide a sweep's results (with train.*, through synth.recipe.result_hash);
# resources and retries are left out so a rerun on a different cluster restores the same sweep.
TUNE_RECIPE = ("ratios", "seeds", "mode", "asha", "asha_grace_steps", "asha_reduction_factor")


# ============================================================================================
# 1. Trial: which images a trial trains on, and the plain-PyTorch loop Tune runs
# ============================================================================================


# The stored splits a sweep reads (decoded once on the driver, shared with every trial): the
# objective is the real validation split; the test splits are for the final table only.
SWEEP_SPLITS = (("real", "train"), ("synthetic", "train"), ("real", "val"), ("real", "test"), ("synthetic", "test"))


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares besides the data: names, the recipe, where to write its record."""

    run: str
    experiment: str
    sweep_hash: str
    mode: str
    hp: dict  # TrainConfig as a dict: the recipe and the step budget
    classes: tuple[str, ...]
    storage: Storage
    threads: int  # torch threads of a trial on a CPU (its tune.cpus_per_trial)


def trial_hash(sweep_hash: str, ratio: float, seed: int) -> str:
    return hashlib.sha256(f"{sweep_hash}/{trial_tag(ratio, seed)}".encode()).hexdigest()[:16]


def read_record(storage: Storage, key: str, expected_hash: str) -> Optional[TrialRecord]:
    """A finished trial's record made with this config, else None (absent, unreadable, stale or malformed)."""
    obj = storage.read_json_or_none(key)
    if not isinstance(obj, dict) or obj.get("trial_hash") != expected_hash:
        return None
    try:
        return TrialRecord.from_json(obj)
    except RecordError as exc:
        log.warning("tune: %s is malformed (%s); the trial runs again", storage.uri(key), exc)
        return None


def train_trial(config: dict, data: SplitCache, context: TrialContext) -> None:
    """One Tune trial: the training core (:class:`synth.recipe.Run`) at ``config["ratio"]`` with ``config["seed"]``.

    Each epoch reports the core's epoch record (``val_accuracy`` is on the real validation
    split, one view per image) with a checkpoint; the report at the last step adds the final
    scores with the full test-time augmentation (``val_real_accuracy``, ``test_<domain>_accuracy``
    for real, synthetic and mixture), the data counts and ``completed: True``. The trial's
    :class:`synth.records.TrialRecord` is written before that last report: a trial restarted
    after it (the driver died before Tune noted the trial done) replays it instead of training.
    """
    import ray.tune  # [ray]
    import torch

    from synth.runtime import code_version

    start = time.perf_counter()
    ratio, seed, hp = float(config["ratio"]), int(config["seed"]), context.hp
    storage, key = context.storage, Layout(context.run).tune_trial(context.experiment, ratio, seed)
    this_hash = trial_hash(context.sweep_hash, ratio, seed)

    # 0. Already finished with this config: report what it measured, train nothing.
    record = read_record(storage, key, this_hash)
    if record is not None:
        ray.tune.report(record.final)  # [ray]
        return

    # 1. The training core on this trial's set, on the trial's device (a GPU when Tune gave it one).
    real, synthetic, real_val = data.get("real", "train"), data.selected("synthetic", "train"), data.get("real", "val")
    train = mix(real, synthetic, ratio, seed, context.mode)  # the train stage's mixing rule, at every r
    n_real, n_synthetic = composition(len(real), len(synthetic), ratio, context.mode)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(hp, len(context.classes), seed, device, train.arrays(), real_val.arrays(), this_hash, threads=context.threads)

    # 2. Resume: Tune hands a restarted trial (failure, or a restored sweep) its last checkpoint.
    checkpoint = ray.tune.get_checkpoint()  # [ray]
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.restore(os.path.join(folder, STATE_FILE))
        log.info("tune: %s resumed from epoch %d", trial_tag(ratio, seed), run.progress.epoch)

    def finish() -> dict:
        """Score the final model once, store the trial's record, return its last report's metrics."""
        sets = {"val": real_val.arrays(), "real": data.get("real", "test").arrays(), "synthetic": data.get("synthetic", "test").arrays()}
        scores = run.scores(sets, context.classes, UNIONS)
        final = {
            **run.progress.history[-1],
            "val_real_accuracy": scores["val"]["accuracy"],
            **{f"test_{d}_accuracy": scores[d]["accuracy"] for d in TEST_DOMAINS},
            "ratio": ratio,
            "seed": seed,
            "train_images": len(train),
            "real_images": n_real,
            "synthetic_images": n_synthetic,
            "completed": True,
        }
        record = TrialRecord(
            experiment=context.experiment, ratio=ratio, seed=seed, mode=context.mode, trial_hash=this_hash,
            classes=list(context.classes), val=scores["val"], test={d: scores[d] for d in TEST_DOMAINS}, final=final,
            history=run.progress.history, architecture=run.net.signature, train_images=len(train), real_images=n_real,
            synthetic_images=n_synthetic, train_ids_sha256=train.ids_digest(), steps=hp["steps"], batch_size=hp["batch_size"], epochs=run.budget.epochs,
            resumed_from_epochs=run.progress.resumed_from_epochs, device=device.type,
            wall_seconds=round(time.perf_counter() - start, 3), train_seconds=round(run.train_seconds, 3),
            finished_at=time.time(), attempt=uuid.uuid4().hex, code_version=code_version(),
        )  # fmt: skip
        storage.write_json(key, record.to_json())
        return final

    # 3. Epochs until the step budget is spent; the last one also carries the final scores
    #    (ASHA stops a trial at its last step, so they must ride on that report).
    reported_final = False
    for metrics in run.fit():
        if run.done:
            metrics, reported_final = finish(), True
        with tempfile.TemporaryDirectory() as folder:
            run.save(os.path.join(folder, STATE_FILE))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))  # [ray]
    if not reported_final:
        # Restored from the last epoch's checkpoint (written only after the record, so this is
        # rare: the record was lost): score and record again from the restored model.
        ray.tune.report(finish())  # [ray]


# ============================================================================================
# 2. Driver: the plan, checked before any trial, and the Tuner
# ============================================================================================


def sweep_hash(cfg: Config) -> str:
    """What decides a sweep's results (:func:`synth.recipe.result_hash`): the recipe, data and the grid and scheduler."""
    u = cfg.tune
    sweep = {k: v for k, v in to_dict(u).items() if k in TUNE_RECIPE and (u.asha or not k.startswith("asha_"))}
    sweep["ratios"], sweep["seeds"] = sorted(sweep["ratios"]), sorted(sweep["seeds"])  # the grid, not its order
    return result_hash(cfg, kind="tune", tune=sweep)


def experiment_name(cfg: Config) -> str:
    """``<run>.tune.<mode>.<hash>``: no timestamp, so a rerun finds (and restores) the same sweep."""
    return f"{cfg.run}.tune.{cfg.tune.mode}.{sweep_hash(cfg)}"


def sweep_plan(n_real: int, n_synthetic: int, cfg: Config) -> list[dict]:
    """Per ratio: images of each domain and the epochs the step budget makes; raises before any trial.

    Catches what only the data can tell: an empty domain, too few synthetic images for the
    largest ratio, a training set smaller than one batch.
    """
    u, t = cfg.tune, cfg.train
    if n_real == 0:
        raise ValueError("the real train split is empty. Fix: rebuild the dataset with real data (dataset.domains)")
    if u.mode == "fixed_budget" and n_synthetic == 0 and any(r > 0 for r in u.ratios):
        raise ValueError(
            "the synthetic train split is empty, so tune.mode=fixed_budget has a budget of 0 images. "
            "Fix: run the generate and dataset stages with 'synthetic' in dataset.domains"
        )
    plan = []
    for r in sorted(u.ratios):
        n_r, n_s = composition(n_real, n_synthetic, r, u.mode)
        try:
            epochs = budget(n_r + n_s, t.batch_size, t.steps).epochs
        except ValueError as exc:
            raise ValueError(f"tune.ratios: the trial at r={r:g} trains on {n_r + n_s:,} images: {exc}") from exc
        plan.append({"ratio": r, "real_images": n_r, "synthetic_images": n_s, "train_images": n_r + n_s, "epochs": epochs})
    return plan


def trial_resources(u: TuneConfig, cluster: dict) -> dict:
    """One trial's resources: ``tune.cpus_per_trial`` CPUs and, by default, one GPU if the cluster has any."""
    gpus = u.gpus_per_trial if u.gpus_per_trial is not None else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    return {"cpu": u.cpus_per_trial, "gpu": gpus}


def max_concurrent_trials(u: TuneConfig, resources: dict, cluster: dict, trials: int) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's CPUs and GPUs fit (at least 1)."""
    if u.max_concurrent_trials is not None:
        return min(u.max_concurrent_trials, trials)
    fits = math.floor(cluster.get("CPU", 1) / resources["cpu"] + 1e-9)
    if resources["gpu"] > 0:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / resources["gpu"] + 1e-9))
    return max(1, min(fits, trials))


def make_scheduler(cfg: Config):
    """ASHA on real-val accuracy with rungs in optimizer steps, or None (FIFO: every trial runs to the end).

    Steps, not epochs, measure progress: in augment mode the training set, and so the epoch
    length, changes with r, while the step budget does not.
    """
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = cfg.tune.asha_grace_steps or max(1, cfg.train.steps // 4)
    return ASHAScheduler(
        time_attr="step", max_t=cfg.train.steps, grace_period=grace, reduction_factor=cfg.tune.asha_reduction_factor
    )


def _trial_name(trial) -> str:
    return trial_tag(float(trial.config["ratio"]), int(trial.config["seed"]))


def _state_readable(path: str, filesystem) -> bool:
    """Whether Tune's newest experiment state under ``path`` parses. A driver killed while Tune
    wrote it leaves an empty or cut file, from which ``Tuner.restore`` cannot rebuild the trials;
    a new Tuner then runs the sweep instead (trials with a record replay it, the rest train)."""
    import pyarrow.fs as pafs

    if filesystem is None:
        filesystem, path = pafs.FileSystem.from_uri(path)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path))
        states = sorted(i.path for i in infos if i.base_name.startswith("experiment_state") and i.base_name.endswith(".json"))
        if not states:
            return True  # nothing to judge: leave it to Tune
        with filesystem.open_input_stream(states[-1]) as f:
            json.loads(f.readall())
        return True
    except (OSError, ValueError) as exc:
        say(STAGE, f"the sweep's saved state under {path} is unreadable ({type(exc).__name__}: a driver was killed while "
            "writing it); starting the sweep anew: finished trials replay their records, the others train")  # fmt: skip
        return False


def make_tuner(cfg: Config, storage: Storage, trainable, concurrency: int, callbacks: Optional[list] = None, restore: bool = True):
    """The sweep's ``Tuner``: restored when its experiment folder exists (and ``restore``), else new; returns (tuner, restored)."""
    from ray import tune

    # Epochs of seconds make Tune's forced experiment snapshots (see CheckpointConfig below)
    # frequent, which is what we want for resumption; only their warning is switched off.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    experiment = experiment_name(cfg)
    storage_path, filesystem = storage.ray_storage(Layout(cfg.run).tune_ray_results)
    path = f"{storage_path.rstrip('/')}/{experiment}"  # a local path, s3://..., or bucket/... with a filesystem
    # A killed driver left the experiment's state behind: continue it. Finished trials keep
    # their results; unfinished ones restart from their last checkpoint; errored ones retry.
    if restore and tune.Tuner.can_restore(path, storage_filesystem=filesystem) and _state_readable(path, filesystem):
        log.info("tune: restoring %s", path)
        # A restored Tuner keeps its stored RunConfig; progress callbacks are not part of it.
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem), True
    tuner = tune.Tuner(
        trainable,
        param_space={"ratio": tune.grid_search(sorted(cfg.tune.ratios)), "seed": tune.grid_search(list(cfg.tune.seeds))},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=make_scheduler(cfg),
            max_concurrent_trials=concurrency,
            reuse_actors=True,  # a trial process keeps torch loaded for the next trial
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=experiment,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            # A resume needs only the latest epoch; the records hold the results. Tune snapshots
            # the experiment whenever a trial has made num_to_keep checkpoints since the last
            # snapshot, so a restore never points at a deleted checkpoint.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=2 if verbose() else 0,  # synth's own progress lines (sweep_progress) instead of Tune's table
        ),
    )
    return tuner, False


# ============================================================================================
# 3. Results: one row per (ratio, seed), the table by ratio, the best ratio
# ============================================================================================

def _row(ratio: float, seed: int, record: Optional[TrialRecord], result, plan: dict) -> dict:
    """A row of results.parquet from a trial's record (finished) or its Tune result (stopped, errored)."""
    counts = {k: plan[k] for k in ("train_images", "real_images", "synthetic_images", "epochs")}
    metrics = (result.metrics or {}) if result is not None else {}
    trial_id = metrics.get("trial_id")
    if record is not None:
        return TuneRow(
            ratio=ratio, seed=seed, status="completed", trial_id=trial_id, step=record.history[-1]["step"],
            val_real_accuracy=record.val["accuracy"], **{f"test_{d}_accuracy": record.test[d]["accuracy"] for d in TEST_DOMAINS},
            resumed_from_epochs=list(record.resumed_from_epochs), wall_seconds=record.wall_seconds,
            finished_at=record.finished_at, attempt=record.attempt, **counts,
        ).to_json()  # fmt: skip
    if result is not None and result.error is not None:
        status, error = "error", str(result.error).strip().splitlines()[-1][:500]
    else:
        status, error = ("stopped_early" if metrics else "missing"), None  # stopped_early: ASHA stopped it below the budget
    # The accuracy at the step it stopped is kept for inspection but is not comparable: left out of the table.
    return TuneRow(
        ratio=ratio, seed=seed, status=status, trial_id=trial_id, step=metrics.get("step"),
        val_real_accuracy=metrics.get(METRIC), error=error, **counts,
    ).to_json()  # fmt: skip


def ratio_table(rows: list[dict]) -> list[dict]:
    """Per ratio, over its completed seeds: mean and sample std (ddof=1; 0 for one seed) of each accuracy."""
    by_ratio: dict[float, list[dict]] = defaultdict(list)
    for row in rows:
        by_ratio[row["ratio"]].append(row)
    table = []
    for ratio in sorted(by_ratio):
        done = [r for r in by_ratio[ratio] if r["status"] == "completed"]
        entry: dict[str, Any] = {
            "ratio": ratio,
            "n": len(done),
            "seeds": [r["seed"] for r in done],
            "stopped_early": sum(r["status"] == "stopped_early" for r in by_ratio[ratio]),
            "errors": sum(r["status"] in ("error", "missing") for r in by_ratio[ratio]),
            "real_images": by_ratio[ratio][0]["real_images"],
            "synthetic_images": by_ratio[ratio][0]["synthetic_images"],
        }
        for name in ("val_real", *(f"test_{d}" for d in TEST_DOMAINS)):
            values = [r[f"{name}_accuracy"] for r in done]
            entry[name] = dict(zip(("mean", "std"), mean_std(values))) if values else None
        table.append(entry)
    return table


def best_ratio(table: list[dict]) -> Optional[dict]:
    """The ratio with the highest mean real-val accuracy (ties: the smaller ratio); None if none finished."""
    scored = [e for e in table if e["val_real"] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda e: (e["val_real"]["mean"], -e["ratio"]))
    return {"ratio": best["ratio"], "val_real": best["val_real"], "test_real": best["test_real"], "n": best["n"]}


def best_sentence(best: Optional[dict], mode: str) -> str:
    if best is None:
        return "No trial of the sweep finished, so no mixing ratio can be recommended."
    what = "of a fixed-size training set" if mode == "fixed_budget" else "added on top of all real images"
    spread = f" ± {100 * best['val_real']['std']:.1f}" if best["n"] > 1 else ""
    test = best["test_real"]
    return (
        f"Best synthetic fraction by real-validation accuracy: r = {best['ratio']:g} ({mode}: synthetic images {what}), "
        f"{100 * best['val_real']['mean']:.1f}{spread}% on real validation images over {best['n']} seed"
        f"{'s' if best['n'] != 1 else ''}; its real test accuracy, not used to choose, is {100 * test['mean']:.1f}%."
    )


def gather(cfg: Config, storage: Storage, grid, plan: list[dict]) -> list[dict]:
    """Exactly one row per (ratio, seed) of the grid; raises if Tune's results miss or repeat one."""
    layout, experiment, sh = Layout(cfg.run), experiment_name(cfg), sweep_hash(cfg)
    results: dict[tuple[float, int], list] = defaultdict(list)
    for result in grid:
        config = result.config or {}
        results[(round(float(config["ratio"]), 6), int(config["seed"]))].append(result)
    cells = [(round(r, 6), s) for r in sorted(cfg.tune.ratios) for s in cfg.tune.seeds]
    extra = sorted(set(results) - set(cells))
    repeated = sorted(c for c, found in results.items() if len(found) > 1)
    if extra or repeated or len(results) != len(cells):
        raise RuntimeError(
            f"Tune's results for {experiment} do not hold each (ratio, seed) of the grid once: missing "
            f"{sorted(set(cells) - set(results))}, repeated {repeated}, unexpected {extra}. Fix: delete "
            f"{storage.uri(layout.tune_ray_results)}/{experiment} and rerun the tune stage"
        )
    plan_by_ratio = {round(p["ratio"], 6): p for p in plan}
    rows = []
    for ratio, seed in cells:
        record = read_record(storage, layout.tune_trial(experiment, ratio, seed), trial_hash(sh, ratio, seed))
        found = results.get((ratio, seed))
        rows.append(_row(ratio, seed, record, found[0] if found else None, plan_by_ratio[ratio]))
    return rows


def _write_results(storage: Storage, cfg: Config, rows: list[dict], document: dict) -> None:
    import pyarrow as pa

    layout = Layout(cfg.run)
    columns = {name: [r[name] for r in rows] for name in TuneRow.field_names()}
    types = {"resumed_from_epochs": pa.list_(pa.int64()), "ratio": pa.float64(), "seed": pa.int64()}
    table = pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
    storage.write_parquet(f"{layout.tune_results}.parquet", table)
    storage.write_json(f"{layout.tune_results}.json", document)


def sweep_progress(total: int, already: int):
    """A Tune callback for the driver: a progress line per epoch report, one per finished trial with the best so far."""
    from ray.tune import Callback

    # Defined here, so importing synth.tune does not import Ray Tune.
    class _SweepProgress(Callback):
        def __init__(self, total: int, already: int):
            self.total, self.done, self.best = total, already, None

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("completed"):
                say(STAGE, f"{trial_tag(float(trial.config['ratio']), int(trial.config['seed']))}: step "
                    f"{result.get('step')}, real val {100 * result.get(METRIC, 0):.1f}% "
                    f"({self.done}/{self.total} trials done)", progress=True)  # fmt: skip

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            last = trial.last_result or {}
            if last.get("completed"):
                value = last.get("val_real_accuracy", 0.0)
                if self.best is None or value > self.best[0]:
                    self.best = (value, float(trial.config["ratio"]))
            best = f", best so far r = {self.best[1]:g} ({100 * self.best[0]:.1f}% real val)" if self.best else ""
            say(STAGE, f"{self.done}/{self.total} trials done{best}", progress=True)

    return _SweepProgress(total, already)


# ============================================================================================
# 4. Stage
# ============================================================================================


def _finished(storage: Storage, cfg: Config) -> Optional[dict]:
    """The stored results of this exact sweep when every trial of it has finished, else None."""
    key = f"{Layout(cfg.run).tune_results}.json"
    document = storage.read_json_or_none(key)
    if not isinstance(document, dict):
        return None
    rows = document.get("rows", [])
    if document.get("experiment") != experiment_name(cfg) or len(rows) != len(cfg.tune.ratios) * len(cfg.tune.seeds):
        return None
    return document if all(r.get("status") == "completed" for r in rows) else None


def run_tune(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or continue, or skip) the mixing-ratio sweep; returns the summary that is also stored.

    Bad config (a ratio outside [0, 1], an empty grid, an unknown mode) and data too small for
    the plan raise ``ValueError`` (:class:`synth.config.ConfigError` for the config) before any
    trial starts. A trial that still fails after ``tune.max_failures`` retries is recorded in the
    results and then raised as ``RuntimeError``; rerunning the command retries it.
    """
    from synth.runtime import code_version, init_ray, write_stage_config, write_stage_summary

    start = time.perf_counter()
    validate(cfg)  # configs built in code skip load_config; no trial may start on a bad grid
    storage = storage or Storage.from_config(cfg.storage)
    layout, u, experiment = Layout(cfg.run), cfg.tune, experiment_name(cfg)
    cells = len(u.ratios) * len(u.seeds)

    # 1. Fail fast on storage; note the config; clear interrupted writes of our own records.
    storage.check_writable()
    write_stage_config(storage, cfg, STAGE)
    removed = storage.remove_partials(f"{layout.stage(STAGE)}/trials")

    # 2. The whole sweep already done with this config, every trial's record intact: nothing to
    #    start (not even Ray).
    already = sum(
        read_record(storage, layout.tune_trial(experiment, r, s), trial_hash(sweep_hash(cfg), r, s)) is not None
        for r in u.ratios
        for s in u.seeds
    )
    document = _finished(storage, cfg)
    # A finished sweep that lost trial records (found by verify) starts a new Tuner: a restored one
    # would find every trial done. Trials with a record replay it; only the others train.
    lost_records = document is not None and already < cells
    document = None if lost_records else document
    status, restored, concurrency, resources, data_counts = "skipped (already done)", False, None, None, None
    source: Optional[str] = None  # the resolved dataset.synthetic_source, when this run read the data
    if document is None:
        # 3. Data and plan, checked before any trial starts.
        source = resolve_synthetic_source(cfg.dataset.synthetic_source, storage, cfg.run)
        data = SplitCache(storage, cfg.run, label_classes(cfg), synthetic_source=source).load(SWEEP_SPLITS)
        if len(data.get("real", "val")) == 0:
            raise ValueError("the real validation split is empty. Fix: set dataset.val_fraction > 0 and rebuild the dataset")
        plan = sweep_plan(len(data.get("real", "train")), len(data.selected("synthetic", "train")), cfg)
        data_counts = data.counts()

        # 4. The sweep: new, or restored where a killed driver left it.
        import ray
        from ray import tune

        init_ray(cfg.ray)
        cluster = ray.cluster_resources()
        resources = trial_resources(u, cluster)
        concurrency = max_concurrent_trials(u, resources, cluster, cells)
        context = TrialContext(
            run=cfg.run, experiment=experiment, sweep_hash=sweep_hash(cfg), mode=u.mode, hp=to_dict(cfg.train),
            classes=tuple(label_classes(cfg)), storage=storage, threads=max(1, int(u.cpus_per_trial)),
        )  # fmt: skip
        trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, context=context), resources)
        tuner, restored = make_tuner(cfg, storage, trainable, concurrency, [sweep_progress(cells, already)], restore=not lost_records)
        say(STAGE, f"{cells} trials ({len(u.ratios)} ratio(s) x {len(u.seeds)} seed(s), {u.mode}), {already} already finished, "
            f"{concurrency} at once{', restored' if restored else ''}")  # fmt: skip
        grid = tuner.fit()

        # 5. Gather: one row per (ratio, seed), the table by ratio, the best ratio.
        rows = gather(cfg, storage, grid, plan)
        table = ratio_table(rows)
        best = best_ratio(table)
        document = {
            "run": cfg.run,
            "experiment": experiment,
            "experiment_path": storage.uri(f"{layout.tune_ray_results}/{experiment}"),
            "mode": u.mode,
            "ratios": sorted(u.ratios),
            "seeds": list(u.seeds),
            "steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size,
            "metric": "val_real_accuracy",  # what chooses the best ratio: the final model, full TTA
            "plan": plan,
            "rows": rows,
            "table": table,
            "best": best,
            "best_sentence": best_sentence(best, u.mode),
            "code_version": code_version(),
        }
        _write_results(storage, cfg, rows, document)
        status = "restored" if restored else "new"

    # 6. Summary; a trial that failed for good fails the stage after its row is stored.
    rows = document["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "error", "missing")}
    summary = {
        "experiment": experiment,
        "status": status,
        "mode": u.mode,
        "trials_total": cells,
        "trials_completed": counts["completed"],
        "trials_stopped_early": counts["stopped_early"],
        "trials_failed": counts["error"] + counts["missing"],
        "trials_already_finished": already,
        "trials_trained": counts["completed"] - already,
        "max_concurrent_trials": concurrency,
        "resources_per_trial": resources,
        "best": document["best"],
        "best_sentence": document["best_sentence"],
        "table": document["table"],
        "results": storage.uri(f"{layout.tune_results}.parquet"),
        "data": data_counts,
        "synthetic_source": None if source is None else {"setting": cfg.dataset.synthetic_source, "resolved": source},
        "partial_writes_removed": removed,
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    summary = write_stage_summary(storage, cfg, STAGE, summary)
    failed = [r for r in rows if r["status"] in ("error", "missing")]
    if failed:
        first = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {cells} tune trials failed after {u.max_failures} retries, e.g. "
            f"{trial_tag(first['ratio'], first['seed'])}: {first['error'] or 'no result'}. Fix: see error.txt in its "
            f"folder under {document['experiment_path']}; rerun the same command to retry the failed trials"
        )
    say(STAGE, f"{counts['completed']}/{cells} trials completed ({counts['stopped_early']} stopped early, "
        f"{counts['error'] + counts['missing']} failed; {status}) in {summary['wall_seconds']:.1f} s -> {summary['results']}")  # fmt: skip
    say(STAGE, document["best_sentence"])
    return summary
