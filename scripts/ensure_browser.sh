#!/usr/bin/env bash
# Make sure the browser tests (tests/browser/) have what they need:
#   - Debian's Chromium at /usr/bin/chromium (Playwright's own browser download is not used), and
#   - the Playwright Python package in the kit's environment.
#
#   scripts/ensure_browser.sh [PYTHON]      PYTHON defaults to .venv/bin/python
#
# Installs Chromium with apt-get when running as root, else with `sudo -n` (never prompts).
# When neither works it prints why and exits 0: the browser tests then skip with that reason
# (CI runs as root, so there they always run).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${1:-.venv/bin/python}"
CHROMIUM="${LORA_LAB_CHROMIUM:-/usr/bin/chromium}"

say() { echo "==> browser tests: $*"; }

if ! "$PY" -c 'import playwright' 2>/dev/null; then
  say "installing playwright into $PY's environment"
  "$PY" -m pip install -q 'playwright>=1.45' || say "could not install playwright; browser tests will skip"
fi

if [ -x "$CHROMIUM" ]; then
  exit 0
fi

install_chromium() {
  export DEBIAN_FRONTEND=noninteractive
  "$@" apt-get update -qq && "$@" apt-get install -y -qq --no-install-recommends chromium >/dev/null
}

if ! command -v apt-get >/dev/null 2>&1; then
  say "no $CHROMIUM and no apt-get here; install Chromium and set LORA_LAB_CHROMIUM=/path/to/chromium," \
      "or the browser tests will skip"
elif [ "$(id -u)" = 0 ]; then
  say "installing Debian's chromium package"
  install_chromium || say "apt-get install chromium failed; browser tests will skip"
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  say "installing Debian's chromium package with sudo"
  install_chromium sudo -n || say "sudo apt-get install chromium failed; browser tests will skip"
else
  say "$CHROMIUM is missing and this user cannot install it (not root, no password-less sudo)."
  say "Run 'sudo apt-get install chromium' once, or the browser tests will skip."
fi
exit 0
