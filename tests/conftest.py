"""Shared fixtures: tiny random models, a real S3 server on 127.0.0.1, a local Ray instance."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Nothing in the tests may reach the network: fail fast instead of waiting on the Hub.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Test credentials for the local S3 server, set before any Ray worker starts so workers inherit them.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")


def synth_imports(path: Path) -> set[str]:
    """The ``synth.*`` modules a source file imports, at module level or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "synth"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "synth":
            found.add(node.module)
    return found


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on ``n`` threads inside the block: tiny models gain nothing from more, and on a busy
    2-core machine torch's spinning worker threads make each forward pass many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """A module's tiny models on one torch thread (see torch_threads); use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with torch_threads(1):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A random-weight Stable Diffusion pipeline saved with save_pretrained (built once)."""
    from synth.testkit import build_tiny_random_sd_pipeline

    return build_tiny_random_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


def _start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto S3 server did not start")


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a real S3-speaking HTTP server (moto) on 127.0.0.1."""
    proc, url = _start_moto()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server_with_auth():
    """A second S3 server that checks credentials; no keys exist, so every key is wrong."""
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def ray_processes(title: str) -> list:
    """This process's descendants whose title starts with ``title`` (Ray names workers ``ray::<Actor>[.<method>]``).

    The session's local Ray instance (``ray_local``) runs under this process, so only its
    workers can match, never those of another test run on the same machine.
    """
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(title):
                found.append(process)
        except psutil.Error:  # it ended while we looked
            pass
    return found


def without_timings(history: list[dict]) -> list[dict]:
    """An epoch history without its wall-clock fields: what a faulted and an unfaulted run must share exactly."""
    return [{k: v for k, v in h.items() if k not in ("seconds", "val_seconds")} for h in history]


def train_unfaulted(hp: dict, classes: list[str], seed: int, train, val, sets: dict, unions: dict, threads: int):
    """The training core alone (:class:`synth.recipe.Run`), in this process: no Ray, no fault.

    What a faulted run is compared with. ``train``, ``val`` and each of ``sets`` are ``(images,
    labels)``; ``sets`` is scored in one pass, in its order, as the worker or trial scores.
    ``threads``: the worker's or trial's torch threads (on a CPU they decide the order of sums,
    so another count gives other numbers); this process's count is put back after. Returns
    ``(history, scores)``.
    """
    import torch

    from synth.recipe import Run

    before = torch.get_num_threads()
    try:
        run = Run(hp, len(classes), seed, torch.device("cpu"), train, val, "", threads=threads)
        for _ in run.fit():
            pass
        return run.progress.history, run.scores(sets, classes, unions)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance for the in-process tests (4 logical CPUs on 2 cores)."""
    import ray

    from synth.config import RayConfig
    from synth.runtime import init_ray

    init_ray(RayConfig(local_num_cpus=4))
    yield
    ray.shutdown()


# --------------------------------------------------------------------------------------------
# The fault campaign's figures: each fault test records what it measured, printed after the run
# --------------------------------------------------------------------------------------------

_FAULT_FIGURES: list[tuple[str, dict]] = []


@pytest.fixture
def fault_figures(request):
    """Record a fault test's figures: ``fault_figures(missing=0, duplicated=0, ...)``.

    Printed in the terminal summary as one line per test, so CI's log shows what each injected
    fault cost (images missing or duplicated, epochs recomputed, accuracy against an unfaulted run).
    """

    def record(**figures) -> None:
        _FAULT_FIGURES.append((request.node.name, figures))

    return record


def pytest_terminal_summary(terminalreporter):
    if not _FAULT_FIGURES:
        return
    terminalreporter.section("fault campaign figures")
    for name, figures in _FAULT_FIGURES:
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --------------------------------------------------------------------------------------------
# A finished run for the web app's tests (built once a session)
# --------------------------------------------------------------------------------------------

WEB_RUN = "webrun"


@pytest.fixture(scope="session")
def web_run(tmp_path_factory, ray_local):
    """A small curated run through the real stages: class-aware images (so a label mix-up would
    show), exact colour scores, a dataset, one trained model and its report. Returns its config."""
    from synth.config import load_config
    from synth.curate import run_curate
    from synth.dataset import run_dataset
    from synth.generate import run_generate
    from synth.report import run_report
    from synth.testkit import write_cifar10_fixture
    from synth.train import run_train

    root = tmp_path_factory.mktemp("web")
    real = write_cifar10_fixture(root / "cifar", per_class_train=20, per_class_test=6)
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [f"storage.root={root / 'runs'}", f"run={WEB_RUN}", f"dataset.real_path={real}", "prompts.per_class=16",
         "prompts.hostile_per_class=2", "generate.generator=synth.testkit:ClassAwareTestGenerator",
         "derive.variations.count=0", "derive.inpainting.count=0", "curate.scorer=synth.testkit:ColourTestScorer",
         "curate.min_per_class=8", "dataset.synthetic_train_per_class=8", "dataset.synthetic_test_per_class=4",
         "dataset.synthetic_source=all", "train.batch_size=16", "train.experiments=[synthetic]", "train.test_domains=[real,synthetic]"],
    )  # fmt: skip
    for stage in (run_generate, run_curate, run_dataset, run_train, run_report):
        stage(cfg)
    return cfg


def copy_of_run(cfg, dest):
    """``cfg`` on a copy of its storage root at ``dest``, for a web test that writes (review
    decisions, saved images): the session's ``web_run`` stays as the other modules expect it."""
    import dataclasses
    import shutil

    shutil.copytree(cfg.storage.root, dest)
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root=str(dest)))


def app_for(cfg, *overrides, **kwargs):
    """The web app on the smoke preset with ``cfg``'s storage root (and ``overrides``), for tests."""
    from synth.config import load_config
    from synth.web import create_app

    app = create_app(load_config(REPO / "configs" / "smoke.yaml", [f"storage.root={cfg.storage.root}", *overrides]), secret_key="test", **kwargs)
    app.testing = True
    return app


def client_with_token(app):
    """A test client holding a session and sending its CSRF token with every request."""
    client = app.test_client()
    token = client.get("/api/csrf").get_json()["csrf_token"]
    client.environ_base["HTTP_X_CSRF_TOKEN"] = token
    return client


def png_bytes(array, fmt: str = "PNG") -> bytes:
    """``array`` (H, W, 3) uint8 encoded by Pillow as ``fmt``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()
