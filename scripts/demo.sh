#!/usr/bin/env bash
# Fresh machine -> the main demo: installs packages, builds, runs the first examples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j2
./build/tools/dagrad-info | head -4
./build/examples/hot_cold
