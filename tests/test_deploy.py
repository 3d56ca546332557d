"""Deployment files: cluster.yaml, the Dockerfile, docker/install.sh and gunicorn.conf.py, the Makefile.

No Docker engine and no cloud here: cluster.yaml goes through Ray's own config preparation and
validation (what `ray up` runs before it calls AWS) and its `ray start` lines through Ray's own
CLI parser; gunicorn's settings through gunicorn's own validators; the install script runs against
a stand-in interpreter that records its pip arguments. The rest holds the files to what the
README promises and to what the cluster launcher needs of the image.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster.yaml"
DOCKERFILE = REPO / "Dockerfile"
INSTALL = REPO / "docker" / "install.sh"
GUNICORN_CONF = REPO / "docker" / "gunicorn.conf.py"
WEB_CMD = ["gunicorn", "--config", "docker/gunicorn.conf.py", "synth.web:create_app()"]
# web.generate_timeout_s's default: how long a generation request may wait for its image.
GENERATE_TIMEOUT_S = 120


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_checked(config: dict) -> dict:
    """What `ray up` does to a config before it calls the cloud: merge Ray's provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments): continuation lines joined, comments dropped."""
    instructions, pending = [], []
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = []
    return instructions


def ray_start_commands(config: dict) -> list[tuple[str, dict, list[str]]]:
    """Each `ray start` line of the config as (node kind, environment prefix, arguments after `ray start`)."""
    found = []
    for kind in ("head", "worker"):
        for command in config[f"{kind}_start_ray_commands"]:
            words = shlex.split(command)
            env = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if words[:2] == ["ray", "start"]:
                found.append((kind, env, words[2:]))
    return found


# -- cluster.yaml -----------------------------------------------------------------------------


def test_cluster_config_passes_rays_validation():
    config = ray_checked(cluster_config())
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes.pop(config["head_node_type"])
    assert head["resources"] == {"CPU": 0}  # generation and training never land on the head
    assert nodes and all(node["min_workers"] == 0 and node["max_workers"] >= 1 for node in nodes.values())
    # S3 through instance roles on every node, never keys in the file.
    assert all("IamInstanceProfile" in node["node_config"] for node in [head, *nodes.values()])
    assert "AWS_SECRET_ACCESS_KEY" not in CLUSTER.read_text()


@pytest.mark.parametrize(
    "breakage",
    [
        {"idle_timeout_minute": 10},  # a misspelt key
        {"head_node_type": "cpu_head"},  # a head type that is not among the node types
        {"max_workers": "eight"},  # a wrong type
        {"docker": {"image": "synth:cuda", "container_name": "synth", "run_option": []}},  # a misspelt docker key
    ],
)
def test_broken_cluster_config_is_refused(breakage):
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_checked({**cluster_config(), **breakage})


def test_nodes_install_nothing():
    """Everything is in the image: no node runs pip (Ray's AWS defaults would pip-install on the head)."""
    config = ray_checked(cluster_config())
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not [c for c in config[key] if re.search(r"\bpip3? install|\buv pip|\bconda install", c)], key


def test_ray_start_commands_parse_and_use_token_auth():
    """Every `ray start` is valid for Ray 2.60's CLI and runs with token authentication on every node."""
    from ray.scripts.scripts import start

    commands = ray_start_commands(cluster_config())
    assert {kind for kind, _, _ in commands} == {"head", "worker"}
    for kind, env, args in commands:
        assert env.get("RAY_AUTH_MODE") == "token", (kind, args)  # the same mode on every node
        params = start.make_context("start", list(args)).params  # an unknown or misspelt flag raises
        if kind == "head":
            assert params["head"] and params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
        else:
            assert not params["head"] and params["address"] == "$RAY_HEAD_IP:6379"


