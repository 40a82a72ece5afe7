#!/usr/bin/env bash
# Runs every test flce has on this machine: the C++ core (GoogleTest, with every CUDA source
# compiled when nvcc is found), then the Python package (pytest). On a GPU machine pass
# `--device cuda` to run the Python suite on the GPU as well.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="$(nproc 2>/dev/null || echo 2)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure

python3 -m pytest tests/python -q "$@"
