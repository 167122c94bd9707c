# unlearn: the usual targets. Everything runs from a local virtualenv in .venv, made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
N      ?= 100

.PHONY: install demo test test-all lint format bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,ray]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/python -c "import unlearn_cli, torch, sklearn, typer"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded digits default: N reference models, N finetune runs, the score.
demo: install
	$(BIN)/unlearn train-refs --num-models $(N)
	$(BIN)/unlearn apply --method finetune
	$(BIN)/unlearn score --out report.json

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_attacks.py
	$(BIN)/python benchmarks/bench_demo.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_methods.py

## GPU tests + GPU benchmark in <= 8 minutes; results in $$UNLEARN_BENCH_OUT (default benchmarks/out)
bench-gpu: install
	PYTHON=$(BIN)/python benchmarks/gpu_check.sh

clean:
	rm -rf runs report.json .pytest_cache benchmarks/out
