#!/usr/bin/env bash
# Build the spegel-tx container image without Docker: dist/spegel-tx-<version>.tar, an
# OCI archive that `ctr images import` and skopeo (oci-archive:) read.
#
#   bash deploy/image/build.sh [--output DIR] [--keep-layout DIR]
#
# On Debian as root (mmdebstrap unpacks Debian's packages, chroot runs the image's
# python3), with the packages of .ci/run's image block: mmdebstrap umoci python3-pip.
# Environment: SOURCE_DATE_EPOCH (default: the last commit's time), SOURCE_URL (the
# source label; default: git's origin), IMAGE_NAME (default spegel-tx), DEBIAN_MIRROR and
# DEBIAN_SECURITY_MIRROR. How it builds and why: deploy/image/build.py.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
    echo "build.sh: run as root (mmdebstrap --mode=root and chroot need it)" >&2
    exit 1
fi
missing=()
for tool in mmdebstrap umoci dpkg-deb chroot tar git python3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
python3 -m pip --version >/dev/null 2>&1 || missing+=("pip (python3 -m pip)")
if [ ${#missing[@]} != 0 ]; then
    echo "build.sh: missing ${missing[*]}; apt-get install mmdebstrap umoci python3-pip git" >&2
    exit 1
fi
exec python3 deploy/image/build.py "$@"
