#!/usr/bin/env bash
# Install and run the whole test suite (what .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint first (ruff comes with the `test` extra; `python -m` runs the installed one).
python -m ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_SILENT=true
# --durations=25: the 25 slowest tests, so a test that grew slow is seen at the next run.
# -n 2 --dist loadgroup: two workers (pytest-xdist), the tests of one shared multi-process group on one worker
# (tests/distributed/conftest.py); SPARSETUNE_TEST_WORKERS=0 runs everything in this one process.
python -m pytest -q -p no:cacheprovider --timeout 900 --durations=25 -n "${SPARSETUNE_TEST_WORKERS:-2}" \
    --dist loadgroup tests "$@"
