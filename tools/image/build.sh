#!/usr/bin/env bash
# Builds the operator's image from the repository's Dockerfile with buildah (Debian's package), on a
# machine that reaches no container registry.
#
#   tools/image/build.sh [--tag TAG] [--archive FILE]
#       The operator image. The Dockerfile's defaults (the public Rust and distroless images) are
#       out of reach here, so this passes BINARY=prebuilt (the release binary built by cargo on this
#       Debian 12 host) and RUNTIME_IMAGE=a local equivalent of distroless cc-debian12
#       (see runtime_base). The runtime stage is the same either way. Checks that the image has no
#       shell and runs as 65532, prints its size, and with --archive writes it as an OCI archive.
#   tools/image/build.sh test-images DIR
#       The images a test node needs besides the operator's, from Debian 12 packages, as OCI
#       archives in DIR: the pod sandbox (catatonit, a pause process) and busybox (test workloads).
#
# Needs: buildah (apt-get install buildah), apt-get (for the .deb files), cargo.
# Where a registry is reachable, users build the default way: docker build -t REGISTRY/wgtwo-operator:TAG .
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
command -v buildah >/dev/null || { echo "image: buildah is missing: apt-get install buildah" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# debs PKG...: downloads the candidate .deb of each package into $work/debs (without installing it).
debs() {
  mkdir -p "$work/debs"
  (cd "$work/debs" && apt-get download -qq "$@" 2>/dev/null) || {
    apt-get update -qq && (cd "$work/debs" && apt-get download -qq "$@")
  }
}

# commit_rootfs DIR IMAGE [buildah config args...]: an image of DIR's tree as one layer, ownership kept.
commit_rootfs() {
  local dir=$1 image=$2 c mnt
  shift 2
  c=$(buildah from scratch)
  mnt=$(buildah mount "$c")
  cp -a "$dir/." "$mnt/"
  buildah umount "$c" >/dev/null
  buildah config --os linux --arch amd64 "$@" "$c"
  buildah commit --quiet --rm "$c" "$image" >/dev/null
}

# runtime_base: prints the name of a local image holding what gcr.io/distroless/cc-debian12:nonroot
# holds and the operator needs, built from the same Debian 12 packages: glibc, libgcc, CA
# certificates, tzdata, netbase, /etc/passwd with root, nobody and nonroot (65532), a 1777 /tmp, and
# no shell or package manager. Its tag is keyed by the package versions, so it is built once.
runtime_base() {
  local pkgs=(libc6 libgcc-s1 ca-certificates tzdata netbase) key image rootfs
  debs "${pkgs[@]}"
  # Keyed by the packages and by this recipe, so a change to either builds the base again.
  key=$( (cd "$work/debs" && ls; declare -f runtime_base commit_rootfs debs) | sha256sum | cut -c1-12)
  image=localhost/wgtwo-runtime-base:debian12-$key
  if ! buildah inspect --type image "$image" >/dev/null 2>&1; then
    rootfs=$work/rootfs
    mkdir -p "$rootfs"/{etc/ssl/certs,tmp,home/nonroot,root}
    for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$rootfs"; done
    # What ca-certificates' postinst (update-ca-certificates) would write; no script runs here.
    cat "$rootfs"/usr/share/ca-certificates/mozilla/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
    # As distroless ships it: without it glibc's resolver falls back to its built-in order.
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\nethers: files\nrpc: files\n' >"$rootfs/etc/nsswitch.conf"
    cp "$rootfs/usr/lib/os-release" "$rootfs/etc/os-release" 2>/dev/null || true
    chmod 1777 "$rootfs/tmp"
    chmod 700 "$rootfs/root"
    chown 65532:65532 "$rootfs/home/nonroot"
    # Documentation is not part of the image (distroless drops it too).
    rm -rf "$rootfs"/usr/share/{doc,man,lintian}
    commit_rootfs "$rootfs" "$image" --user 65532:65532 --workingdir /home/nonroot --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  fi
  echo "$image"
}

# check_image IMAGE: no shell anywhere in it, runs as 65532; prints its size.
check_image() {
  local image=$1 c mnt user shells size
  user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
  [[ $user == 65532:65532 ]] || { echo "image: $image runs as '$user', not 65532:65532" >&2; return 1; }
  c=$(buildah from "$image")
  mnt=$(buildah mount "$c")
  shells=$(find "$mnt" \( -name sh -o -name bash -o -name dash -o -name ash -o -name busybox \) -printf '/%P\n')
  buildah umount "$c" >/dev/null
  buildah rm "$c" >/dev/null
  [[ -z $shells ]] || { echo "image: $image holds a shell: $shells" >&2; return 1; }
  size=$(buildah images --format '{{.Size}}' "$image" | head -1)
  echo "image: $image: user 65532:65532, no shell, size $size" >&2
}

if [[ ${1:-} == test-images ]]; then
  out=${2:?usage: $0 test-images DIR}
  mkdir -p "$out"
  debs catatonit busybox-static
  for pkg in catatonit busybox; do mkdir -p "$work/$pkg" && dpkg-deb -x "$work"/debs/"$pkg"*.deb "$work/$pkg"; done
  # The pod sandbox: catatonit's pause mode (what podman's infra containers run), statically linked.
  mkdir -p "$work/pause-root"
  install -m 0755 "$work/catatonit/usr/bin/catatonit" "$work/pause-root/catatonit"
  commit_rootfs "$work/pause-root" localhost/wgtwo-testenv/pause:catatonit --entrypoint '["/catatonit","-P"]' --user 65535:65535
  # Test workloads: the statically linked busybox with its applets, as the busybox image has them.
  mkdir -p "$work/busybox-root/bin" "$work/busybox-root/tmp"
  install -m 0755 "$work/busybox/bin/busybox" "$work/busybox-root/bin/busybox"
  for applet in $("$work/busybox-root/bin/busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$work/busybox-root/bin/$applet"
  done
  chmod 1777 "$work/busybox-root/tmp"
  commit_rootfs "$work/busybox-root" localhost/wgtwo-testenv/busybox:debian12 --cmd '["sh"]'
  buildah push --quiet localhost/wgtwo-testenv/pause:catatonit "oci-archive:$out/pause.tar:localhost/wgtwo-testenv/pause:catatonit"
  buildah push --quiet localhost/wgtwo-testenv/busybox:debian12 "oci-archive:$out/busybox.tar:localhost/wgtwo-testenv/busybox:debian12"
  exit 0
fi

tag=localhost/wgtwo-operator:dev
archive=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --archive) archive=$2; shift 2 ;;
    *) echo "usage: $0 [--tag TAG] [--archive FILE] | test-images DIR" >&2; exit 2 ;;
  esac
