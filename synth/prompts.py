"""The prompts stage: a table of per-class prompts, each with a stable id, a fixed seed and its technique.

Each class gets ``per_class`` rows mixed by ``prompts.techniques`` (shares that sum to 1):

- ``vanilla``: plain class-name prompts ("a photo of a {cls}");
- ``environment``: templates x environments x styles, visited in a seeded random order so that
  the first N rows of a class are already diverse;
- ``domain``: "a {domain} of a {cls}" (photo, drawing, painting, sketch, 3D render, ...);
- ``hard``: hard *positive* cases real photographs contain (occlusion, dim light, clutter);
- ``llm``: "A {cls} {text}" with texts a language model wrote (:mod:`synth.llm`); when it wrote
  none usable for a class, those rows fall back to ``environment`` prompts.

Each technique's rows are spread evenly through a class's indices, so any prefix has its share.
On top come ``hostile_per_class`` **hostile** rows per class: the class's look on the wrong
object ("a teapot shaped like a cat"), labelled with the class they imitate but NOT of it: an
evaluation set for the fooling rate, never training data.

Everything is a pure function of the config and the LLM texts: the same inputs give the same
table, byte for byte.

Columns: id, class_name, label, index, prompt, negative, seed, technique, guidance_scale (null:
generate.guidance_scale), params (a JSON object: {"domain": ...}, {"imitates": ..., "object": ...},
{"llm_model": ..., "llm_seed": ...}, "{}" when nothing).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from typing import TYPE_CHECKING, Optional, Union

import pyarrow as pa

from synth.config import HOSTILE, PROMPT_TECHNIQUES, Config, PromptsConfig, class_slug

if TYPE_CHECKING:
    from synth.llm import LLMTexts

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("class_name", pa.string()),
        ("label", pa.int32()),
        ("index", pa.int32()),
        ("prompt", pa.string()),
        ("negative", pa.string()),
        ("seed", pa.int64()),
        ("technique", pa.string()),
        ("guidance_scale", pa.float64()),
        ("params", pa.string()),
    ]
)


def image_id(class_name: str, index: int) -> str:
    """Stable id of the ``index``-th image of a class: 'horse-000042'."""
    return f"{class_slug(class_name)}-{index:06d}"


def hostile_id(class_name: str, k: int) -> str:
    """Stable id of the ``k``-th hostile example imitating a class: 'horse-hostile-00003'."""
    return f"{class_slug(class_name)}-hostile-{k:05d}"


def derive_seed(run: str, class_name: str, index: Union[int, str]) -> int:
    """A 63-bit seed that depends only on (run, class, index); a string index is a separate context."""
    digest = hashlib.sha256(f"{run}\x1f{class_name}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _clean(text: str) -> str:
    # Empty environments or styles must not leave ", ," or double spaces behind.
    text = " ".join(text.split())
    return text.replace(" ,", ",").strip(" ,")


def technique_counts(cfg: PromptsConfig) -> dict[str, int]:
    """Rows per class of each technique: the shares of per_class, rounded by largest remainder (sum = per_class)."""
    shares = {t: getattr(cfg.techniques, t) for t in PROMPT_TECHNIQUES}
    exact = {t: cfg.per_class * s for t, s in shares.items()}
    counts = {t: int(v) for t, v in exact.items()}
    by_remainder = sorted(PROMPT_TECHNIQUES, key=lambda t: (-(exact[t] - counts[t]), PROMPT_TECHNIQUES.index(t)))
    for t in by_remainder[: cfg.per_class - sum(counts.values())]:
        counts[t] += 1
    return counts


def technique_order(cfg: PromptsConfig) -> list[str]:
    """The technique of each index of a class: each spread evenly, so any prefix holds its share (within one row)."""
    counts = technique_counts(cfg)
    done = dict.fromkeys(PROMPT_TECHNIQUES, 0)
    order = []
    for i in range(cfg.per_class):
        # The technique furthest behind its share of the first i + 1 rows goes next.
        t = max((t for t in PROMPT_TECHNIQUES if done[t] < counts[t]), key=lambda t: (i + 1) * counts[t] / cfg.per_class - done[t])
        done[t] += 1
        order.append(t)
    return order


def _cycle(rng: random.Random, items: list) -> "itertools.cycle":
    items = list(items)
    rng.shuffle(items)
    return itertools.cycle(items)


def _class_prompts(cfg: PromptsConfig, run: str, class_name: str, llm_texts: list[str]) -> list[tuple[str, str, dict]]:
    """(prompt, technique, params) for every index of one class."""
    rng = random.Random(derive_seed(run, class_name, -1))
    environment = _cycle(rng, list(itertools.product(cfg.templates, cfg.environments, cfg.styles)))
    hard = _cycle(rng, list(itertools.product(cfg.hard_templates, cfg.styles)))
    vanilla = _cycle(rng, cfg.vanilla_templates)
    domains = _cycle(rng, cfg.domains)
    llm = itertools.cycle(llm_texts) if llm_texts else None
    out: list[tuple[str, str, dict]] = []
    for technique in technique_order(cfg):
        if technique == "llm" and llm is None:
            technique = "environment"  # the model wrote nothing usable for this class
        if technique == "environment":
            template, env, style = next(environment)
            out.append((_clean(template.format(cls=class_name, env=env, style=style)), technique, {}))
        elif technique == "hard":
            template, style = next(hard)
            out.append((_clean(template.format(cls=class_name, env="", style="") + ", " + style), technique, {}))
        elif technique == "vanilla":
            out.append((_clean(next(vanilla).format(cls=class_name)), technique, {}))
        elif technique == "domain":
            domain = next(domains)
            out.append((_clean(cfg.domain_template.format(cls=class_name, domain=domain)), technique, {"domain": domain}))
        else:
            text = next(llm)
            params = {"llm_model": cfg.llm.model, "llm_seed": cfg.llm.seed}
            out.append((_clean(cfg.llm.template.format(cls=class_name, text=text)), technique, params))
    return out


def _hostile_prompts(cfg: PromptsConfig, run: str, class_name: str) -> list[tuple[str, dict]]:
    """(prompt, params) of each hostile example imitating one class."""
    combos = _cycle(random.Random(derive_seed(run, class_name, "hostile-order")), list(itertools.product(cfg.hostile_templates, cfg.hostile_objects)))
    out = []
    for _ in range(cfg.hostile_per_class):
        template, obj = next(combos)
        out.append((_clean(template.format(cls=class_name, object=obj)), {"imitates": class_name, "object": obj}))
    return out


def _guidance(cfg: PromptsConfig, run: str, row_id: str) -> Optional[float]:
    """The row's guidance scale, a seeded draw from prompts.guidance_scale_range (2 decimals), or None."""
    if cfg.guidance_scale_range is None:
        return None
    low, high = cfg.guidance_scale_range
    return round(random.Random(derive_seed(run, row_id, "guidance")).uniform(low, high), 2)


