#!/usr/bin/env bash
# The scale benchmark (see docs/benchmarks.md): a real kube-apiserver + etcd, a fast local rotating
# token endpoint, N grants and the release operator. Arguments go to wgtwo-bench, e.g.
#   tools/bench.sh --grants 10000
#   tools/bench.sh --grants 1000 --soak 600 --token-lifetime 90
set -euo pipefail
cd "$(dirname "$0")/.."
tools/testenv/build.sh kube hydra >/dev/null
cargo build --quiet --locked --release --bin wgtwo-operator --bin wgtwo-bench --workspace
exec target/release/wgtwo-bench --operator target/release/wgtwo-operator "$@"
