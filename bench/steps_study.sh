#!/usr/bin/env bash
# The steps-versus-quality study of docs/sampling.md: `ddpm eval` over samplers x spacings x
# steps at w = 0.5, 1, 3, n = 1000, seed 1, one report per setting under $OUT. Resumable: a
# setting whose report.json exists is skipped, so rerunning continues where it stopped.
#
#   bash bench/steps_study.sh CHECKPOINT OUT [N]
set -euo pipefail
ckpt=${1:?usage: steps_study.sh CHECKPOINT OUT [N]}
out=${2:?usage: steps_study.sh CHECKPOINT OUT [N]}
n=${3:-1000}
ddpm=${DDPM:-target/release/ddpm}
[ -x "$ddpm" ] || { echo "build it first: cargo build --release -p ddpm-cli ($ddpm missing)" >&2; exit 1; }
run() { # sampler spacing steps
  local dir="$out/$1-$2-$3"
  [ -f "$dir/report.json" ] && return 0
  # A run whose driver stopped after its eval finished: keep its report.
  if [ -f "$dir.tmp/report.json" ]; then rm -rf "$dir" && mv "$dir.tmp" "$dir"; return 0; fi
  echo "== $(date -u +%H:%M:%S) $1 $2 $3 steps" >&2
  "$ddpm" eval --checkpoint "$ckpt" --n "$n" --guidance 0.5,1,3 --sampler "$1" --spacing "$2" \
    --steps "$3" --seed 1 --out "$dir.tmp" >/dev/null
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}
# Today's default first; then the four solvers that matter on the log-SNR grid at the step
# counts of at most 10 guided calls (4, 5), then 6, 8, 10 and 20 steps (the rows that decide
# the default); then trailing (diffusers' choice for few steps); then the rest (ddim, unipc3,
# karras).
run dpm++ leading 20
main="dpm++ unipc ipndm dpm++3m"
for steps in 4 5 6 8 10; do for s in $main; do run "$s" logsnr "$steps"; done; done
for s in dpm++ unipc ipndm dpm++3m; do run "$s" logsnr 20; done
for steps in 4 5; do for s in $main; do run "$s" trailing "$steps"; done; done
for steps in 6 8 10; do for s in $main; do run "$s" trailing "$steps"; done; done
for steps in 4 6 8 10 20; do for s in ddim unipc3; do run "$s" logsnr "$steps"; done; done
for steps in 4 6 8 10; do for s in dpm++ unipc ipndm; do run "$s" karras "$steps"; done; done
echo "== $(date -u +%H:%M:%S) done" >&2
