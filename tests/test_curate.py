"""The curate stage: CLIP scores exactly once, filter rules checked exactly, bad input refused before Ray."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from synth.config import ConfigError, CurateConfig, load_config
from synth.curate import SCORES_SCHEMA, Spread, filter_class, read_scores, score_images
from synth.storage import Layout, Storage

CLASS_AWARE = "synth.testkit:ClassAwareTestGenerator"
DERIVER = "synth.testkit:ClassAwareTestDeriver"
COLOUR = "synth.testkit:ColourTestScorer"
NO_DERIVE = ["derive.variations.count=0", "derive.inpainting.count=0", "derive.fusion.per_class=0", "derive.parents_per_class=null"]


# The presets' filter rules off: each test asks for its own.
NO_RULES = ["curate.probability_rule=false", "curate.dedup_cosine=null", "curate.min_per_class=null"]


def config(root, *extra, run="c"):
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [f"storage.root={root}", f"run={run}", f"generate.generator={CLASS_AWARE}", f"derive.generator={DERIVER}", *NO_DERIVE,
         "prompts.classes=[cat,dog,frog]", "prompts.per_class=6", "prompts.hostile_per_class=0", "generate.shard_size=4",
         "curate.shard_size=5", *NO_RULES, *extra],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The rules, exactly, as a pure function
# --------------------------------------------------------------------------------------------

IDS = ["c-a", "c-b", "c-c", "c-d", "c-e", "c-f"]
SIM = np.array([0.30, 0.25, 0.30, 0.10, 0.20, 0.05], np.float32)
PROB = np.array([0.5, 0.2, 0.4, 0.6, 0.3, 0.9], np.float32)
EMB = np.array([[1, 0], [0, 1], [1, 0], [-1, 0], [0.6, 0.8], [0, -1]], np.float32)  # c-c duplicates c-a


def verdicts(**rules):
    v = filter_class(IDS, SIM, PROB, EMB, CurateConfig(**rules), num_classes=4)
    return dict(zip(IDS, v.rank.tolist())), dict(zip(IDS, v.reason)), v


def test_rules_in_order_with_ranks_and_reasons():
    rank, reason, v = verdicts(min_similarity=0.08, probability_rule=True, dedup_cosine=0.95, top_per_class=2)
    # Ties in similarity are ranked by id: c-a before c-c.
    assert rank == {"c-a": 1, "c-c": 2, "c-b": 3, "c-e": 4, "c-d": 5, "c-f": 6}
    assert reason == {"c-a": "", "c-c": "duplicate", "c-b": "probability", "c-e": "", "c-d": "top", "c-f": "similarity"}
    assert v.accepted.tolist() == [True, False, False, False, True, False] and v.rescued == 0  # in IDS order


def test_min_per_class_rescues_the_best_ranked_rejected():
    _, reason, v = verdicts(min_similarity=0.08, probability_rule=True, dedup_cosine=0.95, min_per_class=4)
    # Kept by the rules: c-a, c-e, c-d (3 < 4); c-c (rank 2, a duplicate) is the best-ranked rejected one.
    assert reason == {"c-a": "", "c-c": "", "c-b": "probability", "c-e": "", "c-d": "", "c-f": "similarity"}
    assert v.rescued == 1 and int(v.accepted.sum()) == 4
    _, reason, v = verdicts(min_similarity=0.5, min_per_class=2)  # all rejected: the top two come back
    assert [i for i, r in reason.items() if not r] == ["c-a", "c-c"] and v.rescued == 2


def test_probability_floor_and_no_rules():
    _, reason, _ = verdicts(min_probability=0.45)
    assert [i for i, r in reason.items() if not r] == ["c-a", "c-d", "c-f"]
    _, reason, v = verdicts()
    assert set(reason.values()) == {""} and v.accepted.all()
    _, reason, _ = verdicts(top_per_class=1, dedup_cosine=1.0)  # c-c is an exact duplicate: dropped before the quota
    assert reason == {"c-a": "", "c-c": "duplicate", "c-b": "top", "c-e": "top", "c-d": "top", "c-f": "top"}


def test_probability_rule_is_one_over_k_inclusive():
    v = filter_class(["a", "b"], np.array([0.2, 0.1], np.float32), np.array([1 / 3, 0.33], np.float32), np.eye(2, dtype=np.float32),
                     CurateConfig(probability_rule=True), num_classes=3)  # fmt: skip
    assert v.reason == ["", "probability"]


def test_spread_is_the_exact_mean_pairwise_cosine_distance():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    spread = Spread()
    spread.add(e[:20])
    spread.add(e[20:])
    brute = np.mean([1 - e[i] @ e[j] for i in range(50) for j in range(i + 1, 50)])
    assert spread.value() == pytest.approx(brute, abs=1e-6)
    one = Spread()
    one.add(e[:1])
    assert one.value() is None


def test_scores_are_softmax_over_class_prompts():
    class Fixed:
        text = np.eye(3, dtype=np.float32)
        logit_scale = 2.0

        def embed(self, images):
            return np.array([[1, 0, 0], [0.6, 0.8, 0]], np.float32)

    s = score_images(Fixed(), [None, None], [0, 2])
    assert s["similarity"].tolist() == pytest.approx([1.0, 0.0])
    p = np.exp(2 * np.array([0.6, 0.8, 0.0]))
    p /= p.sum()
    assert s["probabilities"][1] == pytest.approx(p, abs=1e-6) and s["prob_own"][1] == pytest.approx(p[2], abs=1e-6)
    assert s["entropy"][1] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, before Ray starts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ("curate.min_similarity=1.5", "[-1, 1]"),
        ("curate.min_probability=-0.1", "[0, 1]"),
        ("curate.dedup_cosine=0", "(0, 1]"),
        ("curate.top_per_class=0", "at least 1"),
        ("curate.min_per_class=0", "at least 1"),
        ("curate.prompt=a photo", "{cls}"),
        ("curate.scorer=not a scorer", "package.module:ClassName"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(tmp_path, override, words):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as exc:
        config(tmp_path, override)
    assert words in str(exc.value)


def test_min_per_class_above_top_per_class_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="must not exceed curate.top_per_class"):
        config(tmp_path, "curate.top_per_class=2", "curate.min_per_class=3")


def test_unloadable_model_and_missing_images_are_refused_before_ray(tmp_path):
    from synth.curate import run_curate

    (tmp_path / "empty-model").mkdir()
    for model, words in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty-model", "holds no config.json"),
                         (REPO / "configs", "holds no config.json")]:  # fmt: skip
        with pytest.raises(ConfigError, match="save_pretrained") as exc:
            run_curate(config(tmp_path, f"curate.model={model}"))
        assert words in str(exc.value)
    with pytest.raises(ConfigError, match="no images to curate.*ray_jobs.generate"):
        run_curate(config(tmp_path, f"curate.scorer={COLOUR}"))
    assert not (tmp_path / "c" / "curate").exists(), "nothing is claimed or written"


# --------------------------------------------------------------------------------------------
# The real code path: a tiny random CLIP on a tiny generated run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from synth.testkit import build_tiny_random_clip

    return build_tiny_random_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_tiny_clip_scores_every_image_once(tmp_path, tiny_clip, ray_local):
    from synth.curate import run_curate
    from synth.generate import run_generate

    cfg = config(tmp_path, f"curate.model={tiny_clip}", "curate.batch_size=4")
    run_generate(cfg)
    summary = run_curate(cfg)
    storage = Storage(str(tmp_path))
    scores = read_scores(storage, "c")
    assert scores.schema.remove_metadata() == SCORES_SCHEMA
    ids = scores.column("id").to_pylist()
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 18
    assert summary["images_scored"] == 18 and summary["shards_scored"] == summary["shards_total"] == 4
    emb = np.array(scores.column("embedding").to_pylist())
    probs = np.array(scores.column("probabilities").to_pylist())
    assert emb.shape == (18, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert probs.shape == (18, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert set(scores.column("stage").to_pylist()) == {"generate"} and all(scores.column("accepted").to_pylist())
    for c in ("cat", "dog", "frog"):
        ranks = sorted(r for r, n in zip(scores.column("rank").to_pylist(), scores.column("class_name").to_pylist()) if n == c)
        assert ranks == list(range(1, 7))
    assert summary["model"] == str(tiny_clip) and set(summary["diversity"]["class"]) == {"cat", "dog", "frog"}
    assert summary["diversity"]["class"]["cat"]["all"] is not None

    again = run_curate(cfg)
    assert again["images_scored"] == 0 and again["shards_already_stored"] == 4, "a rerun scores nothing twice"
    assert read_scores(storage, "c").equals(scores)


# --------------------------------------------------------------------------------------------
# Exactly once with a deterministic scorer: generate + derive, a corrupt shard, new rules
# --------------------------------------------------------------------------------------------


def expected_scores(cfg, storage: Storage) -> dict:
    """Each image's scores recomputed here from the image stages' shards with the same scorer."""
    from synth.images import decode_png
    from synth.testkit import ColourTestScorer

    scorer = ColourTestScorer(cfg.curate, cfg.prompts.classes)
    out = {}
    for stage in ("generate", "derive"):
        for key in storage.list(Layout(cfg.run).shards(stage)):
            t = storage.read_parquet(key, columns=["id", "label", "image"])
            s = score_images(scorer, [decode_png(b) for b in t.column("image").to_pylist()], t.column("label").to_pylist())
            for i, image_id in enumerate(t.column("id").to_pylist()):
                out[image_id] = (stage, float(s["similarity"][i]), s["embedding"][i])
    return out


def test_deterministic_scorer_exactly_once_across_stages_damage_and_new_rules(tmp_path, ray_local):
    from synth.curate import run_curate
    from synth.derive import run_derive
    from synth.generate import run_generate

    derive = ["derive.variations.count=1", "derive.parents_per_class=2"]
    cfg = config(tmp_path, *derive, f"curate.scorer={COLOUR}", "curate.dedup_cosine=0.9999")
    run_generate(cfg)
    run_derive(cfg)
    storage = Storage(str(tmp_path))
    first = run_curate(cfg)
    scores = read_scores(storage, "c")
    expected = expected_scores(cfg, storage)
    assert first["images_scored"] == scores.num_rows == len(expected) == 18 + 6
    rows = scores.to_pylist()
    for row in rows:
        stage, sim, emb = expected[row["id"]]
        assert row["stage"] == stage and row["similarity"] == pytest.approx(sim, abs=1e-6)
        assert np.allclose(row["embedding"], emb, atol=1e-6)
    assert {r["technique"] for r in rows if r["stage"] == "derive"} == {"variation"}
    # The stored verdicts are the pure filter's, class by class.
    for c in ("cat", "dog", "frog"):
        mine = [r for r in rows if r["class_name"] == c]
        v = filter_class([r["id"] for r in mine], np.array([r["similarity"] for r in mine], np.float32),
                         np.array([r["prob_own"] for r in mine], np.float32), np.array([r["embedding"] for r in mine], np.float32),
                         cfg.curate, 3)  # fmt: skip
        assert [r["rank"] for r in mine] == v.rank.tolist() and [r["reason"] for r in mine] == v.reason
    assert first["per_class"]["cat"]["scored"] == 8 and set(first["diversity"]["technique"]) == {"variation", *{r["technique"] for r in rows if r["stage"] == "generate"}}

    # A damaged score shard is quarantined and only it is scored again; the scores come out the same.
    layout = Layout("c")
    from synth.verify import check_curate

    clean = check_curate(cfg, storage)
    assert clean.findings == [] and clean.checked == 5 + 1 + 1
    (tmp_path / layout.shard("curate", 1)).write_bytes(b"not parquet")
    assert [f.kind for f in check_curate(cfg, storage).findings] == ["corrupt"], "verify finds it"
    repaired = run_curate(cfg)
    assert len(repaired["shards_quarantined"]) == 1 and repaired["images_scored"] == 5 and repaired["shards_scored"] == 1
    assert read_scores(storage, "c").equals(scores)

    # New rules re-filter without scoring: two per class, the two best-ranked.
    top = run_curate(config(tmp_path, *derive, f"curate.scorer={COLOUR}", "curate.top_per_class=2"))
    assert top["images_scored"] == 0 and top["accepted"] == 6 and top["rejected_by"]["top"] == 18
    now = read_scores(storage, "c")
    kept = now.filter(now.column("accepted"))
    assert sorted(kept.column("rank").to_pylist()) == [1, 1, 1, 2, 2, 2]

    # Another prompt is another plan: refused, naming the fix.
    with pytest.raises(ConfigError, match="different plan.*prompt.*Fix"):
        run_curate(config(tmp_path, *derive, f"curate.scorer={COLOUR}", "curate.prompt=a {cls}"))

    # Hostile examples are ranked and filtered among themselves: they take no place in a class's top.
    hostile = config(tmp_path / "h", "prompts.hostile_per_class=2", f"curate.scorer={COLOUR}", "curate.top_per_class=1")
    run_generate(hostile)
    summary = run_curate(hostile)
    h_rows = read_scores(Storage(str(tmp_path / "h")), "c").to_pylist()
    for c in ("cat", "dog", "frog"):
        own = [r for r in h_rows if r["class_name"] == c and r["technique"] != "hostile"]
        mimic = [r for r in h_rows if r["class_name"] == c and r["technique"] == "hostile"]
        assert len(own) == 6 and len(mimic) == 2
        assert sorted(r["rank"] for r in own) == list(range(1, 7)) and sorted(r["rank"] for r in mimic) == [1, 2]
        assert [r["rank"] for r in own if r["accepted"]] == [1] and [r["rank"] for r in mimic if r["accepted"]] == [1]
        assert summary["per_class"][c]["scored"] == 6 and summary["per_class"][c]["accepted"] == 1
    assert summary["hostile"] == {"scored": 6, "accepted": 3}


@pytest.mark.slow  # two fresh Ray instances in subprocesses: about a minute on 2 cores
def test_readme_command_as_written(tmp_path, tiny_clip, ray_local):
    """`python -m ray_jobs.curate configs/smoke.yaml` from a directory holding what `make setup` leaves."""
    import os
    import shutil
    import subprocess
    import sys

    from synth.generate import run_generate

    work = tmp_path / "work"
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(tiny_clip, work / ".cache" / "models" / "tiny-clip")
    env = {**{k: v for k, v in os.environ.items() if k not in ("SYNTH_VERBOSE", "RAY_ADDRESS")}, "PYTHONPATH": str(REPO)}

    def curate() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "ray_jobs.curate", "configs/smoke.yaml"]
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    before = curate()
    assert before.returncode == 2 and len(before.stderr.strip().splitlines()) == 1, before.stderr
    assert "no images to curate" in before.stderr and "ray_jobs.generate" in before.stderr
    run_generate(config(work / "outputs", run="smoke"))  # the images, made here: the command under test is curate's
    done = curate()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[curate] 18 images scored (18 now), 18 accepted" in done.stdout + done.stderr
    assert read_scores(Storage(str(work / "outputs")), "smoke").num_rows == 18
