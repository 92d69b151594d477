#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver so tests/web/test_page.py can drive the trading page
# in a real headless browser (Selenium, pointed at /usr/bin/chromium and /usr/bin/chromedriver).
#
# - both already there: nothing to do.
# - apt-get available and we are root (or sudo works without a password): install them,
#   non-interactive, without recommends; refresh the package lists only if the first try fails.
# - otherwise: print a loud message and exit 0; the browser tests then skip with the same reason.
#
# Usage: deploy/install-chromium.sh        (called by `make test`)
set -u

CHROMIUM=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

banner() {
    echo "##########################################################################" >&2
    echo "# $*" >&2
    echo "##########################################################################" >&2
}

present() {
    [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]
}

if present; then
    echo "chromium and chromedriver present: $("$DRIVER" --version 2>/dev/null | head -n 1)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    banner "chromium / chromedriver missing and apt-get is not available: install them by hand (at $CHROMIUM and $DRIVER); the browser tests will be SKIPPED"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        banner "chromium / chromedriver missing and we are not root (and sudo needs a password): run 'sudo apt-get install chromium chromium-driver'; the browser tests will be SKIPPED"
        exit 0
    fi
fi

install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
}

echo "installing Debian's chromium and chromium-driver for the browser tests ..."
if ! install; then
    # The package list may be missing or stale on a fresh machine: refresh once and retry.
    $SUDO apt-get update -q || true
    install || true
fi

if present; then
    echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
else
    banner "installing chromium and chromium-driver with apt-get FAILED: the browser tests will be SKIPPED"
fi
exit 0
