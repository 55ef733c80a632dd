#!/usr/bin/env bash
# Run every bench once, in sequence (they compete for the CPU otherwise); each prints its ratios last.
set -euo pipefail
cd "$(dirname "$0")"
for b in prepare merge schedule status realtime; do
  echo "== bench/${b}"
  set -- $b; python "$1.py" "${@:2}"
done
