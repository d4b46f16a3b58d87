#!/usr/bin/env bash
# llama.cpp, the CPU peer of the benchmark, built from the sources vendored in the llama-cpp-python
# sdist on PyPI (fetched by name; no other download). Builds llama-bench, llama-speculative-simple and
# llama-server into the per-machine cache, $MINEDRAFT_CACHE/llama.cpp/<version>/bin (default
# ~/.cache/minedraft), once: a second run only prints the path. About 4 minutes on 2 cores.
#
#   bash scripts/build_llama_cpp.sh            # prints the bin directory on its last line
set -euo pipefail
VERSION=0.3.36
CACHE="${MINEDRAFT_CACHE:-$HOME/.cache/minedraft}"
PREFIX="$CACHE/llama.cpp/$VERSION"
TARGETS=(llama-bench llama-speculative-simple llama-server)
PYTHON="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ -x "$PREFIX/bin/llama-server" ] && [ -x "$PREFIX/bin/llama-bench" ] && [ -x "$PREFIX/bin/llama-speculative-simple" ]; then
  echo "$PREFIX/bin"
  exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "fetching llama-cpp-python==$VERSION (sdist) ..." >&2
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SOURCE="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "building ${TARGETS[*]} (GGML_NATIVE: this CPU's instruction set) ..." >&2
cmake -S "$SOURCE" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF >&2
cmake --build "$WORK/build" -j "$(nproc)" --target "${TARGETS[@]}" >&2
mkdir -p "$PREFIX/bin"
for target in "${TARGETS[@]}"; do cp "$WORK/build/bin/$target" "$PREFIX/bin/"; done
echo "$PREFIX/bin"
