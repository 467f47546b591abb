#!/usr/bin/env bash
# Builds the real peers the tests run against (kube-apiserver, etcd, kubectl, Ory Hydra) from the
# Go module proxy, once per machine, into a cache outside the checkout keyed by the wrapper module's
# content (so a version bump rebuilds and an unchanged wrapper never does).
#
#   tools/testenv/build.sh            build what is missing, print one "name=/path/to/binary" per line
#   tools/testenv/build.sh kube hydra only these (any of the names below, in any order):
#     kube       kube-apiserver, etcd, kubectl
#     kcm        kube-controller-manager (owner-reference garbage collection, for the tests that need it)
#     hydra      Ory Hydra
#     promtool   checks /metrics scrapes, alert rules and the dashboard's queries (tests only)
#     helm       lints and renders deploy/chart (tests only)
#     node       kubelet, kube-scheduler, kube-proxy (the one-node cluster; same Kubernetes as kube)
#     containerd containerd, its runc shim, ctr and runc (the node's container runtime; runc at the
#                version containerd pins, with seccomp: needs libseccomp-dev)
#
# Cache root: $WGTWO_TESTENV_CACHE, default ~/.cache/wgtwo-operator/testenv.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${WGTWO_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wgtwo-operator/testenv}
mkdir -p "$cache"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

# version MODULE DIR: the version of MODULE that the wrapper in DIR requires.
version() { (cd "$here/$2" && go list -m -f '{{.Version}}' "$1"); }

# key NAME [DIR]: a short hash of every file of the wrapper module in DIR (default NAME) and of
# NAME's build function (its flags), so changing one binary's build leaves the others cached.
key() { { (cd "$here/${2:-$1}" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) -print0 | sort -z | xargs -0 sha256sum); declare -f "build_$1"; if [[ $1 == kube || $1 == kcm || $1 == node ]]; then declare -f kube_flags; fi; } | sha256sum | cut -c1-12; }

# ensure NAME VERSION BUILD_FN [DIR]: run BUILD_FN in the wrapper module DIR (default NAME) into a
# temp dir once, then move it into place atomically.
ensure() {
  local name=$1 version=$2 fn=$3 module=${4:-$1} dir
  dir="$cache/$name-$version-$(key "$name" "$module")"
  if [[ ! -f "$dir/.complete" ]]; then
    exec 9>"$cache/$name.lock"
    flock 9
    if [[ ! -f "$dir/.complete" ]]; then
      local tmp start
      tmp=$(mktemp -d "$cache/.$name.XXXXXX")
      start=$(date +%s)
      echo "testenv: building $name $version into $dir (cold build, takes minutes)" >&2
      (cd "$here/$module" && "$fn" "$tmp")
      echo "testenv: built $name in $(( $(date +%s) - start ))s" >&2
      touch "$tmp/.complete"
      rm -rf "$dir"
      mv "$tmp" "$dir"
      # Older builds of the same binary are never used again.
      find "$cache" -maxdepth 1 -name "$name-*" ! -path "$dir" -exec rm -rf {} +
    fi
    exec 9>&-
  fi
  for f in "$dir"/*; do echo "$(basename "$f")=$f"; done
}

build_kube() {
  local flags
  flags=$(kube_flags)
  go build -ldflags="$flags" -o "$1/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -ldflags="$flags" -o "$1/kubectl" k8s.io/kubernetes/cmd/kubectl
  go build -ldflags='-s -w' -o "$1/etcd" ./cmd/etcd
}

# kube_flags: the -ldflags of Kubernetes' binaries, stamping the real version as its own build does
# (so clients' version checks see v1.37.x).
kube_flags() {
  local v minor flags
  v=$(version k8s.io/kubernetes kube)
  minor=$(echo "$v" | cut -d. -f2)
  flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  echo "$flags"
}

# The node's binaries come from their own wrapper module (so adding them did not rebuild the
# apiserver), pinned to the same k8s.io/kubernetes version as kube: a version skew is refused.
build_node() {
  local flags
  [[ $(version k8s.io/kubernetes node) == "$(version k8s.io/kubernetes kube)" ]] \
    || { echo "testenv: node/go.mod and kube/go.mod pin different k8s.io/kubernetes versions" >&2; return 1; }
  flags=$(kube_flags)
  for cmd in kubelet kube-scheduler kube-proxy; do
    go build -ldflags="$flags" -o "$1/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  done
}

# As containerd's Makefile: the version is stamped, the shim is static (it runs in the pods' mount
# namespaces), and the daemon keeps cgo off (no btrfs, no cgo-only snapshotters).
build_containerd() {
  local v pkg flags
  v=$(version github.com/containerd/containerd/v2 containerd)
  pkg=github.com/containerd/containerd/v2
  flags="-s -w -X $pkg/version.Version=$v -X $pkg/version.Package=github.com/containerd/containerd/v2"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    CGO_ENABLED=0 go build -tags no_btrfs -ldflags="$flags" -o "$1/$cmd" "$pkg/cmd/$cmd"
  done
  # As runc's Makefile: seccomp through libseccomp (cgo), so RuntimeDefault profiles apply.
  CGO_ENABLED=1 go build -tags "seccomp urfave_cli_no_docs" \
    -ldflags="-s -w -X main.version=$(version github.com/opencontainers/runc containerd)" \
    -o "$1/runc" github.com/opencontainers/runc
}

build_kcm() {
  go build -ldflags="$(kube_flags)" -o "$1/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager
}

build_hydra() {
  # The sqlite tag gives Hydra its in-memory store (DSN memory); it needs cgo.
  CGO_ENABLED=1 go build -tags sqlite,sqlite_omit_load_extension \
    -ldflags="-s -w -X github.com/ory/hydra/v2/driver/config.Version=$(version github.com/ory/hydra/v2 hydra)" \
    -o "$1/hydra" github.com/ory/hydra/v2
}

build_promtool() {
  go build -ldflags='-s -w' -o "$1/promtool" github.com/prometheus/prometheus/cmd/promtool
}

build_helm() {
  # As helm's Makefile does: its default Kubernetes version is that of the client-go it links.
  local minor flags
  minor=$(version k8s.io/client-go helm | cut -d. -f2)
  flags="-s -w -X helm.sh/helm/v3/internal/version.version=$(version helm.sh/helm/v3 helm)"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  go build -ldflags="$flags" -o "$1/helm" helm.sh/helm/v3/cmd/helm
}

[[ $# -gt 0 ]] || set -- all
for what in "$@"; do
  case "$what" in
    kube) ensure kube "$(version k8s.io/kubernetes kube)" build_kube ;;
    kcm) ensure kcm "$(version k8s.io/kubernetes kube)" build_kcm kube ;;
    hydra) ensure hydra "$(version github.com/ory/hydra/v2 hydra)" build_hydra ;;
    promtool) ensure promtool "$(version github.com/prometheus/prometheus promtool)" build_promtool ;;
    helm) ensure helm "$(version helm.sh/helm/v3 helm)" build_helm ;;
    node) ensure node "$(version k8s.io/kubernetes node)" build_node ;;
    containerd) ensure containerd "$(version github.com/containerd/containerd/v2 containerd)" build_containerd ;;
    all) "$0" kube kcm hydra promtool helm node containerd ;;
    *) echo "usage: $0 [all | kube kcm hydra promtool helm node containerd ...]" >&2; exit 2 ;;
  esac
done
