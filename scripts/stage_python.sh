#!/usr/bin/env bash
# Builds halo._core into a private build folder and stages an importable copy
# of the package there, so several people can test Python code side by side
# without reinstalling into .venv:
#   scripts/stage_python.sh NAME   ->  PYTHONPATH=build/stage-NAME .venv/bin/python -m pytest ...
set -euo pipefail
name=${1:?usage: scripts/stage_python.sh NAME}
cd "$(dirname "$0")/.."
py=$PWD/.venv/bin/python
build=build/dev-$name
stage=build/stage-$name
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHALO_CUDA=OFF -DHALO_BUILD_PYTHON=ON \
  -DHALO_BUILD_TESTS=OFF -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build" --target _core -j "${JOBS:-2}"
rm -rf "$stage" && mkdir -p "$stage"
cp -r python/halo "$stage/halo"
cp "$build"/bindings/_core*.so "$stage/halo/"
echo "staged: PYTHONPATH=$stage"
