#!/usr/bin/env bash
# Set up and run lbproxy on a fresh Debian machine.
#   ./dev.sh run    set up, then start lbproxy on conf/quickstart.toml with demo real servers
#   ./dev.sh test   set up (incl. Pebble, nginx, HAProxy, wrk, certbot as root), then ruff,
#                   mypy --strict and the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

APT_TEST_PACKAGES="pebble nginx-light haproxy wrk certbot openssl redis-server chromium nghttp2-client knot"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev.sh: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        return 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

setup() {
    apt_install python3-venv python3-dev gcc
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
}

case "${1:-}" in
run)
    setup
    exec .venv/bin/lbproxy run -c conf/quickstart.toml --demo-backends
    ;;
test)
    apt_install $APT_TEST_PACKAGES
    setup
    .venv/bin/ruff check lbproxy acmeclient tests bench
    .venv/bin/mypy --strict lbproxy acmeclient
    .venv/bin/lbproxy check -c conf/quickstart.toml
    exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "${@:2}"
    ;;
*)
    sed -n '2,6p' "$0" >&2
    exit 2
    ;;
esac
