#!/bin/sh
# Prints the path of a headless-capable Chromium, installing Debian's `chromium` package first if
# none is found and apt-get can be used (root). Exits 1, with the reason on stderr, otherwise.
# Browser tests (the run report's, the server's) call it and skip with that reason.
set -u
find_chromium() {
    for name in chromium chromium-browser google-chrome; do
        path=$(command -v "$name" 2>/dev/null) && { echo "$path"; return 0; }
    done
    return 1
}
if find_chromium; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found, and apt-get cannot install it here (needs root and apt)" >&2
    exit 1
fi
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "chromium not found, and apt-get install chromium failed" >&2
    exit 1
fi
find_chromium || { echo "chromium installed but not on PATH" >&2; exit 1; }
