#!/usr/bin/env bash
# make demo: a real SPIRE server and agent, svid-bridge in delegated mode, and two Envoys
# (client and server, each its own registered workload) doing mTLS with each other's SPIFFE
# IDs, all on this machine. Their TLS contexts come only from svid-bridge over SDS.
# Prints who talked to whom, the certificates' expiry and one live rotation; then cleans up.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
peers="$root/target/peers/bin"
bridge_bin="$root/target/debug/svid-bridge"
td=demo.example.org
svid_ttl=${DEMO_SVID_TTL:-30}

for bin in spire-server spire-agent envoy; do
  [[ -x "$peers/$bin" ]] || { echo "missing $peers/$bin: run 'make peers'" >&2; exit 1; }
done
[[ -x "$bridge_bin" ]] || { echo "missing $bridge_bin: run 'cargo build'" >&2; exit 1; }

# Short paths: Unix socket paths are limited to 107 bytes.
work=$(mktemp -d /tmp/svid-bridge-demo.XXXXXX)
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# On failure: stop every process, but keep the logs for a look.
die() { echo "demo failed: $*" >&2; echo "logs are in $work/*.log (kept)" >&2; trap - EXIT; stop_all; exit 1; }
# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$work"/{server,agent,public,admin,sds,bin}
# Each workload is told apart by its binary path (unix attestor, discover_workload_path).
envoy_real=$(readlink -f "$peers/envoy")
for name in envoy-server envoy-client; do
  ln "$envoy_real" "$work/bin/$name" 2>/dev/null || cp "$envoy_real" "$work/bin/$name"
done
cp "$bridge_bin" "$work/bin/svid-bridge"

step "Starting SPIRE server and agent (trust domain $td)"
server_port=$(free_port)
cat >"$work/server.conf" <<EOF
server {
  bind_address = "127.0.0.1"
  bind_port = "$server_port"
  socket_path = "$work/server/api.sock"
  trust_domain = "$td"
  data_dir = "$work/server"
  log_level = "WARN"
  experimental { cache_reload_interval = "1s" }
}
plugins {
  DataStore "sql" { plugin_data { database_type = "sqlite3" connection_string = "$work/server/datastore.sqlite3" } }
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
}
EOF
"$peers/spire-server" run -config "$work/server.conf" >"$work/spire-server.log" 2>&1 & pids+=($!)
server_cli() { "$peers/spire-server" "$@" -socketPath "$work/server/api.sock"; }
wait_for "the SPIRE server" 30 server_cli healthcheck
token=$("$peers/spire-server" token generate -socketPath "$work/server/api.sock" -spiffeID "spiffe://$td/node" | awk '{print $2}')
cat >"$work/agent.conf" <<EOF
agent {
  data_dir = "$work/agent"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "$server_port"
  socket_path = "$work/public/api.sock"
  admin_socket_path = "$work/admin/admin.sock"
  trust_domain = "$td"
  insecure_bootstrap = true
  join_token = "$token"
  authorized_delegates = ["spiffe://$td/svid-bridge"]
  experimental { sync_interval = "1s" }
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
    # workload_size_limit = -1: no unix:sha256 selector, which would hash Envoy's 100 MB
  # binary at every attestation.
  WorkloadAttestor "unix" { plugin_data { discover_workload_path = true workload_size_limit = -1 } }
}
EOF
"$peers/spire-agent" run -config "$work/agent.conf" >"$work/spire-agent.log" 2>&1 & pids+=($!)
wait_for "the SPIRE agent" 30 "$peers/spire-agent" healthcheck -socketPath "$work/public/api.sock"

step "Registering workloads"
register() { # id path [extra args]
  server_cli entry create -parentID "spiffe://$td/node" -spiffeID "spiffe://$td/$1" \
    -selector "unix:path:$2" "${@:3}" >/dev/null
  printf '  %-32s ← unix:path:%s\n' "spiffe://$td/$1" "$2"
}
register svid-bridge "$work/bin/svid-bridge"
register server "$work/bin/envoy-server" -x509SVIDTTL "$svid_ttl"
register client "$work/bin/envoy-client" -x509SVIDTTL "$svid_ttl"

step "Starting svid-bridge (delegated mode: each Envoy gets its own workload's SVIDs)"
"$work/bin/svid-bridge" run --admin-socket "$work/admin/admin.sock" --sds-socket "$work/sds/socket" \
  --csi-socket "" --metrics-addr "" --health-addr "" >"$work/svid-bridge.log" 2>&1 & pids+=($!)
