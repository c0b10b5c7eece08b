#!/bin/sh
# A/B of eager decode steps between two checkouts, alternating so that a shared machine's load hits both:
#   benchmarks/decode_ab.sh /path/to/baseline /path/to/candidate MODEL [decode_profile.py options]
# Prints each run's ms/step line; compare the medians.
base=$1; cand=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
for round in 1 2 3; do
  for tree in "$base" "$cand"; do
    printf '%s round %s: ' "$tree" "$round"
    (cd "$tree" && PYTHONPATH="$tree" python "$here/decode_profile.py" "$@" 2>&1 | grep "ms/step")
  done
done
