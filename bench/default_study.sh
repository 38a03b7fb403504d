#!/usr/bin/env bash
# The n = 10,000 rows that decide the default sampler (docs/sampling.md): `ddpm eval` of today's
# default (DPM-Solver++(2M), 20 leading steps, 40 calls per guided digit) against the candidate
# the n = 1,000 study picked (DPM-Solver++(3M), 8 log-SNR steps, 16 calls), one report per
# (setting, w) under $OUT so that a stopped run loses at most one cell. Resumable: a cell whose
# report.json exists is skipped.
#
#   bash bench/default_study.sh CHECKPOINT OUT [N]
set -euo pipefail
ckpt=${1:?usage: default_study.sh CHECKPOINT OUT [N]}
out=${2:?usage: default_study.sh CHECKPOINT OUT [N]}
n=${3:-10000}
ddpm=${DDPM:-target/release/ddpm}
[ -x "$ddpm" ] || { echo "build it first: cargo build --release -p ddpm-cli ($ddpm missing)" >&2; exit 1; }
run() { # sampler spacing steps w
  local dir="$out/$1-$2-$3-w$4"
  [ -f "$dir/report.json" ] && return 0
  if [ -f "$dir.tmp/report.json" ]; then rm -rf "$dir" && mv "$dir.tmp" "$dir"; return 0; fi
  echo "== $(date -u +%H:%M:%S) $1 $2 $3 steps, w = $4, n = $n" >&2
  local t0=$SECONDS
  "$ddpm" eval --checkpoint "$ckpt" --n "$n" --guidance "$4" --sampler "$1" --spacing "$2" \
    --steps "$3" --seed 1 --out "$dir.tmp" >/dev/null
  echo "   $((SECONDS - t0)) s" >&2
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}
for w in 1 3 0.5; do
  run dpm++3m logsnr 8 "$w"
  run dpm++ leading 20 "$w"
done
echo "== $(date -u +%H:%M:%S) done" >&2
