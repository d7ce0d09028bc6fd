#!/usr/bin/env bash
# Fresh machine -> the main job: installs packages, builds dagrad-train, and trains the default
# `mlp` preset on Fashion-MNIST, ending with the test accuracy and where the curves and the
# checkpoint are. Extra arguments go to dagrad-train (e.g. --epochs 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j2 --target dagrad-train
# Threads spin ~10 µs instead of ~3 ms before they sleep: far faster when other programs use the
# cores, within noise when they do not (README, "Threads on a shared machine").
if [[ -z "${GOMP_SPINCOUNT:-}" && -z "${OMP_WAIT_POLICY:-}" ]]; then export GOMP_SPINCOUNT=1000; fi
./build/tools/dagrad-train --model mlp --epochs 15 --schedule cosine --seed 1 --out runs/mlp "$@"
