"""The report stage: what the trained classifiers say about synthetic data, as one publishable page.

Reads what earlier stages stored under ``<run>/`` and writes ``<run>/report/``:

- ``report.html``: self-contained (plots are base64 PNG data URIs, CSS is inline, nothing is
  fetched), so the one file can be mailed, archived or published as it is;
- ``report.md``: the same content, referring to the PNGs beside it;
- ``report.json``: the aggregated numbers (with the tune stage's sweep when it ran), for tests and tools;
- one PNG per plot, and ``config.yaml`` / ``summary.json`` like every stage.

Inputs:

- required: ``<run>/train/<experiment>/seed-<seed>/metrics.json``, one per trained model;
- optional: ``<run>/dataset/<domain>/<split>.parquet`` (composition table, sample grids),
  ``<run>/tune/results.json`` (the mixing-ratio sweep: table by ratio and accuracy-vs-r plot) and
  each earlier stage's ``config.yaml`` / ``summary.json`` (provenance). A missing optional input is
  noted in the report, never fatal; a malformed metrics file is skipped, counted and named.

The numbers. Rows of the headline matrix are train domains, columns test domains; each cell is
the mean ± sample standard deviation (ddof=1, and 0 for a single seed) of test accuracy over
seeds. Confusion matrices are summed over seeds; per-class precision / recall / F1 are averaged
over seeds. The synthetic -> real gap is real->real minus synthetic->real accuracy on the real
test set. The aggregation functions are pure (dicts in, dicts out), so they are tested without
storage or plots.

The report stage needs no Ray: it reads a few JSON files and tables and draws a dozen plots.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import math
import re
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from synth.config import Config, class_slug
from synth.runtime import code_version, write_stage_config, write_stage_summary
from synth.stats import mean_std, seed_stat  # noqa: F401 -- mean_std re-exported for synth.tune
from synth.storage import Layout, Storage

log = logging.getLogger(__name__)

STAGE = "report"
# The canonical axes of the headline matrix, in reading order; other domains found in the
# metrics are appended after these.
DOMAINS = ("real", "synthetic", "mixture")
SPLITS = ("train", "val", "test")
# Earlier stages whose config.yaml / summary.json the report quotes, in pipeline order.
PROVENANCE_STAGES = ("prompts", "generate", "curate", "dataset", "train", "tune")
# Sample grids: images per class, and the split they come from. val is a random slice of the
# training pool, so it shows what the models learn from at a fraction of the read.
SAMPLES_PER_CLASS = 8
SAMPLE_SPLITS = ("val", "train", "test")
# Sample images are upscaled (nearest neighbour, so pixels stay sharp) to about this many pixels.
SAMPLE_DISPLAY_PX = 96
DOMAIN_COLOURS = {"real": "#1f77b4", "synthetic": "#d62728", "mixture": "#2ca02c"}

# <run>/train/<experiment>/seed-<seed>/metrics.json; checkpoints and other files beside it are ignored.
_METRICS_KEY = re.compile(r"/train/[^/]+/seed-[^/]+/metrics\.json$")


class ReportInputError(ValueError):
    """The report's required inputs are missing or inconsistent; the message says the fix."""


# --------------------------------------------------------------------------------------------
# Aggregation (pure)
# --------------------------------------------------------------------------------------------


def ordered_domains(names: Sequence[str]) -> list[str]:
    """Canonical domains (real, synthetic, mixture) first, any others after them in name order."""
    present = set(names)
    return [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS))


def validate_metrics(m: Any) -> None:
    """Raise ``ValueError`` naming the first way ``m`` breaks the train stage's metrics.json schema."""
    if not isinstance(m, dict):
        raise ValueError(f"expected a JSON object, got {type(m).__name__}")
    for key in ("experiment", "train_domain", "seed", "classes", "test"):
        if key not in m:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(m["experiment"], str) or not m["experiment"]:
        raise ValueError(f"experiment={m['experiment']!r} is not a name")
    if not isinstance(m["train_domain"], str) or not m["train_domain"]:
        raise ValueError(f"train_domain={m['train_domain']!r} is not a domain name")
    if not isinstance(m["seed"], int) or isinstance(m["seed"], bool):
        raise ValueError(f"seed={m['seed']!r} is not an integer")
    classes = m["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes={classes!r} is not a non-empty list of names")
    if not isinstance(m["test"], dict):
        raise ValueError("test is not an object of test domains")
    k = len(classes)
    for domain, r in m["test"].items():
        if not isinstance(r, dict) or not _is_fraction(r.get("accuracy")):
            raise ValueError(f"test.{domain}.accuracy is missing or not in [0, 1]")
        cm = r.get("confusion_matrix")
        if cm is not None:
            if not (isinstance(cm, list) and len(cm) == k and all(isinstance(row, list) and len(row) == k for row in cm)):
                raise ValueError(f"test.{domain}.confusion_matrix is not {k}x{k} (one row and column per class)")
        per_class = r.get("per_class")
        if per_class is not None and not isinstance(per_class, dict):
            raise ValueError(f"test.{domain}.per_class is not an object keyed by class")
    history = m.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("history is not a list of objects")


def _is_fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0


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


