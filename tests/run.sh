#!/usr/bin/env bash
# The test command: bash tests/run.sh [pytest args]. Sets up .venv from requirements.txt first.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/ensure_venv.sh
exec "$PY" -m pytest -q tests "$@"
