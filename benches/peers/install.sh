#!/usr/bin/env bash
# Installs the peers that only the benchmarks need (BENCHMARKS.md), next to the test peers:
#
#   target/peers/bin/spiffe-csi-driver   spiffe-csi-driver, built from benches/peers/spiffe-csi/
#
# The Go tool module's go.sum is committed: builds neither write it nor ask the checksum
# database (GOSUMDB=off), and go.sum still verifies every module. Keyed on a hash of the
# inputs like tests/peers/install.sh, so a second run takes a moment.
#
# Version: github.com/spiffe/spiffe-csi v0.2.6, the newest the Go module proxy serves here
# (v0.2.7 … v0.2.12 answer "not available"). 0.2.6 predates the publish idempotency check
# (0.2.12) and the single-field mountinfo match (0.2.11): its unpublish parses every line of
# /proc/self/mountinfo (with a regexp per field) to find out whether the target is mounted.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="$ROOT/benches/peers/spiffe-csi"
OUT="$ROOT/target/peers"
BIN="$OUT/bin"
STAMPS="$OUT/stamps"
RECIPE=1

say() { echo "bench peers: $*"; }
die() { echo "bench peers: error: $*" >&2; exit 1; }

mkdir -p "$BIN" "$STAMPS"
exec 9>"$OUT/.bench-install.lock"
flock 9

command -v go >/dev/null || die "go is not on PATH (Go >= 1.25 builds spiffe-csi-driver)"
export GOFLAGS="-mod=readonly -buildvcs=false" GOSUMDB=off GOTOOLCHAIN=local CGO_ENABLED=0
GO_VERSION="$(go env GOVERSION)"
VERSION="$(cd "$SRC" && go list -m -f '{{.Version}}' github.com/spiffe/spiffe-csi)"
key="$({ echo "recipe=$RECIPE $GO_VERSION"; cat "$SRC/go.mod" "$SRC/go.sum"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMPS/spiffe-csi" ] && [ "$(cat "$STAMPS/spiffe-csi")" = "$key" ] && [ -x "$BIN/spiffe-csi-driver" ]; then
    say "spiffe-csi-driver $VERSION is up to date"
else
    say "building spiffe-csi-driver $VERSION with $GO_VERSION"
    start=$SECONDS
    stage="$BIN/.stage-spiffe-csi"
    rm -rf "$stage" && mkdir -p "$stage"
    # The driver reads its version from the build info (I-1 in docs/behaviours.md): `go build` of a
    # dependency's main package records the module version.
    (cd "$SRC" && go build -o "$stage/" github.com/spiffe/spiffe-csi/cmd/spiffe-csi-driver)
    mv -f "$stage/spiffe-csi-driver" "$BIN/spiffe-csi-driver"
    rmdir "$stage"
    echo "$key" >"$STAMPS/spiffe-csi"
    say "built spiffe-csi-driver in $((SECONDS - start))s"
fi

# Charts need a TrueType font (plotters' ab_glyph backend reads DejaVu Sans).
if ! [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing fonts-dejavu-core for the charts"
        apt-get install -y -q fonts-dejavu-core >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q fonts-dejavu-core >/dev/null; }
    else
        die "DejaVuSans.ttf is missing: install fonts-dejavu-core"
    fi
fi
say "ready: $BIN/spiffe-csi-driver"