def test_token_reaches_every_node():
    """`ray start` with RAY_AUTH_MODE=token needs a token on the node; the launcher mounts the client's there.

    Ray reads it from ~/.ray/auth_token; the launcher mounts file_mounts under the HOME the image
    declares, which must be the home of the user the container runs as.
    """
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    token_path = "~/" + _get_default_token_path().relative_to(Path.home()).as_posix()
    assert cluster_config()["file_mounts"].get(token_path) == token_path
    readme = (REPO / "README.md").read_text()
    real_run = readme.split("## The real run", 1)[1]
    assert real_run.index("ray get-auth-token --generate") < real_run.index("ray up cluster.yaml")

    env = " ".join(args for keyword, args in dockerfile() if keyword == "ENV")
    home = re.search(r"\bHOME=(\S+)", env)
    user = [args for keyword, args in dockerfile() if keyword == "USER"][-1]
    useradd = next(args for keyword, args in dockerfile() if keyword == "RUN" and "useradd" in args)
    assert home and re.search(rf"useradd [^&]*--home-dir {re.escape(home.group(1))} [^&]*\b{user}\b", useradd)


def test_cluster_image_is_the_one_the_readme_pushes():
    config = cluster_config()
    image = config["docker"]["image"]
    readme = (REPO / "README.md").read_text()
    docker = readme.split("## Docker", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^docker push (\S+)$", docker, re.MULTILINE) == [image]
    tagged = re.search(rf"^docker tag (\S+) {re.escape(image)}$", docker, re.MULTILINE)
    assert tagged, "the README tags a local build as the cluster's image"
    # That local build is the CUDA one (the workers are GPU nodes).
    build = re.search(rf"^docker build (?:[^\n]*\\\n)*[^\n]*-t {re.escape(tagged.group(1))} \.", docker, re.MULTILINE)
    assert build and "--build-arg BASE=nvidia/cuda:" in build.group(0)
    # Each node logs Docker in to the image's registry before it pulls.
    registry = image.split("/", 1)[0]
    assert any(c.rstrip().endswith(f"docker login --username AWS --password-stdin {registry}") for c in config["initialization_commands"])


# -- the image ------------------------------------------------------------------------------


def test_dockerfile_installs_only_through_install_script():
    instructions = dockerfile()
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert not [r for r in runs if re.search(r"\bpip3? install|\buv pip|\bconda install|setup\.py", r)]
    installs = [r for r in runs if "docker/install.sh" in r]
    assert len(installs) == 2  # the dependency layer, then the code layer
    for run in installs:
        assert re.search(r"\bEXTRAS=web\s", run) and "test" not in run and "EDITABLE" not in run, run
    # Dependencies before code: only pyproject.toml and the script are copied in before the first install.
    first_install = instructions.index(("RUN", installs[0]))
    copied = [args for keyword, args in instructions[:first_install] if keyword in ("COPY", "ADD")]
    assert copied == ["pyproject.toml ./", "docker/install.sh docker/"]
    # The placeholders' build/ must go: setuptools would put its newer placeholder files in the code's wheel.
    assert re.search(r"docker/install\.sh && rm -rf [^&]*\bbuild\b", installs[0]), installs[0]
    assert instructions.index(("COPY", ". .")) < instructions.index(("RUN", installs[1]))


def test_dockerfile_serves_the_web_app():
    instructions = dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ("ARG", "BASE=python:3.12-slim") and ("FROM", "${BASE}") in instructions  # CPU by default
    assert json.loads(next(args for keyword, args in reversed(instructions) if keyword == "CMD")) == WEB_CMD
    assert ("EXPOSE", "8000") in instructions
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    # The cluster launcher starts the container with `bash` as its command: an ENTRYPOINT would swallow it.
    assert "ENTRYPOINT" not in keywords
    # It also runs `ray` in login shells, which reset PATH: the venv is put back on it there.
    assert any("/etc/profile.d/" in args and "/opt/venv/bin" in args for keyword, args in instructions if keyword == "RUN")


def test_dockerignore_keeps_out_local_state():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:  # a pattern excludes a path or any folder above it
        parts = path.split("/")
        return any(fnmatch.fnmatch("/".join(parts[:i]), p) for p in patterns for i in range(1, len(parts) + 1))

    for path in (".git/HEAD", ".venv/bin/python", "outputs/smoke/report/report.html", ".cache/models/tiny-sd/model_index.json",
                 "synth/__pycache__/config.cpython-312.pyc", "synth.egg-info/PKG-INFO", ".pytest_cache/v/x"):  # fmt: skip
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "synth/config.py", "ray_jobs/pipeline.py", "configs/base.yaml",
                 "docker/install.sh", "docker/gunicorn.conf.py"):  # fmt: skip
        assert not ignored(path), path


