# The two commands of the README, plus the pieces they are made of.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TINY_SD := .cache/models/tiny-sd
TINY_CLIP := .cache/models/tiny-clip
CIFAR_FIXTURE := .cache/data/cifar10-fixture

.PHONY: setup smoke test web bench clean

# Makes the venv and installs the package in place with its test extras (torch 2.14.1 /
# torchvision 0.29.1 pinned in pyproject) through docker/install.sh, the script the Docker image
# installs with; again only when pyproject.toml or the script changes.
$(VENV)/.installed: pyproject.toml docker/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) EXTRAS=test EDITABLE=1 docker/install.sh
	@touch $@

setup: $(VENV)/.installed
	@test -f $(TINY_SD)/model_index.json || $(PY) -m synth.testkit tiny-sd $(TINY_SD)
	@test -f $(TINY_CLIP)/config.json || $(PY) -m synth.testkit tiny-clip $(TINY_CLIP)
	@test -f $(CIFAR_FIXTURE)/cifar-10-batches-py/batches.meta || $(PY) -m synth.testkit cifar10-fixture $(CIFAR_FIXTURE)

# The main job on this machine, on the smoke preset (tiny random-weight pipeline, CPU).
smoke: setup
	$(PY) -m ray_jobs.pipeline configs/smoke.yaml

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=30

# The web app on the smoke run's outputs (after `make smoke`): http://127.0.0.1:5000
web: setup
	SYNTH_CONFIG=configs/smoke.yaml $(VENV)/bin/flask --app synth.web run --port 5000

bench: setup
	$(PY) benchmarks/bench_generate.py --preset tiny   # the script checked on the tiny model; the real run: README, Benchmarks

clean:
	rm -rf outputs .cache