done

cd "$root"
start=$(date +%s)
# The release build keeps its own target dir outside the checkout, so a fresh clone (CI) rebuilds
# only what changed; the binary is then copied into the build context.
target=${WGTWO_IMAGE_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wgtwo-operator/image-target}
CARGO_TARGET_DIR=$target cargo build --release --locked --bin wgtwo-operator
mkdir -p target/image
cp "$target/release/wgtwo-operator" target/image/wgtwo-operator
base=$(runtime_base)
# The runtime base's glibc must have every symbol version the host-built binary asks for (a newer
# build host would otherwise make an image that fails at start).
command -v objdump >/dev/null || { echo "image: objdump missing: apt-get install binutils" >&2; exit 1; }
needs=$( (objdump -T target/image/wgtwo-operator | grep -o 'GLIBC_[0-9.]*' || true) | sed 's/GLIBC_//' | sort -uV | tail -1)
libc_version=$(dpkg-deb -f "$(ls "$work"/debs/libc6_*.deb | head -1)" Version)
has=$(sed -nE 's/^([0-9]+\.[0-9]+)-.*deb12.*$/\1/p' <<<"$libc_version")
if [[ -z $needs || -z $has ]]; then
  echo "image: cannot compare glibc versions (binary needs '$needs', libc6 package $libc_version)" >&2
  exit 1
fi
if [[ $(printf '%s\n%s\n' "$needs" "$has" | sort -V | tail -1) != "$has" ]]; then
  echo "image: the binary needs glibc $needs; the runtime base has $has (build on Debian 12, or use BINARY=build)" >&2
  exit 1
fi
dangling_before=$(buildah images --quiet --filter dangling=true | sort)
buildah build --quiet --layers=false -f Dockerfile --build-arg BINARY=prebuilt \
  --build-arg PREBUILT_BINARY=target/image/wgtwo-operator --build-arg "RUNTIME_IMAGE=$base" -t "$tag" . >/dev/null
# The prebuilt stage's image is only an intermediate: remove it (and no other untagged image).
for id in $(comm -13 <(echo "$dangling_before") <(buildah images --quiet --filter dangling=true | sort)); do
  buildah rmi "$id" >/dev/null 2>&1 || true
done
check_image "$tag"
if [[ -n $archive ]]; then
  rm -f "$archive"
  buildah push --quiet "$tag" "oci-archive:$archive:$tag"
fi
echo "image: built $tag in $(( $(date +%s) - start ))s" >&2
