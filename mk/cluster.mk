# The real single-node Kubernetes of the end-to-end tests, and the image without a container
# engine (docs/testing.md). The Makefile includes this file:  include mk/cluster.mk
#
#   make cluster   start the test node by hand: etcd, kube-apiserver, containerd, the kubelet,
#                  SPIRE server + agent as pods and svid-bridge from charts/svid-bridge; prints
#                  the KUBECONFIG to use. Ctrl-C stops it and removes everything.
#   make image     target/images/svid-bridge.tar: the release binary and the libraries it
#                  links as an OCI image archive (deploy/image/oci-image.py), for
#                  `ctr -n k8s.io images import`, `podman load` or `skopeo copy oci-archive:...`

CARGO ?= cargo
IMAGE_NAME ?= svid-bridge:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

.PHONY: cluster image

# Same binary and setup as `cargo test --test k8s_node`, held until Ctrl-C.
cluster: peers
	SVID_BRIDGE_K8S_HOLD=1 $(CARGO) test --test k8s_node -- --nocapture

image:
	$(CARGO) build --release --locked --bin svid-bridge
	python3 deploy/image/oci-image.py --name $(IMAGE_NAME) --out target/images/svid-bridge.tar \
		--entrypoint /svid-bridge --cmd run --libs target/release/svid-bridge=/svid-bridge
