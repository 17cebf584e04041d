#!/usr/bin/env bash
# Install and run the whole test suite (what .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint first (ruff comes with the `test` extra; `python -m` runs the installed one).
python -m ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_SILENT=true
# --durations=25: the 25 slowest tests, so a test that grew slow is seen at the next run
python -m pytest -q -p no:cacheprovider --timeout 900 --durations=25 tests "$@"
