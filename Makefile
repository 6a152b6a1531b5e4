# stormfs — every routine task has a target here; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
STORMFS := $(VENV)/bin/stormfs
# Debian packages: FUSE runtime and headers (pyfuse3 compiles against libfuse3),
# and the real programs the test suite drives on a mount.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev attr fio rsync sqlite3 git tar psmisc
SYS_STAMP := $(VENV)/.system-packages
PY_STAMP  := $(VENV)/.python-packages

.PHONY: help install system-packages demo test lint format clean
.PHONY: encrypt-audit encrypt-files bench-encrypt

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(SYS_STAMP):
	@mkdir -p $(VENV)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(APT_PACKAGES); \
	fi
	@touch $@

system-packages: $(SYS_STAMP) ## install the Debian packages (apt-get, as root)

$(PY_STAMP): $(SYS_STAMP) pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(PY_STAMP) ## set up everything; leaves the command at .venv/bin/stormfs

demo: install ## mount a demo storage directory, write and read through it, show the envelope
	$(PY) tools/demo.py

encrypt-audit: install ## SOURCE=DIR: count files encrypted / needing encryption / with issues (ARGS=--json)
	@tools/encrypt-audit.sh "$(SOURCE)" $(ARGS)

encrypt-files: install ## SOURCE=DIR: encrypt every legacy file in place, with progress (ARGS=--dry-run)
	@tools/encrypt-files.sh "$(SOURCE)" $(ARGS)

bench-encrypt: install ## throughput of `stormfs encrypt` against `cp -a` of the same tree
	$(PY) tools/bench_encrypt.py $(ARGS)

test: install ## run the whole test suite (mounts real filesystems; root and /dev/fuse)
	$(PY) -m pytest -q

lint: install ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove the virtualenv and caches (leaves system packages)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo *.egg-info
