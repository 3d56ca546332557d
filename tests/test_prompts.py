from synth.config import load_config
from synth.prompts import build_prompt_table, derive_seed, image_id


def test_table_is_complete_stable_and_labelled():
    cfg = load_config(None, ["prompts.per_class=50", "run=r1"])
    table = build_prompt_table(cfg)
    assert table.num_rows == 6 * 50
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["seed"] for r in rows}) == len(rows)
    for r in rows:
        assert cfg.prompts.classes[r["label"]] == r["class_name"]
        assert r["class_name"] in r["prompt"]  # the prompt names its own class...
        others = [c for c in cfg.prompts.classes if c != r["class_name"]]
        assert not any(f" {c} " in f" {r['prompt']} " for c in others)  # ...and no other
        assert r["id"] == image_id(r["class_name"], r["index"])
        assert r["seed"] == derive_seed("r1", r["class_name"], r["index"])
    assert table.equals(build_prompt_table(cfg))  # pure function of the config


def test_diversity_and_adversarial_share():
    cfg = load_config(None, ["prompts.per_class=200", "prompts.adversarial_fraction=0.1"])
    rows = build_prompt_table(cfg).to_pylist()
    cat = [r for r in rows if r["class_name"] == "cat"]
    assert sum(r["technique"] == "adversarial" for r in cat) == 20
    assert len({r["prompt"] for r in cat}) >= 198  # templates x environments x styles, shuffled
    # Adversarial rows are spread through the class, so any prefix has its share.
    assert any(r["technique"] == "adversarial" for r in cat[:20])


def test_seed_depends_on_run_class_and_index():
    assert derive_seed("a", "cat", 0) != derive_seed("b", "cat", 0)
    assert derive_seed("a", "cat", 0) != derive_seed("a", "dog", 0)
    assert derive_seed("a", "cat", 0) != derive_seed("a", "cat", 1)
    assert 0 <= derive_seed("a", "cat", 0) < 2**63


def test_any_class_list_works():
    cfg = load_config(None, ["prompts.classes=[oil painting,pencil drawing]", "prompts.per_class=5"])
    rows = build_prompt_table(cfg).to_pylist()
    assert {r["id"].rsplit("-", 1)[0] for r in rows} == {"oil-painting", "pencil-drawing"}
    assert all(r["class_name"] in r["prompt"] for r in rows)
