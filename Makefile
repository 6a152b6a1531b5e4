# stormfs — every routine task has a target here; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
STORMFS := $(VENV)/bin/stormfs
# Debian packages: FUSE runtime and headers (pyfuse3 compiles against libfuse3),
# the real programs the test suite drives on a mount, python3-venv for the
# system-wide install of `make deploy`, systemd for systemctl and
# systemd-analyze (the unit is verified by the tests), and systemd-container
# (systemd-nspawn) with debootstrap for `make test-systemd`, which boots a real
# systemd in a container and deploys there; e2fsprogs for the ext4 images of the
# inode-identity tests.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr fio rsync sqlite3 git tar psmisc systemd
APT_PACKAGES += systemd-container debootstrap e2fsprogs
APT_PACKAGES += glusterfs-server glusterfs-client
SYS_STAMP := $(VENV)/.system-packages
PY_STAMP  := $(VENV)/.python-packages

.PHONY: help install system-packages demo test test-systemd stress lint format clean deploy bench bench-quick gocryptfs
.PHONY: encrypt-audit encrypt-files rotate-keys

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# Depends on the Makefile so that a package added to the list gets installed.
$(SYS_STAMP): Makefile
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

rotate-keys: install ## SOURCE=DIR: re-encrypt every file not under the current key (ARGS=--keyring FILE, --dry-run)
	@tools/rotate-keys.sh "$(SOURCE)" $(ARGS)

test: install ## run the whole test suite (mounts real filesystems; root and /dev/fuse)
	$(PY) -m pytest -q

test-systemd: install ## deploy under systemd booted in a Debian 12 container: mount, restart, crash, keys, fstab
	$(PY) -m pytest -q -m systemd tests/test_systemd.py

stress: install ## long runs: 500 kill -9, fsx, fio, CPython's file tests on a mount, fuzzing
	$(PY) -m pytest -q -s -m stress
	$(PY) -m pytest -q tests/test_format.py tests/test_format_v2.py --hypothesis-profile=stress

deploy: install ## install system-wide and run SOURCE= MOUNTPOINT= NAME= [OPTIONS=] as stormfs@NAME, key from the environment
	$(PY) tools/deploy.py --source "$(SOURCE)" --mountpoint "$(MOUNTPOINT)" --name "$(NAME)" --options "$(OPTIONS)"

# gocryptfs is the encrypting filesystem the benchmark compares against.
gocryptfs:
	@dpkg -s gocryptfs >/dev/null 2>&1 || \
	    (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y gocryptfs)

bench: install gocryptfs ## benchmark raw / passthrough / gocryptfs / stormfs (BENCH_ARGS=...)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: install gocryptfs ## short benchmark smoke run (small sizes, one round)
	$(PY) bench/run.py --quick $(BENCH_ARGS)

lint: install ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy stormfs

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove the virtualenv and caches (leaves system packages)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo *.egg-info
