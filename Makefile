# The two commands of README.md: `make demo` (the main job) and `make test` (what CI runs).
# Both do all set-up on a fresh machine: scripts/setup makes .venv with libtorch from PyPI.

CARGO ?= cargo
# libtorch has one global random generator per process; several tests seed it and compare
# exact draws, so tests run one at a time (libtorch still uses every core inside each test).
export RUST_TEST_THREADS ?= 1

.PHONY: all setup build test lint demo clean-venv

all: build

setup:
	scripts/setup

build: setup
	$(CARGO) build --release --workspace

test: setup
	$(CARGO) test --workspace --no-fail-fast

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo: setup
	scripts/demo

clean-venv:
	rm -rf .venv .libtorch
