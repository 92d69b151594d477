#!/usr/bin/env bash
# Debian's haproxy, so tests/deploy/test_compose.py can run `haproxy -c` on deploy/haproxy.
exec bash "$(dirname "$0")/install-debian.sh" "the haproxy config check" "haproxy" haproxy
