#!/usr/bin/env bash
# The control room's browser tests drive Debian's Chromium headless through Playwright (launched by
# its path: Playwright downloads nothing). Installs the package when it is missing.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  echo "installing chromium from Debian's packages" >&2
  apt-get install -y -qq chromium >/dev/null
fi
