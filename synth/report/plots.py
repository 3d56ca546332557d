"""Every plot of the report, and of the tune stage's sweep, as PNG bytes.

Drawn on matplotlib's Agg canvas directly: no pyplot, so no global backend or figure state, and
the same numbers give the same bytes (no timestamp in the PNG). :func:`draw_plots` makes the
report's whole set, keyed by the file name each is stored and referred to under.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from synth.config import class_slug
from synth.report.inputs import SAMPLES_PER_CLASS, Inputs
from synth.report.numbers import DOMAINS, is_ablation, ordered_domains, pct

DOMAIN_COLOURS = {"real": "#1f77b4", "synthetic": "#d62728", "mixture": "#2ca02c"}
# Sample images are upscaled (nearest neighbour, so pixels stay sharp) to about this many pixels.
SAMPLE_DISPLAY_PX = 96

ACCURACY_PLOT = "accuracy-matrix.png"
CURVES_PLOT = "training-curves.png"
TUNE_PLOT = "tune-accuracy-vs-ratio.png"
ABLATION_PLOT = "ablation-what-each-technique-buys.png"
TUNE_SERIES = (  # (table key, label, colour, marker) of the accuracy-vs-ratio plot and table, in column order
    ("val_real", "real validation (objective)", "#111111", "o"),
    ("test_real", "real test", DOMAIN_COLOURS["real"], "s"),
    ("test_synthetic", "synthetic test", DOMAIN_COLOURS["synthetic"], "^"),
    ("test_mixture", "mixture test", DOMAIN_COLOURS["mixture"], "D"),
)


def confusion_plot_name(train: str, test: str) -> str:
    return f"confusion-{class_slug(train)}-on-{class_slug(test)}.png"


def samples_plot_name(domain: str) -> str:
    return f"samples-{domain}.png"


def draw_plots(agg: dict, inputs: Inputs) -> dict[str, bytes]:
    """All of the report's plots, as PNG bytes keyed by file name; a plot without data is left out."""
    plots: dict[str, bytes] = {ACCURACY_PLOT: plot_accuracy_matrix(agg)}
    curves = plot_training_curves([m for m in inputs.metrics if not is_ablation(m)])
    if curves:
        plots[CURVES_PLOT] = curves
    for train, row in agg["confusion"].items():
        for test, cm in row.items():
            n = agg["matrix"][train][test]["n"]
            title = f"train {train} → test {test} (summed over {n} seed{'s' if n != 1 else ''})"
            plots[confusion_plot_name(train, test)] = plot_confusion(cm, agg["classes"], title)
    if inputs.tune:
        plots[TUNE_PLOT] = plot_tune_curve(inputs.tune)
    if agg["ablation"]:
        plots[ABLATION_PLOT] = plot_ablation(agg["ablation"])
    for domain, s in inputs.samples.items():
        if any(s["images"]):
            title = f"{domain} images ({s['split']} split)"
            plots[samples_plot_name(domain)] = plot_sample_grid(s["classes"], s["images"], title, SAMPLES_PER_CLASS)
    return plots


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No timestamp or software metadata: the same numbers give the same bytes.
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def _text_colour(value: float) -> str:
    return "white" if value > 0.55 else "black"


def _blues(n: int) -> np.ndarray:
    # A white-to-blue ramp that stays light enough at the low end for black annotations.
    t = np.linspace(0.0, 1.0, n)[:, None]
    light, dark = np.array([0.97, 0.98, 1.0]), np.array([0.03, 0.19, 0.42])
    return np.hstack([light + (dark - light) * t, np.ones((n, 1))])


# --------------------------------------------------------------------------------------------
# The accuracy matrix and the confusion matrices
# --------------------------------------------------------------------------------------------


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
                spread = f" ± {pct(cell['std'])}" if cell["n"] > 1 else ""
                text = f"{pct(cell['mean'])}{spread}\nn={cell['n']}"
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


# --------------------------------------------------------------------------------------------
# Curves: training over steps, accuracy over the mixing ratio
# --------------------------------------------------------------------------------------------


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


def plot_ablation(ablation: dict) -> bytes:
    """What each technique buys: test-real accuracy per ablation cell (mean ± std over seeds) and its fooling rate.

    Left: accuracy on real test images, one bar per technique cell then curated / uncurated;
    right (when any cell was tested on hostile images): the fooling rate, lower is better.
    """
    rows = ablation["techniques"] + ablation["curation"]
    fooled = any(r["fooling_rate"] for r in rows)
    fig = Figure(figsize=(max(5.5, 1.0 + 0.9 * len(rows)) * (2 if fooled else 1), 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2 if fooled else 1, squeeze=False)[0]
    labels = [r["label"] for r in rows]
    colours = ["#1f77b4" if r in ablation["techniques"] else ("#2ca02c" if r["selection"] == "curated" else "#7f7f7f") for r in rows]
    x = np.arange(len(rows))
    per_class = ", ".join(map(str, ablation["images_per_class"])) or "?"
    for ax, key, title in zip(axes, ("real", "fooling_rate"), (
        f"train synthetic → test real ({per_class} images per class)", "fooling rate on hostile images (lower is better)",
    )):  # fmt: skip
        means = [100.0 * r[key]["mean"] if r[key] else 0.0 for r in rows]
        stds = [100.0 * r[key]["std"] if r[key] and r[key]["n"] > 1 else 0.0 for r in rows]
        ax.bar(x, means, yerr=stds, color=colours, capsize=4)
        for xi, r, m, s in zip(x, rows, means, stds):
            ax.text(xi, m + s + 1, pct(r[key]["mean"]) if r[key] else "—", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


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


# --------------------------------------------------------------------------------------------
# Sample images
# --------------------------------------------------------------------------------------------


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
