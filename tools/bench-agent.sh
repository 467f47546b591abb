#!/usr/bin/env bash
# The agent benchmark (see docs/benchmarks.md): a real kube-apiserver + etcd, the sidecar example's
# one-Secret RBAC and the release `wgtwo-operator agent`; N updates of its Secret, each timed to
# the disk, and the agent's memory. Arguments go to wgtwo-agent-bench, e.g.
#   tools/bench-agent.sh --updates 1000
set -euo pipefail
cd "$(dirname "$0")/.."
tools/testenv/build.sh kube >/dev/null
cargo build --quiet --locked --release --bin wgtwo-operator --bin wgtwo-agent-bench --workspace
exec target/release/wgtwo-agent-bench --operator target/release/wgtwo-operator "$@"
