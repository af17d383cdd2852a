# Deployment targets (issue 6). The Makefile includes this file:  include mk/deploy.mk
#
#   make release-build   the container image's build step (Dockerfile), without a container
#                        engine: cargo build --release --locked
#   make deploy-test     only the deployment tests: the Helm chart (Helm + strict Kubernetes
#                        decoding), the Envoy configs (envoy --mode validate), Istio-style
#                        Envoys against svid-bridge and SPIRE, the image's build context
#   make chart-template  render the chart as `helm template` would, every object strictly
#                        decoded; pass values with CHART_ARGS='--set openshift.enabled=true'

CARGO ?= cargo
CHART_ARGS ?=

.PHONY: release-build deploy-test chart-template

# --locked: the image must build from the committed Cargo.lock, never a re-resolved one.
release-build:
	$(CARGO) build --release --locked

deploy-test: peers
	$(CARGO) test --test deploy_chart --test deploy_envoy_configs --test deploy_istio --test deploy_image

chart-template: peers
	target/peers/bin/chart-check render $(CHART_ARGS) charts/svid-bridge
