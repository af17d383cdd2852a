# Side-by-side benchmarks (BENCHMARKS.md): svid-bridge against the SPIRE agent's own SDS
# server and against spiffe-csi-driver. Included from the Makefile (`include mk/bench.mk`,
# replacing its placeholder `bench` rule); `make -f mk/bench.mk bench` works on its own too.
#
#   make bench        installs what it needs (test peers + spiffe-csi-driver), builds the
#                     release binary, runs both benchmarks; tables and PNGs land in
#                     benches/results/ (BENCHMARKS.md shows them)
#   make bench-sds    only the SDS comparison   (knobs: BENCH_N, BENCH_REPS, BENCH_SVID_TTL)
#   make bench-csi    only the CSI comparison   (knobs: BENCH_CSI_CYCLES, BENCH_CSI_MOUNTS)
#   make bench-k8s    pods on the real test node (src/testing/cluster.rs): pod start → Envoy
#                     holds its SVID, and the node's memory, svid-bridge vs. spiffe-csi-driver
#                     + the agent's SDS (knobs: BENCH_K8S_SETUPS, BENCH_K8S_LATENCY_PODS,
#                     BENCH_K8S_RSS_AT); waits for the node lock like `make test`
#   make bench-pods   pod-mode CSI volumes (#15): publish → first SVID (files / Workload API),
#                     bridge memory per volume vs. shared volumes, files rewritten per
#                     rotation, and `spire-agent api fetch x509 -write` per pod as the nearest
#                     reference (knobs: BENCH_PODS_N, BENCH_PODS_TTL)
#   make bench-pod-view  the pod view's memory at 0/110/1,000 pods and its API requests per
#                     minute, on the test node's etcd + kube-apiserver only (knobs:
#                     BENCH_POD_VIEW_AT, BENCH_POD_VIEW_WINDOW seconds)
#
# Needs root (the CSI benchmark bind-mounts inside `unshare -m --propagation private`; the
# Kubernetes one runs a kubelet) and a few GiB of free memory: 1,000 sidecar processes run at
# the largest N, 110 Envoy pods in the Kubernetes benchmark.

CARGO ?= cargo
BENCH_N ?= 100,500,1000
BENCH_REPS ?= 2
BENCH_SVID_TTL ?= 3600
BENCH_CSI_CYCLES ?= 1000
BENCH_CSI_MOUNTS ?= 10000
BENCH_K8S_SETUPS ?= bridge,csi
BENCH_K8S_LATENCY_PODS ?= 50
BENCH_K8S_RSS_AT ?= 10,50,110
BENCH_PODS_N ?= 200
BENCH_PODS_TTL ?= 30
BENCH_POD_VIEW_AT ?= 0,110,1000
BENCH_POD_VIEW_WINDOW ?= 300

BENCH_SDS_CMD = SB_BENCH_N=$(BENCH_N) SB_BENCH_REPS=$(BENCH_REPS) SB_BENCH_SVID_TTL=$(BENCH_SVID_TTL) \
	$(CARGO) bench --bench sds_fanout
BENCH_CSI_CMD = SB_CSI_CYCLES=$(BENCH_CSI_CYCLES) SB_CSI_EXTRA_MOUNTS=$(BENCH_CSI_MOUNTS) \
	$(CARGO) bench --bench csi_compare
BENCH_K8S_CMD = SB_K8S_SETUPS=$(BENCH_K8S_SETUPS) SB_K8S_LATENCY_PODS=$(BENCH_K8S_LATENCY_PODS) \
	SB_K8S_RSS_AT=$(BENCH_K8S_RSS_AT) $(CARGO) bench --bench k8s_pods
BENCH_PODS_CMD = SB_PODS_N=$(BENCH_PODS_N) SB_PODS_TTL=$(BENCH_PODS_TTL) \
	$(CARGO) bench --bench pod_volumes
BENCH_POD_VIEW_CMD = SB_POD_VIEW_AT=$(BENCH_POD_VIEW_AT) SB_POD_VIEW_WINDOW=$(BENCH_POD_VIEW_WINDOW) \
	$(CARGO) bench --bench k8s_pod_view

.PHONY: bench bench-peers bench-build bench-sds bench-csi bench-k8s bench-pods bench-pod-view

bench: bench-peers bench-build
	@start=$$(date +%s); \
	$(BENCH_SDS_CMD) && $(BENCH_CSI_CMD) && $(BENCH_K8S_CMD) && $(BENCH_PODS_CMD) && \
		$(BENCH_POD_VIEW_CMD); \
	rc=$$?; echo "bench: measurements took $$(( $$(date +%s) - start )) s; results in benches/results/"; exit $$rc

bench-peers:
	bash tests/peers/install.sh
	bash benches/peers/install.sh

# The bench profile is the release profile: `cargo bench` runs target/release/svid-bridge.
bench-build:
	$(CARGO) build --release --bin svid-bridge
	$(CARGO) bench --no-run --bench sds_fanout --bench csi_compare --bench k8s_pods \
		--bench pod_volumes --bench k8s_pod_view

bench-sds: bench-build
	$(BENCH_SDS_CMD)

bench-csi: bench-build
	$(BENCH_CSI_CMD)

bench-k8s: bench-build
	$(BENCH_K8S_CMD)

bench-pods: bench-build
	$(BENCH_PODS_CMD)

bench-pod-view: bench-build
	$(BENCH_POD_VIEW_CMD)
