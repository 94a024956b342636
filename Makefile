# `make demo` and `make test` are the whole set-up: both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/certprune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	# auto_LiRPA 0.3 pins torch<1.13: install it without its pins (certprune/lirpa_compat.py makes it run).
	$(BIN)/pip install --quiet --no-deps auto-lirpa==0.3
	$(BIN)/pip install --quiet -e ".[test,attacks]"
	touch $(BIN)/certprune

install: $(BIN)/certprune

demo: install
	$(BIN)/certprune sweep --config configs/demo.yaml --out runs/demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_masked_bounds.py

clean:
	rm -rf $(VENV) runs
