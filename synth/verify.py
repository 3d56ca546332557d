"""The verify stage: reconcile a run's storage with its plan and manifests, stage by stage.

For each stage the run has started (it wrote its ``config.yaml``), every object the config says
should exist is looked for and checked:

- prompts: the table is readable and is the one this config builds;
- generate: ``plan.json`` is this config's plan; every shard is there, intact (its checksum) and
  of this plan (:func:`synth.imagejob.scan_shards`); stray names are reported; the manifest
  lists exactly the shards' images;
- derive: the same for the children planned from the stored parent table;
- curate: the same for its score shards, planned from the image manifests; ``scores.parquet`` is readable;
- dataset: every split is readable, holds the number of images its summary says, no id is in
  two splits of a domain, and every synthetic id is in the generate or derive manifest;
- train: every cell of ``train.experiments x train.seeds`` has a valid ``metrics.json`` made with
  this config and a loadable ``model.pt``;
- tune: every (ratio, seed) of the grid has a valid record made with this config.

Each problem is a :class:`Finding`: ``missing``, ``corrupt``, ``foreign`` (made under another
plan or config), or ``extra`` (a stray object, reported and left alone). With ``repair``,
corrupt and foreign objects are moved to ``<run>/quarantine/<stage>/`` and the stages with
findings run again, in pipeline order; each remakes only what is missing (the stages are
resumable and deterministic), and the run is verified once more. Findings that a rerun cannot
fix (a plan or prompt table made by another config) are left for the user, with the fix named.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from synth.config import Config, ConfigError
from synth.progress import plural, say
from synth.shards import MANIFEST_COLUMNS, SHARD_COLUMNS
from synth.storage import Layout, Storage, quarantine

MISSING, CORRUPT, FOREIGN, EXTRA = "missing", "corrupt", "foreign", "extra"
STAGES = ("prompts", "generate", "derive", "curate", "dataset", "train", "tune")


@dataclass
class Finding:
    kind: str  # MISSING, CORRUPT, FOREIGN or EXTRA
    key: str  # relative to the storage root
    reason: str = ""
    repairable: bool = True  # whether quarantining it and rerunning the stage fixes it


@dataclass
class StageCheck:
    stage: str
    ran: bool  # whether the run has started this stage
    checked: int = 0  # objects looked at
    findings: list[Finding] = field(default_factory=list)
    note: str = ""  # what was found good, in a few words

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.kind != EXTRA]


# --------------------------------------------------------------------------------------------
# One check per stage
# --------------------------------------------------------------------------------------------


def check_prompts(cfg: Config, storage: Storage) -> StageCheck:
    from synth.llm import read_llm_texts
    from synth.prompts import build_prompt_table

    layout = Layout(cfg.run)
    check = StageCheck("prompts", ran=storage.exists(layout.config_file("prompts")) or storage.exists(layout.prompts_table))
    if not check.ran:
        return check
    check.checked = 1
    key = layout.prompts_table
    try:
        stored = storage.read_parquet(key)
    except FileNotFoundError:
        check.findings.append(Finding(MISSING, key))
        return check
    except Exception as exc:  # pyarrow raises several types for a damaged file
        check.findings.append(Finding(CORRUPT, key, f"unreadable ({type(exc).__name__})"))
        return check
    if not stored.equals(build_prompt_table(cfg, read_llm_texts(cfg, storage))):
        reason = "built from another prompts config than this one; verify with the config that made the run"
        check.findings.append(Finding(FOREIGN, key, reason, repairable=False))
    else:
        check.note = f"{stored.num_rows:,} prompts"
    return check


def check_generate(cfg: Config, storage: Storage) -> StageCheck:
    from synth.generate import plan_for, shard_rows
    from synth.llm import read_llm_texts
    from synth.prompts import build_prompt_table

    layout = Layout(cfg.run)
    check = StageCheck("generate", ran=_image_job_started(storage, layout, "generate"))
    if not check.ran:
        return check
    prompts = build_prompt_table(cfg, read_llm_texts(cfg, storage))
    return _check_image_job(check, storage, layout, plan_for(cfg, prompts), shard_rows(prompts, cfg.generate.shard_size))


def check_derive(cfg: Config, storage: Storage) -> StageCheck:
    from synth.derive import planned
    from synth.imagejob import cut_shards

    layout = Layout(cfg.run)
    check = StageCheck("derive", ran=_image_job_started(storage, layout, "derive"))
    if not check.ran:
        return check
    try:
        parents = storage.read_parquet(layout.derive_parents)
    except FileNotFoundError:
        check.findings.append(Finding(MISSING, layout.derive_parents, "the parent table the children were planned from"))
        return check
    except Exception as exc:
        check.findings.append(Finding(CORRUPT, layout.derive_parents, f"unreadable ({type(exc).__name__})"))
        return check
    rows, plan = planned(cfg, parents)
    check = _check_image_job(check, storage, layout, plan, cut_shards(rows, cfg.generate.shard_size))
    check.checked += 1
    return check


def check_curate(cfg: Config, storage: Storage) -> StageCheck:
    from synth.config import ConfigError
    from synth.curate import SCORE_COLUMNS, SHARD_KEEP, planned, scores_key

    layout = Layout(cfg.run)
    check = StageCheck("curate", ran=_image_job_started(storage, layout, "curate"))
    if not check.ran:
        return check
    try:
        shards, plan = planned(cfg, storage)
    except ConfigError as exc:
        check.findings.append(Finding(MISSING, layout.manifest("generate"), str(exc), repairable=False))
        return check
    check = _check_image_job(check, storage, layout, plan, shards, columns=SCORE_COLUMNS, keep=SHARD_KEEP)
    check.checked += 1
    try:
        storage.read_parquet(scores_key(cfg.run), columns=["id"])
    except FileNotFoundError:
        check.findings.append(Finding(MISSING, scores_key(cfg.run)))
    except Exception as exc:
        check.findings.append(Finding(CORRUPT, scores_key(cfg.run), f"unreadable ({type(exc).__name__})"))
    return check


def _image_job_started(storage: Storage, layout: Layout, stage: str) -> bool:
    return storage.exists(layout.plan(stage)) or bool(storage.list(layout.shards(stage)))


def _check_image_job(
    check: StageCheck, storage: Storage, layout: Layout, plan: dict, shards: list[list[dict]],
    columns: Sequence[str] = SHARD_COLUMNS, keep: Sequence[str] = MANIFEST_COLUMNS,
) -> StageCheck:  # fmt: skip
    """Plan, shards and manifest of one shard job (generate, derive, curate) against the plan this config makes.

    ``columns`` / ``keep``: what a shard stores and what the manifest lists (image shards by default).
    """
    import pyarrow as pa

    from synth.imagejob import scan_shards
    from synth.shards import plan_sha256

    stage = check.stage
    stored_plan = storage.read_json_or_none(layout.plan(stage))
    if stored_plan is None:
        check.findings.append(Finding(MISSING, layout.plan(stage), "shards are stored but the plan is not"))
    elif stored_plan != plan:
        changed = sorted(k for k in set(plan) | set(stored_plan) if plan.get(k) != stored_plan.get(k))
        reason = f"the run was made under another plan (differs in {', '.join(changed)}); verify with the config that made it"
        check.findings.append(Finding(FOREIGN, layout.plan(stage), reason, repairable=False))
        return check
    ids = [[r["id"] for r in rows] for rows in shards]
    scan = scan_shards(storage, layout, ids, plan_sha256(plan), stage=stage, columns=columns, keep=keep)
    check.checked = len(shards) + len(scan.stray) + 1
    check.findings += [Finding(MISSING, layout.shard(stage, k)) for k in scan.missing]
    check.findings += [Finding(CORRUPT, layout.shard(stage, k), why) for k, why in sorted(scan.corrupt.items())]
    check.findings += [Finding(FOREIGN, layout.shard(stage, k), why) for k, why in sorted(scan.foreign.items())]
    check.findings += [Finding(EXTRA, key, "no plan writes this name; left alone") for key in scan.stray]
    try:
        manifest = storage.read_parquet(layout.manifest(stage), columns=list(keep))
    except FileNotFoundError:
        check.findings.append(Finding(MISSING, layout.manifest(stage)))
    except Exception as exc:
        check.findings.append(Finding(CORRUPT, layout.manifest(stage), f"unreadable ({type(exc).__name__})"))
    else:
        if len(scan.good) == len(shards):
            shards_say = pa.concat_tables([scan.good[k] for k in sorted(scan.good)]).sort_by("id")
            if not manifest.equals(shards_say):
                check.findings.append(Finding(CORRUPT, layout.manifest(stage), "does not list exactly the shards' images"))
    check.note = f"{len(scan.good)}/{len(shards)} shards intact, manifest agrees"
    return check


def check_dataset(cfg: Config, storage: Storage) -> StageCheck:
    from synth.dataset import ADVERSARIAL, SPLITS, SPLITS_OF

    layout = Layout(cfg.run)
    summary = storage.read_json_or_none(layout.summary("dataset"))
    check = StageCheck("dataset", ran=storage.exists(layout.config_file("dataset")))
    if not check.ran:
        return check
    if not isinstance(summary, dict):
        check.findings.append(Finding(MISSING, layout.summary("dataset"), "the stage started but did not finish"))
        return check
    manifest_ids: Optional[set] = None
    images = 0
    # The adversarial domain (hostile examples) is built with the synthetic one when the run has them.
    domains = [*cfg.dataset.domains, *([ADVERSARIAL] if ADVERSARIAL in summary.get("domains", {}) else [])]
    for domain in domains:
        seen: dict[str, str] = {}
        for split in SPLITS_OF.get(domain, SPLITS):
            key = layout.dataset_split(domain, split)
            check.checked += 1
            try:
                ids = storage.read_parquet(key, columns=["id"]).column("id").to_pylist()
            except FileNotFoundError:
                check.findings.append(Finding(MISSING, key))
                continue
            except Exception as exc:
                check.findings.append(Finding(CORRUPT, key, f"unreadable ({type(exc).__name__})"))
                continue
            expected = summary.get("domains", {}).get(domain, {}).get("images", {}).get(split)
            if expected is not None and expected != len(ids):
                check.findings.append(Finding(CORRUPT, key, f"holds {len(ids)} images, its summary says {expected}"))
            leaked = [i for i in ids if i in seen]
            if leaked:
                check.findings.append(Finding(CORRUPT, key, f"{len(leaked)} ids also in {seen[leaked[0]]} (e.g. {leaked[0]!r})"))
            seen.update((i, split) for i in ids)
            if domain in ("synthetic", ADVERSARIAL):
                if manifest_ids is None:
                    manifest_ids = _manifest_ids(storage, layout)
                unknown = [i for i in ids if i not in manifest_ids]
                if unknown:
                    check.findings.append(Finding(FOREIGN, key, f"{len(unknown)} ids are in no image manifest (generate, derive)"))
            images += len(ids)
    check.note = f"{check.checked} splits, {images:,} images"
    return check


def _manifest_ids(storage: Storage, layout: Layout) -> set:
    ids: set = set()
    for stage in ("generate", "derive"):
        try:
            ids |= set(storage.read_parquet(layout.manifest(stage), columns=["id"]).column("id").to_pylist())
        except Exception:  # missing (derive did not run) or damaged: that stage's own check reports the manifest
            pass
    return ids


def check_train(cfg: Config, storage: Storage) -> StageCheck:
    layout, t = Layout(cfg.run), cfg.train
    check = StageCheck("train", ran=storage.exists(layout.config_file("train")))
    if not check.ran:
        return check
    from synth.model import load_model
    from synth.records import TrainMetrics
    from synth.splits import resolve_synthetic_source
    from synth.train import config_hash, experiment_name

    try:  # the synthetic images the cells read (all or curated) are part of their result hash
        source: Optional[str] = resolve_synthetic_source(cfg.dataset.synthetic_source, storage, cfg.run)
    except ValueError:
        source = None  # curated without verdicts: the cells cannot match; the dataset check says why
    for domain in t.experiments:
        for seed in t.seeds:
            experiment = experiment_name(domain)
            key, model_key = layout.train_metrics(experiment, seed), layout.train_model(experiment, seed)
            check.checked += 2
            finding = _record_finding(storage, key, TrainMetrics, "config_hash", config_hash(cfg, domain, seed, source))
            if finding is not None:
                check.findings.append(finding)
                if finding.kind != FOREIGN:
                    continue
            try:
                load_model(storage.read_bytes(model_key))
            except FileNotFoundError:
                check.findings.append(Finding(MISSING, model_key))
            except Exception as exc:
                check.findings.append(Finding(CORRUPT, model_key, f"does not load ({type(exc).__name__})"))
    check.note = f"{len(t.experiments) * len(t.seeds)} cells"
    return check


def _record_finding(storage: Storage, key: str, record, hash_key: str, expected: str) -> Optional[Finding]:
    """What is wrong with one stage record (``metrics.json``, a trial's record), or None: valid and this config's.

    A record of another config (its hash differs) is FOREIGN: the stage's rerun redoes it.
    """
    from synth.records import RecordError

    obj = storage.read_json_or_none(key)
    if obj is None:
        return Finding(CORRUPT, key, "not JSON") if storage.exists(key) else Finding(MISSING, key)
    try:
        record.from_json(obj)
    except RecordError as exc:
        return Finding(CORRUPT, key, str(exc))
    if obj.get(hash_key) != expected:
        return Finding(FOREIGN, key, "made with another config; the stage's rerun redoes it")
    return None


def check_tune(cfg: Config, storage: Storage) -> StageCheck:
    layout, u = Layout(cfg.run), cfg.tune
    check = StageCheck("tune", ran=storage.exists(layout.config_file("tune")))
    if not check.ran:
        return check
    from synth.records import TrialRecord
    from synth.tune import experiment_name, sweep_hash, trial_hash

    experiment, sh = experiment_name(cfg), sweep_hash(cfg)
    for ratio in u.ratios:
        for seed in u.seeds:
            key = layout.tune_trial(experiment, ratio, seed)
            check.checked += 1
            finding = _record_finding(storage, key, TrialRecord, "trial_hash", trial_hash(sh, ratio, seed))
            if finding is not None:
                check.findings.append(finding)
    check.note = f"{check.checked} trials"
    return check


CHECKS: dict[str, Callable[[Config, Storage], StageCheck]] = {
    "prompts": check_prompts,
    "generate": check_generate,
    "derive": check_derive,
    "curate": check_curate,
    "dataset": check_dataset,
    "train": check_train,
    "tune": check_tune,
}


# Each stage's own function, imported only when its stage needs repair.
RUNNERS = {
    "prompts": "synth.prompts:run_prompts",
    "generate": "synth.generate:run_generate",
    "derive": "synth.derive:run_derive",
    "curate": "synth.curate:run_curate",
    "dataset": "synth.dataset:run_dataset",
    "train": "synth.train:run_train",
    "tune": "synth.tune:run_tune",
}


def _stage_runner(stage: str) -> Callable:
    import importlib

    module, _, name = RUNNERS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def verify_run(cfg: Config, storage: Storage) -> list[StageCheck]:
    checks = [CHECKS[stage](cfg, storage) for stage in STAGES]
    for check in checks:
        _say_check(storage, Layout(cfg.run), check)
    return checks


def _say_check(storage: Storage, layout: Layout, check: StageCheck) -> None:
    if not check.ran:
        say("verify", f"{check.stage}: not run")
        return
    extra = [f for f in check.findings if f.kind == EXTRA]
    tail = f"; {plural(len(extra), 'stray object')} ignored" if extra else ""
    if not check.problems:
        say("verify", f"{check.stage}: ok ({check.note}){tail}")
        return
    counts = {}
    for f in check.problems:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    say("verify", f"{check.stage}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" of {check.checked} checked{tail}")
    for f in check.problems[:5]:
        say("verify", f"  {f.kind}: {storage.uri(f.key)}" + (f" ({f.reason})" if f.reason else ""))
    if len(check.problems) > 5:
        say("verify", f"  ... and {len(check.problems) - 5} more (all of them in {storage.uri(layout.summary('verify'))})")


def run_verify(cfg: Config, storage: Optional[Storage] = None, repair: bool = False) -> dict:
    """Check every started stage of ``cfg.run``; with ``repair``, remake what is missing or bad. Returns the summary.

    The summary's ``problems`` counts what is still wrong at the end (0: the run is whole).
    """
    from synth.runtime import write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout = Layout(cfg.run)
    checks = verify_run(cfg, storage)
    before = sum(len(c.problems) for c in checks)
    repaired: dict[str, list[str]] = {}
    if repair and before:
        unfixable = [f for c in checks for f in c.problems if not f.repairable]
        if unfixable:
            raise ConfigError(f"cannot repair {storage.uri(unfixable[0].key)}: {unfixable[0].reason}")
        storage.check_writable()
        for check in checks:
            if not check.problems:
                continue
            moved = []
            for f in check.problems:
                if f.kind in (CORRUPT, FOREIGN) and storage.exists(f.key):
                    moved.append(storage.uri(quarantine(storage, layout, f.key, check.stage)))
            say("verify", f"repairing {check.stage}" + (f": {plural(len(moved), 'object')} moved to quarantine" if moved else ""))
            _stage_runner(check.stage)(cfg, storage)
            repaired[check.stage] = moved
        checks = verify_run(cfg, storage)
    after = sum(len(c.problems) for c in checks)
    summary = {
        "problems": after,
        "problems_found": before,
        "repaired": repaired,
        "stages": {c.stage: {**asdict(c), "problems": len(c.problems)} for c in checks},
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    verdict = "the run is whole" if not after else f"{plural(after, 'problem')} remain" + ("s" if after == 1 else "")
    hint = "" if after == 0 or repair else "; python -m ray_jobs.verify <config> --repair remakes what can be remade"
    say("verify", f"{verdict}{hint}")
    return write_stage_summary(storage, cfg, "verify", summary)
