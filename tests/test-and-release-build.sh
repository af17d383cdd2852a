#!/usr/bin/env bash
# The last step of `make test`: every test (`make cargo-test`) and, beside them, the release
# build (`make release-build`, the container image's build step).
#
# Why beside: the tests spend most of their time waiting on their peers (SPIRE, Envoy, the
# Kubernetes node, istiod), one test binary at a time; on the 2-core test machine the CPU was
# 60-90 % idle while they ran, and the release build then needed another 6-7 minutes of both
# cores after them. Started when the tests start, at the lowest CPU priority, the build only
# takes what the tests leave idle (docs/testing.md, "Cold cost").
#
#   bash tests/test-and-release-build.sh [cargo test arguments]
#   (make test CARGO_TEST_ARGS='...' passes them)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO="${CARGO:-cargo}"
MAKE="${MAKE:-make}"

# Compiling the tests is CPU-bound: it goes first, alone.
"$CARGO" test --no-run "$@"

mkdir -p target
log=target/release-build.log
echo "test-and-release-build: make release-build runs at nice 19 beside the tests (log: $log)"
# Its own session, so that stopping it stops every rustc it started too.
setsid nice -n 19 "$MAKE" --no-print-directory release-build CARGO="$CARGO" >"$log" 2>&1 &
release=$!
stop_release() { kill -TERM -- "-$release" 2>/dev/null || true; }
trap stop_release EXIT

rc=0
tests_start=$SECONDS
"$CARGO" test "$@" || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "test-and-release-build: the tests failed; the release build is stopped"
    exit "$rc"
fi

echo "test-and-release-build: the tests passed ($((SECONDS - tests_start))s); waiting for the release build"
waited=$SECONDS
if ! wait "$release"; then
    echo "test-and-release-build: make release-build FAILED; its log:"
    cat "$log"
    exit 1
fi
trap - EXIT
echo "test-and-release-build: the release build was done $((SECONDS - waited))s after the tests ($(grep -h 'Finished' "$log" | sed 's/^ *//'))"