def build_prompt_table(cfg: Config, llm: Optional["LLMTexts"] = None) -> pa.Table:
    """The whole prompt table for ``cfg`` and the LLM texts ``llm`` (pure: no I/O).

    Without LLM texts (or with none for a class), that class's llm rows are environment rows.
    """
    p = cfg.prompts
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(row_id: str, class_name: str, label: int, index: int, prompt: str, seed: int, technique: str, params: dict):
        for name, value in (("id", row_id), ("class_name", class_name), ("label", label), ("index", index), ("prompt", prompt),
                            ("negative", p.negative_prompt), ("seed", seed), ("technique", technique),
                            ("guidance_scale", _guidance(p, cfg.run, row_id)), ("params", json.dumps(params, sort_keys=True))):  # fmt: skip
            columns[name].append(value)

    for label, class_name in enumerate(p.classes):
        texts = llm.texts.get(class_name, []) if llm is not None else []
        for index, (prompt, technique, params) in enumerate(_class_prompts(p, cfg.run, class_name, texts)):
            add(image_id(class_name, index), class_name, label, index, prompt, derive_seed(cfg.run, class_name, index), technique, params)
        for k, (prompt, params) in enumerate(_hostile_prompts(p, cfg.run, class_name)):
            seed = derive_seed(cfg.run, class_name, f"hostile-{k}")  # a string context: never an index's seed
            add(hostile_id(class_name, k), class_name, label, k, prompt, seed, HOSTILE, params)
    return pa.table(columns, schema=SCHEMA)


def llm_wanted(cfg: Config) -> bool:
    return cfg.prompts.techniques.llm > 0


def expected_prompt_table(cfg: Config, storage) -> tuple[pa.Table, Optional["LLMTexts"]]:
    """The prompt table ``cfg`` builds, with its LLM texts: read from the run's cache or written now."""
    llm = None
    if llm_wanted(cfg):
        from synth.llm import ensure_llm_texts

        llm = ensure_llm_texts(cfg, storage)
    return build_prompt_table(cfg, llm), llm


def run_prompts(cfg: Config, storage=None) -> dict:
    """Claim the prompt table (or find the same one stored), write its config and summary; returns the summary."""
    from synth.storage import Storage

    storage = storage or Storage.from_config(cfg.storage)
    storage.check_writable()
    table, llm = expected_prompt_table(cfg, storage)
    _claim_prompt_table(cfg, storage, table)
    return _write_prompt_summary(cfg, storage, table, llm)


