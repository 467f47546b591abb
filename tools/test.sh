#!/usr/bin/env bash
# Every check CI runs: formatting, lints, and all tests (unit + end-to-end against a real
# kube-apiserver/etcd and a real Ory Hydra, built by tools/testenv/build.sh on first use, and the
# chart installed on a one-node cluster from the image built here by tools/image/build.sh).
# The cluster tests need root and a few Debian 12 packages, installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "==> $* ($(( $(date +%s) - start ))s)"; }

# A full disk shows up much later as apiserver 504s (etcd cannot write) and Hydra 500s (SQLite
# cannot write); say so up front. A cold build needs about 12 GiB (target/ plus the Go cache).
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
if (( free_kib < 12 * 1024 * 1024 )); then
  echo "warning: only $(( free_kib / 1024 / 1024 )) GiB free on $(df -P . | awk 'NR == 2 { print $6 }'); the tests need about 12 GiB" >&2
fi

step "Debian packages of the one-node cluster (tools/testenv/debian-deps.sh)"
tools/testenv/debian-deps.sh

step "building or reusing the test peers and tools (kube-apiserver, etcd, kubectl, hydra, promtool, helm, kubelet, containerd)"
bins=$(tools/testenv/build.sh)
echo "$bins"

step "the operator image, from the Dockerfile (tools/image/build.sh)"
image_archive=$(dirname "$(dirname "$(echo "$bins" | head -1 | cut -d= -f2)")")/operator-image.tar
tools/image/build.sh --tag localhost/wgtwo-operator:test --archive "$image_archive"
export WGTWO_OPERATOR_IMAGE_ARCHIVE=$image_archive

step "hadolint Dockerfile"
tools/hadolint.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

# The scale benchmark at a small N, so it cannot rot: its request and token counts are checked (the
# full run, with time and memory targets, is tools/bench.sh --grants 10000; docs/benchmarks.md).
step "scale benchmark, 200 grants (--check)"
cargo build --quiet --locked --workspace --bins
target/debug/wgtwo-bench --operator target/debug/wgtwo-operator --grants 200 --clients 4 --no-baseline --check

# The agent benchmark at a small N, for the same reason (tools/bench-agent.sh for the full run).
step "agent benchmark, 50 updates"
target/debug/wgtwo-agent-bench --operator target/debug/wgtwo-operator --updates 50

# The harness kills every server it starts; prove it, so a leak cannot go unnoticed.
step "checking for leftover test processes"
cache_root=$(dirname "$(dirname "$(echo "$bins" | head -1 | cut -d= -f2)")")
# Also what ran in the node's pods (its sandboxes and the operator's containers).
leftover=$( (pgrep -fa "^$cache_root/"; pgrep -fa '^/catatonit'; pgrep -fa '^/usr/local/bin/wgtwo-operator') || true)
if [[ -n "$leftover" ]]; then
  echo "leftover processes after the tests:"; echo "$leftover"; exit 1
fi
step "all checks passed"
# One closing line with the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