def aggregate(metrics_list: Sequence[dict]) -> dict:
    """Aggregate per-model ``metrics.json`` dicts over seeds into the report's numbers.

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
    if not metrics_list:
        raise ReportInputError("no training metrics to aggregate. Fix: run the train stage first")
    for m in metrics_list:
        validate_metrics(m)
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
        vals = [(m["val"]["accuracy"], m["seed"]) for m in runs if _is_fraction((m.get("val") or {}).get("accuracy"))]
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


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


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
        f"images reach {_pct(gap['real_on_real'])}% accuracy and models trained on synthetic images "
        f"{_pct(gap['synthetic_on_real'])}% (means over {_seeds_text(gap['n_real'], gap['n_synthetic'])}{se})."
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
        f"{pp:+.1f} percentage points ({_pct(mixture['mean'])}% vs {_pct(real['mean'])}%, "
        f"{_seeds_text(mixture['n'], real['n'])})."
    )


def training_runs(metrics_list: Sequence[dict]) -> dict:
    """Per train domain: how the models were trained (steps, data, time, val accuracy, code versions)."""
    by_train: dict[str, list[dict]] = defaultdict(list)
    for m in metrics_list:
        by_train[m["train_domain"]].append(m)
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


# --------------------------------------------------------------------------------------------
# Loading inputs from storage
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything the report reads, with what was missing or malformed."""

    metrics: list[dict]
    metrics_keys: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"key", "reason"} per unusable metrics.json
    configs: dict[str, str] = field(default_factory=dict)  # stage -> config.yaml text
    summaries: dict[str, dict] = field(default_factory=dict)  # stage -> summary.json
    dataset_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # domain -> split -> class -> n
    samples: dict[str, dict] = field(default_factory=dict)  # domain -> {"split", "classes", "images"}
    notes: list[str] = field(default_factory=list)
    tune: Optional[dict] = None  # <run>/tune/results.json: the mixing-ratio sweep, when it ran


def load_train_metrics(storage: Storage, run: str) -> tuple[list[dict], list[str], list[dict]]:
    """``(metrics, keys, skipped)`` for every ``<run>/train/*/seed-*/metrics.json``.

    A file that is not valid JSON or breaks the schema is skipped and listed with the reason,
    so one bad model never hides the others and never silently disappears.
    """
    metrics, keys, skipped = [], [], []
    for key in storage.list(Layout(run).stage("train")):
        if not _METRICS_KEY.search(key):
            continue
        try:
            m = storage.read_json(key)
            validate_metrics(m)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            skipped.append({"key": key, "reason": str(exc).splitlines()[0]})
            log.warning("report: skipping %s: %s", key, exc)
            continue
        metrics.append(m)
        keys.append(key)
    return metrics, keys, skipped


def _missing_train_error(storage: Storage, run: str) -> ReportInputError:
    return ReportInputError(
        f"no training metrics for run {run!r}: nothing matches "
        f"{storage.uri(Layout(run).stage('train'))}/<experiment>/seed-<seed>/metrics.json. "
        f"Fix: run the train stage first (python -m ray_jobs.train <config.yaml> run={run}), "
        "or check run= and storage.root"
    )


def load_inputs(storage: Storage, run: str, samples_per_class: int = SAMPLES_PER_CLASS) -> Inputs:
    """Read the report's inputs; raises :class:`ReportInputError` when no usable metrics exist."""
    metrics, keys, skipped = load_train_metrics(storage, run)
    if not metrics:
        err = _missing_train_error(storage, run)
        if skipped:
            err = ReportInputError(
                f"all {len(skipped)} metrics.json files of run {run!r} are unusable, e.g. {skipped[0]['key']}: "
                f"{skipped[0]['reason']}. Fix: rerun the train stage for them"
            )
        raise err
    inputs = Inputs(metrics=metrics, metrics_keys=keys, skipped=skipped)
    for s in skipped:
        inputs.notes.append(f"Skipped {s['key']}: {s['reason']}.")

    layout = Layout(run)
    for stage in PROVENANCE_STAGES:
        try:
            inputs.configs[stage] = storage.read_bytes(layout.config_file(stage)).decode("utf-8", "replace")
        except FileNotFoundError:
            pass
        try:
            summary = storage.read_json(layout.summary(stage))
            if isinstance(summary, dict):
                inputs.summaries[stage] = summary
        except FileNotFoundError:
            pass
        except ValueError as exc:
            inputs.notes.append(f"{layout.summary(stage)} is not valid JSON ({exc}); its counts are left out.")

    _load_dataset(storage, run, inputs, samples_per_class)
    inputs.tune = load_tune_results(storage, run, inputs)
    return inputs


def load_tune_results(storage: Storage, run: str, inputs: Inputs) -> Optional[dict]:
    """The tune stage's ``results.json`` (rows, table by ratio, best ratio), or None when it did not run."""
    key = f"{Layout(run).tune_results}.json"
    try:
        document = storage.read_json(key)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        inputs.notes.append(f"{key} is not valid JSON ({exc}); the mixing-ratio sweep is left out.")
        return None
    if not isinstance(document, dict) or not isinstance(document.get("table"), list) or not document["table"]:
        inputs.notes.append(f"{key} holds no table by ratio; the mixing-ratio sweep is left out (rerun the tune stage).")
        return None
    return document


def _read_table(storage: Storage, key: str, columns: list[str], inputs: Inputs) -> Optional[pa.Table]:
    try:
        return storage.read_parquet(key, columns=columns)
    except FileNotFoundError:
        return None
    except (pa.ArrowException, ValueError, KeyError) as exc:
        inputs.notes.append(f"Dataset table {key} could not be read ({str(exc).splitlines()[0]}); it is left out.")
        return None


