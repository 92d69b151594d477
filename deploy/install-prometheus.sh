#!/usr/bin/env bash
# Install promtool (Debian's `prometheus` package ships it) so tests/deploy/test_promtool.py can run
# `promtool check config` and `promtool check rules`.
#
# - promtool already on PATH: nothing to do.
# - apt-get available and we are root (or sudo works without a password): install it, non-interactive,
#   without recommends. No service is started here (no systemd in containers/CI; the package's
#   postinst only enables the unit where systemd runs).
# - otherwise: print a loud message and exit 0; the promtool tests then skip with the same reason.
#
# Usage: deploy/install-prometheus.sh        (called by `make test`)
set -u

banner() {
    echo "##########################################################################" >&2
    echo "# $*" >&2
    echo "##########################################################################" >&2
}

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "prometheus and promtool present: $(command -v prometheus)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    banner "promtool is missing and apt-get is not available: install Prometheus (promtool) by hand; the promtool tests will be SKIPPED"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        banner "promtool is missing and we are not root (and sudo needs a password): run 'sudo apt-get install prometheus'; the promtool tests will be SKIPPED"
        exit 0
    fi
fi

install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
}

# policy-rc.d keeps invoke-rc.d from starting the daemon on hosts where it could.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    if printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null 2>&1 && $SUDO chmod +x "$POLICY"; then
        CREATED_POLICY=1
    fi
fi

echo "installing Debian's prometheus package for promtool ..."
if ! install; then
    # The package list may be missing or stale on a fresh machine: refresh once and retry.
    $SUDO apt-get update -q || true
    install || true
fi

if [ "$CREATED_POLICY" = "1" ]; then
    $SUDO rm -f "$POLICY"
fi

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "prometheus installed: $(prometheus --version 2>&1 | head -n 1)"
else
    banner "installing prometheus with apt-get FAILED: the promtool tests and the live Prometheus test will be SKIPPED"
fi
exit 0
