#!/bin/bash
# Run from the repository root after `cargo build --release -p agent`.
BIN=${BIN:-target/release/zerotrace}
N=500000
one() { local s=$(date +%s%N); dd if=/dev/zero of=/dev/null bs=1 count=$N status=none; local e=$(date +%s%N); echo $(( (e - s) / (2 * N) )); }
start() {
  case $1 in
    none) pid= ;;
    floor) (sleep 100 | $BIN bench-floor > /dev/null 2>&1 &); sleep 2 ;;
    off|on) $BIN run --listen off --program-stats $1 --exporter console > /dev/null 2>/tmp/agent-$1.log & pid=$!
            for i in $(seq 50); do grep -q tracing /tmp/agent-$1.log && break; sleep 0.2; done ;;
  esac
}
stop() { case $1 in floor) pkill -f "zerotrace bench-floor"; pkill -f "sleep 100"; sleep 0.5 ;; off|on) kill -INT $pid; wait $pid ;; esac; }
for round in 1 2 3 4; do
  line="round $round:"
  for mode in none floor off on; do
    start $mode; r="$(one) $(one) $(one)"; stop $mode
    line="$line  $mode [$r]"
  done
  echo "$line"
done
