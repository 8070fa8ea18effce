# rockstate build entry points. Every target first runs the idempotent bootstrap, which
# installs what is missing on a Debian machine (run as root).
#
# Builds go to a persistent target directory outside the clone so that RocksDB is
# compiled once per machine, not once per checkout.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/rockstate-target
export CARGO_TERM_COLOR ?= never

.PHONY: bootstrap build test lint demo bench

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	cargo build --locked --workspace --all-targets

lint: bootstrap
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked --workspace --all-targets --features rockstate/testing -- -D warnings
	cargo clippy --locked -p rockstate --lib -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps

test: lint
	cargo nextest run --locked --workspace --no-fail-fast --features rockstate/testing
	cargo test --locked --workspace --doc
	# The library alone, without the cloud features the CLI turns on.
	cargo nextest run --locked -p rockstate --lib --no-fail-fast storage::

demo: bootstrap
	bash scripts/demo.sh

bench: bootstrap
	cargo bench --locked --bench state_access
