# `make demo` and `make test` are the whole set-up: both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test wheel-check bench clean

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

# The wheel a user installs, in a fresh venv outside the source tree: --version, then a tiny prune of a user's
# network on user data and its verification (CI runs this after the tests).
wheel-check: install
	bash scripts/check_wheel.sh --model $(CURDIR)/tests/data/user_net.py:make --dataset npz:$(CURDIR)/tests/data/tiny.npz \
		--k 0.1 --loss ibp --eps 0.05

bench: install
	$(BIN)/python benchmarks/bench_masked_bounds.py

clean:
	rm -rf $(VENV) runs
