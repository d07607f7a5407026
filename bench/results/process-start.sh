#!/bin/bash
# usage: bench/results/process-start.sh BIN... — what starting processes costs the agent, each
# build in turn: `BIN run --exporter console` (every process traced), 8 s to start,
# its CPU over 3 idle seconds, then over 20 × COMMAND for each command below, less
# the idle rate over the same time. CPU is the sum of its threads' schedstat.
url=${URL:-http://127.0.0.1:18080/a.txt}
for bin in "$@"; do
  $bin run --exporter console > /dev/null 2>/dev/null &
  agent=$!
  sleep 8
  ns(){ cat /proc/$agent/task/*/schedstat | awk '{s+=$1} END {print s}'; }
  now(){ date +%s%N; }
  a=$(ns); t=$(now); sleep 3; b=$(ns); u=$(now); idle_rate=$(( (b-a)*1000/(u-t) )) # per mille
  each(){ local a b t u; a=$(ns); t=$(now); for i in $(seq 20); do "$@" > /dev/null 2>&1; done; sleep 0.5; b=$(ns); u=$(now); echo $(( ((b-a) - (u-t)*idle_rate/1000) / 20000 )); }
  py=$(each python3 -c 1); sh=$(each sh -c 'ls /tmp >/dev/null; date >/dev/null'); cu=$(each curl -s $url); tr=$(each /bin/true)
  echo "$(basename $bin) idle_cpu_permille=$idle_rate python3_us=$py sh_ls_date_us=$sh curl_us=$cu true_us=$tr"
  kill -INT $agent; wait $agent 2>/dev/null
done
