#!/usr/bin/env bash
# Runs a command under heaptrack's preload library as the same process (exec), so a signal sent to
# it (the benchmark stops its operators with SIGTERM) reaches the profiled program itself; the
# `heaptrack` launcher script would take the signal and leave the program running. For the scale
# benchmark's heap profile (README, "Memory"):
#   cargo build --release --no-default-features --bin wgtwo-operator --target-dir /tmp/ht-target
#   WGTWO_BENCH_WRAP=tools/heaptrack-exec.sh target/release/wgtwo-bench \
#     --operator /tmp/ht-target/release/wgtwo-operator --grants 10000 --no-baseline
#   heaptrack_print -f "$HEAPTRACK_OUT"/heaptrack.<pid>.gz
# (--no-default-features: the system allocator, which heaptrack sees; jemalloc it does not.)
# Needs: heaptrack (apt-get install heaptrack). Output: $HEAPTRACK_OUT (default /tmp).
set -euo pipefail
lib=/usr/lib/heaptrack
[[ -x $lib/libexec/heaptrack_interpret ]] || { echo "heaptrack-exec.sh: heaptrack is not installed (apt-get install heaptrack)" >&2; exit 1; }
out=${HEAPTRACK_OUT:-/tmp}
pipe=$out/heaptrack.$$.pipe
mkfifo "$pipe"
("$lib/libexec/heaptrack_interpret" < "$pipe" | gzip -c > "$out/heaptrack.$$.gz"; rm -f "$pipe") &
exec env LD_PRELOAD="$lib/libheaptrack_preload.so" DUMP_HEAPTRACK_OUTPUT="$pipe" "$@"
