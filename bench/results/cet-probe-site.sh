#!/bin/bash
# usage: cet-probe-site.sh BIN...  (each a zerotrace binary, or a path ending in /none for no agent;
# the agent is started, the CET libssl probed, then two runs per library)
U=$HOME/.cache/zerotrace/cet-libssl/lib
S="$(dirname "$0")"/uprobe-trap-ssl.py
for bin in "$@"; do
  name=$(basename $bin)
  if [ "$name" != none ]; then
    $bin run --exporter console > /dev/null 2> /tmp/$name.err &
    apid=$!
    for i in $(seq 60); do grep -q "exporting console" /tmp/$name.err && break; sleep 0.5; done
    LD_LIBRARY_PATH=$U python3 -c "import ssl,time; time.sleep(2)"; grep -c "probed in $U/libssl.so.3" /tmp/$name.err | tr "\n" " "
  fi
  a=$(LD_LIBRARY_PATH=$U python3 $S | cut -d' ' -f1); b=$(LD_LIBRARY_PATH=$U python3 $S | cut -d' ' -f1)
  c=$(python3 $S | cut -d' ' -f1); d=$(python3 $S | cut -d' ' -f1)
  echo "$(date +%T) $name cet: $a $b debian: $c $d"
  if [ "$name" != none ]; then kill -INT $apid; wait $apid 2>/dev/null; fi
  sleep 1
done