def _load_dataset(storage: Storage, run: str, inputs: Inputs, samples_per_class: int) -> None:
    """Per-class counts of every dataset table, and a few decoded images per class and domain."""
    for domain in ("real", "synthetic"):
        for split in SPLITS:
            table = _read_table(storage, Layout(run).dataset_split(domain, split), ["class_name"], inputs)
            if table is not None:
                counts = Counter(table.column("class_name").to_pylist())
                inputs.dataset_counts.setdefault(domain, {})[split] = dict(counts)
        split = next((s for s in SAMPLE_SPLITS if s in inputs.dataset_counts.get(domain, {})), None)
        if split is None:
            inputs.notes.append(
                f"No {domain} dataset tables under {storage.uri(Layout(run).stage('dataset'))}/{domain}/, so no {domain} "
                "sample images or counts are shown (run the dataset stage to include them)."
            )
            continue
        table = _read_table(storage, Layout(run).dataset_split(domain, split), ["id", "label", "class_name", "image"], inputs)
        if table is None:
            continue
        inputs.samples[domain] = _decode_samples(table, samples_per_class, f"{domain}/{split}", inputs)
        inputs.samples[domain]["split"] = split


def _decode_samples(table: pa.Table, per_class: int, where: str, inputs: Inputs) -> dict:
    from PIL import Image

    labels = table.column("label").to_pylist()
    names = table.column("class_name").to_pylist()
    class_names = {int(label): name for label, name in zip(labels, names)}
    picks = choose_samples(table.column("id").to_pylist(), labels, per_class)
    images_col = table.column("image")
    classes, images, bad = [], [], 0
    for label, rows in picks.items():
        decoded = []
        for row in rows:
            try:
                with Image.open(io.BytesIO(images_col[row].as_py())) as img:
                    decoded.append(np.asarray(img.convert("RGB")))
            except Exception:  # PIL raises many types for corrupt bytes; count them, show the rest
                bad += 1
        classes.append(class_names[label])
        images.append(decoded)
    if bad:
        inputs.notes.append(f"{bad} sample images in {where} could not be decoded as images and are left out of the grid.")
    return {"classes": classes, "images": images}


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot, so no global backend or figure state)
# --------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No timestamp or software metadata: the same numbers give the same bytes.
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def _text_colour(value: float) -> str:
    return "white" if value > 0.55 else "black"


def plot_accuracy_matrix(agg: dict) -> bytes:
    """Heatmap of mean test accuracy, train domain (rows) x test domain (columns), mean ± std and n."""
    rows = ordered_domains([*DOMAINS, *agg["train_domains"]])
    cols = ordered_domains([*DOMAINS, *agg["test_domains"]])
    values = np.full((len(rows), len(cols)), np.nan)
    for i, train in enumerate(rows):
        for j, test in enumerate(cols):
            cell = agg["matrix"].get(train, {}).get(test)
            if cell:
                values[i, j] = cell["mean"]
    fig = Figure(figsize=(1.4 * len(cols) + 2.0, 0.95 * len(rows) + 1.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = ListedColormap(_blues(256)).with_extremes(bad="#eeeeee")  # cells not run show grey
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0)
    for i, train in enumerate(rows):
        for j, test in enumerate(cols):
            cell = agg["matrix"].get(train, {}).get(test)
            if cell:
                spread = f" ± {_pct(cell['std'])}" if cell["n"] > 1 else ""
                text = f"{_pct(cell['mean'])}{spread}\nn={cell['n']}"
                ax.text(j, i, text, ha="center", va="center", fontsize=11, color=_text_colour(cell["mean"]))
            else:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=10, color="#888888")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("test domain")
    ax.set_ylabel("train domain")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    ax.set_title("Test accuracy (%), mean ± std over seeds", pad=12)
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean accuracy")
    return _png(fig)


