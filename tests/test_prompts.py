import json

import pyarrow as pa
import pytest

from synth.config import TECHNIQUES, TRAIN_TECHNIQUES, ConfigError, load_config
from synth.llm import LLMTexts
from synth.prompts import SCHEMA, build_prompt_table, derive_seed, image_id, run_prompts, technique_counts, technique_order


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


def test_diversity_and_hard_share():
    cfg = load_config(None, ["prompts.per_class=200"])
    rows = build_prompt_table(cfg).to_pylist()
    cat = [r for r in rows if r["class_name"] == "cat"]
    env = [r for r in cat if r["technique"] == "environment"]
    assert sum(r["technique"] == "hard" for r in cat) == 20
    assert len({r["prompt"] for r in env}) == len(env)  # templates x environments x styles, shuffled
    # Hard rows are spread through the class, so any prefix has its share.
    assert any(r["technique"] == "hard" for r in cat[:20])


MIX = ["prompts.techniques.vanilla=0.1", "prompts.techniques.environment=0.3", "prompts.techniques.domain=0.25",
       "prompts.techniques.hard=0.15", "prompts.techniques.llm=0.2"]  # fmt: skip


def test_mix_counts_and_every_prefix_has_its_share():
    cfg = load_config(None, ["prompts.per_class=97", *MIX])
    shares = {"vanilla": 0.1, "environment": 0.3, "domain": 0.25, "hard": 0.15, "llm": 0.2}
    counts = technique_counts(cfg.prompts)
    assert sum(counts.values()) == 97 and all(abs(counts[t] - 97 * s) < 1 for t, s in shares.items())
    order = technique_order(cfg.prompts)
    for n in range(1, 98):
        for t, s in shares.items():
            assert abs(order[:n].count(t) - counts[t] * n / 97) <= 1.0, (n, t)
    # Without LLM texts the llm slots are environment rows, never missing ones.
    rows = build_prompt_table(cfg).to_pylist()
    cat = [r for r in rows if r["class_name"] == "cat"]
    assert len(cat) == 97 and not any(r["technique"] == "llm" for r in cat)
    assert sum(r["technique"] == "environment" for r in cat) == counts["environment"] + counts["llm"]
    domains = [r for r in cat if r["technique"] == "domain"]
    assert all(r["prompt"] == f"a {json.loads(r['params'])['domain']} of a cat" for r in domains)
    assert len({json.loads(r["params"])["domain"] for r in domains}) == len(cfg.prompts.domains)
    assert all(r["params"] == "{}" and r["guidance_scale"] is None for r in cat if r["technique"] != "domain")
    vanilla = [r["prompt"] for r in cat if r["technique"] == "vanilla"]
    assert set(vanilla) <= {t.format(cls="cat") for t in cfg.prompts.vanilla_templates}


def test_llm_rows_use_the_texts_and_record_the_model():
    cfg = load_config(None, ["prompts.per_class=20", *MIX, "prompts.classes=[cat,dog]"])
    llm = LLMTexts(texts={"cat": ["sleeping on a warm windowsill", "chasing a red ball"], "dog": []})
    rows = build_prompt_table(cfg, llm).to_pylist()
    cat_llm = [r for r in rows if r["class_name"] == "cat" and r["technique"] == "llm"]
    assert len(cat_llm) == 4
    assert [r["prompt"] for r in cat_llm] == ["A cat sleeping on a warm windowsill", "A cat chasing a red ball"] * 2
    assert {r["params"] for r in cat_llm} == {json.dumps({"llm_model": cfg.prompts.llm.model, "llm_seed": 0}, sort_keys=True)}
    # dog: no text accepted -> its llm slots are environment rows
    assert not any(r["technique"] == "llm" for r in rows if r["class_name"] == "dog")
    assert build_prompt_table(cfg, llm).equals(build_prompt_table(cfg, llm))


