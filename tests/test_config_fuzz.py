"""Fuzzing of config input: every override and every YAML file loads or fails with one clear line.

Properties over generated input: ``load_config`` returns a Config or raises a one-line
:class:`ConfigError`, for an override and for a YAML file; the command line turns an override into
exit 0, or exit 2 with exactly one ``synth prompts: error:`` line on stderr (never a traceback,
never exit 1). The inputs a fault-injection pass found crashing are pinned as explicit examples.
Derandomized and without an example database, so every run (here and in CI) tries the same 850
inputs; about 5 s of CPU.
"""

import contextlib
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from ray_jobs._cli import main as cli_main
from synth.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _schema_keys() -> tuple[list[str], list[str], list[str]]:
    """Every dotted key of the schema: (sections, lists, single values)."""
    sections, lists, values = [], [], []

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node.keys():
            key, child = f"{prefix}{name}", node[name]
            if isinstance(child, DictConfig):
                sections.append(key)
                walk(child, key + ".")
            else:
                (lists if isinstance(child, ListConfig) else values).append(key)

    walk(OmegaConf.structured(Config), "")
    return sections, lists, values


SECTIONS, LISTS, VALUES = _schema_keys()
REAL_KEYS = SECTIONS + LISTS + VALUES

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def _near_miss(draw, key: str) -> str:
    i = draw(st.integers(0, len(key) - 1))
    return draw(
        st.sampled_from(
            [
                key[:i] + key[i + 1 :],  # a letter dropped
                key[:i] + key[i] * 2 + key[i + 1 :],  # doubled
                key.upper(),
                key.replace(".", "_"),
                key + ".",
                "." + key,
                key.replace(".", ".."),
                key.rsplit(".", 1)[-1],  # the section left out
            ]
        )
    )


@st.composite
def keys(draw) -> str:
    kind = draw(st.sampled_from(["real", "real", "near", "index", "garbage"]))
    if kind == "real":
        return draw(st.sampled_from(REAL_KEYS))
    if kind == "near":
        return _near_miss(draw, draw(st.sampled_from(REAL_KEYS)))
    if kind == "index":  # one list item, as people try: prompts.classes.0, prompts.classes[0]
        key = draw(st.sampled_from(LISTS))
        return key + draw(st.sampled_from([".0", "[0]", ".1", ".-1", ".x", "[", "[0", ".0.a"]))
    # Dots and brackets are what OmegaConf's key parser splits on, so they are drawn often.
    return draw(st.text(st.sampled_from("..[[]]\\ab_-0 ${}:=#'\"é"), max_size=8))


ATOMS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "no", "null", "~", "", " ", "1e3", ".inf", "-.nan", "0x10", "1_000", "2020-01-01"]),
    st.sampled_from(["cat", "oil painting", "a {cls} at dusk", "diffusers", "s3://", "s3://b/p", "auto", "float32"]),
    st.sampled_from(["???", "\\???", "'???'", "x???"]),
    st.sampled_from(
        [
            "${train.steps}",
            "${train.seeds}",
            "${tune}",
            "${nope}",
            "${run}",
            "${",
            "${}",
            "$${x}",
            "x${train.steps}",
            "${oc.env:HOME}",
            "${oc.env:SYNTH_FUZZ_UNSET}",
            "${oc.env:SYNTH_FUZZ_UNSET,7}",
            "${oc.decode:'[1,2]'}",
            "${oc.create:{a: 1}}",
            "${oc.select:nope,3}",
            "${oc.deprecated:run}",
            "${oc.dict.keys:train}",
            "${oc.nope:x}",
        ]
    ),
    st.sampled_from(
        ["[", "]", "[1,", "{", "}", "{a:", "[[1]", "{a: [}", "'", '"', "'x", '"x', "`x", "@x", "%x", "*a", "&a"]
        + ["!!python/name:os.system", "|", ">", "- x", "? x", "a: b", "#c"]
    ),
    st.text(max_size=8),
)


@st.composite
def values(draw) -> str:
    shape = draw(st.sampled_from(["atom", "atom", "list", "map", "quoted"]))
    if shape == "atom":
        return draw(ATOMS)
    if shape == "quoted":
        q = draw(st.sampled_from(["'", '"']))
        return q + draw(ATOMS).replace(q, "") + q
    items = draw(st.lists(ATOMS, max_size=3))
    if shape == "map":
        items = [f"{draw(keys())}: {v}" for v in items]
    open_, close = ("[", "]") if shape == "list" else ("{", "}")
    close = draw(st.sampled_from([close, close, "", close * 2]))  # sometimes unbalanced
    return open_ + draw(st.sampled_from([",", ", "])).join(items) + close


overrides = st.builds(lambda k, v: f"{k}={v}", keys(), values())

# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


def assert_loads_or_one_line(*args) -> None:
    try:
        assert isinstance(load_config(*args), Config)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert len(lines) == 1 and lines[0].strip(), repr(str(exc))


