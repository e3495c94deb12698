#!/bin/bash
# Instructions Redis executes per pair (valgrind's callgrind: a count, not a time, so
# it does not move with the machine's load), through the ledger module and through
# the service's Lua functions. Redis runs under callgrind on port 6392; its counts are
# zeroed just before the measured run and dumped just after it.
# usage: callgrind.sh MODULE.so LIBRARY.lua SECONDS [drive.py options: --depth, --tokens, --tenants]
set -euo pipefail
so=$1 lib=$2 secs=$3
shift 3
options=("$@")
here=$(dirname "$0")
out=$(mktemp -d)
trap 'redis-cli -p 6392 shutdown nosave >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
measure() {  # label, drive.py options...
  local label=$1; shift
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.%p" \
    redis-server --port 6392 --save "" --appendonly no --loadmodule "$so" \
    >"$out/valgrind.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do redis-cli -p 6392 ping >/dev/null 2>&1 && break; sleep 0.2; done
  local line
  line=$(python3 "$here/drive.py" 6392 "$secs" --warm-up 2 "${options[@]}" "$@" \
    --around "callgrind_control -z $pid >/dev/null 2>&1" "callgrind_control -d $pid >/dev/null 2>&1")
  local pairs ir
  pairs=$(echo "$line" | sed -E 's/^[a-z]+: ([0-9]+) pairs.*/\1/')
  ir=$(awk '/^summary:/ {print $2; exit}' "$out"/cg.$pid.1)
  echo "$label: $pairs pairs, $((ir / pairs)) instructions per pair in Redis"
  redis-cli -p 6392 shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  rm -f "$out"/cg.*
}
measure module
measure lua --lua "$lib"
