# corral — one target per chore, the same for people and CI.
# Every target installs what it needs on a fresh Debian machine (run as root).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the sandboxes, the fence and the tests need (postgresql: the
# server programs for tests/test_postgres.py, which starts a private cluster; no
# system cluster is made: createcluster.conf says so before the package installs)
APT_PKGS := bubblewrap btrfs-progs util-linux iproute2 nftables git curl ca-certificates \
            python3 python3-venv procps postgresql
APT_BENCH := podman runc uidmap debootstrap

.PHONY: help deps venv demo test test-all lint bench clean

help:
	@echo "make demo      run the main job (installs what it needs)"
	@echo "make test      run the test suite (under 20 minutes on 2 cores)"
	@echo "make test-all  also the slow soak, fuzz and crash-resume runs"
	@echo "make lint      ruff + mypy"
	@echo "make bench     benchmarks (print JSON)"

deps: .make/apt

.make/apt: Makefile
	@mkdir -p .make
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then \
	    mkdir -p /etc/postgresql-common; \
	    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	  fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 \
	    apt-get install -y -qq -o Dpkg::Options::=--force-confdef \
	    -o Dpkg::Options::=--force-confold $$missing; \
	fi
	@# the agent CLIs (Claude Code, Codex) install with npm; keep a newer node if present
	@command -v npm >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@touch $@

.make/apt-bench: Makefile
	@mkdir -p .make
	@missing=$$(for p in $(APT_BENCH); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .make/apt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: venv
	$(BIN)/corral demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

test-all: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: venv .make/apt-bench
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/orchestrator.py

clean:
	rm -rf .make $(VENV) build dist *.egg-info
