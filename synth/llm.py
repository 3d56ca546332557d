"""LLM-written prompts: a local causal language model writes short action/scene phrases per class.

The prompts stage turns each accepted phrase into "A {cls} {text}" (``prompts.llm.template``).

1. Sampling is seeded: ``torch.manual_seed`` per (``prompts.llm.seed``, class, attempt); each
   attempt asks for ``per_class`` candidates, up to ``attempts`` rounds per class.
2. Every candidate is cleaned (:func:`clean_line`: first line, no quotes, list markers or trailing
   punctuation, no repeated "A {cls}" opening) and then accepted or rejected for one reason
   (:data:`REASONS`, see :func:`rejection`): too short or long, garbage, naming the class again or
   another class, or a full prompt over the text encoder's 77 CLIP tokens, counted with the
   *generator's* tokenizer (refused, never cut). Accepted texts are de-duplicated ignoring case
   and spaces; rejections are counted by reason, never swallowed.
3. The accepted texts are cached in ``<run>/prompts/llm.parquet`` (claimed atomically, like the
   prompt table) with the settings that made them: a rerun with the same settings reads it and
   calls the model zero times; a cache made with other settings is refused with the fix.
4. On a cluster the model runs in one Ray task (a GPU where the cluster has one).

Tests pass a plain function as the text source (:data:`TextSource`) instead of a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pyarrow as pa

from synth.config import Config, ConfigError, LLMConfig, RayConfig

# Why a candidate line was refused, in the order the rules are applied.
REASONS = ("empty", "garbage", "too_short", "too_long", "repeats_class", "other_class", "too_many_tokens", "duplicate")
MIN_WORDS, MAX_WORDS, MAX_CHARS = 2, 20, 160
CLIP_TOKENS = 77  # the text encoder's context, start and end tokens included

# (class_name, attempt, n) -> n raw completions for that class; seeded by the caller's settings.
TextSource = Callable[[str, int, int], Sequence[str]]
# A full prompt -> its length in the generator's text-encoder tokens (start/end included).
TokenCounter = Callable[[str], int]

SCHEMA = pa.schema(
    [("class_name", pa.string()), ("k", pa.int32()), ("text", pa.string()), ("llm_model", pa.string()), ("llm_seed", pa.int64())]
)
META_SETTINGS, META_REJECTED, META_CALLS = b"synth.llm_settings", b"synth.llm_rejected", b"synth.llm_calls"

_LIST_MARKER = re.compile(r"^\s*(?:[-*•·>]+|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+")
_QUOTES = "\"'`“”‘’«»"
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


@dataclass
class LLMTexts:
    """Accepted texts per class (in the order accepted) and what was refused on the way."""

    texts: dict[str, list[str]]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> lines
    calls: int = 0  # generation calls made now (0 when read from the cache)
    from_cache: bool = False

    @property
    def accepted(self) -> int:
        return sum(len(t) for t in self.texts.values())


# --------------------------------------------------------------------------------------------
# Cleaning and the acceptance rules (pure)
# --------------------------------------------------------------------------------------------


def clean_line(raw: str, class_name: str) -> str:
    """The first non-empty line of ``raw``, without quotes, list markers, trailing punctuation or an
    opening that repeats "A {cls}" (the template adds it)."""
    line = next((part.strip() for part in raw.splitlines() if part.strip()), "")
    for _ in range(3):  # markers and quotes nest: '1. "a cat ..."'
        line = _LIST_MARKER.sub("", line).strip().strip(_QUOTES).strip()
    line = re.sub(rf"^(?:an?|the)\s+{re.escape(class_name)}\b\s*", "", line, flags=re.IGNORECASE)
    line = line.rstrip(" .,;:!?…-–—").strip().strip(_QUOTES).strip()
    return " ".join(line.split())


def dedup_key(text: str) -> str:
    """Texts that differ only in case or spacing are the same text."""
    return " ".join(text.lower().split())


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(name.lower())}(?:e?s)?(?![A-Za-z])", text.lower()) is not None


def rejection(text: str, class_name: str, classes: Sequence[str], count_tokens: TokenCounter, template: str) -> Optional[str]:
    """Why the cleaned ``text`` is refused (one of :data:`REASONS` but duplicate), or None when accepted."""
    if not text:
        return "empty"
    chars = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in chars) * 2 < len(chars):  # more than half non-letters
        return "garbage"
    real_words = [w for w in text.split() if _WORD.match(w) and (len(w) >= 2 or w.lower() in ("a", "i"))]
    if len(real_words) < MIN_WORDS:
        return "too_short"
    if len(text.split()) > MAX_WORDS or len(text) > MAX_CHARS:
        return "too_long"
    if _mentions(text, class_name):
        return "repeats_class"
    if any(_mentions(text, other) for other in classes if other != class_name):
        return "other_class"  # the prompt would name two classes: its label would be a guess
    if count_tokens(template.format(cls=class_name, text=text)) > CLIP_TOKENS:
        return "too_many_tokens"  # refused, never cut: a cut prompt is not the prompt recorded
    return None


def collect_texts(source: TextSource, classes: Sequence[str], m: LLMConfig, count_tokens: TokenCounter) -> LLMTexts:
    """Up to ``m.per_class`` distinct accepted texts per class from ``source``, in at most ``m.attempts`` calls per class."""
    texts: dict[str, list[str]] = {}
    rejected: Counter = Counter()
    calls = 0
    for class_name in classes:
        accepted: list[str] = []
        seen: set[str] = set()
        for attempt in range(m.attempts):
            if len(accepted) >= m.per_class:
                break
            calls += 1
            for raw in source(class_name, attempt, m.per_class):
                text = clean_line(raw, class_name)
                reason = rejection(text, class_name, classes, count_tokens, m.template)
                if reason is None and dedup_key(text) in seen:
                    reason = "duplicate"
                if reason is not None:
                    rejected[reason] += 1
                    continue
                seen.add(dedup_key(text))
                accepted.append(text)
                if len(accepted) >= m.per_class:
                    break
        texts[class_name] = accepted
    return LLMTexts(texts=texts, rejected={r: rejected[r] for r in REASONS if rejected[r]}, calls=calls)


def sample_seed(seed: int, class_name: str, attempt: int) -> int:
    """The torch seed of one sampling call: a function of (seed, class, attempt) only."""
    digest = hashlib.sha256(f"llm\x1f{seed}\x1f{class_name}\x1f{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def instruction(class_name: str) -> str:
    return (
        f"Complete the sentence 'A {class_name} ...' with a short action and place for a photograph "
        f"(3 to 12 words). Reply with only the words that follow 'A {class_name}', on one line."
    )


# --------------------------------------------------------------------------------------------
# The model and the tokenizer (loaded where they run)
# --------------------------------------------------------------------------------------------


class HFTextSource:
    """A transformers causal LM as a :data:`TextSource`: the chat template when the tokenizer has one."""

    def __init__(self, m: LLMConfig, model: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.m = m
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()

    def prompt(self, class_name: str) -> tuple[str, bool]:
        """(text to continue, whether it already holds the special tokens)."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": instruction(class_name)}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
        return f"Short actions and places for photographs.\nA {class_name}", False

    def __call__(self, class_name: str, attempt: int, n: int) -> list[str]:
        import torch

        text, templated = self.prompt(class_name)
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        torch.manual_seed(sample_seed(self.m.seed, class_name, attempt))
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                do_sample=True,
                temperature=self.m.temperature,
                top_p=self.m.top_p,
                max_new_tokens=self.m.max_new_tokens,
                num_return_sequences=n,
                pad_token_id=pad,
            )  # (n, prompt + new tokens)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def tokenizer_source(cfg: Config) -> tuple[str, Optional[str], str]:
    """(folder or id, subfolder, config key) of the tokenizer that the 77-token limit is counted with."""
    if cfg.prompts.llm.tokenizer:
        return cfg.prompts.llm.tokenizer, None, "prompts.llm.tokenizer"
    g = cfg.generate
    # A prior + decoder pair reads the prompt with the prior's text encoder.
    return (g.prior, "tokenizer", "generate.prior") if g.prior else (g.model, "tokenizer", "generate.model")


