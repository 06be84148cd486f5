#!/usr/bin/env bash
# The local base image of the container tests: Debian bookworm (whose python3 is 3.11) made with
# debootstrap and imported as flywheel-base:bookworm. Nothing can be pulled from a registry on the
# test machines; users build on the public python:3.11-slim-bookworm instead. The root filesystem
# is kept as a tarball in the download cache, so only the first run on a machine downloads it.
set -euo pipefail
TAG="${1:-flywheel-base:bookworm}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  exit 0
fi
CACHE="${FLYWHEEL_CACHE_DIR:-$HOME/.cache/flywheel}/images"
TAR="$CACHE/bookworm-python3.tar"
if [ ! -f "$TAR" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  ROOT="$(mktemp -d)"
  trap 'rm -rf "$ROOT"' EXIT
  echo "building the bookworm root filesystem with debootstrap (about a minute)" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" \
    http://deb.debian.org/debian >/dev/null
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc \
    "$ROOT"/usr/share/man "$ROOT"/usr/share/locale
  mkdir -p "$CACHE"
  tar -C "$ROOT" -cf "$TAR.part" . && mv "$TAR.part" "$TAR"
fi
docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["/bin/bash"]' "$TAR" "$TAG" >/dev/null
