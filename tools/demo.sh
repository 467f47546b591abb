#!/usr/bin/env bash
# The main job, locally, on a fresh machine: builds (or reuses) a real kube-apiserver + etcd and
# Ory Hydra, authorizes a simulated subscriber with `wgtwo-operator authorize`, applies a product
# grant (client credentials) next to it, runs the operator and shows both target Secrets renewed. Everything stops and is removed at the end
# (pass --keep to keep it running until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building or reusing the local servers (first run: several minutes)"
tools/testenv/build.sh kube hydra >/dev/null
echo "==> building wgtwo-operator"
cargo build --quiet --locked --bin wgtwo-operator --bin wgtwo-demo --workspace
exec target/debug/wgtwo-demo --operator target/debug/wgtwo-operator "$@"
