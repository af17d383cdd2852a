# svid-bridge developer entry points. CI runs `make test` (.ci/run).
#
#   make peers   install the real peers the integration tests run (SPIRE, Envoy, Istio, ...)
#                into target/peers/ (cached: a second run takes seconds)
#   make test    peers, then formatting, clippy and every test
#                (extra `cargo test` arguments: make test CARGO_TEST_ARGS='-- --nocapture')
#   make demo    SPIRE server + agent, svid-bridge and two Envoys doing mTLS, on this machine
#   make bench   svid-bridge against the SPIRE agent's SDS and spiffe-csi-driver (BENCHMARKS.md)
#   make test-istio
#                only the real-Istio tests (istiod, injected sidecars, pilot-agent + Envoy with
#                SPIRE through svid-bridge; mk/istio.mk); `make test` runs them too
#   make fresh-check
#                `make test` in a clone of HEAD with empty Cargo, Go and pip caches, timing
#                each phase: what a new machine sees (not part of `make test`)

SHELL := bash
CARGO ?= cargo
CARGO_TEST_ARGS ?=

.PHONY: all peers test fmt-check clippy cargo-test test-and-release-build rust-components demo \
	bench fresh-check

all: test

# After `all`, so that a bare `make` still means `make test`.
include mk/deploy.mk
include mk/bench.mk
include mk/cluster.mk
include mk/istio.mk

peers:
	bash tests/peers/install.sh

# The tests and, beside them at the lowest CPU priority, release-build: the container image's
# build step (Dockerfile), run here without an engine (tests/test-and-release-build.sh says
# why beside).
test: peers fmt-check clippy test-and-release-build

# rustfmt and clippy ship as rustup components; install them when a toolchain lacks them.
rust-components:
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

fmt-check: rust-components
	$(CARGO) fmt --check

clippy: rust-components
	$(CARGO) clippy --all-targets -- -D warnings

cargo-test:
	$(CARGO) test $(CARGO_TEST_ARGS)

test-and-release-build:
	CARGO="$(CARGO)" MAKE="$(MAKE)" bash tests/test-and-release-build.sh $(CARGO_TEST_ARGS)

fresh-check:
	bash tests/fresh-check.sh

demo: peers
	$(CARGO) build
	bash demo/demo.sh

