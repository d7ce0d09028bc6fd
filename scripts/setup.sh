#!/usr/bin/env bash
# Installs the Debian 12 packages dagrad needs to build, test and run its examples.
# Safe to run again: apt-get skips what is already installed.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  g++ cmake make pkg-config \
  libdnnl-dev libfmt-dev libboost-graph-dev libgtest-dev libbenchmark-dev \
  zlib1g-dev nlohmann-json3-dev libcli11-dev \
  dataset-fashion-mnist gnuplot-nox graphviz >/dev/null
