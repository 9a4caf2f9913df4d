# One way to do each thing: `make testnet` (the README's first command) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: testnet test lint typecheck pytest browser-deps nat-deps netns nat bench clean

# torch is installed first, pinned, so no resolver step can ever pick a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

testnet: $(STAMP)
	$(BIN)/p2pfl testnet --nodes 8 --rounds 5 --out runs/testnet

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check p2pfl tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite includes the browser tests (marker `browser`, about 40 s): Chromium first;
# and the NAT namespace test: nftables first.
pytest: $(STAMP) browser-deps nat-deps
	$(BIN)/pytest -q

browser-deps:
	.ci/browser-deps

nat-deps:
	.ci/nat-deps

# Six daemons in their own network namespaces with a partition, a dead link and a SIGKILL,
# then four with two behind NAT routers (root only; part of `make pytest` too, skipped with
# the reason when not root). ~5 min.
netns: $(STAMP) nat-deps
	$(BIN)/pytest -q -s tests/netns

# Only the NAT scenarios of tests/netns: two nodes behind nftables masquerade routers reach
# the network through relays, lose one, and route around a hostile one (root only;
# skipped with the reason otherwise). 1.5-2.5 min.
nat: $(STAMP) nat-deps
	$(BIN)/pytest -q -s tests/netns/test_nat.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