def load_token_counter(path: str, subfolder: Optional[str], key: str) -> TokenCounter:
    """The generator's text tokenizer as a :data:`TokenCounter`; a ConfigError naming the fix when it cannot load."""
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    if local.exists() and subfolder and not (local / subfolder).is_dir():
        subfolder = None  # a tokenizer folder of its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else path, subfolder=subfolder or "")
    except Exception as exc:  # missing files, no network, not a tokenizer
        raise ConfigError(
            f"cannot load the text-encoder tokenizer of {key}={path!r}{f' (subfolder {subfolder})' if subfolder else ''} to count "
            f"the 77-token limit of LLM prompts ({type(exc).__name__}). Fix: set prompts.llm.tokenizer=<a folder holding the "
            "generator's CLIP tokenizer>, or set prompts.techniques.llm=0"
        ) from exc

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False)["input_ids"])

    return count


def resolve_llm(model: str) -> str:
    """Check, before anything runs, that ``model`` names a loadable causal LM; a local folder made absolute."""
    local = Path(model).expanduser()
    fix = "Fix: give a local folder written by save_pretrained (prompts.llm.model=<folder>), or set prompts.techniques.llm=0"
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"prompts.llm.model={model!r} is a folder without config.json. {fix}")
        return str(local.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(f"prompts.llm.model={model!r} is neither an existing folder nor a Hugging Face id. {fix}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except Exception as exc:  # offline and not cached, 401/404, no network
        raise ConfigError(
            f"cannot load prompts.llm.model={model!r}: not in the local Hugging Face cache and the Hub could not be reached "
            f"or refused it ({type(exc).__name__}). {fix}"
        ) from exc
    return model


def _write_texts(m: LLMConfig, model: str, tokenizer: tuple[str, Optional[str], str], classes: list[str]) -> LLMTexts:
    """One process: load the model and the tokenizer once, collect every class's texts."""
    return collect_texts(HFTextSource(m, model), classes, m, load_token_counter(*tokenizer))


def write_with_ray(m: LLMConfig, model: str, tokenizer: tuple[str, Optional[str], str], classes: list[str], ray_cfg: RayConfig) -> LLMTexts:
    """:func:`_write_texts` in one Ray task: on a GPU where the cluster has one."""
    import ray

    from synth.runtime import init_ray

    init_ray(ray_cfg)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_gpus=gpus, num_cpus=1)(_write_texts)
    return ray.get(task.remote(m, model, tokenizer, classes))


# --------------------------------------------------------------------------------------------
# The cache: <run>/prompts/llm.parquet
# --------------------------------------------------------------------------------------------


def llm_settings(cfg: Config) -> dict:
    """Everything the cached texts depend on; a cache with other settings is refused."""
    m = cfg.prompts.llm
    path, subfolder, _ = tokenizer_source(cfg)
    return {
        "model": m.model, "seed": m.seed, "classes": list(cfg.prompts.classes), "per_class": m.per_class,
        "max_new_tokens": m.max_new_tokens, "temperature": m.temperature, "top_p": m.top_p, "attempts": m.attempts,
        "template": m.template, "tokenizer": f"{path}:{subfolder or ''}",
    }  # fmt: skip


def texts_table(cfg: Config, found: LLMTexts) -> pa.Table:
    m = cfg.prompts.llm
    rows = [(c, k, t) for c in cfg.prompts.classes for k, t in enumerate(found.texts.get(c, []))]
    table = pa.table(
        {
            "class_name": [r[0] for r in rows],
            "k": pa.array([r[1] for r in rows], pa.int32()),
            "text": [r[2] for r in rows],
            "llm_model": [m.model] * len(rows),
            "llm_seed": pa.array([m.seed] * len(rows), pa.int64()),
        },
        schema=SCHEMA,
    )
    return table.replace_schema_metadata(
        {
            META_SETTINGS: json.dumps(llm_settings(cfg), sort_keys=True).encode(),
            META_REJECTED: json.dumps(found.rejected, sort_keys=True).encode(),
            META_CALLS: str(found.calls).encode(),
        }
    )


def _from_table(cfg: Config, table: pa.Table) -> LLMTexts:
    meta = table.schema.metadata or {}
    texts: dict[str, list[str]] = {c: [] for c in cfg.prompts.classes}
    for row in table.sort_by([("class_name", "ascending"), ("k", "ascending")]).to_pylist():
        texts.setdefault(row["class_name"], []).append(row["text"])
    return LLMTexts(texts=texts, rejected=json.loads(meta.get(META_REJECTED, b"{}")), calls=0, from_cache=True)


def _stored_settings(storage, key: str) -> tuple[Optional[pa.Table], Optional[dict]]:
    try:
        table = storage.read_parquet(key)
        return table, json.loads((table.schema.metadata or {})[META_SETTINGS])
    except (pa.ArrowException, OSError, KeyError, ValueError):
        return None, None


def read_llm_texts(cfg: Config, storage) -> Optional[LLMTexts]:
    """The cached texts of this config, or None (none stored, unreadable, or made with other settings); never runs a model."""
    from synth.storage import Layout

    key = Layout(cfg.run).llm_texts
    if not storage.exists(key):
        return None
    table, settings = _stored_settings(storage, key)
    return _from_table(cfg, table) if table is not None and settings == llm_settings(cfg) else None


def ensure_llm_texts(cfg: Config, storage, source: Optional[TextSource] = None, count_tokens: Optional[TokenCounter] = None) -> LLMTexts:
    """The run's LLM texts: read from the cache (zero model calls) or written now and claimed atomically.

    ``source`` and ``count_tokens`` replace the model and the generator's tokenizer (tests); by
    default both are checked loadable here, before Ray starts, and run in one Ray task.
    """
    from synth.storage import Layout, parquet_bytes

    key = Layout(cfg.run).llm_texts
    settings = llm_settings(cfg)

    def check_stored() -> LLMTexts:
        table, stored = _stored_settings(storage, key)
        if table is None:
            raise ConfigError(f"the LLM prompt cache {storage.uri(key)} is unreadable. Fix: delete it and rerun (the texts are written again)")
        if stored != settings:
            changed = sorted(k for k in set(settings) | set(stored) if settings.get(k) != stored.get(k))
            raise ConfigError(
                f"the LLM prompt cache {storage.uri(key)} was written with other settings ({', '.join(changed)} differ). "
                "Fix: pass the prompts.llm settings that wrote it, delete it to write new texts, or choose a new run name (run=...)"
            )
        return _from_table(cfg, table)

    if storage.exists(key):
        return check_stored()
    classes = list(cfg.prompts.classes)
    m = cfg.prompts.llm
    if source is None:
        model = resolve_llm(m.model)
        path, subfolder, tkey = tokenizer_source(cfg)
        local = Path(path).expanduser()
        tokenizer = (str(local.resolve()) if local.exists() else path, subfolder, tkey)  # Ray workers run elsewhere
        load_token_counter(*tokenizer)  # fails here, not in a Ray task, when it cannot load
        found = write_with_ray(m, model, tokenizer, classes, cfg.ray)
    else:
        found = collect_texts(source, classes, m, count_tokens or load_token_counter(*tokenizer_source(cfg)))
    if storage.create(key, parquet_bytes(texts_table(cfg, found))):
        return found
    return check_stored()  # another driver wrote it meanwhile: use its texts if they are ours
