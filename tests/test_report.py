"""The report stage: numbers aggregated right, said in words, drawn, and packed into one HTML file.

Fixtures write realistic train-stage metrics (2 seeds x 3 experiments with hand-picked accuracies,
confusion matrices and per-class scores consistent with them) and small dataset tables (through
the dataset stage's own writer) into a local storage root; the tests read back what
``run_report`` wrote and check its content.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_jobs._cli import main as cli_main
from synth.config import load_config
from synth.report import (
    ReportInputError,
    aggregate,
    choose_samples,
    flatten_summary,
    gap_sentence,
    run_report,
    transfer_gap,
)
from synth.runtime import write_stage_config, write_stage_summary
from synth.stats import mean_std
from synth.storage import Storage
from synth.testkit import class_pattern_image, write_dataset_split

CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]
PER_CLASS_TEST = 10  # 60 test images per domain: every accuracy below is a whole number of hits
DOMAINS = ("real", "synthetic", "mixture")

# ACCURACY[train][test] = (seed 0, seed 1)
ACCURACY = {
    "real": {"real": (0.90, 0.85), "synthetic": (0.75, 0.80), "mixture": (0.85, 0.80)},
    "synthetic": {"real": (0.60, 0.55), "synthetic": (0.95, 0.90), "mixture": (0.80, 0.75)},
    "mixture": {"real": (0.90, 0.95), "synthetic": (0.90, 0.85), "mixture": (0.90, 0.90)},
}
SPLIT_PER_CLASS = {"train": 12, "val": 9, "test": 10}


# --------------------------------------------------------------------------------------------
# Fakes
# --------------------------------------------------------------------------------------------


def confusion_for(accuracy: float, seed: int, k: int = len(CLASSES), per_class: int = PER_CLASS_TEST) -> np.ndarray:
    """A (k, k) confusion matrix with exactly round(accuracy * k * per_class) correct predictions."""
    correct_total = round(accuracy * k * per_class)
    correct = np.full(k, correct_total // k)
    correct[: correct_total % k] += 1
    rng = np.random.default_rng(seed)
    cm = np.zeros((k, k), dtype=np.int64)
    for i in range(k):
        cm[i, i] = correct[i]
        for _ in range(per_class - correct[i]):  # errors land on other classes
            cm[i, (i + 1 + rng.integers(k - 1)) % k] += 1
    return cm


def scores_from(cm: np.ndarray) -> dict:
    per_class = {}
    for i, name in enumerate(CLASSES):
        tp, predicted, support = cm[i, i], cm[:, i].sum(), cm[i].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(support)}
    return {"accuracy": np.trace(cm) / cm.sum(), "n": int(cm.sum()), "per_class": per_class, "confusion_matrix": cm.tolist()}


def fake_metrics(train: str, seed: int, tests=DOMAINS, code_version: str = "0.1.0+gabc") -> dict:
    test = {}
    for t in tests:
        # crc32, not hash(): str hashes change with PYTHONHASHSEED, and the fixture must not.
        cm = confusion_for(ACCURACY[train][t][seed], seed=zlib.crc32(f"{train}/{t}/{seed}".encode()) % 1000)
        test[t] = scores_from(cm)
        assert test[t]["accuracy"] == pytest.approx(ACCURACY[train][t][seed])
    final_val = ACCURACY[train][train][seed]
    history = [
        {"epoch": e, "step": 20 * e, "train_loss": 2.0 / e, "val_accuracy": final_val * e / 5, "val_loss": 1.8 / e, "seconds": 1.5 * e}
        for e in range(1, 6)
    ]
    return {
        "experiment": f"train-{train}", "train_domain": train, "seed": seed, "classes": CLASSES,
        "architecture": {"name": "cnn", "width": 64}, "steps": 100, "batch_size": 256, "train_images": 3000,
        "num_workers": 1, "history": history, "val": {"accuracy": final_val}, "test": test,
        "wall_seconds": 12.5 + seed, "train_images_per_second": 24000.0, "code_version": code_version,
    }  # fmt: skip


def write_metrics(storage: Storage, run: str, m: dict) -> str:
    key = f"{run}/train/{m['experiment']}/seed-{m['seed']}/metrics.json"
    storage.write_json(key, m)
    return key


def write_dataset(storage: Storage, run: str) -> None:
    for domain in ("real", "synthetic"):
        for split, n in SPLIT_PER_CLASS.items():
            images, labels, ids = [], [], []
            for label, name in enumerate(CLASSES):
                for i in range(n):
                    img = class_pattern_image(label, seed=1000 * label + i + (0 if domain == "real" else 77))
                    if domain == "synthetic":
                        img = 255 - img  # distinguishable from the real grid at a glance
                    images.append(img)
                    labels.append(label)
                    ids.append(f"{name}-{split}-{i:05d}")  # the sample grid picks rows by a hash of these
            source = "cifar10" if domain == "real" else "generate"
            write_dataset_split(storage, run, domain, split, np.stack(images), labels, CLASSES, ids=ids, source=source)


def make_cfg(root: Path, run: str = "rpt"):
    return load_config(None, [f"storage.root={root}", f"run={run}"])


# --------------------------------------------------------------------------------------------
# One full report, shared by the content tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cfg = make_cfg(root)
    storage = Storage(str(root))
    metrics = [fake_metrics(train, seed) for train in DOMAINS for seed in (0, 1)]
    for m in metrics:
        write_metrics(storage, cfg.run, m)
    write_dataset(storage, cfg.run)
    write_stage_config(storage, cfg, "train")
    write_stage_summary(storage, cfg, "generate", {"images_total": 96, "images_per_class": {c: 16 for c in CLASSES}, "plan": {"model": "tiny"}})
    write_stage_summary(
        storage, cfg, "dataset",
        {
            "classes": CLASSES, "image_size": 32, "val_fraction": 0.1,
            "domains": {"real": {"images": {"train": 72, "val": 54, "test": 60}, "per_class": {"train": {c: 12 for c in CLASSES}}}},
            "tables": {"real/train": f"{root}/rpt/dataset/real/train.parquet"},
        },
    )  # fmt: skip
    storage.write_bytes(f"{cfg.run}/report/confusion-old-on-old.png", b"stale")  # from an earlier report
    summary = run_report(cfg, storage)
    out = root / cfg.run / "report"
    return {
        "cfg": cfg, "storage": storage, "summary": summary, "metrics": metrics, "out": out,
        "json": json.loads((out / "report.json").read_text()),
        "md": (out / "report.md").read_text(), "html": (out / "report.html").read_text(),
    }  # fmt: skip


def test_matrix_means_and_stds_match_hand_computed(full):
    matrix = full["json"]["matrix"]
    # Hand-computed: mean of two seeds, sample std |a - b| / sqrt(2).
    expected = {
        ("real", "real"): (0.875, 0.05 / math.sqrt(2)),
        ("real", "synthetic"): (0.775, 0.05 / math.sqrt(2)),
        ("synthetic", "real"): (0.575, 0.05 / math.sqrt(2)),
        ("synthetic", "synthetic"): (0.925, 0.05 / math.sqrt(2)),
        ("mixture", "real"): (0.925, 0.05 / math.sqrt(2)),
        ("mixture", "mixture"): (0.90, 0.0),
    }
    assert set(matrix) == set(DOMAINS) and all(set(row) == set(DOMAINS) for row in matrix.values())
    for (train, test), (mean, std) in expected.items():
        cell = matrix[train][test]
        assert cell["mean"] == pytest.approx(mean), (train, test)
        assert cell["std"] == pytest.approx(std), (train, test)
        assert cell["n"] == 2 and cell["seeds"] == [0, 1]
    assert full["json"]["val_accuracy"]["synthetic"]["mean"] == pytest.approx(0.925)
    assert full["summary"]["cells"] == 9 and full["summary"]["models"] == 6


def test_gap_is_stated_in_words_everywhere(full):
    gap = full["json"]["gap"]
    assert gap["gap"] == pytest.approx(0.30)
    assert gap["standard_error"] == pytest.approx(math.sqrt(0.00125))
    assert full["summary"]["synthetic_to_real_gap"] == pytest.approx(0.30)
    sentence = full["json"]["headline"]["gap_sentence"]
    assert "gap is 30.0 percentage points" in sentence
    assert "87.5%" in sentence and "57.5%" in sentence and "2 seeds each" in sentence
    assert "standard error of the gap 3.5 pp" in sentence and "recovers 66%" in sentence
    for doc in (full["md"], full["html"]):
        assert "30.0 percentage points" in doc
    assert "+5.0 percentage points" in full["json"]["headline"]["mixture_sentence"]  # mixture 92.5 vs real 87.5
    # The matrix table shows mean ± std (n) in percent.
    assert "| real | 87.5 ± 3.5 (n=2) | 77.5 ± 3.5 (n=2) | 82.5 ± 3.5 (n=2) |" in full["md"]


def test_confusion_summed_and_per_class_averaged_over_seeds(full):
    seeds = [m for m in full["metrics"] if m["train_domain"] == "synthetic"]
    summed = np.add(*(np.array(m["test"]["real"]["confusion_matrix"]) for m in seeds))
    assert full["json"]["confusion"]["synthetic"]["real"] == summed.tolist()
    assert summed.sum() == 2 * PER_CLASS_TEST * len(CLASSES)
    cat = full["json"]["per_class"]["synthetic"]["real"]["cat"]
    for stat in ("precision", "recall", "f1"):
        assert cat[stat] == pytest.approx(np.mean([m["test"]["real"]["per_class"]["cat"][stat] for m in seeds]))
    assert cat["support"] == PER_CLASS_TEST


def test_html_is_self_contained(full):
    page = full["html"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "external reference in the HTML"
    assert "<script" not in page.lower() and "<link" not in page.lower()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == len(full["json"]["plots"])  # every plot is embedded, once
    assert "<style>" in page


def test_plots_are_valid_pngs_and_stale_ones_are_gone(full):
    out = full["out"]
    names = set(full["json"]["plots"])
    confusions = {f"confusion-{t}-on-{s}.png" for t in DOMAINS for s in DOMAINS}
    assert names == {"accuracy-matrix.png", "training-curves.png", "samples-real.png", "samples-synthetic.png", *confusions}
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            assert min(img.size) >= 200, (name, img.size)
    assert not (out / "confusion-old-on-old.png").exists()
    for name in names:  # the Markdown refers to each PNG by its file name
        assert f"]({name})" in full["md"]


def test_sample_grid_upscales_with_nearest_neighbour(full):
    with Image.open(full["out"] / "samples-real.png") as img:
        w, h = img.size
    # 8 images of 32 px at 3x (96 px) plus gutters and the label margin, 6 rows.
    assert w >= 8 * 96 and h >= 6 * 96
    assert "from the val split, 8 per class" in full["md"]


def test_counts_provenance_and_stage_files(full):
    counts = full["json"]["dataset_counts"]
    assert counts["real"]["train"] == {c: SPLIT_PER_CLASS["train"] for c in CLASSES}
    assert counts["synthetic"]["val"]["horse"] == SPLIT_PER_CLASS["val"]
    md = full["md"]
    assert "| total | 72 | 54 | 60 | 72 | 54 | 60 |" in md
    assert "generate stage summary" in md and "| images_total | 96 |" in md
    assert "| domains.real.images | test: 60, train: 72, val: 54 |" in md
    assert "Resolved config, as written by the train stage" in md and "run: rpt" in md
    assert "0.1.0+gabc" in md  # the training code version
    out = full["out"]
    assert (out / "config.yaml").read_text().startswith("# synth ")
    stored = json.loads((out / "summary.json").read_text())
    assert stored["stage"] == "report" and stored["html"].endswith("report.html")


# --------------------------------------------------------------------------------------------
# Partial and broken inputs
# --------------------------------------------------------------------------------------------


def test_missing_train_metrics_names_the_fix(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(ReportInputError, match="run the train stage first"):
        run_report(cfg, Storage(str(tmp_path)))
    assert not (tmp_path / cfg.run / "report").exists()


def test_cli_reports_missing_metrics_in_one_line(tmp_path, capsys):
    code = cli_main("report", run_report, [f"storage.root={tmp_path}", "run=nothing"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("synth report: error: no training metrics for run 'nothing'") and "train stage first" in err


def test_partial_run_still_reports_and_says_what_is_missing(tmp_path):
    cfg = make_cfg(tmp_path)
    storage = Storage(str(tmp_path))
    write_metrics(storage, cfg.run, fake_metrics("real", 0, tests=("real",)))
    write_metrics(storage, cfg.run, fake_metrics("synthetic", 0, tests=("real", "synthetic")))
    storage.write_text(f"{cfg.run}/train/train-real/seed-1/metrics.json", "{not json")
    storage.write_json(f"{cfg.run}/train/train-real/seed-2/metrics.json", {"experiment": "train-real"})
    summary = run_report(cfg, storage)
    report = json.loads((tmp_path / cfg.run / "report" / "report.json").read_text())
    notes = " ".join(report["notes"])
    assert summary["models"] == 2 and summary["metrics_skipped"] == 2
    assert "seed-1/metrics.json" in notes and "missing key 'train_domain'" in notes
    assert "run the dataset stage" in notes
    assert "No models trained on mixture data" in notes and "not tested on: synthetic" in notes
    assert "Only one seed" in notes
    assert report["matrix"]["real"]["real"]["std"] == 0.0
    assert report["gap"]["gap"] == pytest.approx(0.90 - 0.60) and report["gap"]["standard_error"] is None
    assert not any(p.startswith("samples-") for p in report["plots"])
    md = (tmp_path / cfg.run / "report" / "report.md").read_text()
    assert "| real | 90.0 (n=1) | — | — |" in md  # one seed: no '± 0.0' posing as certainty
    assert "| mixture | — | — | — |" in md
    page = (tmp_path / cfg.run / "report" / "report.html").read_text()
    assert "Train real → test synthetic: no confusion matrix" in page  # keeps the grid's columns aligned


def test_only_broken_metrics_is_an_error(tmp_path):
    cfg = make_cfg(tmp_path)
    storage = Storage(str(tmp_path))
    storage.write_text(f"{cfg.run}/train/train-real/seed-0/metrics.json", "[]")
    with pytest.raises(ReportInputError, match="unusable.*rerun the train stage"):
        run_report(cfg, storage)


def test_aggregate_refuses_ambiguous_or_inconsistent_models():
    a, b = fake_metrics("real", 0), fake_metrics("real", 1)
    b["experiment"] = "train-real-v2"
    with pytest.raises(ReportInputError, match="claimed by several experiments"):
        aggregate([a, b])
    c = fake_metrics("synthetic", 0)
    c["classes"] = CLASSES[::-1]
    with pytest.raises(ReportInputError, match="disagree on their classes"):
        aggregate([a, c])
    with pytest.raises(ReportInputError, match="appears twice"):
        aggregate([a, fake_metrics("real", 0)])
    with pytest.raises(ReportInputError, match="train stage first"):
        aggregate([])


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_mean_std_uses_sample_std_and_zero_for_one_value():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5) and std == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    with pytest.raises(ValueError):
        mean_std([])


def test_gap_sentence_sign_and_absence():
    matrix = {"real": {"real": {"mean": 0.6, "std": 0.0, "n": 1}}, "synthetic": {"real": {"mean": 0.7, "std": 0.0, "n": 1}}}
    assert "gap is -10.0 percentage points" in gap_sentence(transfer_gap(matrix))
    assert transfer_gap({"real": {"real": matrix["real"]["real"]}}) is None
    assert "cannot be stated" in gap_sentence(None)


def test_choose_samples_is_deterministic_and_order_free():
    ids = [f"img-{i}" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    picks = choose_samples(ids, labels, per_class=3)
    assert sorted(picks) == [0, 1, 2, 3] and all(len(rows) == 3 for rows in picks.values())
    assert all(labels[row] == label for label, rows in picks.items() for row in rows)
    order = list(range(40))[::-1]
    again = choose_samples([ids[i] for i in order], [labels[i] for i in order], per_class=3)
    assert {label: {ids[order[r]] for r in rows} for label, rows in again.items()} == {
        label: {ids[r] for r in rows} for label, rows in picks.items()
    }


def test_flatten_summary_keeps_counts_readable():
    rows = dict(flatten_summary({"stage": "x", "images_total": 12000, "per_class": {"cat": 5, "dog": 7}, "ids": list(range(50))}))
    assert rows == {"images_total": "12,000", "per_class": "cat: 5, dog: 7", "ids": "(50 items)"}


# --------------------------------------------------------------------------------------------
# What a reader sees (needs a headless Chromium; skipped without one)
# --------------------------------------------------------------------------------------------

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_html_renders_in_a_browser(full, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
        "--window-size=1200,2400", (full["out"] / "report.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape == (2400, 1200)
    # The screenshot stays in pytest's basetemp (the last few runs are kept) for a human look.
    assert pixels.std() > 20, f"the rendered page is blank: {shot}"


# --------------------------------------------------------------------------------------------
# What each technique buys: ablation cells, fooling rate, diversity (sections only with data)
# --------------------------------------------------------------------------------------------

ABLATION = {  # experiment -> (ablation record, real accuracy by seed, fooling rate by seed)
    "ablate-technique-vanilla": ({"selection": "technique:vanilla", "technique": "vanilla"}, (0.50, 0.60), (0.40, 0.50)),
    "ablate-technique-domain": ({"selection": "technique:domain", "technique": "domain"}, (0.70, 0.80), (0.30, 0.20)),
    "ablate-curated": ({"selection": "curated", "curated": True}, (0.75, 0.85), (0.25, 0.35)),
    "ablate-uncurated": ({"selection": "uncurated", "curated": False}, (0.65, 0.75), (0.45, 0.55)),
}


def with_fooling(m: dict, rates) -> dict:
    m["test"]["adversarial"] = scores_from(confusion_for(rates[m["seed"]], seed=7 + m["seed"]))
    return m


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablated")
    cfg = make_cfg(root, "abl")
    storage = Storage(str(root))
    for seed in (0, 1):
        write_metrics(storage, cfg.run, with_fooling(fake_metrics("real", seed), (0.60, 0.70)))
        for experiment, (record, real, fooled) in ABLATION.items():
            m = fake_metrics("synthetic", seed, tests=("real",))
            m["test"]["real"] = scores_from(confusion_for(real[seed], seed=seed))
            m.update(experiment=experiment, ablation={**record, "images_per_class": 8}, synthetic_source="curated")
            write_metrics(storage, cfg.run, with_fooling(m, fooled))
    # The curate summary's shape: per group, the distance over all images and over the accepted ones.
    diversity = {
        "technique": {"vanilla": {"all": 0.21, "accepted": 0.18, "images": 48}, "domain": {"all": 0.34, "accepted": None, "images": 1}},
        "class": {c: {"all": 0.3, "accepted": 0.25, "images": 32} for c in CLASSES},
    }
    rejected = {"similarity": 0, "probability": 30, "duplicate": 4, "top": 0}
    per_class = {c: {"scored": 32, "accepted": 20, "rejected": 12, "rejected_by": {**rejected, "probability": 10, "duplicate": 2},
                     "rescued": 1} for c in CLASSES}  # fmt: skip
    write_stage_summary(storage, cfg, "curate", {
        "images": 96, "diversity": diversity, "scored": 96, "accepted": 60, "rejected_by": rejected, "rescued": 3,
        "per_class": per_class, "model": "openai/clip-vit-base-patch32", "prompt": "a photo of a {cls}",
        "rules": {"min_similarity": None, "probability_rule": True, "dedup_cosine": 0.95, "top_per_class": None},
    })  # fmt: skip
    write_stage_summary(storage, cfg, "dataset", {"domains": {"synthetic": {
        "synthetic_source": "curated", "curation": {"decisions_applied": 5, "relabelled": 2}}}})  # fmt: skip
    run_report(cfg, storage)
    out = root / cfg.run / "report"
    return {
        "json": json.loads((out / "report.json").read_text()), "out": out,
        "md": (out / "report.md").read_text(), "html": (out / "report.html").read_text(),
    }  # fmt: skip


def test_ablation_table_plot_fooling_rate_and_diversity(ablated):
    numbers = ablated["json"]
    # Ablation cells stay out of the headline matrix (one train-real row here).
    assert numbers["train_domains"] == ["real"] and "adversarial" in numbers["test_domains"]
    ablation = numbers["ablation"]
    assert [r["label"] for r in ablation["techniques"]] == ["domain", "vanilla"]
    assert [r["label"] for r in ablation["curation"]] == ["curated", "uncurated"] and ablation["images_per_class"] == [8]
    vanilla = ablation["techniques"][1]
    assert vanilla["real"]["mean"] == pytest.approx(0.55) and vanilla["real"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert vanilla["fooling_rate"]["mean"] == pytest.approx(0.45)
    assert ablation["curation_gain"] == pytest.approx(0.10)
    assert numbers["fooling_rate"]["train-real"]["mean"] == pytest.approx(0.65)
    assert set(numbers["fooling_rate"]) == {"train-real", *ABLATION}
    assert numbers["diversity"]["per_technique"] == {
        "domain": {"all": 0.34, "accepted": None, "images": 1}, "vanilla": {"all": 0.21, "accepted": 0.18, "images": 48}
    }
    assert "ablation-what-each-technique-buys.png" in numbers["plots"]
    assert (ablated["out"] / "ablation-what-each-technique-buys.png").read_bytes().startswith(b"\x89PNG")
    for doc in (ablated["md"], ablated["html"]):
        assert "What each technique buys" in doc and "+10.0 percentage points" in doc
        assert "Fooling rate on hostile examples" in doc and "Lower is better" in doc
        assert "Diversity of the synthetic images" in doc and "0.340" in doc and "0.180" in doc
        assert "Curation: CLIP filter and review" in doc and "accepted 60" in doc
        assert "probability_rule=True, dedup_cosine=0.95" in doc and "applied 5 review decisions (2 relabels)" in doc
    assert "| total | 96 | 60 | 0 | 30 | 4 | 0 | 3 |" in ablated["md"]
    assert "| vanilla | ablate-technique-vanilla | 8 | 55.0 ± 7.1 (n=2) | — | 45.0 ± 7.1 (n=2) |" in ablated["md"]


def test_sections_without_their_data_are_left_out(full):
    numbers = full["json"]
    assert numbers["ablation"] is None and numbers["fooling_rate"] is None and numbers["diversity"] is None
    assert not any(p.startswith("ablation") for p in numbers["plots"])
    for doc in (full["md"], full["html"]):
        assert "What each technique buys" not in doc and "Fooling rate" not in doc and "Diversity of" not in doc
