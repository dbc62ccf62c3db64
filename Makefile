# Two commands do all set-up on a fresh machine with only Python 3.11:
#   make demo   optimize the real all-MiniLM-L6-v2 for this CPU and print the report
#   make test   run the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench fuzz venv clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/optim demo --out reports/minilm

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu" tests

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/minilm_cpu.py
	$(BIN)/python -m pytest -q benchmarks/test_int8_kernels.py --benchmark-group-by=param:shape

fuzz: $(STAMP)
	mkdir -p reports
	OPTIM_FUZZ_PROFILE=fuzz OPTIM_FUZZ_COUNTS=reports/fuzz-counts.json $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz

clean:
	rm -rf $(VENV) reports .pytest_cache