def _claim_prompt_table(cfg: Config, storage, expected: pa.Table) -> bool:
    """Store ``expected`` as the run's prompt table unless one is there (atomically); True if this call stored it.

    A stored table must be the same one: images, plan and manifest of the run all refer to it,
    so a table built from another prompts config is refused, never overwritten.
    """
    from synth.storage import Layout

    key = Layout(cfg.run).prompts_table
    stored, same = storage.claim_table(key, expected)
    if stored:
        return True
    if same is None:
        raise ValueError(
            f"the stored prompt table {storage.uri(key)} is unreadable. Fix: delete it and rerun (it is rebuilt "
            "from the config; the generate stage checks it against the plan its images were made under)"
        )
    if not same:
        raise ValueError(
            f"the stored prompt table {storage.uri(key)} was built from a different prompts "
            "config than the one given now. Fix: pass the config that built it, or choose a new run name (run=...)"
        )
    return False


def _write_prompt_summary(cfg: Config, storage, table: pa.Table, llm: Optional["LLMTexts"] = None) -> dict:
    import time
    from collections import Counter

    from synth.progress import say
    from synth.runtime import write_stage_config, write_stage_summary
    from synth.storage import Layout

    start = time.perf_counter()
    layout = Layout(cfg.run)
    write_stage_config(storage, cfg, "prompts")
    techniques = Counter(table.column("technique").to_pylist())
    order = [*PROMPT_TECHNIQUES, HOSTILE]
    shares = ", ".join(f"{techniques[t]:,} {t}" for t in order if techniques[t])
    llm_summary, llm_line = _llm_summary(cfg, storage, llm)
    say("prompts", f"{table.num_rows:,} prompts for {len(cfg.prompts.classes)} classes ({shares}){llm_line} -> {storage.uri(layout.prompts_table)}")
    return write_stage_summary(
        storage,
        cfg,
        "prompts",
        {
            "rows": table.num_rows,
            "classes": list(cfg.prompts.classes),
            "per_class": cfg.prompts.per_class,
            "distinct_prompts": len(set(table.column("prompt").to_pylist())),
            "techniques": {t: techniques[t] for t in order if techniques[t]},
            "hostile": techniques[HOSTILE],
            "guidance_scale_range": cfg.prompts.guidance_scale_range,
            "llm": llm_summary,
            "table": storage.uri(layout.prompts_table),
            "wall_seconds": round(time.perf_counter() - start, 3),
        },
    )


def _llm_summary(cfg: Config, storage, llm: Optional["LLMTexts"]) -> tuple[Optional[dict], str]:
    """The summary's llm entry and the printed line's llm part (None, "" when the llm share is 0)."""
    if not llm_wanted(cfg):
        return None, ""
    from synth.llm import REASONS
    from synth.storage import Layout

    assert llm is not None
    slots = technique_counts(cfg.prompts)["llm"]
    fallback = {c: slots for c in cfg.prompts.classes if not llm.texts.get(c)}
    rejected = sum(llm.rejected.values())
    rejected_by = {r: llm.rejected[r] for r in REASONS if llm.rejected.get(r)}  # the rules' order (JSON sorts keys)
    reasons = ", ".join(f"{n:,} {r}" for r, n in rejected_by.items())
    line = (
        f"; llm {cfg.prompts.llm.model}: {llm.accepted:,} texts accepted"
        + (" (cached, 0 model calls)" if llm.from_cache else f" in {llm.calls:,} calls")
        + f", {rejected:,} lines rejected" + (f" ({reasons})" if reasons else "")
        + (f", {sum(fallback.values()):,} rows of {len(fallback)} classes fell back to environment prompts" if fallback else "")
    )  # fmt: skip
    summary = {
        "model": cfg.prompts.llm.model,
        "seed": cfg.prompts.llm.seed,
        "accepted": {c: len(llm.texts.get(c, [])) for c in cfg.prompts.classes},
        "rejected": rejected_by,
        "rejected_total": rejected,
        "fallback_rows": sum(fallback.values()),
        "fallback_classes": sorted(fallback),
        "model_calls": llm.calls,
        "from_cache": llm.from_cache,
        "cache": storage.uri(Layout(cfg.run).llm_texts),
    }
    return summary, line


def ensure_prompt_table(cfg: Config, storage) -> pa.Table:
    """The run's prompt table: claimed now (with the prompts stage's config and summary) or the same one stored."""
    expected, llm = expected_prompt_table(cfg, storage)
    if _claim_prompt_table(cfg, storage, expected):
        _write_prompt_summary(cfg, storage, expected, llm)
    return expected
