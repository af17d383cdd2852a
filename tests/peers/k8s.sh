# The real single-node Kubernetes of the end-to-end tests (tests/k8s_node.rs,
# src/testing/cluster.rs, docs/testing.md). Sourced by tests/peers/install.sh, whose helpers
# (say, die, stamp_key, up_to_date, mark_done, go_build) and settings (GOFLAGS=-mod=readonly,
# GOSUMDB=off, GOTOOLCHAIN=local) it uses.
#
#   from Debian:           containerd, runc, etcd (etcd-server), busybox (busybox-static)
#   target/peers/bin/kubelet, kube-apiserver   Kubernetes v1.34.4, built from tests/peers/k8s/
#   target/peers/bin/pause                     the pods' sandbox process, tests/peers/k8s/pause/
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io/* staging
# module with ./staging. tests/peers/k8s/go.mod requires it and replaces each staging module
# with its published v0.34.x; go.sum is committed. After changing the version, regenerate
# both with `GOSUMDB=off GOFLAGS=-mod=mod go mod tidy` in tests/peers/k8s (and the replace
# list from the new k8s.io/kubernetes go.mod).

K8S_DEBS=(containerd runc etcd-server busybox-static)

# k8s_install_debs: apt-installs what is missing; `apt-get update` only when something is.
k8s_install_debs() {
    local missing=() pkg
    for pkg in "${K8S_DEBS[@]}"; do
        dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "containerd, runc, etcd, busybox (Debian) are installed"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root (apt-get)"
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # No recommends: containerd would pull in a CNI plugin set the test node does not use.
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# k8s_build: kubelet, kube-apiserver and pause into $BIN, keyed on the module and Go version.
k8s_build() {
    local src="$PEERS_SRC/k8s" key version start
    version="$(cd "$src" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
    key="$(echo "$GO_VERSION" | stamp_key - "$src/go.mod" "$src/go.sum" "$src/tools.go" "$src/pause/main.go")"
    if up_to_date k8s "$key" "$BIN/kubelet" "$BIN/kube-apiserver" "$BIN/pause"; then
        say "kubelet, kube-apiserver $version are up to date"
        return
    fi
    say "building kubelet, kube-apiserver $version and pause with $GO_VERSION; a cold build takes 3-6 minutes"
    start=$SECONDS
    # Static, like Kubernetes' release binaries; the version stamp is what the Node reports
    # and /version returns (without it: v0.0.0-master).
    CGO_ENABLED=0 go_build k8s "$src" "-s -w -X k8s.io/component-base/version.gitVersion=$version" \
        k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-apiserver ./pause
    mark_done k8s "$key"
    say "built kubelet, kube-apiserver and pause in $((SECONDS - start))s"
}

# k8s_versions: one line per component, for install.sh's summary.
k8s_versions() {
    local v_kubelet v_apiserver v_containerd v_runc v_etcd
    v_kubelet="$(version_of kubelet "$BIN/kubelet" --version)"
    v_apiserver="$(version_of kube-apiserver "$BIN/kube-apiserver" --version)"
    v_containerd="$(version_of containerd containerd --version)"
    v_runc="$(version_of runc runc --version)"
    v_etcd="$(version_of etcd etcd --version)"
    [ -x "$BIN/pause" ] || die "pause is missing from $BIN"
    [ -x /bin/busybox ] || die "/bin/busybox (busybox-static) is missing"
    echo "  kubelet       ${v_kubelet#Kubernetes }"
    echo "  apiserver     ${v_apiserver#Kubernetes }"
    echo "  containerd    $v_containerd"
    echo "  runc          $v_runc"
    echo "  etcd          $v_etcd"
}
