#!/usr/bin/env bash
# One command for a fresh machine: set up .venv, then run the demo under supervisord.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[media]'
exec .venv/bin/python scripts/demo.py "$@"
