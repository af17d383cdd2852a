# Real Istio (issue 18, docs/testing.md "Real Istio"). The Makefile includes this file:
#   include mk/istio.mk
#
#   make peers-istio   the peers, plus istiod (pilot-discovery) and pilot-agent built from the
#                      Go module proxy with Istio's charts (tests/peers/istio.sh)
#   make test-istio    peers-istio, then tests/istio_real.rs (its tests are #[ignore]d in
#                      `make test`: the Istio build's cold cost does not fit CI's budget);
#                      test-harness arguments: make test-istio ISTIO_TEST_ARGS='--nocapture'

CARGO ?= cargo
ISTIO_TEST_ARGS ?=

.PHONY: peers-istio test-istio

peers-istio:
	SB_PEERS_ISTIO=1 bash tests/peers/install.sh

test-istio: peers-istio
	$(CARGO) test --test istio_real -- --include-ignored $(ISTIO_TEST_ARGS)
