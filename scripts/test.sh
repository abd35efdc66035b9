#!/usr/bin/env bash
# `make test`: the whole suite, from a fresh clone. Installs the system services the tests
# run for real (when root and missing), then runs pytest in the project's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
exec .venv/bin/python -m pytest -q "$@"
