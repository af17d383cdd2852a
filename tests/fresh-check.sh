#!/usr/bin/env bash
# `make fresh-check`: runs `make test` as a new machine would, and times each phase.
#
# A green CI on a machine whose caches are warm once hid a `make test` that failed on a fresh
# one (a test read crates that only an earlier `cargo fetch` had put in the registry). This
# script clones HEAD into a temporary directory and runs the phases of `make test` there with
# empty Cargo, Go and pip caches, so every download and build that `make test` needs happens
# from the project's own files:
#
#   CARGO_HOME            empty (the toolchain itself stays: rustup keeps it in RUSTUP_HOME)
#   GOMODCACHE, GOCACHE   empty
#   PIP_CACHE_DIR         empty
#   target/               empty (a fresh clone): every peer is rebuilt
#
# What it cannot empty: Debian packages already installed (tests/peers/install.sh installs
# the ones it needs with apt-get when they are missing) and the toolchains the machine kind
# ships (Rust, Go, Python). It is not part of `make test`: it rebuilds everything.
#
#   FRESH_KEEP=1   keep the temporary directory (it is kept anyway when a phase fails)
#   FRESH_DIR=DIR  work in DIR instead of a new directory under /tmp (must not exist)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${FRESH_DIR:-$(mktemp -d /tmp/svid-bridge-fresh.XXXXXX)}"
[ -n "${FRESH_DIR:-}" ] && { [ -e "$WORK" ] && { echo "fresh-check: $WORK exists" >&2; exit 2; }; mkdir -p "$WORK"; }

commit="$(git -C "$ROOT" rev-parse HEAD)"
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
    echo "fresh-check: note: uncommitted changes in $ROOT are not part of the check (it clones HEAD)"
fi

echo "fresh-check: cloning $commit into $WORK/repo"
git clone --quiet --no-hardlinks "$ROOT" "$WORK/repo" || exit 1
git -C "$WORK/repo" checkout --quiet --detach "$commit" || exit 1

mkdir -p "$WORK/cargo-home" "$WORK/go/mod" "$WORK/go/cache" "$WORK/go/path" "$WORK/pip-cache" "$WORK/logs"
export CARGO_HOME="$WORK/cargo-home"
export GOMODCACHE="$WORK/go/mod" GOCACHE="$WORK/go/cache" GOPATH="$WORK/go/path"
export PIP_CACHE_DIR="$WORK/pip-cache"
unset CARGO_TARGET_DIR SVID_BRIDGE_PEERS_DIR
# rustup's proxies (cargo, rustc) live in the old CARGO_HOME's bin; keep them on PATH.

# The phases of `make test`, in its order (Makefile: test: peers fmt-check clippy
# test-and-release-build: the tests with the release build beside them).
phases=("peers" "fmt-check clippy" "test-and-release-build")
names=()
secs=()
failed=""
total_start=$SECONDS
for phase in "${phases[@]}"; do
    log="$WORK/logs/${phase// /+}.log"
    echo "fresh-check: make $phase (log: $log)"
    start=$SECONDS
    # shellcheck disable=SC2086 # a phase may name several make targets
    (cd "$WORK/repo" && make $phase) >"$log" 2>&1
    rc=$?
    names+=("$phase")
    secs+=($((SECONDS - start)))
    if [ "$rc" -ne 0 ]; then
        failed="$phase"
        echo "fresh-check: make $phase FAILED (exit $rc); the end of its log:"
        tail -n 60 "$log"
        break
    fi
done
total=$((SECONDS - total_start))

echo ""
echo "fresh-check: commit $commit, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
printf '  %-24s %8s\n' "phase" "wall"
for i in "${!names[@]}"; do
    printf '  %-24s %5dm%02ds\n' "${names[$i]}" $((secs[i] / 60)) $((secs[i] % 60))
done
printf '  %-24s %5dm%02ds\n' "total" $((total / 60)) $((total % 60))
grep -hE '^peers: (built|installed)' "$WORK/logs/peers.log" 2>/dev/null | sed 's/^/  /'
# The first `Finished` is the tests' compilation (tests/test-and-release-build.sh).
grep -m1 -hE 'Finished .test.' "$WORK/logs/test-and-release-build.log" 2>/dev/null | sed 's/^ */  /'
grep -hE '^test-and-release-build: the (tests passed|release build was done)' \
    "$WORK/logs/test-and-release-build.log" 2>/dev/null | sed 's/^/  /'
grep -hE '^test result:' "$WORK/logs/test-and-release-build.log" 2>/dev/null |
    awk '{p += $4; f += $6} END { if (NR) printf "  tests: %d passed, %d failed (%d test binaries)\n", p, f, NR }'

if [ -n "$failed" ]; then
    echo "fresh-check: FAILED in 'make $failed'; kept $WORK for inspection"
    exit 1
fi
if [ -n "${FRESH_KEEP:-}" ]; then
    echo "fresh-check: passed; kept $WORK"
else
    # Go makes its module cache read-only.
    chmod -R u+w "$WORK" 2>/dev/null
    rm -rf "$WORK"
    echo "fresh-check: passed"
fi
