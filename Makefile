# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
# torch is pinned (TORCH_SPEC); pip installs the build its index serves (a CPU wheel on this project's machines). GPU users keep their own torch:
#   make demo TORCH_SPEC=                                   (pip then resolves torch itself)
#   make demo TORCH_SPEC= VENV_FLAGS=--system-site-packages  (reuse a torch installed system-wide)
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.diffslim-installed
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffslim demo --out report
	@echo "open report/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)  # the main bench table ("Bench on the zoo" in docs/figures.md), with its HTML report in bench_report/
	$(BIN)/diffslim bench zoo:digits-sd --n 50 --repeats 3 --html bench_report \
	    --methods full,steps:25,steps:10,depth:9,depth:7,uniform:10,karras:10,ays:10,gamma:10

clean:
	rm -rf $(VENV) report bench_report .pytest_cache
