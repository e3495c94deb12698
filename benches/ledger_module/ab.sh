#!/bin/bash
# Alternates the ledger module and the service's Lua functions, each run on a fresh
# private Redis (port 6391) with the module loaded, and prints one line per run.
# usage: ab.sh MODULE.so LIBRARY.lua ROUNDS SECONDS DEPTH TOKENS TENANTS
set -euo pipefail
so=$1 lib=$2 rounds=$3 secs=$4 depth=$5 tokens=$6 tenants=$7
here=$(dirname "$0")
fresh() {
  redis-cli -p 6391 shutdown nosave >/dev/null 2>&1 || true
  sleep 0.3
  redis-server --port 6391 --save "" --appendonly no --daemonize yes \
    --loadmodule "$so" --logfile /dev/null
  sleep 0.3
}
for i in $(seq "$rounds"); do
  fresh
  echo -n "round $i "
  python3 "$here/drive.py" 6391 "$secs" --depth "$depth" --tokens "$tokens" --tenants "$tenants"
  fresh
  echo -n "round $i "
  python3 "$here/drive.py" 6391 "$secs" --lua "$lib" --depth "$depth" --tokens "$tokens" --tenants "$tenants"
done
redis-cli -p 6391 shutdown nosave >/dev/null 2>&1 || true
