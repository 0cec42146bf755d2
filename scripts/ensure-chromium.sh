#!/usr/bin/env bash
# Make sure headless Chromium is available for the report's browser test.
#
# Installs Debian's `chromium` with apt-get when it is missing and this shell may install
# packages (root, or passwordless sudo). Always exits 0: without Chromium the browser test
# is skipped and says why. Set KFACPERF_NO_CHROMIUM_INSTALL=1 to never install.
set -u

find_chromium() {
    for c in chromium chromium-browser; do
        if command -v "$c" >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    echo "ensure-chromium: found $path ($("$path" --version 2>/dev/null | head -n1))"
    exit 0
fi

if [ "${KFACPERF_NO_CHROMIUM_INSTALL:-0}" = "1" ]; then
    echo "ensure-chromium: chromium missing; not installing (KFACPERF_NO_CHROMIUM_INSTALL=1); browser tests will be skipped"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: chromium missing and apt-get not available; browser tests will be skipped"
    exit 0
fi

if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-chromium: chromium missing and no permission to install it (not root, no passwordless sudo); browser tests will be skipped"
    exit 0
fi

echo "ensure-chromium: installing chromium with apt-get (takes a few minutes) ..."
log=$(mktemp)
if $SUDO apt-get update >"$log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium >>"$log" 2>&1; then
    path=$(find_chromium || echo "?")
    echo "ensure-chromium: installed $path ($("$path" --version 2>/dev/null | head -n1))"
else
    echo "ensure-chromium: apt-get failed; browser tests will be skipped. Last lines of the log:"
    tail -n 5 "$log"
fi
rm -f "$log"
exit 0
