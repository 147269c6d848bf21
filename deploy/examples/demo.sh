#!/usr/bin/env bash
# One-minute local demo of spegel-tx on a Debian machine (as root): installs Debian's
# containerd and skopeo if missing, then runs deploy/examples/demo.py from this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v containerd >/dev/null || ! command -v skopeo >/dev/null; then
    echo "==> installing Debian's containerd and skopeo"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containerd skopeo >/dev/null
fi
python3 -c "import spegel_tx" 2>/dev/null || python3 -m pip install -q .
exec python3 deploy/examples/demo.py
