"""What the report says, section by section, as document blocks.

:func:`build_blocks` lists the sections in reading order; each section is one function from the
numbers (:mod:`synth.report.numbers`), the inputs and the drawn plots to blocks of
:mod:`synth.report.document`. :func:`report_notes` collects what a reader must know to trust the
numbers. Table cells are formatted here: percentages with one decimal, a missing value as "—".
"""

from __future__ import annotations

from typing import Optional, Sequence

from synth.config import OTHER_CLASS
from synth.report.document import Code, Group, Heading, Para, Plot, Table
from synth.report.inputs import PROVENANCE_STAGES, SAMPLES_PER_CLASS, SPLITS, Inputs
from synth.report.numbers import (
    DOMAINS,
    FOOLING_NOTE,
    flatten_summary,
    gap_sentence,
    mixture_sentence,
    ordered_domains,
    pct,
    training_runs,
)
from synth.report.plots import (
    ABLATION_PLOT,
    ACCURACY_PLOT,
    CURVES_PLOT,
    TUNE_PLOT,
    TUNE_SERIES,
    confusion_plot_name,
    samples_plot_name,
)
from synth.runtime import code_version


def build_blocks(run: str, agg: dict, inputs: Inputs, plots: dict[str, bytes], notes: Sequence[str]) -> list:
    """The report's content, in reading order, as blocks for ``render_markdown`` / ``render_html``."""
    blocks = headline_blocks(agg, plots, notes)
    if inputs.tune:
        blocks += tune_blocks(inputs.tune, plots)
    blocks += ablation_blocks(agg, plots)
    blocks += fooling_blocks(agg)
    blocks += curation_blocks(inputs)
    blocks += diversity_blocks(agg)
    blocks += training_blocks(agg, inputs, plots)
    blocks += confusion_blocks(agg, plots)
    blocks += per_class_blocks(agg)
    blocks += data_blocks(agg, inputs, plots)
    blocks += provenance_blocks(run, inputs)
    return blocks


def headline_blocks(agg: dict, plots: dict[str, bytes], notes: Sequence[str]) -> list:
    """The gap in words, then the accuracy matrix as a table beside its heatmap, then the notes."""
    rows = ordered_domains([*DOMAINS, *agg["train_domains"]])
    cols = ordered_domains([*DOMAINS, *agg["test_domains"]])
    blocks: list = [
        Heading(1, "Headline: train domain × test domain accuracy"),
        Para(gap_sentence(agg["gap"]), "headline"),
    ]
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
    blocks.append(Group([table, Plot(ACCURACY_PLOT, plots[ACCURACY_PLOT], "accuracy matrix heatmap")]))
    if notes:
        blocks.append(Heading(2, "Notes"))
        blocks.extend(Para(n, "note") for n in notes)
    return blocks


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


def ablation_blocks(agg: dict, plots: dict[str, bytes]) -> list:
    """What each technique buys: per technique and with / without the CLIP filter, at equal images per class."""
    ablation = agg["ablation"]
    if not ablation:
        return []
    per_class = ", ".join(map(str, ablation["images_per_class"])) or "?"
    blocks: list = [
        Heading(1, "What each technique buys (ablation)"),
        Para(
            f"Each row trains the same network with the same recipe and step budget on {per_class} synthetic images per "
            "class of one selection only (drawn per seed), validates on the whole synthetic val split, and is tested on "
            "real photos. The technique rows differ only in how their images were made; curated vs uncurated differ "
            "only in the CLIP filter (and review): as many images per class, accepted ones vs any."
        ),
    ]
    if ablation["curation_gain"] is not None:
        blocks.append(Para(
            f"The CLIP filter changes accuracy on real test images by {100.0 * ablation['curation_gain']:+.1f} "
            "percentage points (curated minus uncurated, means over seeds).", "headline",
        ))  # fmt: skip
    rows = [
        [r["label"], r["experiment"], _num(r["images_per_class"]), _cell_text(r["real"]), _cell_text(r["synthetic"]),
         _cell_text(r["fooling_rate"])]
        for r in ablation["techniques"] + ablation["curation"]
    ]  # fmt: skip
    table = Table(
        ["selection", "experiment", "images / class", "test real (%)", "test synthetic (%)", "fooling rate (%)"],
        rows,
        [False, False, True, True, True, True],
        caption="Accuracy (%), mean ± sample std over seeds (n). Fooling rate: accuracy on hostile images, lower is "
        "better (— where the run has no hostile images).",
    )
    figure = plots.get(ABLATION_PLOT)
    blocks.append(Group([table, Plot(ABLATION_PLOT, figure, "what each technique buys")]) if figure else table)
    return blocks


