#!/usr/bin/env bash
# The static checks CI runs: ruff (lint + format), mypy, generated-code freshness, buf lint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" "test,dev"
cd "$ROOT"
V="$ROOT/.venv/bin"
echo "== ruff check";        "$V/ruff" check swu_delivery adapters tests benchmarks scripts
echo "== ruff format";       "$V/ruff" format --check swu_delivery adapters tests benchmarks scripts
echo "== mypy";              "$V/mypy"
echo "== proto freshness";   "$V/python" scripts/gen_proto.py --check
echo "== buf lint";          (cd proto && npx --yes @bufbuild/buf@1 lint)
