# Real Istio (issue 18, docs/testing.md "Real Istio"). The Makefile includes this file:
#   include mk/istio.mk
#
#   make test-istio    the peers (Istio's istiod and pilot-agent among them, tests/peers/istio.sh),
#                      then only tests/istio_real.rs (`make test` runs it with everything else);
#                      test-harness arguments: make test-istio ISTIO_TEST_ARGS='--nocapture'

CARGO ?= cargo
ISTIO_TEST_ARGS ?=

.PHONY: test-istio

test-istio: peers
	$(CARGO) test --test istio_real $(if $(ISTIO_TEST_ARGS),-- $(ISTIO_TEST_ARGS))
