import re
from pathlib import Path

import pytest

from synth.config import Config, ConfigError, label_classes, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(CONFIGS / preset)
    assert isinstance(cfg, Config)


def test_presets_override_base():
    smoke = load_config(CONFIGS / "smoke.yaml")
    full = load_config(CONFIGS / "full.yaml")
    assert smoke.prompts.classes == ["bird", "cat", "deer", "dog", "frog", "horse"]  # from base.yaml
    assert smoke.prompts.per_class == 32 and full.prompts.per_class == 6000
    assert full.generate.model == "stabilityai/sd-turbo"


def test_overrides_win_and_are_typed():
    cfg = load_config(CONFIGS / "smoke.yaml", ["generate.batch_size=3", "prompts.classes=[oil painting,pencil drawing]"])
    assert cfg.generate.batch_size == 3
    assert cfg.prompts.classes == ["oil painting", "pencil drawing"]


@pytest.mark.parametrize(
    "override, needle",
    [
        (["generate.batchsize=3"], "unknown config key 'generate.batchsize'"),
        (["nope=1"], "unknown config key 'nope'"),
        (["generate.batch_size=abc"], "generate.batch_size"),
        (["generate.batch_size=0"], "generate.batch_size=0 is invalid"),
        (["prompts.classes=[]"], "give at least one class"),
        (["prompts.classes=[cat,Cat]"], "must be distinct"),
        (["prompts.techniques.hard=1.5"], "sum to 2.4, not 1"),
        (["prompts.techniques.adversarial=0.1"], "unknown config key 'prompts.techniques.adversarial'"),
        (["generate.height=100"], "multiple of 8"),
        (["generate.generator=gan"], "choose a registered generator (diffusers) or give a class as package.module:ClassName"),
        # The test generator's old registered name: the message shows its import path.
        (["generate.generator=class_aware_test"], "e.g. synth.testkit:ClassAwareTestGenerator"),
        (["generate.generator=notregistered"], "generate.generator='notregistered' is invalid"),
        (["generate.generator=synth.testkit:Gen:Extra"], "package.module:ClassName"),
        (["generate.generator=synth/testkit.py:Gen"], "package.module:ClassName"),
        (["run=has space"], "run='has space' is invalid"),
        (["prompts.templates=[a photo]"], "must contain {cls}"),
        (["generate.batch_size"], "not of the form key=value"),
        # An s3:// root without a bucket is refused with the rest of the config, before any stage starts.
        (["storage.root=s3://"], "name the bucket"),
        (["storage.root=s3:///runs"], "name the bucket"),
        # Found by fault injection: parser errors and merge TypeErrors, now one line naming key and fix.
        (["generate.batch_size=[1,"], "override 'generate.batch_size=[1,' for config key 'generate.batch_size'"),
        (["prompts.classes.0=x"], "'prompts.classes' (from the command line) takes a whole list, e.g. prompts.classes=[bird,cat]"),
        (["train.seeds={a: 1}"], "'train.seeds' (from the command line) takes a whole list, e.g. train.seeds=[0,1]"),
        (["train=5"], "config key 'train' (from the command line) is a section"),
        (["run=[a]"], "config key 'run' (from the command line) takes a single value, not a list"),
        (["run=${"], "close the ${...} interpolation"),
        (["run=${nope}"], "cannot resolve config key 'run'"),
        (["[=0"], "override '[=0' for config key '[': the key does not parse"),  # an IndexError inside OmegaConf
        (["dataset.hostile=train"], "dataset.hostile='train' is invalid: choose evaluate"),
        (["generate.attention=flash"], "generate.attention='flash' is invalid: choose one of sdpa, classic"),
        (["generate.attention=classic"], "generate.fuse_qkv=True is invalid: fused projections run through sdpa attention"),
        (["generate.num_actors=3", "generate.max_actors=2"], "must be at least generate.num_actors=3"),
        (["generate.prompt_cache=-1"], "generate.prompt_cache=-1 is invalid"),
        (["generate.cpus_per_actor=0"], "generate.cpus_per_actor=0.0 is invalid"),
        (["generate.writer_concurrency=0"], "generate.writer_concurrency=0 is invalid"),
        (["generate.decoder=''"], "generate.decoder='' is invalid: give an AutoencoderTiny id or folder"),
        (["dataset.hostile=other_class", "prompts.classes=[cat,Other]"], "rename your class 'other'"),
        (["dataset.hostile=other_class", "prompts.hostile_per_class=0"], "make some (e.g. prompts.hostile_per_class=50)"),
    ],
)
def test_bad_input_names_key_and_fix(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "smoke.yaml", override)
    assert needle in str(err.value)


