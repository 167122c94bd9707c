# unlearn: the usual targets. Everything runs from a local virtualenv in .venv, made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
N      ?= 100

.PHONY: install demo test test-fast lint format bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,ray]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/python -c "import unlearn_cli, torch, sklearn, typer, matplotlib, ray"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded digits default: N reference models, N finetune runs, the score
## (report.json, and report.html: open it in a browser).
demo: install
	$(BIN)/unlearn train-refs --num-models $(N)
	$(BIN)/unlearn apply --method finetune
	$(BIN)/unlearn score --out report.json --html report.html

test: install
	$(BIN)/python -m pytest -q

## The suite without the end-to-end runs marked slow (seconds, for the edit-test loop).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Every benchmark; their output, the machine and the commit go to benchmarks/results/latest.txt
bench: install
	$(BIN)/python benchmarks/run_all.py

## GPU tests + GPU benchmark in <= 8 minutes; results in $$UNLEARN_BENCH_OUT (default benchmarks/out)
bench-gpu: install
	PYTHON=$(BIN)/python benchmarks/gpu_check.sh

clean:
	rm -rf runs report.json report.html .pytest_cache benchmarks/out
