#!/usr/bin/env bash
# Builds a minimal Debian base image from a Debian mirror and loads it into the local Docker
# engine, for hosts that can reach a Debian mirror but no image registry. Then build with
#   docker build --build-arg BASE=debian-local:trixie ...
#
# Usage: docker/make-base-image.sh [SUITE] [MIRROR] [TAG]
#   SUITE   Debian release (default: trixie, the release the Dockerfile's BASE defaults to)
#   MIRROR  Debian mirror URL (default: http://deb.debian.org/debian)
#   TAG     image name (default: debian-local:SUITE)
# Needs root, debootstrap (apt-get install debootstrap) and a running Docker engine.
set -euo pipefail

suite="${1:-trixie}"
mirror="${2:-http://deb.debian.org/debian}"
tag="${3:-debian-local:${suite}}"

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT

# minbase: only the essential and required packages, as the official slim images have.
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

# The image's apt reads the same mirror, with the release's updates and security suites.
security_mirror="${mirror%/debian}/debian-security"
cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
SOURCES
# As in the official images: no package caches, no documentation recommendations.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

tar -C "$rootfs" --numeric-owner -c . | docker import --change 'CMD ["bash"]' - "$tag"
echo "loaded $tag"
