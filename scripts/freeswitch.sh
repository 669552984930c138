#!/bin/sh
# A FreeSWITCH for the real-switch tests: FORKBRIDGE_FREESWITCH (your own prefix) when set, else the bundle in
# ../shared/freeswitch installed into .cache/freeswitch (unpack + Debian runtime libraries + sipp; idempotent).
# Without either the real-switch tests skip with one line saying why; under CI (CI=true) with the bundle beside
# the repo an install failure fails the build.
set -u
BUNDLE=${FREESWITCH_BUNDLE:-../shared/freeswitch}
DEST=${FREESWITCH_CACHE:-.cache}
if [ -n "${FORKBRIDGE_FREESWITCH:-}" ]; then
    echo "freeswitch: using FORKBRIDGE_FREESWITCH=$FORKBRIDGE_FREESWITCH"
    exit 0
fi
if [ ! -x "$BUNDLE/install.sh" ] && [ ! -f "$BUNDLE/install.sh" ]; then
    echo "freeswitch: no bundle at $BUNDLE and FORKBRIDGE_FREESWITCH unset: the real-switch tests will skip"
    exit 0
fi
mkdir -p "$DEST"
if [ "$(id -u)" = "0" ]; then apt=""; else apt="--no-apt"; fi
if bash "$BUNDLE/install.sh" --sipp --no-check $apt "$DEST" >"$DEST/freeswitch-install.log" 2>&1; then
    echo "freeswitch: $(tail -n 1 "$DEST/freeswitch-install.log" | sed 's/^\[install\] //')"
    exit 0
fi
cat "$DEST/freeswitch-install.log"
if [ "${CI:-}" = "true" ]; then
    echo "freeswitch: install of $BUNDLE failed under CI" >&2
    exit 1
fi
echo "freeswitch: install of $BUNDLE failed; the real-switch tests will skip"
exit 0
