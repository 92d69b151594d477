#!/usr/bin/env bash
# Debian's prometheus (server and promtool) for tests/deploy: promtool checks and the live Prometheus test.
exec bash "$(dirname "$0")/install-debian.sh" "the promtool and live Prometheus tests" "promtool prometheus" prometheus
