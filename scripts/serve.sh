#!/usr/bin/env bash
# Install (first run only) and start swu-delivery with embedded defaults: a SQLite data
# directory ./swu-data and the built-in ESP simulator. Extra arguments go to `swu-delivery serve`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" ""
exec "$ROOT/.venv/bin/swu-delivery" serve "$@"
