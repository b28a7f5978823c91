#!/usr/bin/env bash
# Idempotent set-up from nothing: the orchestrator's venv (.venv), the model server's venv
# (.venvs/llama_cpp) and the tiny model. Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv (orchestrator: prefect, httpx, aiohttp, paramiko, pandas ...)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import llmflow, prefect, pytest' 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
fi

if ! .venvs/llama_cpp/bin/python -c 'import llama_cpp.server' 2>/dev/null; then
  echo "[setup] creating .venvs/llama_cpp (llama-cpp-python compiles: ~5.5 minutes on 2 cores)"
  "$PY" -m venv .venvs/llama_cpp
  .venvs/llama_cpp/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements/llama_cpp_server.txt
fi

if [ ! -f models/tiny-llama.gguf ]; then
  .venv/bin/llmflow make-model models/tiny-llama.gguf
fi
echo "[setup] ready"
