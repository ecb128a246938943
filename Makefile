# The two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow clean-demo services

$(STAMP): pyproject.toml requirements/cpu-constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU machine: installing with the CUDA build of torch"; \
	  $(PY) -m pip install -e '.[dev]'; \
	else \
	  echo "CPU machine: installing with the CPU build of torch (requirements/cpu-constraints.txt)"; \
	  $(PY) -m pip install -c requirements/cpu-constraints.txt -e '.[dev]'; \
	  $(PY) -m pip uninstall -y -q torchvision; \
	fi
	touch $(STAMP)

install: $(STAMP)

## make demo: corpus -> tokenizer -> shards -> autoencoder (CPU) -> held-out reconstruction -> runs/demo
demo: install
	$(PY) tools/demo.py --out runs/demo --data data/demo

## make test: the whole default test suite (slow end-to-end tests: make test-slow)
test: install services
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: install services
	$(PY) -m pytest -q -p no:cacheprovider -m slow

## make services: the Debian packages the Slurm tests start (slurmctld, slurmd, munge), installed once
## (as root, or through sudo); CALM_SKIP_SLURM=1 skips them and the Slurm tests
services:
	@if [ "$$CALM_SKIP_SLURM" = 1 ]; then echo "CALM_SKIP_SLURM=1: not installing Slurm"; \
	elif ! command -v slurmctld >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmctld ]; then \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	  echo "installing slurmctld slurmd munge (Debian packages) for the Slurm tests"; \
	  $$sudo apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd munge; \
	fi

clean-demo:
	rm -rf runs/demo data/demo
