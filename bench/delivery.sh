#!/usr/bin/env bash
# Delivery benchmark. Starts a quiet local receiver and prints, measured in
# this run:
#   1. per-record delivery rate as a ratio of wrk's rate against the same
#      receiver at the same concurrency (target >= 0.8): three rounds, each
#      wrk then Backflow, so a slower spell of the machine weighs on both;
#      the median ratio counts. Each round also measures Backflow's HTTP
#      client alone (its transport, requests made by a fixed function, no sync:
#      crates/sink/examples/client_rate.rs), which tells the client's share
#      of the gap from the rest of a run's work;
#   2. batched delivery (1000 per request) in rows per second (target >= 1M);
#   3. wall time of a 1,000,000-row first sync, DuckDB -> batched webhook
#      (target <= 10 s);
# and, for comparison, batched delivery of a re-sync in which every row
# changed (its outbox, like a first sync's, becomes the snapshot).
# Usage: bench/delivery.sh [ROWS_PER_RECORD=100000] [ROWS_BATCHED=1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backflow/target}"
per_record_rows="${1:-100000}"
batched_rows="${2:-1000000}"
concurrency=8
rounds=3

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
# BACKFLOW_BIN measures another build (e.g. an older commit's) instead.
if [ -z "${BACKFLOW_BIN:-}" ]; then cargo test --release --workspace --no-run --quiet 2>/dev/null; fi
bin="${BACKFLOW_BIN:-$CARGO_TARGET_DIR/release/backflow}"
client="$CARGO_TARGET_DIR/release/examples/client_rate"

work=$(mktemp -d)
source bench/receiver.sh

mkdir -p "$work/syncs"
# The warehouse's rows; the argument is part of every name, so another
# argument changes every row.
warehouse() {
  cat > "$work/backflow.yaml" <<YAML
warehouses:
  gen:
    type: duckdb
    init: |
      create table people as
      select range as id, 'n' || range || '$1' as name, 'u' || range || '@example.org' as email,
             range % 100 as score, range % 2 = 0 as active, 'Lisbon' as city
      from range($batched_rows);
YAML
}
warehouse a
for mode in $(seq -f per_record_%g "$rounds") batched; do
  if [ "$mode" = batched ]; then limit=""; batch=1000; else limit="where id < $per_record_rows"; batch=1; fi
  cat > "$work/syncs/$mode.yaml" <<YAML
warehouse: gen
query: select id, name, email, score, active, city from people $limit
primary_key: id
mode: upsert
destination:
  url: http://127.0.0.1:$port/hook
  batch_size: $batch
  concurrency: $concurrency
YAML
done

# Each round: wrk, then a first per-record sync (one sync per round, each
# with its own state).
for round in $(seq "$rounds"); do
  wrk -t2 -c"$concurrency" -d4s -s "$work/post.lua" "http://127.0.0.1:$port/hook" \
    | awk '/Requests\/sec/ { print $2 }' > "$work/wrk_$round"
  if [ -x "$client" ]; then
    "$client" transport "http://127.0.0.1:$port/hook" "$per_record_rows" "$concurrency" > "$work/client_$round"
  fi
  "$bin" --project "$work" --json run "per_record_$round" > "$work/per_record_$round.json"
done
start=$(date +%s.%N)
"$bin" --project "$work" --json run batched > "$work/batched.json"
end=$(date +%s.%N)
warehouse b
"$bin" --project "$work" --json run batched > "$work/resync.json"

python3 - "$work" "$rounds" "$start" "$end" <<'PY'
import json, statistics, sys
work, rounds, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
bat = json.load(open(f"{work}/batched.json"))[0]
resync = json.load(open(f"{work}/resync.json"))[0]
assert resync["counts"]["changed"] == bat["counts"]["rows"], resync["counts"]
ratios, client_ratios = [], []
for r in range(1, rounds + 1):
    per = json.load(open(f"{work}/per_record_{r}.json"))[0]
    per_rps = sum(per["delivered"].values()) / per["send_seconds"]
    wrk_rps = float(open(f"{work}/wrk_{r}").read())
    ratios.append(per_rps / wrk_rps)
    line = f"  round {r}: backflow {per_rps:,.0f} req/s vs wrk {wrk_rps:,.0f} req/s -> {per_rps / wrk_rps:.2f}"
    try:
        client_rps = float(open(f"{work}/client_{r}").read())
        client_ratios.append(client_rps / wrk_rps)
        line += f" (the client alone: {client_rps:,.0f} req/s -> {client_rps / wrk_rps:.2f})"
    except (FileNotFoundError, ValueError):
        pass
    print(line)
bat_rps = sum(bat["delivered"].values()) / bat["send_seconds"]
print(f"per-record: median ratio {statistics.median(ratios):.2f} of wrk at concurrency 8 (target >= 0.8)")
if client_ratios:
    print(f"  the HTTP client alone: median ratio {statistics.median(client_ratios):.2f} of wrk")
print(f"batched (1000/request): {bat_rps:,.0f} rows/s while sending (target >= 1,000,000)")
resync_rps = sum(resync["delivered"].values()) / resync["send_seconds"]
print(f"batched re-sync, every row changed: {resync_rps:,.0f} rows/s while sending (for comparison)")
print(f"first sync of {bat['counts']['rows']:,} rows end to end: {end - start:.1f} s wall "
      f"(stage+diff {bat['seconds'] - bat['send_seconds']:.1f} s, send {bat['send_seconds']:.1f} s; target <= 10 s)")
PY
