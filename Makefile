# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv with the pinned versions of requirements-dev.txt first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FUZZ_SECONDS ?= 30

.PHONY: demo test sysdeps lint typecheck unit fuzz bench bench-keyserver bench-removal bench-gateway bench-stealing clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: sysdeps lint typecheck fuzz unit

# System tools the tests use: strace watches loaders for file writes; PostgreSQL backs the
# key server's database tests (started per test session from a temp dir, spec §17.2); Redis backs
# the gateway's shared quotas (started per test session the same way).
sysdeps:
	@command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks fuzz examples
	$(BIN)/ruff format --check src tests benchmarks fuzz examples

typecheck: $(STAMP)
	$(BIN)/mypy src/modelseal

unit: $(STAMP)
	$(BIN)/pytest

fuzz: $(STAMP)
	rm -rf .fuzz-corpus && mkdir .fuzz-corpus && cp tests/vectors/*.mseal* .fuzz-corpus/
	$(BIN)/python fuzz/fuzz_parse_header.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 .fuzz-corpus
	rm -rf .fuzz-gateway && mkdir .fuzz-gateway && printf '{"inputs": [[1, 2, 3, 4]]}' > .fuzz-gateway/json
	$(BIN)/python fuzz/fuzz_gateway_request.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 .fuzz-gateway

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_container.py

# Key server load (docs/benchmarks.md): open loop at the target rate, then closed-loop capacity.
bench-keyserver: $(STAMP) sysdeps
	$(BIN)/python benchmarks/bench_keyserver.py --backend sqlite --workers 2 --rate 1000
	$(BIN)/python benchmarks/bench_keyserver.py --backend all --workers 1 2

# Ownership proof against removal attacks (docs/ownership.md): about 2-3 minutes on 2 cores.
bench-removal: $(STAMP)
	$(BIN)/modelseal lab removal --out docs/removal

# The gateway against a bare FastAPI + ONNX Runtime endpoint (docs/benchmarks.md): about 6 minutes.
bench-gateway: $(STAMP)
	$(BIN)/python benchmarks/bench_gateway.py

# The stealing lab (docs/lab.md): every attack against every gateway defence, about 10 minutes.
bench-stealing: $(STAMP)
	$(BIN)/modelseal lab report --out docs/stealing

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
