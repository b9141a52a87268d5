#!/bin/sh
# The Debian packages the suite runs for real, installed when missing: a Prometheus Pushgateway (the scorer pushes
# to it on a loopback port), promtool (from prometheus: checks and unit-tests the alerting rules) and chromium
# (renders `report batch` headless). Needs root, as on CI and dev machines.
set -eu
missing=""
command -v prometheus-pushgateway >/dev/null 2>&1 || missing="$missing prometheus-pushgateway"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "test-deps: install the Debian packages$missing first (needs root)" >&2
    exit 2
fi
echo "test-deps: installing$missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
