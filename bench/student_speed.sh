#!/usr/bin/env bash
# 1,000 guided digits (100 per class, w = 1) from a teacher at DPM-Solver++(2M) 20 steps
# (40 network calls per digit) and from its distilled student in its own steps, alternating,
# `rounds` times each, on an otherwise idle machine; prints the CPU, its GEMM rate, every time
# (milliseconds) and the ratio of the medians. docs/sampling.md quotes its output.
#
#   bash bench/student_speed.sh TEACHER STUDENT [ROUNDS]
set -euo pipefail
teacher=${1:?usage: student_speed.sh TEACHER STUDENT [ROUNDS]}
student=${2:?usage: student_speed.sh TEACHER STUDENT [ROUNDS]}
rounds=${3:-2}
ddpm=${DDPM:-target/release/ddpm}
[ -x "$ddpm" ] || { echo "build it first: cargo build --release -p ddpm-cli ($ddpm missing)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
"$ddpm" bench --mode gemm | tail -1
time_one() { # label, then the sample command's flags
  local label=$1; shift
  local t0 t1
  t0=$(date +%s%N)
  RUST_LOG=warn "$ddpm" sample --class all --n 100 --guidance 1 --seed 1 --out "$tmp/$label.png" "$@" >/dev/null
  t1=$(date +%s%N)
  echo "$label $(( (t1 - t0) / 1000000 ))"
}
for _ in $(seq "$rounds"); do
  time_one teacher --checkpoint "$teacher" --sampler dpm++ --steps 20 --spacing leading
  time_one student --checkpoint "$student"
done | tee "$tmp/times"
python3 - "$tmp/times" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    t.setdefault(k, []).append(float(v) / 1000.0)
mt, ms = statistics.median(t["teacher"]), statistics.median(t["student"])
print(f"median seconds for 1000 digits: teacher {mt:.1f}, student {ms:.1f}; the student is {mt / ms:.1f}x faster")
PY
