# protein-performer: `make train` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install install-bench test train bench clean

install: $(STAMP)

# torch goes in first and pinned: an unpinned torch pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The demo: a small Performer MLM on the bundled Swiss-Prot subset, on the CPU, in about 5 minutes.
train: install
	$(BIN)/python -m protein_performer.train experiment=demo $(ARGS)

install-bench: install
	$(BIN)/python -m pip install -e ".[bench]" "$(TORCH)"

# Benchmarks print Markdown tables (ratios against baselines measured in the same run).
bench: install-bench
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/embed.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
