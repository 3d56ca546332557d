"""The verify job's contract on the command line: exit 0 whole, 1 problems, 2 bad input; --repair."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def verify(root, *overrides: str, repair: bool = False) -> subprocess.CompletedProcess:
    flags = ["--repair"] if repair else []
    cmd = [sys.executable, "-m", "ray_jobs.verify", *flags, str(REPO / "configs" / "smoke.yaml"), f"storage.root={root}", "run=v", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_verify_exit_codes_and_repair_of_a_damaged_prompt_table(tmp_path):
    made = subprocess.run(
        [sys.executable, "-m", "ray_jobs.prompts", str(REPO / "configs" / "smoke.yaml"), f"storage.root={tmp_path}", "run=v"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    whole = verify(tmp_path)
    assert whole.returncode == 0 and "[verify] prompts: ok (216 prompts)" in whole.stdout, whole.stdout + whole.stderr
    assert "[verify] generate: not run" in whole.stdout and "the run is whole" in whole.stdout

    table = tmp_path / "v" / "prompts" / "prompts.parquet"
    table.write_bytes(table.read_bytes()[:100])  # truncated
    damaged = verify(tmp_path)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert "[verify] prompts: 1 corrupt of 1 checked" in damaged.stdout and "1 problem remains" in damaged.stdout
    assert "--repair" in damaged.stdout  # the fix is named

    repaired = verify(tmp_path, repair=True)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "moved to quarantine" in repaired.stdout and repaired.stdout.rstrip().splitlines()[-2].endswith("the run is whole")
    assert len(list((tmp_path / "v" / "quarantine" / "prompts").iterdir())) == 1

    bad = verify(tmp_path, "prompts.per_class=0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "prompts.per_class" in bad.stderr
