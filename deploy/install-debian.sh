#!/usr/bin/env bash
# Install Debian packages that some tests need, where the machine allows it, and say loudly where not.
#
#   deploy/install-debian.sh WHAT "NEEDED ..." PACKAGE ...
#
# WHAT names the tests that need them (for the messages); NEEDED are commands on PATH or absolute paths
# that must exist afterwards. Nothing to do when they all exist. Otherwise, with apt-get and root (or
# sudo without a password): install the packages non-interactively without recommends, without
# starting any daemon (policy-rc.d), refreshing the package lists once only if the first try fails.
# Anything else prints a banner and exits 0: those tests then skip with the same reason.
set -u

WHAT=$1
NEEDED=$2
shift 2
PACKAGES="$*"

banner() {
    echo "##########################################################################" >&2
    echo "# $*" >&2
    echo "##########################################################################" >&2
}

present() {
    local item
    for item in $NEEDED; do
        case "$item" in
            /*) [ -x "$item" ] || return 1 ;;
            *) command -v "$item" >/dev/null 2>&1 || return 1 ;;
        esac
    done
}

if present; then
    echo "$PACKAGES: present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    banner "$NEEDED missing and apt-get is not available: install $PACKAGES by hand; $WHAT will be SKIPPED"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        banner "$NEEDED missing and we are not root (and sudo needs a password): run 'sudo apt-get install $PACKAGES'; $WHAT will be SKIPPED"
        exit 0
    fi
fi

install() {
    # shellcheck disable=SC2086  # the package list is meant to split
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES
}

# policy-rc.d keeps invoke-rc.d from starting a daemon (prometheus, haproxy) on hosts where it could.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    if printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null 2>&1 && $SUDO chmod +x "$POLICY"; then
        CREATED_POLICY=1
    fi
fi

echo "installing Debian's $PACKAGES for $WHAT ..."
if ! install; then
    # The package lists may be missing or stale on a fresh machine: refresh once and retry.
    $SUDO apt-get update -q || true
    install || true
fi

if [ "$CREATED_POLICY" = "1" ]; then
    $SUDO rm -f "$POLICY"
fi

if present; then
    echo "$PACKAGES: installed"
else
    banner "installing $PACKAGES with apt-get FAILED: $WHAT will be SKIPPED"
fi
exit 0