# Every input the fault-injection pass reported, and its kin.
@example("generate.batch_size=[1,")
@example("prompts.classes.0=x")
@example("prompts.classes[0]=x")
@example("train.seeds={a: 1}")
@example("train.max_failures=???")
@example("generate=???")
@example("run=${")
@example("run=${nope}")
@example("train.steps=${oc.env:SYNTH_FUZZ_UNSET}")
@example("train=${tune}")
@example("run=${oc.deprecated:run}")
@example("storage.root=s3://")
@given(overrides)
@settings(FUZZ, max_examples=400)
def test_any_override_loads_or_fails_with_one_line(override):
    assert_loads_or_one_line(None, [override])


def _run_cli(argv: list[str]) -> tuple[int, list[str], bool]:
    called = []

    def fn(cfg: Config) -> dict:
        called.append(cfg)
        return {"wall_seconds": 0.0}

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main("prompts", fn, argv)
    return code, err.getvalue().splitlines(), bool(called)


@example("generate.batch_size=[1,")
@example("prompts.classes.0=x")
@example("train.seeds={a: 1}")
@example("train.max_failures=???")
@example("run=${oc.env:SYNTH_FUZZ_UNSET}")
@example("storage.root=s3:///x")
@given(overrides)
@settings(FUZZ, max_examples=150)
def test_command_line_exits_0_or_2_with_one_error_line(override):
    code, stderr, called = _run_cli([override])
    if code == 0:
        assert called and not stderr
    else:
        assert code == 2 and not called
        assert len(stderr) == 1 and stderr[0].startswith("synth prompts: error: "), stderr


# A YAML document: generated mappings (dumped, so well-formed) or stitched lines (often not).
_yaml_keys = st.one_of(keys(), st.integers(-3, 3), st.booleans(), st.none(), st.floats(0, 2))
_yaml_leaves = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.booleans(), st.none(), ATOMS, st.binary(max_size=3)
)
_yaml_trees = st.recursive(
    _yaml_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_yaml_keys, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def dumped_documents(draw) -> str:
    doc = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS + ["run", "base", "nope"]), max_size=3, unique=True)):
        doc[section] = draw(
            st.one_of(
                st.dictionaries(st.sampled_from(LISTS + VALUES).map(lambda k: k.split(".", 1)[-1]) | _yaml_keys, _yaml_trees, max_size=3),
                _yaml_trees,
                st.sampled_from(["BASE_DIR", "BASE_SELF", "BASE_MISSING", str(CONFIGS / "base.yaml"), "???", "${oc.env:HOME}"]),
            )
        )
    return yaml.safe_dump(doc, allow_unicode=True) if draw(st.booleans()) else yaml.dump(doc)


_LINES = [
    "base: BASE_DIR", "base: BASE_SELF", "base: BASE_MISSING", f"base: {CONFIGS / 'base.yaml'}", "base:", "base: [a]", "base: ???",
    "run: ???", "run: [a]", "run: {a: 1}", "run: ${nope}", "run: ${", "run: *nope", "run: &a x", "1: x", "? [a]", ": x", "- x", "---",
    "generate:", "generate: 5", "generate: [1, 2]", "  steps: 2", "  steps: ???", "  steps: [1,", "  stepz: 2", "  batch_size: {a: 1}",
    "prompts:", "  classes: cat", "  classes:", "  - cat", "  - ???", "  - [a]", "  classes: {0: x}", "  0: x",
    "train:", "  seeds: {a: 1}", "  seeds: [1, 2]", "  max_failures: ???", "\tsteps: 1", "%YAML 1.1", "!!binary aGk=", "run: !!set {a}",
]  # fmt: skip
stitched_documents = st.lists(st.sampled_from(_LINES) | st.text(max_size=10), max_size=6).map("\n".join)


@example("prompts:\n  classes:\n    a: 1\n")  # a mapping where a list belongs
@example("generate: [1, 2]\n")  # a list where a section belongs
@example("train:\n  seeds: {a: 1}\n")
@example("1: x\n")  # a key that is not a string
@example("generate:\n  1: 2\n")
@example("base: BASE_DIR\n")  # base: names a folder
@example("base: BASE_MISSING\n")
@example("base: [a, b]\n")
@example("run: ???\n")
@example("generate:\n  steps: ???\n")
@example("prompts:\n  classes:\n  - cat\n  - ???\n")
@example("run: ${oc.env:SYNTH_FUZZ_UNSET}\n")
@given(st.one_of(dumped_documents(), stitched_documents))
@settings(FUZZ, max_examples=300)
def test_any_yaml_file_loads_or_fails_with_one_line(text):
    # Hypothesis runs many examples in one call of the test, so no function-scoped tmp_path here.
    with tempfile.TemporaryDirectory() as tmp:
        folder, path = Path(tmp) / "folder", Path(tmp) / "fuzz.yaml"
        folder.mkdir()
        text = text.replace("BASE_DIR", str(folder)).replace("BASE_SELF", str(path)).replace("BASE_MISSING", str(Path(tmp) / "nope.yaml"))
        path.write_text(text, encoding="utf-8")
        assert_loads_or_one_line(path)
