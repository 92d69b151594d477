#!/usr/bin/env bash
# Install Debian's haproxy so tests/deploy/test_compose.py can run `haproxy -c` on deploy/haproxy.
#
# - haproxy already on PATH: nothing to do.
# - apt-get available and we are root (or sudo works without a password): install it, non-interactive,
#   without recommends, without starting the daemon (policy-rc.d, as deploy/install-prometheus.sh).
# - otherwise: print a loud message and exit 0; that one test then skips with the same reason.
#
# Usage: deploy/install-haproxy.sh        (called by `make test`)
set -u

banner() {
    echo "##########################################################################" >&2
    echo "# $*" >&2
    echo "##########################################################################" >&2
}

if command -v haproxy >/dev/null 2>&1; then
    echo "haproxy present: $(command -v haproxy)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    banner "haproxy is missing and apt-get is not available: install it by hand; the haproxy config test will be SKIPPED"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        banner "haproxy is missing and we are not root (and sudo needs a password): run 'sudo apt-get install haproxy'; the haproxy config test will be SKIPPED"
        exit 0
    fi
fi

install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy
}

POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    if printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null 2>&1 && $SUDO chmod +x "$POLICY"; then
        CREATED_POLICY=1
    fi
fi

echo "installing Debian's haproxy package ..."
if ! install; then
    $SUDO apt-get update -q || true  # a missing or stale package list on a fresh machine
    install || true
fi
if [ "$CREATED_POLICY" = "1" ]; then
    $SUDO rm -f "$POLICY"
fi

if command -v haproxy >/dev/null 2>&1; then
    echo "haproxy installed: $(haproxy -v 2>&1 | head -n 1)"
else
    banner "installing haproxy with apt-get FAILED: the haproxy config test will be SKIPPED"
fi
exit 0
