#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the report's browser tests, once.
#
#   bash env/install-browser.sh        # prints /usr/bin/chromium; ~1 min the first time, instant after
#
# Idempotent: does nothing when /usr/bin/chromium already runs; otherwise one
# `apt-get update` (a fresh machine has no package lists) and one install, without
# recommended packages. Needs root, as on CI.
set -euo pipefail

browser=/usr/bin/chromium

if [[ -x "$browser" ]] && "$browser" --version >/dev/null 2>&1; then
    echo "$browser"
    exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
    echo "install-browser: $browser is missing and installing it needs root (apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-browser: apt-get update" >&2
apt-get update -qq >&2
# fonts-dejavu-core: a bare machine has no font at all, and the screenshot would show boxes.
echo "install-browser: apt-get install chromium fonts-dejavu-core" >&2
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2

"$browser" --version >&2
echo "$browser"
