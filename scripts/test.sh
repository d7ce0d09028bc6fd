#!/usr/bin/env bash
# Fresh machine -> the whole test suite: installs packages, builds, runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j2
# Threads sleep at barriers instead of spinning, so two test processes sharing two cores do not
# slow each other down.
cd build && OMP_WAIT_POLICY=passive ctest --output-on-failure -j2