def _blues(n: int) -> np.ndarray:
    # A white-to-blue ramp that stays light enough at the low end for black annotations.
    t = np.linspace(0.0, 1.0, n)[:, None]
    light, dark = np.array([0.97, 0.98, 1.0]), np.array([0.03, 0.19, 0.42])
    return np.hstack([light + (dark - light) * t, np.ones((n, 1))])


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    """Confusion matrix coloured by row-normalised rate (recall per true class), annotated with counts."""
    counts = np.asarray(cm, dtype=np.int64)  # (K, K), rows = true class
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    k = len(classes)
    # Fixed margins instead of a layout engine: one draw instead of several, and this plot is
    # made once per (train, test) cell. Margins grow with the longest class name.
    longest = max(len(c) for c in classes)
    cell = 0.62 if k <= 8 else 0.45  # inches per matrix cell
    side = max(2.6, cell * k)
    left, bottom = 0.75 + 0.085 * longest, 0.75 + 0.065 * longest
    # No colour bar: every cell prints its share, and the room goes to larger numbers instead.
    top, right = 0.5, 0.25
    fig_w, fig_h = left + side + right, bottom + side + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, side / fig_w, side / fig_h))
    ax.imshow(rates, cmap=ListedColormap(_blues(256)), vmin=0.0, vmax=1.0)
    if k <= 20:  # beyond that the annotations overlap; the colours still read
        fontsize = 10 if k <= 8 else 7
        for i in range(k):
            for j in range(k):
                if counts[i, j] == 0:  # a bare, faint 0 keeps the eye on the cells that matter
                    ax.text(j, i, "0", ha="center", va="center", fontsize=fontsize, color="#b0b0b0")
                    continue
                ax.text(
                    j, i, f"{counts[i, j]}\n{100 * rates[i, j]:.0f}%", ha="center", va="center",
                    fontsize=fontsize, color=_text_colour(rates[i, j]),
                )  # fmt: skip
    ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def plot_training_curves(metrics_list: Sequence[dict]) -> Optional[bytes]:
    """Validation accuracy and training loss against step: thin lines per seed, a thick mean per experiment.

    The mean is drawn only where every seed logged the same steps, so it never interpolates.
    Returns None when no model logged a history.
    """
    by_train: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(metrics_list, key=lambda m: m["seed"]):
        if m.get("history"):
            by_train[m["train_domain"]].append(m)
    if not by_train:
        return None
    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    fallback = iter(["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"] * 10)
    for train in ordered_domains(list(by_train)):
        colour = DOMAIN_COLOURS.get(train) or next(fallback)
        runs = by_train[train]
        curves = {"val_accuracy": [], "train_loss": []}
        for m in runs:
            steps = [h.get("step", h.get("epoch")) for h in m["history"]]
            for key, ax, scale in (("val_accuracy", ax_acc, 100.0), ("train_loss", ax_loss, 1.0)):
                pts = [
                    (s, scale * h[key])
                    for s, h in zip(steps, m["history"])
                    if s is not None and isinstance(h.get(key), (int, float))
                ]
                if pts:
                    ax.plot(*zip(*pts), color=colour, linewidth=0.9, alpha=0.45)
                    curves[key].append(pts)
        for key, ax in (("val_accuracy", ax_acc), ("train_loss", ax_loss)):
            series = curves[key]
            label = f"{runs[0]['experiment']} ({len(runs)} seed{'s' if len(runs) != 1 else ''})"
            if series and all([s for s, _ in pts] == [s for s, _ in series[0]] for pts in series):
                steps = [s for s, _ in series[0]]
                mean = np.mean([[v for _, v in pts] for pts in series], axis=0)
                ax.plot(steps, mean, color=colour, linewidth=2.2, label=label)
            elif series:
                ax.plot([], [], color=colour, linewidth=2.2, label=label)  # legend entry only
    ax_acc.set_title("validation accuracy")
    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.set_title("training loss")
    ax_loss.set_ylabel("loss")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return _png(fig)


TUNE_SERIES = (  # (table key, label, colour, marker) of the accuracy-vs-ratio plot and table, in column order
    ("val_real", "real validation (objective)", "#111111", "o"),
    ("test_real", "real test", DOMAIN_COLOURS["real"], "s"),
    ("test_synthetic", "synthetic test", DOMAIN_COLOURS["synthetic"], "^"),
    ("test_mixture", "mixture test", DOMAIN_COLOURS["mixture"], "D"),
)
TUNE_PLOT = "tune-accuracy-vs-ratio.png"