def gunicorn_config(monkeypatch, **env: str):
    """docker/gunicorn.conf.py under the given environment, set into gunicorn's own Config."""
    from gunicorn.config import Config

    for name in ("PORT", "GUNICORN_THREADS", "GUNICORN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = Config()
    for name, value in runpy.run_path(str(GUNICORN_CONF)).items():
        if not name.startswith("_") and not isinstance(value, types.ModuleType):
            cfg.set(name, value)  # raises on an unknown name (gunicorn itself skips those silently) or a bad value
    return cfg


def test_gunicorn_settings(monkeypatch):
    cfg = gunicorn_config(monkeypatch)
    assert cfg.bind == ["0.0.0.0:8000"] and gunicorn_config(monkeypatch, PORT="9001").bind == ["0.0.0.0:9001"]
    assert cfg.workers == 1 and cfg.worker_class_str == "gthread" and cfg.threads > 1  # one process: the models
    assert cfg.timeout > GENERATE_TIMEOUT_S and cfg.accesslog == "-"


def run_install(tmp_path: Path, **env: str) -> list[str]:
    """Run docker/install.sh against a venv whose python only records its arguments; the pip arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    log = tmp_path / "args"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    python.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("EXTRAS", "EDITABLE", "TORCH_INDEX_URL")}
    subprocess.run([str(INSTALL)], env={**clean, "VENV": str(venv), **env}, check=True, timeout=30)
    return log.read_text().splitlines()


def test_install_script(tmp_path):
    # The image: runtime extras, the CPU torch index as an extra index, not in place.
    assert run_install(tmp_path, EXTRAS="web", TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu") == [
        "-m", "pip", "install", "-qq", "--extra-index-url", "https://download.pytorch.org/whl/cpu", ".[web]",
    ]  # fmt: skip
    # make setup: test extras in place, pip's own index settings untouched.
    assert run_install(tmp_path, EXTRAS="test", EDITABLE="1") == ["-m", "pip", "install", "-qq", "-e", ".[test]"]
    assert run_install(tmp_path) == ["-m", "pip", "install", "-qq", "."]


def test_make_and_ci_install_through_the_same_script(tmp_path):
    """CI runs `make test`; make's setup installs with docker/install.sh and nothing else."""
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.MULTILINE)
    venv = tmp_path / "venv"
    dry = subprocess.run(["make", "-n", "-B", f"VENV={venv}", "test"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert re.search(rf"^VENV={venv} PYTHON=\S+ EXTRAS=test EDITABLE=1 docker/install.sh$", dry.stdout, re.MULTILINE), dry.stdout
    assert "pip install" not in dry.stdout and "-m venv" not in dry.stdout, dry.stdout


def test_the_wheel_carries_the_web_apps_pages(tmp_path):
    """The image installs a wheel, not the checkout: the templates and scripts must be in it."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: setuptools builds in place and would leave build/ in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("synth", "ray_jobs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
                   check=True, cwd=tmp_path, capture_output=True)  # fmt: skip
    wheel = next(tmp_path.glob("synth-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "synth" / "web").glob("*/*") if p.suffix in (".html", ".js", ".css")}
    assert pages and pages <= names, sorted(pages - names)
