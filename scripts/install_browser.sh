#!/usr/bin/env bash
# Install a headless Chromium for the web UI browser test (tests/test_webui.py), idempotently.
# `playwright install chromium` cannot download here, so the browser comes from the distribution's packages;
# Playwright drives it through `executable_path`. Usage: sudo bash scripts/install_browser.sh   (CI: before pytest)
set -euo pipefail
for exe in chromium-headless-shell chromium chromium-browser; do
  if command -v "$exe" >/dev/null 2>&1; then
    echo "browser already installed: $(command -v "$exe")"
    exit 0
  fi
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian ships the small headless shell; Ubuntu has only the snap-backed `chromium`, so fall back to it.
if apt-cache show chromium-headless-shell >/dev/null 2>&1; then
  $SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell
else
  $SUDO apt-get install -y -qq --no-install-recommends chromium
fi
command -v chromium-headless-shell || command -v chromium
