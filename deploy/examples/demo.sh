#!/usr/bin/env bash
# Local demos of spegel-tx on a Debian machine, as root, from any directory:
#   bash deploy/examples/demo.sh          one node serving its containerd's content
#   bash deploy/examples/demo.sh mirror   three nodes pulling from each other
# First it installs what is missing: Debian's containerd, docker-registry, skopeo and
# python3-venv with apt-get, and this checkout into a virtualenv of the demo's own,
# $SPEGEL_TX_DEMO_VENV (default ~/.cache/spegel-tx/demo-venv), again whenever the
# checkout's code has changed. The demo then runs that installed spegel-tx.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${SPEGEL_TX_DEMO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/spegel-tx/demo-venv}

fail() {
    echo "demo: $*" >&2
    exit 1
}

case "${1:-}" in
    mirror) story=mirror_demo.py ;;
    "") story=demo.py ;;
    *) echo "usage: bash deploy/examples/demo.sh [mirror]" >&2; exit 2 ;;
esac

# Debian packages: one per missing command.
missing=()
command -v containerd >/dev/null && command -v ctr >/dev/null || missing+=(containerd)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v skopeo >/dev/null || missing+=(skopeo)
if ! command -v python3 >/dev/null; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ "$(id -u)" != 0 ]; then
    fail "run as root (sudo bash deploy/examples/demo.sh): containerd needs it"
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed (above); check /etc/apt/sources.list"
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
        "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed (above)"
fi

# The project, in a virtualenv. What is installed is checked by running it from outside
# the checkout (inside it, the checkout's own twisted/plugins would shadow a missing
# Twisted) and by a stamp of the sources it was installed from.
stamp=$(cd "$ROOT" && find pyproject.toml setup.cfg spegel_tx twisted -type f \
    ! -name '*.pyc' ! -name dropin.cache | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)
installed() {
    [ "$(cat "$VENV/spegel-tx-source" 2>/dev/null)" = "$stamp" ] &&
        (cd / && env -u PYTHONPATH "$VENV/bin/spegel-tx" version) >/dev/null 2>&1 &&
        (cd / && env -u PYTHONPATH "$VENV/bin/python" -c \
            'import twisted.scripts.twistd, twisted.plugins.spegel_plugin') >/dev/null 2>&1
}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9 # Two demos started at once install once.
if ! installed; then
    echo "==> installing spegel-tx from $ROOT into $VENV"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed (above)"
    fi
    # Build from a copy: a build writes build/ and *.egg-info beside the sources.
    source_copy=$(mktemp -d)
    trap 'rm -rf "$source_copy"' EXIT
    cp -r "$ROOT"/{pyproject.toml,setup.cfg,README.md,LICENSE,spegel_tx,twisted} "$source_copy"
    "$VENV/bin/python" -m pip install -qq --disable-pip-version-check "$source_copy" ||
        fail "pip install into $VENV failed (above); it needs PyPI"
    rm -rf "$source_copy"
    trap - EXIT
    echo "$stamp" >"$VENV/spegel-tx-source"
    installed || fail "the installed spegel-tx does not run: try $VENV/bin/spegel-tx version"
fi
flock -u 9

export SPEGEL_TX_CODE=installed PATH="$VENV/bin:$PATH"
exec env -u PYTHONPATH "$VENV/bin/python" "$ROOT/deploy/examples/$story"