def plot_tune_curve(tune: dict) -> bytes:
    """Accuracy against the synthetic fraction r: mean over seeds with ± std error bars, best r marked.

    ``tune`` is the tune stage's results.json. Ratios without a finished trial leave gaps.
    """
    table = tune["table"]
    fig = Figure(figsize=(7.5, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    # The objective last, dashed, on top: it often lies right on the real-test line.
    for key, label, colour, marker in (*TUNE_SERIES[1:], TUNE_SERIES[0]):
        points = [(e["ratio"], e[key]) for e in table if e.get(key)]
        if not points:
            continue
        ratios = [r for r, _ in points]
        means = [100.0 * c["mean"] for _, c in points]
        stds = [100.0 * c["std"] for _, c in points]
        objective = key == "val_real"
        ax.errorbar(ratios, means, yerr=stds, label=label, color=colour, marker=marker, markersize=5, capsize=3,
                    linewidth=2.0 if objective else 1.4, linestyle="--" if objective else "-",
                    alpha=0.95 if objective else 0.8)  # fmt: skip
    best = tune.get("best")
    if best:
        ax.axvline(best["ratio"], color="#888888", linestyle="--", linewidth=1)
        ax.annotate(f"best r = {best['ratio']:g}", (best["ratio"], 0.0), xycoords=("data", "axes fraction"),
                    xytext=(4, 5), textcoords="offset points", fontsize=9, color="#555555")  # fmt: skip
    ns = sorted({e.get("n", 0) for e in table if e.get("n")}) or [0]
    fixed = tune.get("mode") == "fixed_budget"
    ax.set_xlabel("synthetic fraction r" + (" (of a fixed budget)" if fixed else " (x real images, added to all of them)"))
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-0.04, 1.04)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    ax.set_title(f"Accuracy vs synthetic fraction ({tune.get('mode', '?')}), mean ± std over {n} seed(s)", fontsize=11)
    return _png(fig)


def sample_grid(images: Sequence[Sequence[np.ndarray]], per_class: int, scale: int, gutter: int = 3) -> np.ndarray:
    """One (H, W, 3) uint8 mosaic: a row per class, ``per_class`` columns, each image upscaled
    ``scale`` times by pixel repetition (nearest neighbour keeps 32 px images crisp, not blurred).
    Missing images leave a light grey cell."""
    size = next((img.shape[0] for row in images for img in row), 32)
    cell = size * scale
    height = len(images) * (cell + gutter) + gutter
    width = per_class * (cell + gutter) + gutter
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, row in enumerate(images):
        for j in range(per_class):
            y, x = gutter + i * (cell + gutter), gutter + j * (cell + gutter)
            if j < len(row):
                img = row[j]
                if img.shape[:2] != (size, size):  # odd-sized rows are cropped/padded to the common size
                    img = _fit(img, size)
                grid[y : y + cell, x : x + cell] = img.repeat(scale, axis=0).repeat(scale, axis=1)
            else:
                grid[y : y + cell, x : x + cell] = 235
    return grid


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def plot_sample_grid(classes: Sequence[str], images: Sequence[Sequence[np.ndarray]], title: str, per_class: int) -> bytes:
    """Sample images as a labelled grid (one row per class), drawn at one screen pixel per grid pixel."""
    size = next((img.shape[0] for row in images for img in row), 32)
    scale = max(1, SAMPLE_DISPLAY_PX // size)
    grid = sample_grid(images, per_class, scale)
    dpi = 100
    left, top, right, bottom = 110, 36, 8, 8  # margins in pixels: class labels left, title on top
    h, w = grid.shape[:2]
    fig_w, fig_h = w + left + right, h + top + bottom
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    # Exact pixel placement (no layout engine) so the mosaic is not resampled.
    ax = fig.add_axes((left / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
    ax.imshow(grid, interpolation="nearest")
    cell = size * scale
    ax.set_yticks([3 + i * (cell + 3) + cell / 2 for i in range(len(classes))], classes, fontsize=11)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(left=False)
    fig.suptitle(title, x=left / fig_w, y=1 - 8 / fig_h, ha="left", va="top", fontsize=12)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# The document: built once as blocks, rendered to Markdown and to self-contained HTML
# --------------------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    css: str = ""  # "headline" or "note" in HTML; a blockquote in Markdown


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-align these columns
    caption: str = ""


@dataclass
class Plot:
    name: str  # file name beside report.md
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Code:
    text: str
    caption: str = ""


@dataclass
class Group:
    """Blocks shown side by side in HTML (a figure and its table), one after another in Markdown."""

    blocks: list
    css: str = "group"  # "group": a flex row; "grid3": three equal columns (a matrix row of plots)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: Sequence) -> str:
    """The report as Markdown; images are referenced by file name (the PNGs sit beside it)."""
    out = [f"# {title}", ""]

    def emit(block) -> None:
        if isinstance(block, Heading):
            out.extend([f"{'#' * (block.level + 1)} {block.text}", ""])
        elif isinstance(block, Para):
            out.extend([("> " if block.css else "") + block.text, ""])
        elif isinstance(block, Table):
            if block.caption:
                out.extend([f"*{block.caption}*", ""])
            align = [("---:" if num else "---") for num in (block.numeric or [False] * len(block.header))]
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("| " + " | ".join(align) + " |")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)
            out.append("")
        elif isinstance(block, Plot):
            out.extend([f"![{block.alt}]({block.name})", ""])
            if block.caption:
                out.extend([f"*{block.caption}*", ""])
        elif isinstance(block, Code):
            if block.caption:
                out.extend([f"*{block.caption}*", ""])
            out.extend(["```yaml", block.text.rstrip("\n"), "```", ""])
        elif isinstance(block, Group):
            for b in block.blocks:
                emit(b)

    for block in blocks:
        emit(block)
    return "\n".join(out).rstrip("\n") + "\n"


_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde2ea; --accent:#1f5fa8; --bg-soft:#f5f7fa; }
* { box-sizing:border-box; }
body { margin:0; color:var(--fg); background:#fff;
  font:15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width:1240px; margin:0 auto; padding:32px 28px 64px; }
h1 { font-size:28px; margin:0 0 4px; }
h2 { font-size:21px; margin:40px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:16px; margin:26px 0 8px; }
p { margin:8px 0 12px; }
.meta { color:var(--muted); font-size:13px; margin-bottom:20px; }
.headline { background:#eef4fb; border-left:4px solid var(--accent); padding:12px 16px; font-size:16.5px; }
.note { background:#fff8e6; border-left:4px solid #e0a800; padding:8px 14px; font-size:14px; }
table { border-collapse:collapse; margin:6px 0 18px; font-size:13.5px; }
caption { caption-side:top; text-align:left; color:var(--muted); font-size:13px; padding-bottom:4px; }
th, td { border-bottom:1px solid var(--line); padding:5px 12px; text-align:left; vertical-align:top; }
th { background:var(--bg-soft); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
figure { margin:8px 0 18px; }
figure img { max-width:100%; height:auto; display:block; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.group { display:flex; flex-wrap:wrap; gap:20px; align-items:flex-start; }
.group > * { flex:0 1 auto; }
.grid3 { display:grid; grid-template-columns:repeat(3, minmax(0, 1fr)); gap:14px; }
.grid3 figure { margin:4px 0; }
.empty { color:var(--muted); background:var(--bg-soft); border:1px dashed var(--line); padding:24px 16px; text-align:center; }
pre { background:var(--bg-soft); border:1px solid var(--line); padding:12px 14px; overflow:auto;
  font:12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; max-height:520px; }
"""


def render_html(title: str, meta: str, blocks: Sequence) -> str:
    """The report as one self-contained HTML page: inline CSS, plots as base64 data URIs."""
    esc = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<div class="meta">{esc(meta)}</div>',
    ]

    def emit(block) -> None:
        if isinstance(block, Heading):
            out.append(f"<h{block.level + 1}>{esc(block.text)}</h{block.level + 1}>")
        elif isinstance(block, Para):
            css = f' class="{block.css}"' if block.css else ""
            out.append(f"<p{css}>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            numeric = block.numeric or [False] * len(block.header)
            cls = [' class="num"' if n else "" for n in numeric]
            out.append("<table>")
            if block.caption:
                out.append(f"<caption>{esc(block.caption)}</caption>")
            head = "".join(f"<th{c}>{esc(h)}</th>" for c, h in zip(cls, block.header))
            out.append(f"<thead><tr>{head}</tr></thead><tbody>")
            for row in block.rows:
                out.append("<tr>" + "".join(f"<td{c}>{esc(v)}</td>" for c, v in zip(cls, row)) + "</tr>")
            out.append("</tbody></table>")
        elif isinstance(block, Plot):
            data = base64.b64encode(block.png).decode("ascii")
            caption = f"<figcaption>{esc(block.caption)}</figcaption>" if block.caption else ""
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.alt)}">{caption}</figure>')
        elif isinstance(block, Code):
            if block.caption:
                out.append(f'<p class="meta">{esc(block.caption)}</p>')
            out.append(f"<pre>{esc(block.text)}</pre>")
        elif isinstance(block, Group):
            out.append(f'<div class="{block.css}">')
            for b in block.blocks:
                emit(b)
            out.append("</div>")

    for block in blocks:
        emit(block)
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _support_text(per_test: dict[str, dict]) -> str:
    """'real 1,000, synthetic 980-1,000': per test domain, the (range of) per-class support."""
    parts = []
    for test, per_class in per_test.items():
        supports = [round(s["support"]) for s in per_class.values() if "support" in s]
        if supports:
            lo, hi = min(supports), max(supports)
            parts.append(f"{test} {lo:,}" if lo == hi else f"{test} {lo:,}–{hi:,}")
    return ", ".join(parts) or "not reported"


def _cell_text(cell: Optional[dict]) -> str:
    """'87.5 ± 3.5 (n=2)'; a single seed has no spread to show, so no '± 0.0' that reads as certainty."""
    if not cell:
        return "—"
    spread = f" ± {_pct(cell['std'])}" if cell["n"] > 1 else ""
    return f"{_pct(cell['mean'])}{spread} (n={cell['n']})"


def _num(x: Optional[float], fmt: str = "{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def tune_blocks(tune: dict, plots: dict[str, bytes]) -> list:
    """The mixing-ratio sweep: the best ratio in words, the table by ratio and the accuracy-vs-r plot."""
    mode = tune.get("mode", "?")
    how = (
        "each trial trains on the same number of images, a fraction r of them synthetic"
        if mode == "fixed_budget"
        else "each trial keeps every real training image and adds r times as many synthetic ones"
    )
    blocks: list = [Heading(1, "Mixing ratio: how much synthetic data to use (tune stage)")]
    blocks.append(Para(tune.get("best_sentence") or "", "headline"))
    blocks.append(
        Para(
            f"Mode {mode}: {how}; same network, recipe and {tune.get('steps', '?')} optimizer steps in every trial. "
            "Ratios are chosen on the real validation split only; test accuracy is shown for the record."
        )
    )
    rows = []
    for e in tune["table"]:
        cells = [_cell_text({**e[k], "n": e["n"]} if e.get(k) else None) for k, *_ in TUNE_SERIES]
        left_out = e.get("stopped_early", 0) + e.get("errors", 0)
        rows.append([f"{e['ratio']:g}", f"{e.get('real_images', 0):,} + {e.get('synthetic_images', 0):,}", *cells,
                     str(left_out) if left_out else ""])  # fmt: skip
    table = Table(
        ["r", "real + synthetic images", "val real (%)", "test real (%)", "test synthetic (%)", "test mixture (%)",
         "trials left out"],
        rows,
        [True, True, True, True, True, True, True],
        caption="Accuracy (%), mean ± sample std over the seeds that finished (n). Trials left out: stopped early by "
        "ASHA or failed; they do not enter the means.",
    )  # fmt: skip
    figure = plots.get(TUNE_PLOT)
    blocks.append(Group([table, Plot(TUNE_PLOT, figure, "accuracy against synthetic fraction")]) if figure else table)
    return blocks


def build_blocks(run: str, agg: dict, inputs: Inputs, plots: dict[str, bytes], notes: Sequence[str]) -> list:
    """The report's content, in reading order, as blocks for :func:`render_markdown` / :func:`render_html`."""
    rows = ordered_domains([*DOMAINS, *agg["train_domains"]])
    cols = ordered_domains([*DOMAINS, *agg["test_domains"]])
    blocks: list = []

    # 1. Headline: the gap in words, then the matrix as a table and as a heatmap.
    blocks.append(Heading(1, "Headline: train domain × test domain accuracy"))
    blocks.append(Para(gap_sentence(agg["gap"]), "headline"))
    mixture = mixture_sentence(agg["matrix"])
    if mixture:
        blocks.append(Para(mixture))
    table = Table(
        ["train \\ test", *cols],
        [[r, *(_cell_text(agg["matrix"].get(r, {}).get(c)) for c in cols)] for r in rows],
        [False, *([True] * len(cols))],
        caption="Test accuracy (%), mean ± sample std over seeds (n = seeds). Rows: the data the model was "
        "trained on; columns: the test set.",
    )
    blocks.append(Group([table, Plot("accuracy-matrix.png", plots["accuracy-matrix.png"], "accuracy matrix heatmap")]))
    if notes:
        blocks.append(Heading(2, "Notes"))
        blocks.extend(Para(n, "note") for n in notes)

    if inputs.tune:
        blocks.extend(tune_blocks(inputs.tune, plots))

    # 2. How the models were trained.
    blocks.append(Heading(1, "Training runs"))
    runs = training_runs(inputs.metrics)
    table_rows = []
    for train, r in runs.items():
        val = agg["val_accuracy"].get(train)
        table_rows.append(
            [
                train, r["experiment"], ", ".join(map(str, r["seeds"])), _num(r["steps"]), _num(r["batch_size"]),
                _num(r["train_images"]), _cell_text(val), _num(r["wall_seconds"], "{:,.1f}"),
                _num(r["train_images_per_second"]), ", ".join(r["code_versions"]),
            ]
        )  # fmt: skip
    blocks.append(
        Table(
            ["train domain", "experiment", "seeds", "steps", "batch", "train images", "val accuracy (%)",
             "wall s (mean)", "images/s (mean)", "code version"],
            table_rows,
            [False, False, False, True, True, True, True, True, True, False],
        )
    )  # fmt: skip
    if "training-curves.png" in plots:
        blocks.append(
            Plot(
                "training-curves.png", plots["training-curves.png"], "training curves",
                "Thin lines: one seed each; thick line: mean over seeds (where all seeds logged the same steps).",
            )
        )  # fmt: skip

    # 3. Confusion matrices laid out like the headline matrix (a row per train domain), then
    #    per-class scores with one table per train domain so test domains compare side by side.
    blocks.append(Heading(1, "Confusion matrices"))
    blocks.append(
        Para(
            "One matrix per cell of the headline matrix, summed over seeds: rows are true classes, columns "
            "predicted classes; numbers are counts and the share of the true class, which also sets the colour."
        )
    )
    for train in agg["train_domains"]:
        row: list = []
        for test in agg["test_domains"]:
            name = _confusion_name(train, test)
            if name in plots:
                row.append(Plot(name, plots[name], f"confusion matrix, train {train}, test {test}"))
            else:  # a placeholder keeps every column of the grid on one test domain
                row.append(Para(f"Train {train} → test {test}: no confusion matrix (not tested).", "empty"))
        blocks.append(Group(row, "grid3"))
    blocks.append(Heading(1, "Per-class precision, recall and F1"))
    for train in agg["train_domains"]:
        tests = [t for t in agg["test_domains"] if agg["per_class"].get(train, {}).get(t)]
        if not tests:
            continue
        per_test = {t: agg["per_class"][train][t] for t in tests}
        body = []
        for c in agg["classes"]:
            scores = [per_test[t].get(c, {}) for t in tests]
            body.append([c, *(_num(s.get(k), "{:.3f}") for s in scores for k in ("precision", "recall", "f1"))])
        blocks.append(Heading(2, f"Trained on {train} ({agg['experiments'][train]})"))
        blocks.append(
            Table(
                ["class", *(f"{t} {k}" for t in tests for k in ("P", "R", "F1"))],
                body,
                [False, *([True] * 3 * len(tests))],
                caption="Columns: test domain, then precision (P), recall (R) and F1, each a mean over seeds. "
                f"Test images per class and seed: {_support_text(per_test)}.",
            )
        )

    # 4. What the data looks like and how much of it there is.
    blocks.append(Heading(1, "Data"))
    if inputs.samples:
        blocks.append(Heading(2, "Sample images"))
    for domain in ("real", "synthetic"):
        name = f"samples-{domain}.png"
        if name in plots:
            split = inputs.samples[domain]["split"]
            blocks.append(
                Plot(
                    name, plots[name], f"{domain} sample images",
                    f"{domain.capitalize()} images from the {split} split, {SAMPLES_PER_CLASS} per class, chosen by a "
                    "hash of their id (the same on every run); upscaled with nearest-neighbour.",
                )
            )  # fmt: skip
    if inputs.dataset_counts:
        columns = [(d, s) for d in ("real", "synthetic") for s in SPLITS if s in inputs.dataset_counts.get(d, {})]
        class_order = list(agg["classes"]) + sorted(
            {c for d, s in columns for c in inputs.dataset_counts[d][s]} - set(agg["classes"])
        )
        body = [[c, *(f"{inputs.dataset_counts[d][s].get(c, 0):,}" for d, s in columns)] for c in class_order]
        body.append(["total", *(f"{sum(inputs.dataset_counts[d][s].values()):,}" for d, s in columns)])
        blocks.append(Heading(2, "Dataset composition"))
        blocks.append(
            Table(["class", *(f"{d} {s}" for d, s in columns)], body, [False, *([True] * len(columns))],
                  caption="Images per class in each dataset table.")
        )  # fmt: skip
    for stage in ("prompts", "generate", "curate", "dataset"):
        summary = inputs.summaries.get(stage)
        if summary:
            blocks.append(Heading(2, f"{stage} stage summary"))
            blocks.append(Table(["key", "value"], [list(r) for r in flatten_summary(summary)]))

    # 5. Provenance: which code and which config made these numbers.
    blocks.append(Heading(1, "Provenance"))
    versions = [["report", code_version()]]
    versions += [[f"{stage} stage", str(s.get("code_version", "unknown"))] for stage, s in inputs.summaries.items()]
    versions += [[f"model {r['experiment']}", ", ".join(r["code_versions"])] for r in runs.values()]
    blocks.append(Table(["produced by", "code version"], versions))
    blocks.append(
        Table(
            ["metrics file"],
            [[k] for k in inputs.metrics_keys],
            caption=f"{len(inputs.metrics_keys)} models aggregated"
            + (f"; {len(inputs.skipped)} unusable files skipped (see Notes)." if inputs.skipped else "."),
        )
    )
    stage, text = resolved_config(inputs.configs)
    if text:
        blocks.append(Code(text, f"Resolved config, as written by the {stage} stage ({run}/{stage}/config.yaml)."))
    else:
        blocks.append(Para("No stage config.yaml was found for this run.", "note"))
    return blocks


def resolved_config(configs: dict[str, str]) -> tuple[Optional[str], Optional[str]]:
    """``(stage, text)`` of the config that made the models: the train stage's, else the latest stage's."""
    if "train" in configs:
        return "train", configs["train"]
    for stage in reversed(PROVENANCE_STAGES):
        if stage in configs:
            return stage, configs[stage]
    return None, None


def _confusion_name(train: str, test: str) -> str:
    return f"confusion-{class_slug(train)}-on-{class_slug(test)}.png"


def report_notes(agg: dict, inputs: Inputs) -> list[str]:
    """Things a reader must know to trust the numbers: missing cells, skipped files, mixed code."""
    notes = list(inputs.notes)
    missing_rows = [d for d in DOMAINS if d not in agg["train_domains"]]
    if missing_rows:
        notes.append(
            f"No models trained on {', '.join(missing_rows)} data were found; those matrix rows are empty "
            "(run the train stage for them)."
        )
    for train in agg["train_domains"]:
        absent = [t for t in agg["test_domains"] if t not in agg["matrix"][train]]
        if absent:
            notes.append(f"Models trained on {train} data were not tested on: {', '.join(absent)}.")
        ns = {c["n"] for c in agg["matrix"][train].values()}
        if len(ns) > 1:
            notes.append(f"Not every seed of the {train} models was tested on every domain, so n varies along its row.")
        if agg["matrix"][train] and max(ns) == 1:
            notes.append(
                f"Only one seed was trained on {train} data, so its cells show no spread; train more seeds to estimate it."
            )
    versions = sorted({str(m.get("code_version", "unknown")) for m in inputs.metrics})
    if len(versions) > 1:
        notes.append(
            f"The models were trained by {len(versions)} different code versions ({', '.join(versions)}); compare with care."
        )
    return notes


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_report(cfg: Config, storage: Storage | None = None) -> dict:
    """Build the report for ``cfg.run`` from stored stage outputs; returns the summary that is also stored.

    Raises :class:`ReportInputError` (a ``ValueError``) when the run has no usable training metrics.
    """
    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout = Layout(cfg.run)
    out = layout.stage(STAGE)

    # 1. Read and aggregate; fail before writing anything if there is nothing to report.
    inputs = load_inputs(storage, cfg.run)
    agg = aggregate(inputs.metrics)
    notes = report_notes(agg, inputs)

    # 2. Plots, as PNG bytes keyed by file name.
    plots: dict[str, bytes] = {"accuracy-matrix.png": plot_accuracy_matrix(agg)}
    curves = plot_training_curves(inputs.metrics)
    if curves:
        plots["training-curves.png"] = curves
    for train, row in agg["confusion"].items():
        for test, cm in row.items():
            n = agg["matrix"][train][test]["n"]
            title = f"train {train} → test {test} (summed over {n} seed{'s' if n != 1 else ''})"
            plots[_confusion_name(train, test)] = plot_confusion(cm, agg["classes"], title)
    if inputs.tune:
        plots[TUNE_PLOT] = plot_tune_curve(inputs.tune)
    for domain, s in inputs.samples.items():
        if any(s["images"]):
            title = f"{domain} images ({s['split']} split)"
            plots[f"samples-{domain}.png"] = plot_sample_grid(s["classes"], s["images"], title, SAMPLES_PER_CLASS)

    # 3. The documents.
    title = f"synth report: run {cfg.run}"
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = f"Generated {generated} by synth {code_version()} from {len(inputs.metrics)} trained models."
    blocks = build_blocks(cfg.run, agg, inputs, plots, notes)
    markdown = render_markdown(title, [Para(meta), *blocks])
    page = render_html(title, meta, blocks)
    numbers = {
        "run": cfg.run,
        "generated": generated,
        "code_version": code_version(),
        "headline": {"gap_sentence": gap_sentence(agg["gap"]), "mixture_sentence": mixture_sentence(agg["matrix"])},
        **agg,
        "training_runs": training_runs(inputs.metrics),
        "dataset_counts": inputs.dataset_counts,
        "notes": notes,
        "inputs": {"metrics": inputs.metrics_keys, "skipped": inputs.skipped},
        "tune": inputs.tune,
        "plots": sorted(plots),
    }

    # 4. Write: plots first and the summary last, so a summary means a complete report.
    write_stage_config(storage, cfg, STAGE)
    for name, png in plots.items():
        storage.write_bytes(f"{out}/{name}", png)
    storage.write_json(f"{out}/report.json", numbers)
    storage.write_text(f"{out}/report.md", markdown)
    storage.write_text(f"{out}/report.html", page)
    # PNGs of an earlier report (a cell since removed) would contradict this one; drop them.
    stale = [k for k in storage.list(out) if k.endswith(".png") and k.rsplit("/", 1)[-1] not in plots]
    for key in stale:
        storage.delete(key)

    gap = agg["gap"]
    summary = {
        "html": storage.uri(f"{out}/report.html"),
        "markdown": storage.uri(f"{out}/report.md"),
        "json": storage.uri(f"{out}/report.json"),
        "models": len(inputs.metrics),
        "metrics_skipped": len(inputs.skipped),
        "cells": sum(len(r) for r in agg["matrix"].values()),
        "synthetic_to_real_gap": gap["gap"] if gap else None,
        "plots": len(plots),
        "notes": len(notes),
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("report: %d models, %d plots -> %s", len(inputs.metrics), len(plots), summary["html"])
    return write_stage_summary(storage, cfg, STAGE, summary)