def test_unknown_key_in_yaml_names_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'base.yaml'}\ngenerate:\n  stepz: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'generate.stepz'.*valid keys under 'generate'.*steps"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, key",
    [("train.max_failures=???", "train.max_failures"), ("generate=???", "generate"), ("run=???", "run")],
)
def test_missing_marker_in_an_override_is_refused(override, key):
    # OmegaConf's merge would keep the default where a layer says ??? and the run would go on silently.
    with pytest.raises(ConfigError, match=rf"^config key '{key}' \(from the command line\) is \?\?\? \(no value\); give it a value"):
        load_config(CONFIGS / "smoke.yaml", [override])


@pytest.mark.parametrize(
    "text, key",
    [
        ("run: ???\n", "run"),
        ("train:\n  max_failures: ???\n", "train.max_failures"),
        ("tune: ???\n", "tune"),
        ("prompts:\n  classes:\n  - cat\n  - ???\n", "prompts.classes[1]"),
    ],
)
def test_missing_marker_in_a_yaml_file_is_refused(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'smoke.yaml'}\n{text}")
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}' \(from {re.escape(str(bad))}\) is \?\?\?"):
        load_config(bad)
    # In a base file too: the message names the file that holds it.
    top = tmp_path / "top.yaml"
    top.write_text("base: bad.yaml\n")
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' \(from {re.escape(str(bad))}\) is \?\?\?"):
        load_config(top)


def test_a_literal_question_marks_value_is_escaped():
    assert load_config(None, [r"prompts.negative_prompt=\???"]).prompts.negative_prompt == "???"


def test_interpolations_resolve_or_name_the_key(monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_ROOT", "/tmp/synth-interpolated")
    cfg = load_config(CONFIGS / "smoke.yaml", ["tune.seeds=${train.seeds}", "storage.root=${oc.env:SYNTH_TEST_ROOT}"])
    assert cfg.tune.seeds == cfg.train.seeds == [0] and cfg.storage.root == "/tmp/synth-interpolated"
    monkeypatch.delenv("SYNTH_TEST_ROOT")
    with pytest.raises(ConfigError, match=r"^cannot resolve config key 'storage.root' .*'SYNTH_TEST_ROOT' not found.*Fix: .*oc.env:NAME,default"):
        load_config(CONFIGS / "smoke.yaml", ["storage.root=${oc.env:SYNTH_TEST_ROOT}"])


@pytest.mark.parametrize(
    "text, needle",
    [
        ("generate: [1, 2]\n", "config key 'generate' (from {bad}) is a section"),
        ("prompts:\n  classes:\n    a: 1\n", "config key 'prompts.classes' (from {bad}) takes a whole list"),
        ("1: x\n", "unknown config key '1' (from {bad})"),
        ("run: [a\n", "config file '{bad}' is not valid YAML: "),
        ("base: [a, b]\n", "base: in '{bad}' must name a YAML file it extends"),
        ("base: .\n", "(the base: of '{bad}') is a folder"),
    ],
)
def test_malformed_yaml_names_key_and_fix(tmp_path, text, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert needle.format(bad=bad) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(a)


def test_generator_paths_are_checked_for_syntax_only():
    # Whether a path imports is the generate stage's check (on the driver, before Ray starts):
    # the config must load in stages that never build a generator.
    cfg = load_config(CONFIGS / "smoke.yaml", ["generate.generator=nope.module:Thing"])
    assert cfg.generate.generator == "nope.module:Thing"
    cfg = load_config(CONFIGS / "smoke.yaml", ["generate.generator=synth.testkit:ClassAwareTestGenerator"])
    assert cfg.generate.generator == "synth.testkit:ClassAwareTestGenerator"


def test_label_classes_add_other_only_when_hostile_examples_train_it():
    evaluate = load_config(CONFIGS / "smoke.yaml")
    assert evaluate.dataset.hostile == "evaluate"
    assert label_classes(evaluate) == evaluate.prompts.classes
    other = load_config(CONFIGS / "smoke.yaml", ["dataset.hostile=other_class"])
    assert label_classes(other) == [*other.prompts.classes, "other"]
    assert other.prompts.classes == evaluate.prompts.classes  # the images made stay the K classes'