def fooling_blocks(agg: dict) -> list:
    """The fooling rate on hostile examples of every trained model; only when some model was tested on them."""
    rates = agg["fooling_rate"]
    if not rates:
        return []
    return [
        Heading(1, "Fooling rate on hostile examples"),
        Para(FOOLING_NOTE),
        Table(
            ["experiment", "fooling rate (%)"],
            [[e, _cell_text(stat)] for e, stat in rates.items()],
            [False, True],
            caption="Mean ± sample std over seeds (n); lower is better.",
        ),
    ]


def curation_blocks(inputs: Inputs) -> list:
    """What the CLIP filter and the review did to the synthetic images, and which ones were trained on."""
    curate = inputs.summaries.get("curate") or {}
    synthetic = ((inputs.summaries.get("dataset") or {}).get("domains") or {}).get("synthetic") or {}
    if not isinstance(curate.get("per_class"), dict):
        return []
    # The curate stage's rule and reason names, in the order it applies them (stored summaries sort keys).
    stored_rules = curate.get("rules") or {}
    rule_order = ("min_similarity", "probability_rule", "min_probability", "dedup_cosine", "top_per_class", "min_per_class")
    said = ", ".join(f"{k}={stored_rules[k]}" for k in rule_order if stored_rules.get(k) not in (None, False))
    said = said or "none (every image accepted)"
    stored_reasons = curate.get("rejected_by") or {}
    reasons = {r: stored_reasons[r] for r in ("similarity", "probability", "duplicate", "top") if r in stored_reasons}
    rows = []
    for class_name, c in curate["per_class"].items():
        if isinstance(c, dict):
            by = c.get("rejected_by") or {}
            rows.append([class_name, _num(c.get("scored")), _num(c.get("accepted")),
                         *(_num(by.get(r, 0)) for r in reasons), _num(c.get("rescued", 0))])  # fmt: skip
    total = ["total", _num(curate.get("scored")), _num(curate.get("accepted")), *(_num(n) for n in reasons.values()),
             _num(curate.get("rescued", 0))]  # fmt: skip
    text = (
        f"The curate stage scored {_num(curate.get('scored'))} synthetic images with CLIP ({curate.get('model', 'model unknown')}) "
        f"against \"{curate.get('prompt', 'a photo of a {cls}')}\" and accepted {_num(curate.get('accepted'))}. Rules: {said}."
    )
    source = synthetic.get("synthetic_source")
    review = synthetic.get("curation") or {}
    if source:
        text += (
            f" The dataset stage applied {_num(review.get('decisions_applied', 0))} review decisions "
            f"({_num(review.get('relabelled', 0))} relabels), and the train and tune stages read the "
            + ("accepted synthetic training images (dataset.synthetic_source resolved to curated)." if source == "curated"
               else "synthetic training images whether accepted or not (dataset.synthetic_source resolved to all).")
        )  # fmt: skip
    return [
        Heading(1, "Curation: CLIP filter and review"),
        Para(text),
        Table(["class", "scored", "accepted", *(f"rejected: {r}" for r in reasons), "rescued"], [*rows, total],
              [False, *([True] * (3 + len(reasons)))], caption="Rejections by the first rule that rejected each image; "
              "rescued: rejected images kept to reach curate.min_per_class.")  # fmt: skip
    ]


