#!/usr/bin/env bash
# The whole test suite on a Debian machine, as root, set-up included:
#   bash tests/run.sh [pytest arguments]
# It installs what is missing: with apt-get, containerd (with ctr), docker-registry,
# skopeo, chromium, systemd (systemd-analyze), python3-venv, iproute2 and iptables (the
# network namespaces of tests/integration/test_ip_networks.py), and for the container image
# (tests/image) mmdebstrap, umoci, runc and git; with pip, the project
# and its test extras into a virtualenv, $SPEGEL_TX_TEST_VENV (default .venv in the
# checkout), again whenever the checkout's code has changed. Then it runs
# `python -m pytest` from the checkout with that virtualenv first on PATH, with
# SPEGEL_TX_REQUIRE_REAL=1 (unless set otherwise): everything is installed, so a test
# that skips for want of a real component fails the run instead.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROGRAM=tests/run.sh
VENV=${SPEGEL_TX_TEST_VENV:-$ROOT/.venv}
# shellcheck source=support/install.sh
. "$ROOT/tests/support/install.sh"

install_missing_packages containerd=containerd ctr=containerd docker-registry=docker-registry \
    skopeo=skopeo chromium=chromium systemd-analyze=systemd \
    mmdebstrap=mmdebstrap umoci=umoci runc=runc git=git ip=iproute2 iptables=iptables
install_project "$VENV" "[test]"

cd "$ROOT"
export PATH="$VENV/bin:$PATH"
export SPEGEL_TX_REQUIRE_REAL=${SPEGEL_TX_REQUIRE_REAL:-1}
exec env -u PYTHONPATH "$VENV/bin/python" -m pytest "$@"
