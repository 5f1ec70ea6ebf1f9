#!/bin/sh
# Prints the path of an nginx binary, installing Debian's `nginx-light` first if none is found and
# apt-get can be used (root). Exits 1, with the reason on stderr, otherwise. tests/test_serve_nginx.py
# calls it and skips with that reason. Installing does not start nginx (no init system here, and
# the test runs its own nginx with its own configuration).
set -u
find_nginx() {
    path=$(command -v nginx 2>/dev/null) && { echo "$path"; return 0; }
    [ -x /usr/sbin/nginx ] && { echo /usr/sbin/nginx; return 0; }
    return 1
}
if find_nginx; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "nginx not found, and apt-get cannot install it here (needs root and apt)" >&2
    exit 1
fi
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; } >/dev/null 2>&1; then
    echo "nginx not found, and apt-get install nginx-light failed" >&2
    exit 1
fi
find_nginx || { echo "nginx installed but not found" >&2; exit 1; }
