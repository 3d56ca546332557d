#!/usr/bin/env bash
# The one way synth is installed. The Docker image runs it (EXTRAS=web) and so does `make setup`
# (EXTRAS=test EDITABLE=1), hence CI (.ci/run -> make test -> setup): the image holds what the
# tests ran on, and cannot drift from it.
#
#   VENV=.venv EXTRAS=test EDITABLE=1 docker/install.sh     # development and CI (make setup)
#   VENV=/opt/venv EXTRAS=web docker/install.sh             # the image (Dockerfile)
#
# Settings, from the environment:
#   VENV             the virtual environment to install into; made with $PYTHON -m venv when missing
#                    (default .venv)
#   PYTHON           the interpreter that makes it (default python3)
#   EXTRAS           extras of pyproject.toml, comma-separated: web (the image), test (development:
#                    includes web); empty installs the core only
#   EDITABLE=1       install the checkout in place (pip -e), for development
#   TORCH_INDEX_URL  an extra package index, e.g. https://download.pytorch.org/whl/cpu for the CPU
#                    image, so torch comes without CUDA libraries; unset, pip's own settings decide
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -qq --upgrade pip
fi

args=(-qq)
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    args+=(--extra-index-url "$TORCH_INDEX_URL")
fi
if [[ "${EDITABLE:-0}" == 1 ]]; then
    args+=(-e)
fi
"$VENV/bin/python" -m pip install "${args[@]}" ".${EXTRAS:+[$EXTRAS]}"
