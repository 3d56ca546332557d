"""The report's numbers: per-model metrics aggregated over seeds, and the headline said in words.

Rows of the headline matrix are train domains, columns test domains; each cell is the mean ±
sample standard deviation (ddof=1, and 0 for a single seed) of test accuracy over seeds.
Confusion matrices are summed over seeds; per-class precision / recall / F1 are averaged over
seeds. The synthetic -> real gap is real->real minus synthetic->real accuracy on the real test
set.

Everything here is pure (dicts in, dicts and strings out): no storage, no plots, so each number
is tested on its own. :func:`aggregate` is the entry point; the rest serve it or the text.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np

from synth.config import ADVERSARIAL
from synth.records import TrainMetrics, is_fraction
from synth.stats import seed_stat

# The canonical axes of the headline matrix, in reading order; other domains found in the
# metrics are appended after these.
DOMAINS = ("real", "synthetic", "mixture")


class ReportInputError(ValueError):
    """The report's required inputs are missing or inconsistent; the message says the fix."""


def ordered_domains(names: Sequence[str]) -> list[str]:
    """Canonical domains (real, synthetic, mixture) first, any others after them in name order."""
    present = set(names)
    return [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS))


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal, the precision every table and plot shows."""
    return f"{100.0 * x:.1f}"


# --------------------------------------------------------------------------------------------
# Validation: the train stage's metrics.json schema
# --------------------------------------------------------------------------------------------


def validate_metrics(m: Any) -> None:
    """Raise ``ValueError`` naming the first way ``m`` breaks the train stage's metrics.json record.

    The checks are :meth:`synth.records.TrainMetrics.from_json`'s: the writer's own record type.
    """
    TrainMetrics.from_json(m)


# --------------------------------------------------------------------------------------------
# Aggregation over seeds
# --------------------------------------------------------------------------------------------


def _experiment_per_domain(metrics_list: Sequence[dict]) -> dict[str, str]:
    """``{train_domain: experiment}``; two experiments claiming one train domain are an error."""
    names: dict[str, set[str]] = defaultdict(set)
    for m in metrics_list:
        names[m["train_domain"]].add(m["experiment"])
    clash = {d: sorted(e) for d, e in names.items() if len(e) > 1}
    if clash:
        domain, experiments = next(iter(clash.items()))
        raise ReportInputError(
            f"train domain {domain!r} is claimed by several experiments {experiments}; a matrix row must "
            "average one experiment over seeds. Fix: remove or rename the stale experiment folders under <run>/train/"
        )
    return {d: next(iter(e)) for d, e in names.items()}


def _common_classes(metrics_list: Sequence[dict]) -> list[str]:
    first = metrics_list[0]
    for m in metrics_list[1:]:
        if m["classes"] != first["classes"]:
            raise ReportInputError(
                f"models disagree on their classes: {first['experiment']} seed {first['seed']} has {first['classes']}, "
                f"{m['experiment']} seed {m['seed']} has {m['classes']}. Confusion matrices only add up over one "
                "label set. Fix: retrain every experiment with the same prompts.classes, or use a new run name"
            )
    return list(first["classes"])


def is_ablation(m: dict) -> bool:
    """Whether a model is an ablation cell (its numbers go to :func:`ablation_numbers`, not the headline)."""
    return bool(m.get("ablation"))


def aggregate(metrics_list: Sequence[dict]) -> dict:
    """Aggregate per-model ``metrics.json`` dicts over seeds into the report's numbers.

    Ablation cells (:func:`is_ablation`) are left to :func:`ablation_numbers`; every other model
    enters the headline matrix.

    Returns a JSON-ready dict:

    - ``classes``, ``train_domains``, ``test_domains`` (present ones, canonical order),
      ``experiments`` ``{train_domain: experiment}``, ``seeds`` ``{train_domain: [seed, ...]}``;
    - ``matrix[train][test]``: test accuracy ``{"mean", "std", "n", "values", "seeds"}``
      (std is the sample std, 0 for one seed);
    - ``val_accuracy[train]``: the same over the validation accuracy;
    - ``confusion[train][test]``: confusion matrix summed over seeds (rows = true class);
    - ``per_class[train][test][class]``: precision, recall, f1 and support, each a mean over seeds;
    - ``gap``: :func:`transfer_gap` of the matrix (None where a needed cell is missing).

    Raises :class:`ReportInputError` when the list is empty, when models disagree on classes, or
    when two experiments claim one train domain.
    """
    for m in metrics_list:
        validate_metrics(m)
    metrics_list = [m for m in metrics_list if not is_ablation(m)]
    if not metrics_list:
        raise ReportInputError("no training metrics to aggregate. Fix: run the train stage first")
    experiments = _experiment_per_domain(metrics_list)
    classes = _common_classes(metrics_list)
    seen: set[tuple[str, int]] = set()
    for m in metrics_list:
        if (m["train_domain"], m["seed"]) in seen:
            raise ReportInputError(f"{m['experiment']} seed {m['seed']} appears twice; each model must be counted once")
        seen.add((m["train_domain"], m["seed"]))

    # Seed order makes values/seeds lists reproducible whatever order the files were listed in.
    by_train: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(metrics_list, key=lambda m: (m["train_domain"], m["seed"])):
        by_train[m["train_domain"]].append(m)
    train_domains = ordered_domains(list(by_train))
    test_domains = ordered_domains([t for m in metrics_list for t in m["test"]])

    matrix: dict[str, dict] = {}
    val_accuracy: dict[str, dict] = {}
    confusion: dict[str, dict] = {}
    per_class: dict[str, dict] = {}
    for train in train_domains:
        runs = by_train[train]
        vals = [(m["val"]["accuracy"], m["seed"]) for m in runs if is_fraction((m.get("val") or {}).get("accuracy"))]
        if vals:
            val_accuracy[train] = seed_stat([v for v, _ in vals], [s for _, s in vals])
        matrix[train], confusion[train], per_class[train] = {}, {}, {}
        for test in test_domains:
            results = [(m["seed"], m["test"][test]) for m in runs if test in m["test"]]
            if not results:
                continue
            matrix[train][test] = seed_stat([r["accuracy"] for _, r in results], [s for s, _ in results])
            cms = [np.asarray(r["confusion_matrix"], dtype=np.int64) for _, r in results if r.get("confusion_matrix") is not None]
            if cms:
                confusion[train][test] = np.sum(cms, axis=0).tolist()
            per_class[train][test] = _per_class_means([r.get("per_class") or {} for _, r in results], classes)
    return {
        "classes": classes,
        "train_domains": train_domains,
        "test_domains": test_domains,
        "experiments": {d: experiments[d] for d in train_domains},
        "seeds": {d: [m["seed"] for m in by_train[d]] for d in train_domains},
        "matrix": matrix,
        "val_accuracy": val_accuracy,
        "confusion": confusion,
        "per_class": per_class,
        "gap": transfer_gap(matrix),
    }


def _per_class_means(per_class_list: Sequence[dict], classes: Sequence[str]) -> dict:
    """Mean over seeds of each class's precision / recall / f1 / support (over seeds that report it)."""
    out: dict[str, dict] = {}
    for name in classes:
        row = {}
        for stat in ("precision", "recall", "f1", "support"):
            values = [pc[name][stat] for pc in per_class_list if isinstance(pc.get(name), dict) and stat in pc[name]]
            if values:
                row[stat] = statistics.fmean(float(v) for v in values)
        if row:
            out[name] = row
    return out


