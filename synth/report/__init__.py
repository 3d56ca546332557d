"""The report stage: what the trained classifiers say about synthetic data, as one publishable page.

Reads what earlier stages stored under ``<run>/`` and writes ``<run>/report/``:

- ``report.html``: self-contained (inline CSS, plots as base64 PNGs), mailable as it is;
- ``report.md``: the same content, referring to the PNGs beside it;
- ``report.json``: the aggregated numbers (with the tune stage's sweep when it ran), for tests and tools;
- one PNG per plot, and ``config.yaml`` / ``summary.json`` like every stage.

The package reads top to bottom in the order the data flows, each module importing only the
ones before it:

- :mod:`~synth.report.numbers`: metrics aggregated over seeds and the headline in words (pure);
- :mod:`~synth.report.inputs`: everything read from storage, missing pieces turned into notes;
- :mod:`~synth.report.plots`: every plot, as PNG bytes;
- :mod:`~synth.report.document`: the blocks and their Markdown / HTML rendering;
- :mod:`~synth.report.content`: the report's sections as blocks;
- here, :func:`run_report`: the stage, which calls them in that order and writes the files.

The report stage needs no Ray: it reads a few JSON files and tables and draws a dozen plots.
"""

from __future__ import annotations

import time

from synth.config import Config
from synth.report.content import build_blocks, report_notes, tune_blocks
from synth.report.document import Code, Group, Heading, Para, Plot, Table, render_html, render_markdown
from synth.report.inputs import Inputs, load_inputs, load_train_metrics, load_tune_results
from synth.report.numbers import (
    ReportInputError,
    ablation_numbers,
    aggregate,
    choose_samples,
    diversity_numbers,
    flatten_summary,
    fooling_rates,
    gap_sentence,
    mixture_sentence,
    training_runs,
    transfer_gap,
    validate_metrics,
)
from synth.report.plots import (
    draw_plots,
    plot_ablation,
    plot_accuracy_matrix,
    plot_confusion,
    plot_sample_grid,
    plot_training_curves,
    plot_tune_curve,
)
from synth.progress import say
from synth.runtime import code_version, write_stage_config, write_stage_summary
from synth.storage import Layout, Storage

__all__ = [
    "STAGE", "run_report", "ReportInputError", "Inputs", "load_inputs", "load_train_metrics", "load_tune_results",
    "aggregate", "choose_samples", "flatten_summary", "gap_sentence", "mixture_sentence", "training_runs",
    "transfer_gap", "validate_metrics", "draw_plots", "plot_accuracy_matrix", "plot_confusion",
    "plot_sample_grid", "plot_training_curves", "plot_tune_curve", "Code", "Group", "Heading", "Para", "Plot",
    "Table", "render_html", "render_markdown", "build_blocks", "report_notes", "tune_blocks", "ablation_numbers",
    "fooling_rates", "diversity_numbers", "plot_ablation",
]  # fmt: skip


STAGE = "report"


def run_report(cfg: Config, storage: Storage | None = None) -> dict:
    """Build the report for ``cfg.run`` from stored stage outputs; returns the summary that is also stored.

    Raises :class:`ReportInputError` (a ``ValueError``) when the run has no usable training metrics.
    """
    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    out = Layout(cfg.run).stage(STAGE)

    # 1. Read and aggregate; fail before writing anything if there is nothing to report.
    inputs = load_inputs(storage, cfg.run)
    agg = aggregate(inputs.metrics)
    # What each technique buys, the fooling rates and diversity: computed once, for plots, text and report.json.
    agg.update(
        ablation=ablation_numbers(inputs.metrics),
        fooling_rate=fooling_rates(inputs.metrics),
        diversity=diversity_numbers(inputs.summaries.get("curate")),
    )
    notes = report_notes(agg, inputs)

    # 2. Plots, as PNG bytes keyed by file name.
    plots = draw_plots(agg, inputs)

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
    say(STAGE, f"{len(inputs.metrics)} models, {len(plots)} plots, {len(notes)} notes -> {summary['html']}")
    return write_stage_summary(storage, cfg, STAGE, summary)
