#!/usr/bin/env bash
# Redraws every qtune-bench plot in a folder from its gnuplot script (each .gp holds its data
# inline, so this needs nothing but gnuplot): scripts/plot_bench.sh [docs/bench]
set -euo pipefail
dir="${1:-docs/bench}"
if ! command -v gnuplot >/dev/null; then
  echo "plot_bench: gnuplot not found (Debian: apt-get install gnuplot-nox)" >&2
  exit 1
fi
shopt -s nullglob
scripts=("$dir"/*.gp)
if ((${#scripts[@]} == 0)); then
  echo "plot_bench: no .gp scripts in $dir (run qtune-bench --out $dir first)" >&2
  exit 1
fi
cd "$dir"
for gp in *.gp; do
  gnuplot "$gp"
  echo "plot_bench: ${gp%.gp}.png"
done
