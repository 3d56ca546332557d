"""Review decisions applied to the curate stage's verdicts (interim: the review queue lands beside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from synth.config import ConfigError
from synth.storage import Layout, Storage


@dataclass
class CurationState:
    accepted: dict[str, bool]
    relabel: dict[str, str] = field(default_factory=dict)
    decisions: int = 0


def curation_state(storage: Storage, run: str, classes: list[str]) -> Optional[CurationState]:
    key = f"{Layout(run).stage('curate')}/scores.parquet"
    if not storage.exists(key):
        return None
    scores = storage.read_parquet(key, columns=["id", "accepted"])
    accepted = dict(zip(scores.column("id").to_pylist(), map(bool, scores.column("accepted").to_pylist())))
    latest: dict[str, tuple] = {}
    prefix = f"{Layout(run).stage('curate')}/decisions"
    for name in sorted(storage.list(prefix)):
        for n, line in enumerate(storage.read_bytes(name).decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError:
                raise ConfigError(f"{storage.uri(name)} line {n} is not JSON") from None
            key_ = (d["time"], name, n)
            if d["id"] not in latest or latest[d["id"]][0] < key_:
                latest[d["id"]] = (key_, d)
    state = CurationState(accepted)
    for image_id, (_, d) in latest.items():
        state.accepted[image_id] = d["decision"] != "reject"
        if d["decision"] == "relabel":
            state.relabel[image_id] = d["class"]
        state.decisions += 1
    return state
