#!/usr/bin/env bash
# Installs what qtune needs on Debian 12, only what is missing; safe to run again: the Debian
# packages (clang-14 with its sanitizer runtimes, libFuzzer and lld for scripts/ci-sanitize.sh),
# then the Python venv of the oracle tests (.venv-oracle, pins in tests/oracle/requirements.txt;
# docs/oracles.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
packages=(
  g++ cmake ninja-build ccache pkg-config
  libtorch-dev libopenblas0-openmp
  libboost-dev libboost-program-options-dev libyaml-cpp-dev libspdlog-dev libgtest-dev
  libsentencepiece-dev libpcre2-dev libicu-dev nlohmann-json3-dev libgloo-dev gnuplot-nox
  python3 python3-venv
  clang-14 libclang-rt-14-dev libfuzzer-14-dev lld-14
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

# The oracle venv. A copy of the requirements inside the venv records what it holds, so a second
# run that finds the same pins does nothing; changed pins reinstall only what changed. --no-deps:
# the requirements file is the complete list (it leaves out torch's GPU-only extras).
venv="${QTUNE_ORACLE_VENV:-$root/.venv-oracle}"
req="$root/tests/oracle/requirements.txt"
if ! cmp -s "$req" "$venv/.qtune-requirements.txt"; then
  echo "bootstrap: installing the oracle venv $venv (tests/oracle/requirements.txt)"
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$req"
  cp "$req" "$venv/.qtune-requirements.txt"
fi
