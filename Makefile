# Developer entry points. `make install` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The CPU build of torch that this machine (and CI) has on disk; GPU and Jetson users bring their own.
TORCH_CPU ?= torch==2.13.0
GLUE_DIR ?= ../shared/data/glue
PORT ?= 50051

.PHONY: install test test-all lint protos check-protos demo clean bench-accuracy

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU)"
	$(PIP) install -e ".[dev]"

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy sft_common sft_edge sft_cloud

# grpcio-tools 1.70.0 (pinned in sft_common/proto/check.py) in its own venv, .venv-protos: its
# code runs on Python 3.8 (protobuf >= 5.29, grpcio >= 1.70) as well as on the newest runtimes.
protos:
	$(PYTHON) -m sft_common.proto.check --write

check-protos:
	$(PYTHON) -m sft_common.proto.check

demo:
	$(PYTHON) examples/demo.py --data-dir $(GLUE_DIR)

# Baseline vs SFT accuracy on GLUE through a real daemon (docs/accuracy.md). Resumable: finished runs
# are kept in bench/results/accuracy/ and skipped. ACCURACY_PLAN=quick (reduced SST-2 budget) or full.
ACCURACY_PLAN ?= quick
bench-accuracy:
	$(PYTHON) bench/accuracy.py --plan $(ACCURACY_PLAN) --data-dir $(GLUE_DIR) $(ACCURACY_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
