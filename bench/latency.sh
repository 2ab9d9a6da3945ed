#!/usr/bin/env bash
# Realistic-latency benchmark: real endpoints answer in tens of milliseconds,
# so what matters is keeping many requests in flight, not a few microseconds
# of CPU. A local receiver answers every request after a fixed delay
# (`backflow listen --delay`; this kernel has no netem), and per-record
# delivery runs at several concurrencies. Prints, measured in this run, for
# each concurrency: Backflow's rate as a ratio of the bound
# `concurrency / delay` (target >= 0.9) and of wrk against the same receiver
# at the same concurrency (target >= 0.95).
# Usage: bench/latency.sh [DELAY_MS=50] [SECONDS=5] [CONCURRENCIES="8 64 256"]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backflow/target}"
delay_ms="${1:-50}"
seconds="${2:-5}"
concurrencies="${3:-8 64 256}"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
# BACKFLOW_BIN measures another build (e.g. an older commit's) instead.
if [ -z "${BACKFLOW_BIN:-}" ]; then cargo test --release --workspace --no-run --quiet 2>/dev/null; fi
bin="${BACKFLOW_BIN:-$CARGO_TARGET_DIR/release/backflow}"

work=$(mktemp -d)
listen_delay="${delay_ms}ms"
source bench/receiver.sh
mkdir -p "$work/syncs"
for c in $concurrencies; do
  # About `seconds` of sending at the bound.
  rows=$(( c * 1000 / delay_ms * seconds ))
  cat > "$work/backflow.yaml" <<YAML
warehouses:
  gen:
    type: duckdb
    init: |
      create table people as
      select range as id, 'n' || range as name, 'u' || range || '@example.org' as email, range % 100 as score
      from range($rows);
YAML
  cat > "$work/syncs/c$c.yaml" <<YAML
warehouse: gen
query: select id, name, email, score from people
primary_key: id
mode: upsert
destination:
  url: http://127.0.0.1:$port/hook
  concurrency: $c
  timeout: 30s
YAML
  wrk -t2 -c"$c" -d"${seconds}s" --timeout 30s -s "$work/post.lua" "http://127.0.0.1:$port/hook" \
    | awk '/Requests\/sec/ { print $2 }' > "$work/wrk_$c"
  "$bin" --project "$work" --json run "c$c" > "$work/c$c.json"
done

python3 - "$work" "$delay_ms" "$concurrencies" <<'PY'
import json, sys
work, delay_ms, concurrencies = sys.argv[1], float(sys.argv[2]), sys.argv[3].split()
for c in concurrencies:
    run = json.load(open(f"{work}/c{c}.json"))[0]
    rps = sum(run["delivered"].values()) / run["send_seconds"]
    bound = int(c) / (delay_ms / 1000)
    wrk = float(open(f"{work}/wrk_{c}").read())
    print(f"concurrency {c:>3}, {delay_ms:.0f} ms per answer: backflow {rps:,.0f} req/s = {rps / bound:.2f} of the "
          f"bound {bound:,.0f} (target >= 0.9), {rps / wrk:.2f} of wrk's {wrk:,.0f} (target >= 0.95)")
PY
