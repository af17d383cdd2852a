# Real Istio for tests/istio_real.rs (docs/testing.md, "Real Istio"). Sourced by
# tests/peers/install.sh (`make peers`); it uses install.sh's helpers (say, die, stamp_key,
# up_to_date, mark_done, go_build) and settings (GOFLAGS=-mod=readonly, GOSUMDB=off,
# GOTOOLCHAIN=local).
#
#   target/peers/istio/pilot-discovery     istiod, built from tests/peers/istio/
#   target/peers/istio/pilot-agent         the sidecar's agent (istio-proxy runs it), same module
#   target/peers/istio/charts/             Istio's Helm charts (the module's manifests/charts)
#   target/peers/istio/envoy_bootstrap.json
#                                          the Envoy bootstrap template pilot-agent renders (the
#                                          proxy image's /var/lib/istio/envoy/envoy_bootstrap_tmpl.json)
#
# The proxy's Envoy is the test bed's (target/peers/bin/envoy): upstream Envoy, not Istio's
# build, so istiod is run without the Istio-only filters (see tests/istio_real.rs).
#
# The Go module proxy serves no Istio release here, only pseudo-versions of the main branch:
# tests/peers/istio/go.mod pins one of the 1.31 development cycle. To move it:
#   cd tests/peers/istio && GOSUMDB=off GOFLAGS=-mod=mod go get istio.io/istio@<version> \
#     && GOSUMDB=off GOFLAGS=-mod=mod go mod tidy

ISTIO_OUT="$OUT/istio"
# The release the pinned pseudo-version leads to (its istio.io/api is v1.31.0-rc.0): what the
# binaries report as their version, and what istiod compares proxy versions with.
ISTIO_DEV_VERSION=1.31-dev

# istio_build: the two binaries, the charts and the bootstrap template into $ISTIO_OUT, keyed
# on the module and the Go version.
istio_build() {
    local src="$PEERS_SRC/istio" key version moddir start
    version="$(cd "$src" && go list -m -f '{{.Version}}' istio.io/istio)"
    key="$(echo "$GO_VERSION" | stamp_key - "$src/go.mod" "$src/go.sum" "$src/tools.go" "${BASH_SOURCE[0]}")"
    if up_to_date istio "$key" "$ISTIO_OUT/pilot-discovery" "$ISTIO_OUT/pilot-agent" \
        "$ISTIO_OUT/charts/istio-control/istio-discovery/Chart.yaml" "$ISTIO_OUT/envoy_bootstrap.json"; then
        say "Istio $version (pilot-discovery, pilot-agent, charts) is up to date"
        return
    fi
    require_go 26 "Istio $version (its go.mod declares go 1.26)"
    say "building Istio $version (pilot-discovery, pilot-agent) with $GO_VERSION; a cold build takes about 4 minutes"
    start=$SECONDS
    # Resolving the two commands' packages downloads the modules they use (152 of the 448 in
    # the graph), nothing else.
    (cd "$src" && go list -deps istio.io/istio/pilot/cmd/pilot-discovery \
        istio.io/istio/pilot/cmd/pilot-agent >/dev/null)
    say "downloaded what the build needs in $((SECONDS - start))s"
    mkdir -p "$ISTIO_OUT"
    # Static and with the build tags of Istio's release binaries (its Makefile.core.mk:
    # STANDARD_TAGS for istiod, AGENT_TAGS for the agent): what Istio ships, at the cost of a
    # plain build (docs/testing.md, "Real Istio"). The version is what `pilot-discovery
    # version` says.
    local ldflags="-s -w -X istio.io/istio/pkg/version.buildVersion=$ISTIO_DEV_VERSION \
-X istio.io/istio/pkg/version.buildGitRevision=${version##*-} -X istio.io/istio/pkg/version.buildTag=$version"
    CGO_ENABLED=0 GO_TAGS=vtprotobuf,disable_pgv go_build istio "$src" "$ldflags" \
        istio.io/istio/pilot/cmd/pilot-discovery
    CGO_ENABLED=0 GO_TAGS=agent,disable_pgv,grpcnotrace,retrynotrace go_build istio "$src" "$ldflags" \
        istio.io/istio/pilot/cmd/pilot-agent
    mv -f "$BIN/pilot-discovery" "$BIN/pilot-agent" "$ISTIO_OUT/"
    # Files of the module: the charts istiod and its injector are installed from, and the
    # bootstrap template. The module cache is read-only: copy, then make the copy writable.
    moddir="$(cd "$src" && go list -m -f '{{.Dir}}' istio.io/istio)"
    rm -rf "$ISTIO_OUT/charts"
    cp -R "$moddir/manifests/charts" "$ISTIO_OUT/charts"
    cp "$moddir/tools/packaging/common/envoy_bootstrap.json" "$ISTIO_OUT/envoy_bootstrap.json"
    chmod -R u+w "$ISTIO_OUT/charts" "$ISTIO_OUT/envoy_bootstrap.json"
    mark_done istio "$key"
    say "built Istio in $((SECONDS - start))s"
}

# istio_versions: one line per binary, for install.sh's summary. (Their stderr is dropped: both
# log a line about memory limits before anything else.)
istio_versions() {
    local name v
    for name in pilot-discovery pilot-agent; do
        CURRENT="$name (version check)"
        v="$("$ISTIO_OUT/$name" version --short 2>/dev/null)" || die "$ISTIO_OUT/$name version failed"
        printf '  %-15s %s\n' "$name" "${v#client version: }"
    done
    echo "                  (in $ISTIO_OUT)"
}