def transfer_gap(matrix: dict) -> Optional[dict]:
    """The synthetic -> real gap: accuracy on real test images of real-trained minus synthetic-trained models.

    Returns None unless both ``matrix['real']['real']`` and ``matrix['synthetic']['real']`` exist.
    ``standard_error`` is Welch's standard error of the difference of two independent means
    (models of different train domains share no pairing by seed), None when a side has one seed.
    """
    real = matrix.get("real", {}).get("real")
    synthetic = matrix.get("synthetic", {}).get("real")
    if not real or not synthetic:
        return None
    se = None
    if real["n"] > 1 and synthetic["n"] > 1:
        se = math.sqrt(real["std"] ** 2 / real["n"] + synthetic["std"] ** 2 / synthetic["n"])
    return {
        "real_on_real": real["mean"],
        "synthetic_on_real": synthetic["mean"],
        "gap": real["mean"] - synthetic["mean"],
        "standard_error": se,
        # What share of real-data accuracy synthetic training recovers.
        "relative": synthetic["mean"] / real["mean"] if real["mean"] > 0 else None,
        "n_real": real["n"],
        "n_synthetic": synthetic["n"],
    }


def training_runs(metrics_list: Sequence[dict]) -> dict:
    """Per train domain: how the models were trained (steps, data, time, val accuracy, code versions)."""
    by_train: dict[str, list[dict]] = defaultdict(list)
    for m in metrics_list:
        by_train[m["experiment"] if is_ablation(m) else m["train_domain"]].append(m)
    out = {}
    for train in ordered_domains(list(by_train)):
        runs = sorted(by_train[train], key=lambda m: m["seed"])

        def mean_of(key: str) -> Optional[float]:
            values = [m[key] for m in runs if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
            return statistics.fmean(values) if values else None

        out[train] = {
            "experiment": runs[0]["experiment"],
            "seeds": [m["seed"] for m in runs],
            "steps": mean_of("steps"),
            "batch_size": mean_of("batch_size"),
            "train_images": mean_of("train_images"),
            "num_workers": mean_of("num_workers"),
            "wall_seconds": mean_of("wall_seconds"),
            "train_images_per_second": mean_of("train_images_per_second"),
            "code_versions": sorted({str(m.get("code_version", "unknown")) for m in runs}),
        }
    return out


# --------------------------------------------------------------------------------------------
# What each technique buys: the ablation cells, the fooling rate, diversity
# --------------------------------------------------------------------------------------------

FOOLING_DOMAIN = ADVERSARIAL  # hostile images: a model's accuracy there is its fooling rate
FOOLING_NOTE = (
    "Fooling rate: the share of hostile images (the look of a class on the wrong object, e.g. a "
    "dalmatian-patterned car) that a model assigns to the class they imitate; it is the accuracy on the "
    "adversarial test domain. Lower is better."
)


def _stat_of(runs: Sequence[dict], domain: str) -> Optional[dict]:
    pairs = [(m["test"][domain]["accuracy"], m["seed"]) for m in runs if domain in m["test"]]
    return seed_stat([v for v, _ in pairs], [s for _, s in pairs]) if pairs else None


def ablation_numbers(metrics_list: Sequence[dict]) -> Optional[dict]:
    """The ablation cells over seeds; None when no ablation cell was trained.

    ``techniques``: one row per ``ablate-technique-<t>`` experiment; ``curation``: the
    ``ablate-curated`` / ``ablate-uncurated`` rows and ``curation_gain`` (curated minus uncurated
    mean accuracy on real test images). Each row: ``experiment``, ``label``, ``images_per_class``,
    ``seeds``, ``real`` / ``synthetic`` / ``fooling_rate`` (seed stats, None when not tested).
    """
    by_experiment: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(metrics_list, key=lambda m: (m["experiment"], m["seed"])):
        if is_ablation(m):
            by_experiment[m["experiment"]].append(m)
    if not by_experiment:
        return None
    techniques, curation = [], []
    for experiment, runs in sorted(by_experiment.items()):
        a = runs[0]["ablation"]
        row = {
            "experiment": experiment,
            "selection": a.get("selection"),
            "label": a.get("technique") or a.get("selection"),
            "images_per_class": a.get("images_per_class"),
            "train_images": runs[0].get("train_images"),
            "seeds": [m["seed"] for m in runs],
            "real": _stat_of(runs, "real"),
            "synthetic": _stat_of(runs, "synthetic"),
            "fooling_rate": _stat_of(runs, FOOLING_DOMAIN),
        }
        (curation if a.get("selection") in ("curated", "uncurated") else techniques).append(row)
    curation.sort(key=lambda r: r["selection"] != "curated")  # curated first
    gain = None
    pair = {r["selection"]: r for r in curation}
    if pair.get("curated", {}).get("real") and pair.get("uncurated", {}).get("real"):
        gain = pair["curated"]["real"]["mean"] - pair["uncurated"]["real"]["mean"]
    per_class = sorted({r["images_per_class"] for r in techniques + curation if r["images_per_class"] is not None})
    return {"images_per_class": per_class, "techniques": techniques, "curation": curation, "curation_gain": gain}


def fooling_rates(metrics_list: Sequence[dict]) -> Optional[dict]:
    """``{experiment: seed stat of accuracy on hostile images}`` for every model tested on them; None if none was."""
    by_experiment: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(metrics_list, key=lambda m: (m["experiment"], m["seed"])):
        if FOOLING_DOMAIN in m["test"]:
            by_experiment[m["experiment"]].append(m)
    if not by_experiment:
        return None
    return {e: _stat_of(runs, FOOLING_DOMAIN) for e, runs in sorted(by_experiment.items())}


def diversity_numbers(curate_summary: Optional[dict]) -> Optional[dict]:
    """The curate stage's ``diversity`` section (mean pairwise cosine distance of CLIP embeddings), checked.

    The curate summary holds ``{"technique" | "class": {name: {"all": d, "accepted": d, "images": n}}}``
    (``d`` null for groups of fewer than two images). Returns ``{"per_technique" | "per_class":
    {name: {"all", "accepted", "images"}}}``, malformed entries dropped; None when nothing is left.
    """
    section = (curate_summary or {}).get("diversity")
    if not isinstance(section, dict):
        return None

    def number(v: Any) -> Optional[float]:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    out: dict[str, Any] = {}
    for key, group in (("per_technique", "technique"), ("per_class", "class")):
        values = section.get(group)
        if not isinstance(values, dict):
            continue
        good = {}
        for name, entry in values.items():
            if isinstance(entry, dict) and number(entry.get("all")) is not None:
                images = entry.get("images")
                good[str(name)] = {"all": number(entry["all"]), "accepted": number(entry.get("accepted")),
                                   "images": images if isinstance(images, int) else None}  # fmt: skip
        if good:
            out[key] = dict(sorted(good.items()))
    return out or None


# --------------------------------------------------------------------------------------------
# The headline in words
# --------------------------------------------------------------------------------------------


def gap_sentence(gap: Optional[dict]) -> str:
    """The synthetic -> real gap of :func:`transfer_gap` in words, in percentage points."""
    if gap is None:
        return (
            "The synthetic → real gap cannot be stated: it needs models trained on real and on synthetic "
            "images, both tested on real images (run the train stage for train-real and train-synthetic)."
        )
    pp = 100.0 * gap["gap"]
    se = f"; standard error of the gap {100.0 * gap['standard_error']:.1f} pp" if gap["standard_error"] is not None else ""
    text = (
        f"The synthetic → real gap is {pp:.1f} percentage points: on real test images, models trained on real "
        f"images reach {pct(gap['real_on_real'])}% accuracy and models trained on synthetic images "
        f"{pct(gap['synthetic_on_real'])}% (means over {_seeds_text(gap['n_real'], gap['n_synthetic'])}{se})."
    )
    if gap["relative"] is not None:
        text += f" Synthetic training recovers {100.0 * gap['relative']:.0f}% of real-data accuracy."
    return text


def _seeds_text(a: int, b: int) -> str:
    if a == b:
        return f"{a} seed{'s' if a != 1 else ''} each"
    return f"{a} and {b} seeds"


def mixture_sentence(matrix: dict) -> Optional[str]:
    """How training on the mixture instead of real images changes accuracy on real test images."""
    real = matrix.get("real", {}).get("real")
    mixture = matrix.get("mixture", {}).get("real")
    if not real or not mixture:
        return None
    pp = 100.0 * (mixture["mean"] - real["mean"])
    return (
        f"Training on the real + synthetic mixture instead of real images changes accuracy on real test images by "
        f"{pp:+.1f} percentage points ({pct(mixture['mean'])}% vs {pct(real['mean'])}%, "
        f"{_seeds_text(mixture['n'], real['n'])})."
    )


# --------------------------------------------------------------------------------------------
# Selection and abridging for what the report shows
# --------------------------------------------------------------------------------------------


def choose_samples(ids: Sequence[str], labels: Sequence[int], per_class: int) -> dict[int, list[int]]:
    """Row indices of up to ``per_class`` rows per label, the same on every run.

    Rows are ranked by a hash of their id rather than taken first-come, so the picks spread over
    prompts, seeds and shards instead of being the first images generated, and they do not change
    when a table is rewritten in another row order.
    """
    ranked: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for row, (image_id, label) in enumerate(zip(ids, labels)):
        ranked[int(label)].append((hashlib.sha1(str(image_id).encode()).hexdigest(), row))
    return {label: [row for _, row in sorted(rows)[:per_class]] for label, rows in sorted(ranked.items())}


def flatten_summary(
    summary: dict, max_items: int = 12, max_chars: int = 120, max_depth: int = 3
) -> list[tuple[str, str]]:
    """A stage summary as ``(dotted key, short text)`` rows for a table; long values are abridged."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any, depth: int) -> None:
        flat = isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values())
        if flat and value and len(value) <= max_items:
            # A small mapping of counts (e.g. images per split or per class) reads best on one line.
            rows.append((prefix, ", ".join(f"{k}: {_short(v)}" for k, v in value.items())))
        elif isinstance(value, dict) and value and depth < max_depth:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif isinstance(value, dict):
            rows.append((prefix, f"({len(value)} entries)"))
        elif isinstance(value, list):
            small = len(value) <= max_items and all(not isinstance(v, (dict, list)) for v in value)
            rows.append((prefix, ", ".join(_short(v) for v in value) if small else f"({len(value)} items)"))
        else:
            rows.append((prefix, _short(value)))

    def _short(v: Any) -> str:
        text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    for key, value in summary.items():
        if key in ("stage", "run", "code_version"):  # shown once, in the provenance table
            continue
        walk(str(key), value, 0)
    return rows