def diversity_blocks(agg: dict) -> list:
    """Diversity of the synthetic images (the curate stage's CLIP-embedding distances); only when curate wrote it."""
    diversity = agg["diversity"]
    if not diversity:
        return []
    blocks: list = [
        Heading(1, "Diversity of the synthetic images"),
        Para(
            "Mean pairwise cosine distance between the CLIP image embeddings of the synthetic images (higher: more "
            "varied), over every image and over those the curate stage accepted. Distilled text-to-image models tend "
            "to collapse towards one look; this shows where, and whether the filter narrows the set further."
        ),
    ]
    tables = []
    for key, what in (("per_technique", "technique"), ("per_class", "class")):
        if key in diversity:
            rows = [[k, _num(v["images"]), f"{v['all']:.3f}", "–" if v["accepted"] is None else f"{v['accepted']:.3f}"]
                    for k, v in diversity[key].items()]  # fmt: skip
            tables.append(Table([what, "images", "distance, all", "distance, accepted"], rows, [False, True, True, True]))
    blocks.append(Group(tables) if len(tables) > 1 else tables[0])
    return blocks


def training_blocks(agg: dict, inputs: Inputs, plots: dict[str, bytes]) -> list:
    """How the models were trained: one table row per train domain, then the training curves."""
    table_rows = []
    for train, r in training_runs(inputs.metrics).items():
        val = agg["val_accuracy"].get(train)
        table_rows.append(
            [
                train, r["experiment"], ", ".join(map(str, r["seeds"])), _num(r["steps"]), _num(r["batch_size"]),
                _num(r["train_images"]), _cell_text(val), _num(r["wall_seconds"], "{:,.1f}"),
                _num(r["train_images_per_second"]), ", ".join(r["code_versions"]),
            ]
        )  # fmt: skip
    blocks: list = [
        Heading(1, "Training runs"),
        Table(
            ["train domain", "experiment", "seeds", "steps", "batch", "train images", "val accuracy (%)",
             "wall s (mean)", "images/s (mean)", "code version"],
            table_rows,
            [False, False, False, True, True, True, True, True, True, False],
        ),
    ]  # fmt: skip
    if CURVES_PLOT in plots:
        blocks.append(
            Plot(
                CURVES_PLOT, plots[CURVES_PLOT], "training curves",
                "Thin lines: one seed each; thick line: mean over seeds (where all seeds logged the same steps).",
            )
        )  # fmt: skip
    return blocks


def confusion_blocks(agg: dict, plots: dict[str, bytes]) -> list:
    """Confusion matrices laid out like the headline matrix: a row of plots per train domain."""
    blocks: list = [
        Heading(1, "Confusion matrices"),
        Para(
            "One matrix per cell of the headline matrix, summed over seeds: rows are true classes, columns "
            "predicted classes; numbers are counts and the share of the true class, which also sets the colour."
        ),
    ]
    for train in agg["train_domains"]:
        row: list = []
        for test in agg["test_domains"]:
            name = confusion_plot_name(train, test)
            if name in plots:
                row.append(Plot(name, plots[name], f"confusion matrix, train {train}, test {test}"))
            else:  # a placeholder keeps every column of the grid on one test domain
                row.append(Para(f"Train {train} → test {test}: no confusion matrix (not tested).", "empty"))
        blocks.append(Group(row, "grid3"))
    return blocks


def per_class_blocks(agg: dict) -> list:
    """Per-class precision, recall and F1: one table per train domain, so test domains compare side by side."""
    blocks: list = [Heading(1, "Per-class precision, recall and F1")]
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
    return blocks


