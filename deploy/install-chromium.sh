#!/usr/bin/env bash
# Debian's chromium and chromium-driver, so tests/web drive the trading page in a real headless browser.
exec bash "$(dirname "$0")/install-debian.sh" "the browser tests" "/usr/bin/chromium /usr/bin/chromedriver" chromium chromium-driver
