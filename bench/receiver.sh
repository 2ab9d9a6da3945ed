# Sourced by the benchmarks: a quiet `backflow listen` on a free port of
# 127.0.0.1 (answering after `$listen_delay` when set), stopped with the
# script, and
# `$work/post.lua`, a wrk script that POSTs a body shaped like Backflow's.
# Needs `$bin` and `$work`; sets `$port` and `$receiver`.
receiver=""
trap '[ -n "$receiver" ] && kill "$receiver" 2>/dev/null; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" listen --quiet --port "$port" ${listen_delay:+--delay "$listen_delay"} &
receiver=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
(exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null || { echo "the receiver did not start" >&2; exit 1; }

body='{"name":"n42","email":"u42@example.org","score":42,"active":true,"city":"Lisbon","_meta":{"op":"upsert","change":"added","sync":"bench","mode":"upsert","run_id":"0193a0b1-0000-7000-8000-000000000000","row_num":42,"message_id":"5f0c2a8e-1b7d-5c3e-9a4f-6d2b8e1c0f3a","key":{"id":42}}}'
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
LUA
