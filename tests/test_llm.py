"""synth.llm: the cleaning and refusal rules exactly (a plain function as the text source), the cache,
and the real path through transformers and Ray with a tiny random-weight model that writes garbage."""

from __future__ import annotations

import json

import pytest

from synth.config import ConfigError, LLMConfig, load_config
from synth.llm import (
    CLIP_TOKENS,
    clean_line,
    collect_texts,
    ensure_llm_texts,
    read_llm_texts,
    rejection,
)
from synth.storage import Layout, Storage

CLASSES = ["cat", "dog"]
LLM_ON = ["prompts.techniques.environment=0.5", "prompts.techniques.llm=0.1", "prompts.classes=[cat,dog]"]


def words_tokens(text: str) -> int:
    """A stand-in tokenizer: start + end + one token per word."""
    return len(text.split()) + 2


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ('  "sleeping on a sunny windowsill."\nsecond line', "sleeping on a sunny windowsill"),
        ("1. chasing a ball in the garden!", "chasing a ball in the garden"),
        ("- 'curled up by the fire'", "curled up by the fire"),
        ("\n\n* 2) hiding under a bed...", "hiding under a bed"),
        ("A cat stretching on the sofa.", "stretching on the sofa"),
        ("the Cat   running   through   grass ;", "running through grass"),
        ("“napping in a basket”", "napping in a basket"),
        ("", ""),
    ],
)
def test_clean_line(raw, cleaned):
    assert clean_line(raw, "cat") == cleaned


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("; 9 * ) . 6 ~ / , ' _ ^", "garbage"),
        ("x7 #% 12 ab", "garbage"),
        ("sleeping", "too_short"),
        ("q w e r t y", "too_short"),
        (" ".join(["very"] * 21), "too_long"),
        ("x" * 160 + " on a hill", "too_long"),
        ("watching another cat nearby", "repeats_class"),
        ("playing with cats in the yard", "repeats_class"),
        ("chasing a dog in the park", "other_class"),
        ("sleeping on a warm windowsill", None),
        ("doggedly climbing a tall tree", None),  # a word that starts with another class is not it
    ],
)
def test_rejection_rules(text, reason):
    assert rejection(text, "cat", CLASSES, words_tokens, "A {cls} {text}") == reason


def test_the_token_limit_counts_the_full_prompt_with_the_generators_tokenizer(clip_tokenizer):
    """The tiny CLIP tokenizer has no merges: one token per letter, plus start and end."""
    from synth.llm import load_token_counter

    count = load_token_counter(str(clip_tokenizer), "tokenizer", "generate.model")  # a tokenizer folder of its own
    assert count("A cat") == 2 + 4
    fits = " ".join(["sleepin"] * 10) + " a"  # 71 letters: "A cat " + it is exactly 77 tokens
    assert count(f"A cat {fits}") == CLIP_TOKENS
    assert rejection(fits, "cat", CLASSES, count, "A {cls} {text}") is None
    assert rejection(fits + "a", "cat", CLASSES, count, "A {cls} {text}") == "too_many_tokens"  # refused, never cut
    # The template is part of what is counted.
    assert rejection(fits, "cat", CLASSES, count, "A photo of a {cls} {text}") == "too_many_tokens"


def scripted(lines: dict[tuple[str, int], list[str]], calls: list):
    """A deterministic text source: the lines of (class, attempt), recording each call."""

    def source(class_name: str, attempt: int, n: int) -> list[str]:
        calls.append((class_name, attempt, n))
        return lines.get((class_name, attempt), [])

    return source


def test_collect_texts_cleans_dedups_counts_and_stops():
    lines = {
        ("cat", 0): ["1. Sleeping on a rug.", "sleeping  on a RUG", "???", "a dog barking", "chasing a moth"],
        ("cat", 1): ["climbing a fence", "sitting in a box", "never read: per_class reached"],
        ("dog", 0): ["!!!", ""],
        ("dog", 1): ["x"],
    }
    calls: list = []
    m = LLMConfig(per_class=4, attempts=3)
    found = collect_texts(scripted(lines, calls), CLASSES, m, words_tokens)
    assert found.texts == {"cat": ["Sleeping on a rug", "chasing a moth", "climbing a fence", "sitting in a box"], "dog": []}
    # "???" and "!!!" are empty once trailing punctuation is gone; "x" is one letter, not a word.
    assert found.rejected == {"empty": 3, "too_short": 1, "other_class": 1, "duplicate": 1}
    assert list(found.rejected) == ["empty", "too_short", "other_class", "duplicate"]  # in the rules' order
    # cat stopped after its 4th text (attempt 1); dog used all 3 attempts.
    assert calls == [("cat", 0, 4), ("cat", 1, 4), ("dog", 0, 4), ("dog", 1, 4), ("dog", 2, 4)]
    assert found.calls == 5 and found.accepted == 4


