#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` (engine `llama_server`) and `rpc-server` (the worker
# that holds a share of a model's layers for a head on another node) on this machine, offline.
#
# GitHub is not reachable from the project's machines, but PyPI is: the llama-cpp-python
# source distribution pinned in scripts/requirements/llama_cpp_server.txt carries the full
# llama.cpp tree it binds (vendor/llama.cpp, tools/server included). We build only the
# `llama-server` and `rpc-server` targets from it, statically linked, CPU and RPC backends, without
# the web UI (its prebuilt assets would be downloaded). Result: build/llama.cpp/bin/llama-server
# and build/llama.cpp/bin/rpc-server (~10-15 min on 2 cores).
#
#   scripts/build_llama_server.sh            build unless the binary is already there
#   JOBS=4 scripts/build_llama_server.sh     more compiler processes
#
# The built binaries are also kept outside the clone, keyed by the pinned version and the backends
# ($LLMFLOW_CACHE, default ~/.cache/llmflow/llama.cpp-<version>-rpc/), as pip keeps built wheels:
# a fresh clone on the same machine copies it instead of compiling again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/llama.cpp
BIN=$OUT/bin/llama-server
RPC=$OUT/bin/rpc-server
if [ -x "$BIN" ] && [ -x "$RPC" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "[llama-server] already built: $BIN, $RPC"
  exit 0
fi
PIN=$(grep -E '^llama-cpp-python(\[[a-z,]+\])?==' scripts/requirements/llama_cpp_server.txt | sed -E 's/.*==//')
[ -n "$PIN" ] || { echo "[llama-server] no llama-cpp-python==X pin in scripts/requirements/llama_cpp_server.txt" >&2; exit 1; }
CACHE_DIR=${LLMFLOW_CACHE:-$HOME/.cache/llmflow}/llama.cpp-$PIN-rpc
if [ -x "$CACHE_DIR/llama-server" ] && [ -x "$CACHE_DIR/rpc-server" ] && "$CACHE_DIR/llama-server" --version >/dev/null 2>&1; then
  mkdir -p "$OUT/bin"
  cp "$CACHE_DIR/llama-server" "$BIN"
  cp "$CACHE_DIR/rpc-server" "$RPC"
  echo "[llama-server] copied the build of llama-cpp-python $PIN's llama.cpp from $CACHE_DIR"
  exit 0
fi
PIP=${PIP:-.venv/bin/pip}
SRC=$OUT/src
mkdir -p "$OUT/bin" "$SRC"
if [ ! -f "$SRC/llama_cpp_python-$PIN/vendor/llama.cpp/tools/server/CMakeLists.txt" ]; then
  echo "[llama-server] fetching the llama-cpp-python $PIN source distribution (vendored llama.cpp) from PyPI"
  "$PIP" download --quiet --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$PIN" -d "$SRC"
  tar -xzf "$SRC/llama_cpp_python-$PIN.tar.gz" -C "$SRC"
fi
LLAMA=$SRC/llama_cpp_python-$PIN/vendor/llama.cpp
echo "[llama-server] building llama-server and rpc-server from llama-cpp-python $PIN's llama.cpp (${JOBS:-$(nproc)} jobs)"
cmake -S "$LLAMA" -B "$OUT/cmake" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CCACHE=OFF >"$OUT/cmake.log"
cmake --build "$OUT/cmake" --target llama-server ggml-rpc-server -j "${JOBS:-$(nproc)}" >>"$OUT/cmake.log" 2>&1 || {
  tail -30 "$OUT/cmake.log" >&2
  exit 1
}
cp "$OUT/cmake/bin/llama-server" "$BIN"
cp "$OUT/cmake/bin/ggml-rpc-server" "$RPC"  # upstream names the target ggml-rpc-server
mkdir -p "$CACHE_DIR"
for f in llama-server rpc-server; do cp "$OUT/bin/$f" "$CACHE_DIR/$f.tmp" && mv "$CACHE_DIR/$f.tmp" "$CACHE_DIR/$f"; done
echo "[llama-server] built $BIN and $RPC ($("$BIN" --version 2>&1 | grep -m1 -i version || true))"
