#!/bin/bash
# usage: bench/results/thread-split.sh WORKLOAD BIN... — one `workloads overhead` run per
# build (run from the repository root after `cargo build --release -p zerotrace-tests`),
# with the agent's threads' CPU read from /proc/PID/task/*/stat every 100 ms. Prints,
# per run, the exporter thread's CPU over the tracer (main) thread's across the window
# in which the exporter ran: a change to one thread measured against the other, whose
# work per span it leaves alone, so the host's drift between runs cancels out.
w=$1; shift
for bin in "$@"; do
  dir=$(mktemp -d)
  ZEROTRACE_BIN=$bin target/release/workloads overhead --rounds 1 --seconds 10 --workload $w \
    > $dir/run.json 2> $dir/run.err &
  wp=$!
  while kill -0 $wp 2>/dev/null; do
    for p in $(pgrep -f "^$bin run"); do
      e=0; m=0
      for t in /proc/$p/task/*; do
        v=$(awk '{print $14+$15}' $t/stat 2>/dev/null)
        [ "$(cat $t/comm 2>/dev/null)" = "zerotrace-expor" ] && e=$v
        [ "${t##*/}" = "$p" ] && m=$v
      done
      echo "$m $e" >> $dir/series
    done
    sleep 0.1
  done
  python3 - "$bin" "$w" "$dir" <<'PY'
import json, sys
bin, w, d = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{d}/run.json")]
off = next(r for r in rows if r["mode"] == "off")
on = next(r for r in rows if r["mode"] == "on")
s = [tuple(map(float, l.split())) for l in open(f"{d}/series") if l.strip()]
busy = [i for i in range(1, len(s)) if s[i][1] > s[i - 1][1]]
a, b = busy[0] - 1, busy[-1]
tracer, exporter = s[b][0] - s[a][0], s[b][1] - s[a][1]
print(json.dumps({"bin": bin, "workload": w, "exporter_over_tracer": round(exporter / tracer, 3),
                  "agent_us_per_span": round(on["agent_cpu_us_per_request"] * on["requests"] / on["spans_made"], 2),
                  "throughput": round(on["rps"] / off["rps"] - 1, 3)}))
PY
  rm -rf $dir
done
pkill nginx; pkill redis-server; true
