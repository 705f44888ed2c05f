#!/usr/bin/env bash
# The Python clients the tests drive colocate with: a virtual environment in .venv (ignored
# by git) holding the official `openai` client at a pinned version. Idempotent: does nothing
# when .venv already has that version. Needs python3 with its venv module and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0
venv=.venv
if [ -x "$venv/bin/python" ] &&
    "$venv/bin/python" -c "import sys, openai; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    exit 0
fi
if ! python3 -m venv "$venv"; then
    # Debian ships venv separately; as root, install it rather than stop a fresh machine.
    rm -rf "$venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv > /dev/null
    fi
    python3 -m venv "$venv" || {
        echo "setup-python: python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
echo "setup-python: openai $OPENAI_VERSION in $venv" >&2
