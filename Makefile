# Two entry points for a fresh clone (see README.md):
#   make demo   install into .venv and run the embedded default job
#   make test   install into .venv (with test extras), install Prometheus and Chromium
#               when missing (Debian packages), and run the test suite
#   make lint   ruff (lint and format check), pyright (basic, probe/ and cluster/) and
#               the doctests in probe/; CI runs it before make test
# On a CPU machine the install pins torch==2.13.0 (the CPU build, from PyTorch's CPU
# index when reachable) before the package, so pip never pulls a CUDA build to satisfy
# pyproject's torch range.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
# A stock pip resolves torch==2.13.0 from PyPI to the multi-GB CUDA build, so the CPU
# build is tried first from PyTorch's CPU wheel index (5 s timeout, no retries); where that
# index is unreachable (or TORCH_INDEX= is set empty) the plain pin follows, which is what
# machines whose pip already serves the CPU build (mirrors, find-links) need.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo system lint test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: keeping pip's torch choice"; \
	 elif [ -n "$(TORCH_INDEX)" ] && $(PY) -m pip install -q --timeout 5 --retries 0 \
	        --index-url "$(TORCH_INDEX)" "$(TORCH_CPU)"; then echo "torch: CPU build from $(TORCH_INDEX)"; \
	 else echo "torch: $(TORCH_INDEX) unreachable or empty, installing $(TORCH_CPU) from pip's own index"; \
	      $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/probe demo

# The tests start real Prometheus (and promtool), a real Pushgateway and headless Chromium:
# Debian's prometheus, prometheus-pushgateway and chromium packages, installed here when
# missing (as root, or with sudo).
system:
	@need=""; \
	 { command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need="$$need prometheus"; \
	 command -v prometheus-pushgateway >/dev/null 2>&1 || need="$$need prometheus-pushgateway"; \
	 command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	 if [ -n "$$need" ]; then \
	   sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	   echo "installing Debian packages:$$need"; \
	   $$sudo apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	 fi

# Lint and type settings live in pyproject.toml ([tool.ruff], [tool.pyright]); ruff and
# pyright (with its own Node.js) come with the test extras.
LINT_PATHS := probe cluster tests bench

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/pyright --project pyproject.toml --pythonpath $(PY)
	$(PY) -m pytest -q --doctest-modules probe

test: install system
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
