"""The prompts stage: a table of per-class prompts, each with a stable id and a fixed seed.

Rows come from the cartesian product templates x environments x styles, visited per class in a
seeded random order so that the first N rows of a class are already diverse, plus a fraction of
adversarial prompts (hard cases real photographs contain). Everything is a pure function of the
config: the same config gives the same table, byte for byte.

Columns: id, class_name, label, index, prompt, negative, seed, technique.
"""

from __future__ import annotations

import hashlib
import itertools
import random

import pyarrow as pa

from synth.config import Config, PromptsConfig, class_slug

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
    ]
)


def image_id(class_name: str, index: int) -> str:
    """Stable id of the ``index``-th image of a class: 'horse-000042'."""
    return f"{class_slug(class_name)}-{index:06d}"


def derive_seed(run: str, class_name: str, index: int) -> int:
    """A 63-bit seed that depends only on (run, class, index)."""
    digest = hashlib.sha256(f"{run}\x1f{class_name}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _clean(text: str) -> str:
    # Empty environments or styles must not leave ", ," or double spaces behind.
    text = " ".join(text.split())
    return text.replace(" ,", ",").strip(" ,")


def _class_prompts(cfg: PromptsConfig, run: str, class_name: str) -> list[tuple[str, str]]:
    """(prompt, technique) for every index of one class."""
    rng = random.Random(derive_seed(run, class_name, -1))
    combos = list(itertools.product(cfg.templates, cfg.environments, cfg.styles))
    rng.shuffle(combos)
    adversarial = list(itertools.product(cfg.adversarial_templates, cfg.styles))
    rng.shuffle(adversarial)
    n_adv = round(cfg.per_class * cfg.adversarial_fraction)
    # Spread adversarial rows evenly through the class so any prefix has its share.
    adversarial_at = {round((i + 0.5) * cfg.per_class / n_adv) for i in range(n_adv)} if n_adv else set()
    out: list[tuple[str, str]] = []
    next_template = next_adv = 0
    for index in range(cfg.per_class):
        if index in adversarial_at:
            template, style = adversarial[next_adv % len(adversarial)]
            next_adv += 1
            out.append((_clean(template.format(cls=class_name, env="", style="") + ", " + style), "adversarial"))
        else:
            template, env, style = combos[next_template % len(combos)]
            next_template += 1
            out.append((_clean(template.format(cls=class_name, env=env, style=style)), "template"))
    return out


def build_prompt_table(cfg: Config) -> pa.Table:
    """The whole prompt table for ``cfg`` (pure: no I/O)."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for label, class_name in enumerate(cfg.prompts.classes):
        for index, (prompt, technique) in enumerate(_class_prompts(cfg.prompts, cfg.run, class_name)):
            columns["id"].append(image_id(class_name, index))
            columns["class_name"].append(class_name)
            columns["label"].append(label)
            columns["index"].append(index)
            columns["prompt"].append(prompt)
            columns["negative"].append(cfg.prompts.negative_prompt)
            columns["seed"].append(derive_seed(cfg.run, class_name, index))
            columns["technique"].append(technique)
    return pa.table(columns, schema=SCHEMA)


def run_prompts(cfg: Config, storage=None) -> dict:
    """Claim the prompt table (or find the same one stored), write its config and summary; returns the summary."""
    from synth.storage import Storage

    storage = storage or Storage.from_config(cfg.storage)
    storage.check_writable()
    table = build_prompt_table(cfg)
    _claim_prompt_table(cfg, storage, table)
    return _write_prompt_summary(cfg, storage, table)


def _claim_prompt_table(cfg: Config, storage, expected: pa.Table) -> bool:
    """Store ``expected`` as the run's prompt table unless one is there (atomically); True if this call stored it.

    A stored table must be the same one: images, plan and manifest of the run all refer to it,
    so a table built from another prompts config is refused, never overwritten.
    """
    from synth.storage import Layout, parquet_bytes

    key = Layout(cfg.run).prompts_table
    if storage.create(key, parquet_bytes(expected)):
        return True
    try:
        same = storage.read_parquet(key).equals(expected)
    except (pa.ArrowException, OSError):
        raise ValueError(
            f"the stored prompt table {storage.uri(key)} is unreadable. Fix: delete it and rerun (it is rebuilt "
            "from the config; the generate stage checks it against the plan its images were made under)"
        ) from None
    if not same:
        raise ValueError(
            f"the stored prompt table {storage.uri(key)} was built from a different prompts "
            "config than the one given now. Fix: pass the config that built it, or choose a new run name (run=...)"
        )
    return False


def _write_prompt_summary(cfg: Config, storage, table: pa.Table) -> dict:
    import time
    from collections import Counter

    from synth.progress import say
    from synth.runtime import write_stage_config, write_stage_summary
    from synth.storage import Layout

    start = time.perf_counter()
    layout = Layout(cfg.run)
    write_stage_config(storage, cfg, "prompts")
    techniques = Counter(table.column("technique").to_pylist())
    shares = ", ".join(f"{n:,} {t}" for t, n in sorted(techniques.items()))
    say("prompts", f"{table.num_rows:,} prompts for {len(cfg.prompts.classes)} classes ({shares}) -> {storage.uri(layout.prompts_table)}")
    return write_stage_summary(
        storage,
        cfg,
        "prompts",
        {
            "rows": table.num_rows,
            "classes": list(cfg.prompts.classes),
            "per_class": cfg.prompts.per_class,
            "distinct_prompts": len(set(table.column("prompt").to_pylist())),
            "techniques": dict(techniques),
            "table": storage.uri(layout.prompts_table),
            "wall_seconds": round(time.perf_counter() - start, 3),
        },
    )


def ensure_prompt_table(cfg: Config, storage) -> pa.Table:
    """The run's prompt table: claimed now (with the prompts stage's config and summary) or the same one stored."""
    expected = build_prompt_table(cfg)
    if _claim_prompt_table(cfg, storage, expected):
        _write_prompt_summary(cfg, storage, expected)
    return expected