wait_for "the SDS socket" 10 test -S "$work/sds/socket"
echo "  SDS on $work/sds/socket"

start_envoy() { # name inbound_allowed upstream_port upstream_id inbound_port outbound_port admin_port
  local name=$1 admin=$7
  NODE_ID=$name ADMIN_PORT=$admin SDS_SOCKET="$work/sds/socket" UPSTREAM_ADDRESS=127.0.0.1 \
  UPSTREAM_PORT=$3 UPSTREAM_SPIFFE_ID=$4 INBOUND_PORT=$5 INBOUND_ALLOWED_SPIFFE_ID=$2 OUTBOUND_PORT=$6 \
    envsubst <"$root/envoy/sidecar.yaml" >"$work/$name.yaml"
  "$work/bin/envoy-$name" -c "$work/$name.yaml" --disable-hot-restart --concurrency 1 -l warning \
    >"$work/envoy-$name.log" 2>&1 & pids+=($!)
}
server_in=$(free_port); client_out=$(free_port)
step "Starting two Envoys whose certificates come only from svid-bridge over SDS"
server_admin=$(free_port); client_admin=$(free_port)
start_envoy server "spiffe://$td/client" 9 spiffe://nobody.invalid/x "$server_in" "$(free_port)" "$server_admin"
start_envoy client spiffe://nobody.invalid/x "$server_in" "spiffe://$td/server" "$(free_port)" "$client_out" "$client_admin"
ready() { [[ $(curl -fs "http://127.0.0.1:$1/ready") == LIVE ]]; }
wait_for "the server Envoy to get its secrets" 60 ready "$server_admin"
wait_for "the client Envoy to get its secrets" 60 ready "$client_admin"
echo "  both Envoys are LIVE: listeners warmed with SDS secrets 'default' and 'ROOTCA'"

step "Sending requests: app → client Envoy → mTLS → server Envoy"
for i in 1 2 3; do
  headers=$(curl -fsS -D - -o "$work/body" "http://127.0.0.1:$client_out/") || die "request $i failed"
  peer=$(grep -i '^x-peer-spiffe-id:' <<<"$headers" | tr -d '\r' | cut -d' ' -f2)
  upstream=$(grep -i '^x-upstream-verified-spiffe-id:' <<<"$headers" | tr -d '\r' | cut -d' ' -f2)
  printf '  request %d: %s  (client verified server as %s; server verified client as %s)\n' \
    "$i" "$(tr -d '\n' <"$work/body")" "$upstream" "$peer"
done

certs() { curl -fs "http://127.0.0.1:$1/certs"; }
describe_certs() { # admin_port label
  certs "$1" | python3 -c '
import json, sys
label = sys.argv[1]
for c in json.load(sys.stdin)["certificates"]:
    for cert in c.get("cert_chain", []):
        sans = ",".join(s.get("uri", "") for s in cert.get("subject_alt_names", []))
        print("  %s: %s  serial %s  expires %s" % (label, sans, cert["serial_number"], cert["expiration_time"]))
        break
    for ca in c.get("ca_cert", [])[:1]:
        print("  %s: trusts %s  (CA expires %s)" % (label, ca["path"], ca["expiration_time"]))
' "$2" | sort -u
}
step "Certificates the Envoys hold (from their admin /certs)"
describe_certs "$server_admin" server
describe_certs "$client_admin" client

step "What svid-bridge serves, asked as Envoy asks (svid-bridge inspect, run as the bridge's own workload)"
"$work/bin/svid-bridge" inspect --sds-socket "$work/sds/socket" default ROOTCA | sed 's/^/  /'

step "Waiting for a live rotation (SVID TTL ${svid_ttl}s: the agent rotates at half-life)"
serial() { certs "$server_admin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["certificates"][0]["cert_chain"][0]["serial_number"])'; }
before=$(serial); start=$SECONDS
rotated() { [[ $(serial) != "$before" ]]; }
wait_for "a rotation" $((svid_ttl * 2)) rotated
echo "  server certificate rotated after $((SECONDS - start))s: serial $before → $(serial)"
curl -fsS -o /dev/null "http://127.0.0.1:$client_out/" || die "request after rotation failed"
echo "  traffic still flows over mTLS after the rotation"
rejected=$(curl -fs "http://127.0.0.1:$server_admin/stats?filter=sds.default.update_rejected" | awk '{print $2}')
echo "  server Envoy: sds.default.update_rejected = ${rejected:-0}"

step "Done: stopping everything"
