# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints/torch.txt
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, at the constraint's version (the CPU wheel).
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[wandb,galore,launch,test]'
	# The UI extra on its own: resolved together with the rest, pip backtracks for minutes.
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[ui]'
	touch $@

# What only the tests need on top: TensorFlow (the tf extra, ~250 MB) writes and reads the
# OpenAI GPT-2 checkpoints of tests/test_weights.py; `make demo` does without it.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[tf]'
	touch $@

demo: $(STAMP)
	bash scripts/demo.sh

test: $(TEST_STAMP)
	bash scripts/test.sh

clean:
	rm -rf $(VENV) runs/demo
