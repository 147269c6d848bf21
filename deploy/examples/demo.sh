#!/usr/bin/env bash
# Local demos of spegel-tx on a Debian machine (as root), from this checkout:
#   bash deploy/examples/demo.sh          one node serving its containerd's content
#   bash deploy/examples/demo.sh mirror   three nodes pulling from each other
# Installs Debian's containerd, docker-registry and skopeo if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v containerd >/dev/null || ! command -v skopeo >/dev/null \
    || ! command -v docker-registry >/dev/null; then
    echo "==> installing Debian's containerd, docker-registry and skopeo"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        containerd docker-registry skopeo >/dev/null
fi
python3 -c "import spegel_tx, yaml" 2>/dev/null || python3 -m pip install -q .
case "${1:-}" in
    mirror) exec python3 deploy/examples/mirror_demo.py ;;
    "") exec python3 deploy/examples/demo.py ;;
    *) echo "usage: $0 [mirror]" >&2; exit 2 ;;
esac
