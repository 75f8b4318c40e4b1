#!/usr/bin/env bash
# The test command (README.md, .ci/run): set up, start what the tests need, run the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# A one-node SLURM cluster on localhost for the launch tests (tests skip with a reason if it
# could not be started, e.g. not root / no apt).
if [ -x scripts/slurm_local.sh ]; then
  bash scripts/slurm_local.sh start || echo "[test.sh] local SLURM could not be started; slurm tests will skip"
  trap 'bash scripts/slurm_local.sh stop' EXIT
fi
# --runslow: CI runs the tests marked slow too (a bare `pytest` skips them)
python3 -m pytest -q --runslow "$@"
