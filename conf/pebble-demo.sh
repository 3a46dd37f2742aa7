#!/usr/bin/env bash
# The whole Let's Encrypt certificate story on this machine against a local Pebble (installed with
# apt-get if missing): start lbproxy, register an account, request a certificate for a made-up
# name (its HTTP-01 challenge answered by an lbproxy VS), then curl the HTTPS VS trusting only
# Pebble's root. Everything lives in a temporary directory; every process started is stopped.
#
#   conf/pebble-demo.sh            (KEEP=1 keeps the directory and prints its path)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
NAME=${NAME:-demo.lbproxy.test}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # lbproxy importable from any directory

if ! command -v pebble >/dev/null || ! command -v pebble-challtestsrv >/dev/null; then
    echo "== installing pebble"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq pebble
fi

WORK=$(mktemp -d /tmp/lbproxy-pebble-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll (10/s) until COMMAND succeeds
    local limit=$(( $1 * 10 )) what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; tail -n 30 "$WORK"/*.log >&2 || true; exit 1
}

HTTP_PORT=$(free_port); HTTPS_PORT=$(free_port); ACME_PORT=$(free_port)
MGMT_PORT=$(free_port); ADMIN_PORT=$(free_port); CTS_PORT=$(free_port); DNS_PORT=$(free_port)

echo "== Pebble (ACME on :$ACME_PORT, validating http-01 on 127.0.0.1:$HTTP_PORT)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/pebble-key.pem" -out "$WORK/pebble-tls.pem" 2>/dev/null
cat > "$WORK/pebble.json" <<JSON
{"pebble": {"listenAddress": "127.0.0.1:$ACME_PORT",
            "managementListenAddress": "127.0.0.1:$MGMT_PORT",
            "certificate": "$WORK/pebble-tls.pem", "privateKey": "$WORK/pebble-key.pem",
            "httpPort": $HTTP_PORT, "tlsPort": $(free_port), "ocspResponderURL": "",
            "externalAccountBindingRequired": false}}
JSON
pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" -dns01 "127.0.0.1:$DNS_PORT" \
    -management "127.0.0.1:$CTS_PORT" -http01 "" -https01 "" -tlsalpn01 "" \
    >"$WORK/challtestsrv.log" 2>&1 &
PIDS+=($!)
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 \
    pebble -config "$WORK/pebble.json" -dnsserver "127.0.0.1:$DNS_PORT" >"$WORK/pebble.log" 2>&1 &
PIDS+=($!)
wait_for 15 "Pebble" curl -sf --cacert "$WORK/pebble-tls.pem" "https://127.0.0.1:$ACME_PORT/dir"

echo "== lbproxy (HTTP VS :$HTTP_PORT, HTTPS VS :$HTTPS_PORT, admin :$ADMIN_PORT)"
CFG="$WORK/lbproxy.toml"
cat > "$CFG" <<TOML
state_dir = "state"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[letsencrypt]
directory_url = "https://127.0.0.1:$ACME_PORT/dir"
ca_bundle = "$WORK/pebble-tls.pem"

[[vs]]
name = "http"
listen = "127.0.0.1:$HTTP_PORT"
  [[vs.subvs]]
  name = "site"
  rules = ["default"]
  not_available = { status = 200, body = "hello from lbproxy over HTTP\n" }

[[vs]]
name = "https"
listen = "127.0.0.1:$HTTPS_PORT"
protocol = "https"
tls = { certificates = ["demo"] }
  [[vs.subvs]]
  name = "site"
  rules = ["default"]
  not_available = { status = 200, body = "hello from lbproxy over HTTPS\n" }
TOML
"$PY" -m lbproxy check -c "$CFG"
"$PY" -m lbproxy run -c "$CFG" >"$WORK/lbproxy.log" 2>&1 &
PIDS+=($!)
wait_for 15 "the admin API" "$PY" -m lbproxy le account -c "$CFG"

lb() { echo "\$ lbproxy $*"; "$PY" -m lbproxy "$@" -c "$CFG"; }
lb le set-directory "https://127.0.0.1:$ACME_PORT/dir" --ca-bundle "$WORK/pebble-tls.pem"
lb le register --email "ops@$NAME"
lb le request --id demo --cn "$NAME" --vs http
lb le list

echo "== the HTTPS VS serves it; curl trusts only Pebble's root"
curl -sf --cacert "$WORK/pebble-tls.pem" "https://127.0.0.1:$MGMT_PORT/roots/0" >"$WORK/root.pem"
echo "\$ curl --cacert root.pem https://$NAME:$HTTPS_PORT/"
curl -sS --cacert "$WORK/root.pem" --resolve "$NAME:$HTTPS_PORT:127.0.0.1" \
    "https://$NAME:$HTTPS_PORT/"
echo "== done: certificate issued by Pebble, verified by curl"
