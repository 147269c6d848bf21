#!/usr/bin/env bash
# Local demos of spegel-tx on a Debian machine, as root, from any directory:
#   bash deploy/examples/demo.sh          one node serving its containerd's content
#   bash deploy/examples/demo.sh mirror   three nodes pulling from each other
# First it installs what is missing: Debian's containerd, docker-registry and skopeo
# (and python3-venv) with apt-get, and this checkout into a virtualenv of the demo's
# own, $SPEGEL_TX_DEMO_VENV (default ~/.cache/spegel-tx/demo-venv), again whenever the
# checkout's code has changed. The demo then runs that installed spegel-tx.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PROGRAM=demo
VENV=${SPEGEL_TX_DEMO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/spegel-tx/demo-venv}
# shellcheck source=../../tests/support/install.sh
. "$ROOT/tests/support/install.sh"

case "${1:-}" in
    mirror) story=mirror_demo.py ;;
    "") story=demo.py ;;
    *) echo "usage: bash deploy/examples/demo.sh [mirror]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || fail "run as root (sudo bash deploy/examples/demo.sh): containerd needs it"

install_missing_packages containerd=containerd ctr=containerd docker-registry=docker-registry \
    skopeo=skopeo
install_project "$VENV"
echo "==> running $("$VENV/bin/spegel-tx" version) from $VENV"

export SPEGEL_TX_CODE=installed PATH="$VENV/bin:$PATH"
exec env -u PYTHONPATH "$VENV/bin/python" "$ROOT/deploy/examples/$story"
