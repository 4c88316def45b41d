#!/usr/bin/env bash
# Install what the tests need (first run only) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" "test"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
