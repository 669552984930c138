#!/bin/sh
# Install the Debian packages that some tests drive for real: promtool/prometheus, systemd-analyze, and kamailio
# (with kamcmd: the dispatcher of the scale-out scenario and `make scale-demo`).
# Tests that need a tool skip (with the reason) when it is absent, so this is best effort; under CI the
# scale-out test fails instead of skipping when kamailio is still missing.
set -u
missing=""
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || missing="$missing prometheus"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
PATH="$PATH:/usr/sbin:/sbin" command -v kamailio >/dev/null 2>&1 || missing="$missing kamailio"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-packages: missing$missing (not root or no apt-get); tests needing them will skip"
    exit 0
fi
echo "system-packages: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
    || echo "system-packages: apt-get install$missing failed; tests needing them will skip"
exit 0
