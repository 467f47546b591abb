#!/usr/bin/env bash
# Installs the Debian 12 packages the one-node cluster of tests/cluster.rs needs, when missing:
# buildah builds the images, the CNI plugins and iptables network the pods, libseccomp-dev and
# pkg-config build runc with seccomp (tools/testenv/build.sh containerd), binutils' objdump checks
# the image's glibc (tools/image/build.sh). Needs root (the node does).
set -euo pipefail
debs=()
command -v buildah >/dev/null 2>&1 || debs+=(buildah)
[[ -x /usr/lib/cni/bridge ]] || debs+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || debs+=(iptables)
command -v ip >/dev/null 2>&1 || debs+=(iproute2)
command -v pkill >/dev/null 2>&1 || debs+=(procps)
command -v pkg-config >/dev/null 2>&1 || debs+=(pkg-config)
[[ -e /usr/include/seccomp.h ]] || debs+=(libseccomp-dev)
command -v objdump >/dev/null 2>&1 || debs+=(binutils)
(( ${#debs[@]} )) || exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "testenv: the cluster tests need root and Debian 12's ${debs[*]} (apt-get install ${debs[*]})" >&2
  exit 1
fi
echo "testenv: installing ${debs[*]} from Debian" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
