# The two commands of README.md: `make train` and `make test`. Each sets up what it needs
# (Debian packages, .venv with libtorch, the release build) and is fast when nothing changed.
SHELL := /bin/bash
ENV := source scripts/env.sh &&
CONFIG ?= configs/quickstart.yaml

.PHONY: setup build train test lint fmt clean gpu-bundle

setup:
	@scripts/setup-system.sh
	@scripts/setup-venv.sh

build: setup
	@$(ENV) cargo build --release --workspace --bins --examples

# --resume auto: a second `make train` continues (or reports that the run is complete)
# instead of refusing an out_dir that already holds a run.
train: build
	@$(ENV) target/release/moe train --config $(CONFIG) --resume auto

# The whole suite: unit, multi-rank (threads), mpirun, end-to-end and bench smoke tests.
# MOE_STRICT=1: every communicator, the dispatcher and the experts check the device and kind
# of what they are handed, so a CPU run fails where a GPU run would (comm/src/placement.rs).
test: build
	@$(ENV) MOE_STRICT=1 cargo test --release --workspace --no-fail-fast

# Builds here and gathers gpu-bundle/ for scripts/gpu-check.sh on a lent GPU machine (carry it).
gpu-bundle: setup
	@scripts/gpu-bundle.sh

lint: setup
	@$(ENV) cargo fmt --all -- --check && cargo clippy --release --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
