#!/usr/bin/env bash
# Installs what qtune needs on Debian 12, only what is missing; safe to run again.
set -euo pipefail
packages=(
  g++ cmake ninja-build ccache pkg-config
  libtorch-dev libopenblas0-openmp
  libboost-dev libboost-program-options-dev libyaml-cpp-dev libspdlog-dev libgtest-dev
  libsentencepiece-dev nlohmann-json3-dev libgloo-dev gnuplot-nox
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