def data_blocks(agg: dict, inputs: Inputs, plots: dict[str, bytes]) -> list:
    """What the data looks like and how much of it there is: sample grids, counts, stage summaries."""
    blocks: list = [Heading(1, "Data")]
    if inputs.samples:
        blocks.append(Heading(2, "Sample images"))
    for domain in ("real", "synthetic"):
        name = samples_plot_name(domain)
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
        blocks += [Heading(2, "Dataset composition"), _composition_table(agg["classes"], inputs.dataset_counts)]
    for stage in ("prompts", "generate", "derive", "curate", "dataset"):
        summary = inputs.summaries.get(stage)
        if summary:
            blocks.append(Heading(2, f"{stage} stage summary"))
            blocks.append(Table(["key", "value"], [list(r) for r in flatten_summary(summary)]))
    return blocks


def _composition_table(classes: Sequence[str], counts: dict[str, dict[str, dict[str, int]]]) -> Table:
    """Images per class (rows) in each dataset table (columns), with a total row."""
    columns = [(d, s) for d in ("real", "synthetic") for s in SPLITS if s in counts.get(d, {})]
    # The models' classes first, in label order; a class only the tables know is still counted.
    class_order = list(classes) + sorted({c for d, s in columns for c in counts[d][s]} - set(classes))
    body = [[c, *(f"{counts[d][s].get(c, 0):,}" for d, s in columns)] for c in class_order]
    body.append(["total", *(f"{sum(counts[d][s].values()):,}" for d, s in columns)])
    return Table(["class", *(f"{d} {s}" for d, s in columns)], body, [False, *([True] * len(columns))],
                 caption="Images per class in each dataset table.")  # fmt: skip


def provenance_blocks(run: str, inputs: Inputs) -> list:
    """Which code and which config made these numbers, and which metrics files were read."""
    versions = [["report", code_version()]]
    versions += [[f"{stage} stage", str(s.get("code_version", "unknown"))] for stage, s in inputs.summaries.items()]
    runs = training_runs(inputs.metrics).values()
    versions += [[f"model {r['experiment']}", ", ".join(r["code_versions"])] for r in runs]
    blocks: list = [
        Heading(1, "Provenance"),
        Table(["produced by", "code version"], versions),
        Table(
            ["metrics file"],
            [[k] for k in inputs.metrics_keys],
            caption=f"{len(inputs.metrics_keys)} models aggregated"
            + (f"; {len(inputs.skipped)} unusable files skipped (see Notes)." if inputs.skipped else "."),
        ),
    ]
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
    if (inputs.summaries.get("dataset") or {}).get("hostile") == "other_class" and OTHER_CLASS in agg["classes"]:
        notes.append(
            f"The class {OTHER_CLASS!r} is the hostile examples (dataset.hostile=other_class), which the models learn to "
            "refuse. Real test images hold none (its real recall is empty), and a real image predicted "
            f"{OTHER_CLASS!r} counts as wrong in the real accuracy. The fooling rate is measured on the hostile test "
            "images only, labelled with the class each imitates."
        )
    versions = sorted({str(m.get("code_version", "unknown")) for m in inputs.metrics})
    if len(versions) > 1:
        notes.append(
            f"The models were trained by {len(versions)} different code versions ({', '.join(versions)}); compare with care."
        )
    return notes


# --------------------------------------------------------------------------------------------
# Cell text
# --------------------------------------------------------------------------------------------


def _cell_text(cell: Optional[dict]) -> str:
    """'87.5 ± 3.5 (n=2)'; a single seed has no spread to show, so no '± 0.0' that reads as certainty."""
    if not cell:
        return "—"
    spread = f" ± {pct(cell['std'])}" if cell["n"] > 1 else ""
    return f"{pct(cell['mean'])}{spread} (n={cell['n']})"


def _num(x: Optional[float], fmt: str = "{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def _support_text(per_test: dict[str, dict]) -> str:
    """'real 1,000, synthetic 980-1,000': per test domain, the (range of) per-class support."""
    parts = []
    for test, per_class in per_test.items():
        supports = [round(s["support"]) for s in per_class.values() if "support" in s]
        if supports:
            lo, hi = min(supports), max(supports)
            parts.append(f"{test} {lo:,}" if lo == hi else f"{test} {lo:,}–{hi:,}")
    return ", ".join(parts) or "not reported"
