# `make demo` and `make test` work on a machine that has only Python 3.11 (and, for `make test`,
# a C compiler). Both share .venv/, installed in two steps with a stamp file each:
#   .venv/.installed-runtime  qiusuo and its runtime dependencies: all `make demo` needs
#   .venv/.installed          the dev extra on top: pytest, transformers, Ray Serve, and
#                             llama-cpp-python, which builds llama.cpp from source (the slow part)
# A demo-only .venv is upgraded to dev by the first `make test`; a dev install also satisfies `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed
# The CPU build of torch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python (dev extra) compiles llama.cpp; this is the compiler its CMake build looks for first.
CC ?= cc
# After each install: the torch in .venv must be the pinned build (qiusuo/cli/common.py says why not).
CHECK_TORCH = $(PY) -c 'import sys; from qiusuo.cli.common import torch_build_problem as p; r = p("$(TORCH_SPEC)"); r and print(r[0], file=sys.stderr); sys.exit(1 if r and r[1] else 0)'
# Printed when it is missing; tools/troubleshooting.py quotes it in README's Troubleshooting section.
NO_CC_MSG := make test: no C compiler ($(CC)) found: the dev extra builds llama.cpp from source. Install one (Debian/Ubuntu: apt-get install build-essential; macOS: xcode-select --install) and run make test again; make demo does not need it.
CHECK_CC = command -v $(CC) >/dev/null 2>&1 || { echo "$(NO_CC_MSG)" >&2; exit 1; }

.PHONY: demo test install install-runtime check-cc check-torch clean

install: $(DEV_STAMP)
install-runtime: $(RUNTIME_STAMP)

# (one shell per recipe, so that an up-to-date dev install skips this step: it already has everything)
$(RUNTIME_STAMP): pyproject.toml
	@if [ -f $(DEV_STAMP) ] && [ $(DEV_STAMP) -nt pyproject.toml ]; then touch $@; exit 0; fi; \
	set -e; \
	echo "make: installing qiusuo and its runtime dependencies into $(VENV)/ ($(TORCH_SPEC) CPU build, tokenizers, FastAPI, matplotlib, ...): a few minutes, once"; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"; \
	$(PY) -m pip install --quiet -e .; \
	$(CHECK_TORCH); \
	touch $@

$(DEV_STAMP): pyproject.toml | $(RUNTIME_STAMP)
	@$(CHECK_CC)
	@echo "make: installing the dev extra into $(VENV)/ (pytest, transformers, Ray Serve, gguf, and llama-cpp-python, which builds llama.cpp from source): 10 minutes or more on 2 cores, once"
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(CHECK_TORCH)
	touch $(RUNTIME_STAMP) $(DEV_STAMP)

check-cc:
	@$(CHECK_CC)

# The dev extra's packages must not replace the pinned torch (a CUDA build is GBs and slower to import).
check-torch:
	@$(CHECK_TORCH)

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/qiusuo demo

test: $(DEV_STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