def good_source(calls: list):
    phrases = ["sleeping on a warm windowsill", "chasing a red ball", "hiding in tall grass", "resting under a tree"]
    return scripted({(c, a): [f"{p} {a}" if a else p for p in phrases] for c in CLASSES for a in range(4)}, calls)


def test_good_path_writes_the_cache_and_a_rerun_calls_nothing(tmp_path, capsys):
    from synth.prompts import build_prompt_table, run_prompts

    cfg = load_config(None, [*LLM_ON, "prompts.per_class=20", "prompts.llm.per_class=3", f"storage.root={tmp_path}"])
    storage = Storage.from_config(cfg.storage)
    calls: list = []
    found = ensure_llm_texts(cfg, storage, source=good_source(calls), count_tokens=words_tokens)
    assert found.texts["cat"] == ["sleeping on a warm windowsill", "chasing a red ball", "hiding in tall grass"]
    assert len(calls) == 2 and not found.from_cache
    cache = storage.read_parquet(Layout(cfg.run).llm_texts)
    assert cache.column_names == ["class_name", "k", "text", "llm_model", "llm_seed"] and cache.num_rows == 6
    assert set(cache.column("llm_model").to_pylist()) == {cfg.prompts.llm.model}

    # A rerun reads the cache: the source is never called (and no model could be loaded: the
    # default model is not available offline, so any attempt would fail).
    again = ensure_llm_texts(cfg, storage, source=good_source(calls), count_tokens=words_tokens)
    assert len(calls) == 2 and again.from_cache and again.texts == found.texts
    summary = run_prompts(cfg, storage)
    assert summary["llm"]["accepted"] == {"cat": 3, "dog": 3} and summary["llm"]["model_calls"] == 0
    assert summary["llm"]["from_cache"] and summary["llm"]["fallback_rows"] == 0
    assert summary["techniques"]["llm"] == 2 * 2
    assert "6 texts accepted (cached, 0 model calls)" in capsys.readouterr().out
    table = build_prompt_table(cfg, read_llm_texts(cfg, storage))
    llm_rows = [r for r in table.to_pylist() if r["technique"] == "llm"]
    assert llm_rows[0]["prompt"] == "A cat sleeping on a warm windowsill"
    assert json.loads(llm_rows[0]["params"]) == {"llm_model": cfg.prompts.llm.model, "llm_seed": 0}

    # Other settings: the cache is refused with the fix, and read_llm_texts (verify) ignores it.
    other = load_config(None, [*LLM_ON, "prompts.per_class=20", "prompts.llm.per_class=3", "prompts.llm.seed=7", f"storage.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"written with other settings \(seed differ\).*Fix") as err:
        ensure_llm_texts(other, storage, source=good_source(calls), count_tokens=words_tokens)
    assert "\n" not in str(err.value) and len(calls) == 2
    assert read_llm_texts(other, storage) is None


def test_all_rejected_falls_back_to_environment_prompts(tmp_path, capsys):
    from synth.prompts import run_prompts

    cfg = load_config(None, [*LLM_ON, "prompts.per_class=10", "prompts.llm.per_class=2", "prompts.llm.attempts=2", f"storage.root={tmp_path}"])
    storage = Storage.from_config(cfg.storage)
    ensure_llm_texts(cfg, storage, source=lambda c, a, n: ["#", "A cat", "x y"], count_tokens=words_tokens)
    summary = run_prompts(cfg, storage)
    assert summary["llm"]["accepted"] == {"cat": 0, "dog": 0}
    # cat: '#' garbage, 'A cat' empty once its opening is dropped, 'x y' too short; dog: 'A cat' names another class.
    assert summary["llm"]["rejected"] == {"empty": 2, "garbage": 4, "too_short": 4, "other_class": 2}
    assert summary["llm"]["fallback_rows"] == 2 and summary["llm"]["fallback_classes"] == ["cat", "dog"]
    assert "llm" not in summary["techniques"] and summary["rows"] == 20
    out = capsys.readouterr().out
    assert "12 lines rejected (2 empty, 4 garbage, 4 too_short, 2 other_class), 2 rows of 2 classes fell back to environment prompts" in out


def test_a_model_that_cannot_be_loaded_stops_before_ray(tmp_path, monkeypatch):
    import synth.llm as llm

    monkeypatch.setattr(llm, "write_with_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    for model, needle in ((str(tmp_path / "nowhere"), "neither an existing folder"), (str(tmp_path), "without config.json")):
        cfg = load_config(None, [*LLM_ON, f"prompts.llm.model={model}", f"storage.root={tmp_path / 'out'}"])
        with pytest.raises(ConfigError, match=rf"{needle}.*prompts.techniques.llm=0") as err:
            ensure_llm_texts(cfg, Storage.from_config(cfg.storage))
        assert "\n" not in str(err.value)


def test_a_generator_tokenizer_that_cannot_be_loaded_is_a_clear_error(tmp_path, tiny_llm, monkeypatch):
    import synth.llm as llm

    monkeypatch.setattr(llm, "write_with_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    cfg = load_config(None, [*LLM_ON, f"prompts.llm.model={tiny_llm}", f"generate.model={tmp_path}", f"storage.root={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"text-encoder tokenizer of generate.model=.*prompts.llm.tokenizer=.*prompts.techniques.llm=0"):
        ensure_llm_texts(cfg, Storage.from_config(cfg.storage))


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from synth.testkit import build_tiny_random_llm

    return build_tiny_random_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from synth.testkit import build_tiny_clip_tokenizer

    folder = tmp_path_factory.mktemp("models") / "clip-tokenizer"
    build_tiny_clip_tokenizer(folder).save_pretrained(folder)
    return folder


def test_hf_source_is_seeded_and_uses_the_chat_template(tiny_llm, tmp_path):
    from synth.llm import HFTextSource
    from synth.testkit import build_tiny_random_llm

    source = HFTextSource(LLMConfig(seed=3, max_new_tokens=8), str(tiny_llm))
    text, templated = source.prompt("cat")
    assert templated and text.startswith("<|user|>") and text.endswith("<|assistant|>")
    first = source("cat", 0, 3)
    assert len(first) == 3 and first == source("cat", 0, 3) and first != source("cat", 1, 3)
    plain = HFTextSource(LLMConfig(seed=3, max_new_tokens=8), str(build_tiny_random_llm(tmp_path / "plain", chat_template=False)))
    assert plain.prompt("cat") == ("Short actions and places for photographs.\nA cat", False)
    assert len(plain("cat", 0, 2)) == 2


def test_tiny_random_model_through_ray_rejects_everything_then_reads_its_cache(tmp_path, tiny_llm, clip_tokenizer, ray_local, monkeypatch, capsys):
    """The real path: one Ray task loads the model and the tokenizer; garbage is counted and falls back."""
    import synth.llm as llm
    from synth.prompts import run_prompts

    cfg = load_config(None, [*LLM_ON, "prompts.per_class=10", f"prompts.llm.model={tiny_llm}", f"prompts.llm.tokenizer={clip_tokenizer}",
                             "prompts.llm.per_class=2", "prompts.llm.attempts=2", "prompts.llm.max_new_tokens=12", f"storage.root={tmp_path}"])  # fmt: skip
    summary = run_prompts(cfg)
    m = summary["llm"]
    assert m["accepted"] == {"cat": 0, "dog": 0} and m["model_calls"] == 4
    assert m["rejected_total"] == 2 * 2 * 2 and set(m["rejected"]) <= {"garbage", "too_short", "empty"}
    assert m["fallback_rows"] == 2 and summary["rows"] == 20
    assert "8 lines rejected" in capsys.readouterr().out
    # The rerun: zero model loads, zero calls.
    monkeypatch.setattr(llm, "write_with_ray", lambda *a, **k: pytest.fail("the model must not run again"))
    monkeypatch.setattr(llm, "HFTextSource", lambda *a, **k: pytest.fail("the model must not load again"))
    again = run_prompts(cfg)
    assert again["llm"]["from_cache"] and again["llm"]["model_calls"] == 0 and again["llm"]["rejected"] == m["rejected"]


def test_tiny_llm_cli(tmp_path):
    from synth.testkit import main

    assert main(["tiny-llm", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
