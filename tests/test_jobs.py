"""The entrypoints as a user runs them: bad input fails fast and clean; `ray job submit` works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port
from synth.storage import Layout, Storage

SMOKE = str(REPO / "configs" / "smoke.yaml")
# The `ray` CLI of this interpreter's environment, whether or not that environment is activated.
RAY_CLI = str(Path(sys.executable).parent / "ray")


def run_job(stage: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"ray_jobs.{stage}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_nothing_finished(root: Path) -> None:
    """No manifest, summary or shard that a rerun could mistake for finished work."""
    if not root.exists():
        return
    leftovers = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".parquet", ".json")]
    assert not leftovers, leftovers


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate.stepz=2"], "unknown config key 'generate.stepz'"),
        (["generate.batch_size=many"], "generate.batch_size"),
        (["prompts.classes=[]"], "give at least one class"),
        (["generate.model=stabilityai/sd-turbo"], "cannot load generate.model='stabilityai/sd-turbo'"),
        (["generate.model=/no/such/folder"], "neither an existing folder nor a Hugging Face id"),
        (["generate.generator=nope.module:Thing"], "cannot be imported (No module named 'nope'). Fix: install"),
        (["generate.generator=notregistered"], "'notregistered' is invalid: choose a registered generator (diffusers)"),
    ],
)
def test_bad_input_fails_fast_with_one_clear_line(tmp_path, args, needle):
    start = time.time()
    # Verbose, so Ray's "Started a local Ray instance" line would show if Ray started.
    result = run_job("generate", SMOKE, f"storage.root={tmp_path / 'out'}", *args, env={"SYNTH_VERBOSE": "1"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("synth generate: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Started a local Ray instance" not in result.stderr + result.stdout  # refused before Ray starts
    assert time.time() - start < 60
    assert_nothing_finished(tmp_path / "out")


def test_unwritable_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_job("generate", SMOKE, f"storage.root={blocker / 'out'}")
    assert result.returncode == 2
    assert "choose a writable storage.root" in result.stderr


def test_wrong_s3_credentials(tmp_path, s3_server_with_auth):
    result = run_job(
        "generate", SMOKE, "storage.root=s3://bucket/x", f"storage.s3_endpoint_url={s3_server_with_auth}",
        env={"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "S3 refused the credentials" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr


def test_prompts_job_writes_table_config_and_summary(tmp_path):
    result = run_job("prompts", SMOKE, f"storage.root={tmp_path}", "prompts.classes=[oil painting,pencil drawing]")
    assert result.returncode == 0, result.stderr
    storage, layout = Storage(str(tmp_path)), Layout("smoke")
    assert storage.read_parquet(layout.prompts_table).num_rows == 2 * (32 + 4)  # smoke: 32 per class + 4 hostile examples
    assert storage.read_json(layout.summary("prompts"))["techniques"]["environment"] > 0
    config = storage.read_bytes(layout.config_file("prompts")).decode()
    assert config.startswith("# synth 0.1.0") and "oil painting" in config


def test_job_output_is_one_line_per_event_and_verbose_is_a_flag(tmp_path):
    quiet = run_job("prompts", SMOKE, f"storage.root={tmp_path}")
    assert quiet.returncode == 0, quiet.stderr
    lines = (quiet.stdout + quiet.stderr).splitlines()
    assert len(lines) == 2 and lines[0].startswith("[prompts] 216 prompts for 6 classes"), lines
    assert lines[1].startswith("[prompts] done in") and lines[1].endswith(f"{tmp_path}/smoke/prompts/summary.json"), lines
    loud = run_job("prompts", "--verbose", SMOKE, f"storage.root={tmp_path}")
    assert loud.returncode == 0, loud.stderr
    assert '"rows": 216' in loud.stdout  # verbose: the whole summary, as JSON
    assert "--verbose" in run_job("prompts", "--help").stdout


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head` cluster in its own temp dir; stopped by killing its process group."""
    port, dashboard = free_port(), free_port()
    # Every listening port explicit: another Ray instance on this machine holds the defaults.
    agent_ports = [
        f"--{flag}={free_port()}"
        for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    ]  # fmt: skip
    temp_dir = Path("/tmp") / f"synth-ray-{os.getpid()}-{port}"  # unix socket paths must stay short
    address = f"http://127.0.0.1:{dashboard}"
    # Job drivers run `python` from the cluster's PATH: this environment's, activated or not.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    proc = subprocess.Popen(
        [
            RAY_CLI, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1", "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", "--include-dashboard=true", *agent_ports,
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    env = {**env, "RAY_ADDRESS": address}
    # Ready means a job can run: the dashboard answers before its job agent does.
    deadline = time.time() + 180
    while time.time() < deadline:
        probe = [RAY_CLI, "job", "submit", "--address", address, "--", "python", "-c", "pass"]
        if subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not come up")
    yield env
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started...
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # ...but drains for up to 30 s first; a test cluster needs no drain
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_ray_job_submit_smoke_generate(tmp_path, tiny_sd, ray_head):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            RAY_CLI, "job", "submit", "--working-dir", str(REPO), "--",
            "python", "-m", "ray_jobs.generate", "configs/smoke.yaml",
            f"storage.root={out}", f"generate.model={tiny_sd}", "prompts.per_class=4", "generate.shard_size=4",
        ],
        env=ray_head,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout
    summary = Storage(str(out)).read_json(Layout("smoke").summary("generate"))
    assert summary["images_total"] == 48 and summary["shards_generated"] == 12  # 4 + 4 hostile per class
