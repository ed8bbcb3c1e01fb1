#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser test (tests/test_dashboard_browser.py): Debian's
# `chromium` package, installed with apt-get as root or through password-less sudo. Without
# either the test skips and says how to install it.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    apt=(apt-get)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt=(sudo -n apt-get)
else
    echo "ci/install_chromium.sh: not root and no password-less sudo: the browser test will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq chromium >/dev/null
chromium --version