def test_hostile_rows():
    cfg = load_config(None, ["prompts.per_class=10", "prompts.hostile_per_class=7", "run=h"])
    rows = build_prompt_table(cfg).to_pylist()
    hostile = [r for r in rows if r["technique"] == "hostile"]
    assert len(hostile) == 7 * 6 and len(rows) == 17 * 6
    dog = [r for r in hostile if r["class_name"] == "dog"]
    assert [r["id"] for r in dog] == [f"dog-hostile-{k:05d}" for k in range(7)]
    for r in dog:
        params = json.loads(r["params"])
        assert params["imitates"] == "dog" and params["object"] in cfg.prompts.hostile_objects
        assert r["label"] == cfg.prompts.classes.index("dog") and "dog" in r["prompt"] and params["object"] in r["prompt"]
    assert len({r["prompt"] for r in dog}) == 7
    seeds = [r["seed"] for r in rows]
    assert len(set(seeds)) == len(seeds)  # never a per_class row's seed
    assert {r["seed"] for r in dog} == {derive_seed("h", "dog", f"hostile-{k}") for k in range(7)}


def test_guidance_range_is_seeded_per_row():
    cfg = load_config(None, ["prompts.per_class=30", "prompts.guidance_scale_range=[1.5,7.5]", "prompts.hostile_per_class=2"])
    table = build_prompt_table(cfg)
    g = table.column("guidance_scale").to_pylist()
    assert table.schema.field("guidance_scale").type == pa.float64()
    assert all(1.5 <= x <= 7.5 and round(x, 2) == x for x in g) and len(set(g)) > 10
    assert table.equals(build_prompt_table(cfg))
    other = build_prompt_table(load_config(None, ["prompts.per_class=30", "prompts.guidance_scale_range=[1.5,7.5]", "run=x"]))
    assert other.column("guidance_scale").to_pylist()[:30] != g[:30]
    assert build_prompt_table(load_config(None, ["prompts.per_class=3"])).column("guidance_scale").null_count == 6 * 3


@pytest.mark.parametrize(
    "override, needle",
    [
        (["prompts.techniques.vanilla=0.5"], "sum to 1.4, not 1"),
        (["prompts.techniques.vanilla=-0.1", "prompts.techniques.environment=0.8"], "must be >= 0"),
        (["prompts.techniques.template=0.1"], "unknown config key 'prompts.techniques.template'"),
        (["prompts.guidance_scale_range=[5,1]"], "low <= high"),
        (["prompts.guidance_scale_range=[-1,1]"], "low <= high"),
        (["prompts.guidance_scale_range=[1]"], "low <= high"),
        (["prompts.hostile_per_class=-1"], "prompts.hostile_per_class=-1 is invalid"),
        (["prompts.hostile_per_class=3", "prompts.hostile_objects=[]"], "prompts.hostile_per_class=0"),
        (["prompts.hostile_per_class=3", "prompts.hostile_templates=[]"], "prompts.hostile_per_class=0"),
        (["prompts.hostile_templates=['a {cls}']"], "must contain {object}"),
        (["prompts.domains=[]"], "prompts.techniques.domain=0"),
        (["prompts.hard_templates=[]"], "prompts.techniques.hard=0"),
        ([*MIX, "prompts.llm.per_class=0"], "prompts.techniques.llm=0"),
        (["prompts.llm.top_p=0"], "prompts.llm.top_p"),
        (["prompts.llm.template=A {cls}"], "must contain {cls} and {text}"),
        (["dataset.techniques=[hostile]"], "dataset.techniques"),
        (["dataset.techniques=[template]"], "dataset.techniques"),
    ],
)
def test_bad_prompt_knobs_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_zero_shares_and_empty_lists_are_fine_when_unused():
    cfg = load_config(None, ["prompts.techniques.domain=0", "prompts.techniques.environment=0.8", "prompts.domains=[]",
                             "prompts.hostile_objects=[]", "prompts.per_class=5"])  # fmt: skip
    assert build_prompt_table(cfg).num_rows == 30
    assert set(TECHNIQUES) == {*TRAIN_TECHNIQUES, "hostile"} and "hostile" not in TRAIN_TECHNIQUES


def test_prompts_stage_summary_and_line(tmp_path, capsys):
    from synth.storage import Layout, Storage

    cfg = load_config(None, ["prompts.per_class=10", "prompts.hostile_per_class=2", f"storage.root={tmp_path}"])
    summary = run_prompts(cfg)
    assert summary["techniques"] == {"vanilla": 6, "environment": 36, "domain": 12, "hard": 6, "hostile": 12}
    assert summary["hostile"] == 12 and summary["llm"] is None
    assert "12 hostile" in capsys.readouterr().out
    stored = Storage.from_config(cfg.storage).read_parquet(Layout(cfg.run).prompts_table)
    assert stored.schema.equals(SCHEMA) and stored.equals(build_prompt_table(cfg))


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
