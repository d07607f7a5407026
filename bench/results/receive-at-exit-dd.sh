#!/bin/bash
# ns per syscall of `dd bs=1` (a read of /dev/zero and a write to /dev/null
# per byte): without the agent, then with it under each --receive-args.
# Run from the repository root as root after `cargo build --release -p agent`.
BIN=${BIN:-target/release/zerotrace}
t() { local s=$(date +%s%N); dd if=/dev/zero of=/dev/null bs=1 count=2000000 2>/dev/null; local e=$(date +%s%N); echo $(( (e-s)/4000000 )); }
for i in 1 2 3; do
  echo -n "none $(t) "
  for m in enter auto; do
    ZEROTRACE_RECEIVE_ARGS=$m $BIN events --format json > /dev/null 2>/dev/null &
    P=$!; sleep 4
    echo -n "$m $(t) "
    kill -INT $P; wait $P
  done
  echo
done
