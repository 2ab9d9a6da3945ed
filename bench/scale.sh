#!/usr/bin/env bash
# Scale benchmark. Prints, measured in this run:
#   1. `backflow plan` over ROWS DuckDB rows x 10 columns with 1% changed,
#      0.5% added and 0.5% removed, as a ratio of a hand-written DuckDB SQL
#      diff of the same two tables (full outer join on the key, comparing row
#      hashes) -- target <= 1.5 -- and its peak RSS (target <= 2 GiB);
#   2. a re-run with no changes over the same rows (it sends nothing), as a
#      ratio of the same reference;
#   3. PG_ROWS rows x 10 columns streamed from Postgres by Backflow's source
#      vs `psql -c "\copy (query) to /dev/null"`, as a throughput ratio
#      (target >= 0.7). Needs the local PostgreSQL (BACKFLOW_BENCH_POSTGRES_URL
#      to use another server).
# Usage: bench/scale.sh [ROWS=10000000] [PG_ROWS=1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backflow/target}"
rows="${1:-10000000}"
pg_rows="${2:-1000000}"
server="${BACKFLOW_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

# The test build compiles the binary and the reference tool in one profile.
cargo test --release --workspace --no-run --quiet 2>/dev/null
bin="$CARGO_TARGET_DIR/release/backflow"
reference="$CARGO_TARGET_DIR/release/examples/bench_reference"

work=$(mktemp -d)
db="backflow_bench_$$"
trap 'kill $receiver 2>/dev/null || true; psql -q "$server" -c "drop database if exists $db" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" listen --quiet --port "$port" 2>/dev/null &
receiver=$!
until (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; do sleep 0.1; done

# measure OUT CMD...: runs CMD with its output in OUT, prints "seconds
# max_rss_bytes" (the child's peak).
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
start = time.monotonic()
subprocess.run(sys.argv[2:], check=True, stdout=open(sys.argv[1], "w"))
elapsed = time.monotonic() - start
print(f"{elapsed} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}")
PY
}

echo "building $rows rows..." >&2
"$reference" sql "$work/warehouse.duckdb" "
  create table v1 as
  select range as id, 'name ' || range as name, 'user' || range || '@example.org' as email,
         range % 1000 as score, range % 2 = 0 as active, 'city ' || (range % 500) as city,
         ((range * 7) % 100000 / 100)::decimal(12, 2) as balance, date '2020-01-01' + (range % 1000)::int as signup,
         range % 7 as tier, md5(range::varchar) as token
  from range($rows);
  create table v2 as
  select id, name, email, case when id % 100 = 1 then score + 1 else score end as score,
         active, city, balance, signup, tier, token
  from v1 where id % 200 <> 3
  union all
  select range, 'name ' || range, 'user' || range || '@example.org', range % 1000, range % 2 = 0,
         'city ' || (range % 500), ((range * 7) % 100000 / 100)::decimal(12, 2),
         date '2020-01-01' + (range % 1000)::int, range % 7, md5(range::varchar)
  from range($rows, $rows + $rows // 200);
  create view people as select * from v1;"

mkdir -p "$work/syncs"
cat > "$work/backflow.yaml" <<YAML
warehouses:
  wh: {type: duckdb, path: warehouse.duckdb}
YAML
cat > "$work/syncs/big.yaml" <<YAML
warehouse: wh
query: select * from people
primary_key: id
mode: mirror
destination:
  url: http://127.0.0.1:$port/hook
  batch_size: 10000
  concurrency: 4
YAML

echo "first sync (every row delivered)..." >&2
read -r first_s _ < <(measure "$work/first.json" "$bin" --json --project "$work" run big)
"$reference" sql "$work/warehouse.duckdb" "create or replace view people as select * from v2"
echo "plan with changes..." >&2
read -r plan_s plan_rss < <(measure "$work/plan.txt" "$bin" --project "$work" plan big)
ref=$("$reference" diff "$work/warehouse.duckdb" v1 v2)
"$bin" --project "$work" run big >/dev/null
echo "re-run without changes..." >&2
read -r rerun_s _ < <(measure "$work/rerun.json" "$bin" --project "$work" --json run big)
sent=$(python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1]))[0]["delivered"].values()))' "$work/rerun.json")

echo "Postgres: $pg_rows rows..." >&2
psql -q "$server" -c "create database $db" >/dev/null
pg_url="${server%/*}/$db"
psql -q "$pg_url" -c "
  create table t as
  select g as id, 'name ' || g as name, 'user' || g || '@example.org' as email, g % 1000 as score,
         g % 2 = 0 as active, 'city ' || (g % 500) as city, ((g * 7) % 100000 / 100.0)::numeric(12, 2) as balance,
         date '2020-01-01' + g % 1000 as signup, now() - g * interval '1 second' as updated_at, md5(g::text)::uuid as token
  from generate_series(1, $pg_rows) g; analyze t;" >/dev/null
read -r copy_s _ < <(measure /dev/null psql -q "$pg_url" -c "\\copy (select * from t) to /dev/null")
stream=$("$reference" pg-stream "$pg_url" "select * from t")

python3 - "$rows" "$first_s" "$plan_s" "$plan_rss" "$ref" "$rerun_s" "$sent" "$pg_rows" "$copy_s" "$stream" <<'PY'
import json, sys
rows, first_s, plan_s, plan_rss, ref, rerun_s, sent, pg_rows, copy_s, stream = sys.argv[1:]
rows, pg_rows = int(rows), int(pg_rows)
ref, stream = json.loads(ref), json.loads(stream)
ref_s = ref["seconds"]
print(f"first sync of {rows:,} rows (stage, diff, deliver in batches of 10000): {float(first_s):.1f} s")
print(f"plan over {rows:,} rows, {ref['changes']:,} changes: {float(plan_s):.1f} s vs hand-written DuckDB diff {ref_s:.1f} s"
      f" -> ratio {float(plan_s) / ref_s:.2f} (target <= 1.5); peak RSS {int(plan_rss) / 2**30:.2f} GiB (target <= 2)")
print(f"re-run without changes: {float(rerun_s):.1f} s, {sent} sent -> ratio {float(rerun_s) / ref_s:.2f} of the reference diff")
ours = stream["rows"] / stream["seconds"]
theirs = pg_rows / float(copy_s)
print(f"Postgres stream of {pg_rows:,} rows: backflow {ours:,.0f} rows/s vs psql \\copy {theirs:,.0f} rows/s"
      f" -> ratio {ours / theirs:.2f} (target >= 0.7)")
PY
