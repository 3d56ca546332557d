from pathlib import Path

import pytest

from synth.config import Config, ConfigError, load_config

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
        (["prompts.adversarial_fraction=1.5"], "must be in [0, 1]"),
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
    assert load_config(CONFIGS / "smoke.yaml", ["generate.generator=synth.testkit:ClassAwareTestGenerator"])
