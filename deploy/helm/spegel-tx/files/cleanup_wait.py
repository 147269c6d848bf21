"""Wait until spegel-tx's cleanup has run on every node: the chart's last post-delete hook.

Helm waits for a hook Pod to end but not for a hook DaemonSet, so this Pod is the
hook's last step. A cleanup pod is ready once its init container has put the node's
certs.d back. The pods are listed by two headless Services: one with every pod,
ready or not, one with ready pods only. Cleanup is done when the first list is not
empty and every address on it is on the second, three polls in a row (DNS answers
lag the pods by a few seconds). Standard library only: it runs in the spegel-tx image.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

PERIOD = 2.0
THRESHOLD = 3
USAGE = "usage: python3 cleanup_wait.py ALL_PODS_NAME READY_PODS_NAME"


def addresses(name: str) -> frozenset[str]:
    """Every address ``name`` resolves to; none while the Service has no endpoints."""
    try:
        found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return frozenset()
    return frozenset(str(info[4][0]) for info in found)


def wait(
    all_pods: str,
    ready_pods: str,
    resolve: Callable[[str], frozenset[str]] = addresses,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once every pod of ``all_pods`` is in ``ready_pods`` on THRESHOLD polls in a row."""
    streak = 0
    while True:
        everyone, ready = resolve(all_pods), resolve(ready_pods)
        done = len(everyone & ready)
        streak = streak + 1 if everyone and done == len(everyone) else 0
        print(f"cleanup done on {done} of {len(everyone)} nodes", flush=True)
        if streak == THRESHOLD:
            return
        sleep(PERIOD)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    wait(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
