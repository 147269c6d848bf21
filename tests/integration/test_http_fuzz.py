"""Nonsense on the wire: a real node answers every request a client can send with a
status below 500, logs no traceback, and keeps its memory flat.

A bounded random loop (seeded, so a failure repeats) over methods, paths,
``ns`` values and headers, sent raw over TCP to a listening ``twistd -n spegel``
beside the session's containerd, which holds the demo image. The node also
forwards (a static peer that does not exist), so the mirror path is fuzzed too.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import Node
from tests.support.containerd import Containerd
from tests.support.loopback import loopback_host
from tests.support.ociimage import SyntheticImage
from tests.support.processes import rss

pytestmark = pytest.mark.integration

REQUESTS = 1500
SECONDS = 90.0
RSS_GROWTH_LIMIT = 40 * 1024 * 1024
"""Flat memory, with room for Python's allocator and the access-log buffers."""


def request_bytes(rng: random.Random, image: SyntheticImage) -> bytes:
    digest = rng.choice(
        [
            *image.digests,
            "sha256:" + "0" * 64,
            "sha256:zz",
            "sha512:" + "a" * 128,
            "md5:abc",
            "",
            "sha256:" + "A" * 64,
            "%00",
        ]
    )
    name = rng.choice([image.repository, "library/x", "UPPER/case", "a" * 300, "..", "a//b", "%ff"])
    reference = rng.choice([image.tag, digest, "", "-bad", "t" * 200, "%20"])
    path = rng.choice(
        [
            f"/v2/{name}/manifests/{reference}",
            f"/v2/{name}/blobs/{digest}",
            f"/v2/{name}/blobs/uploads/",
            f"/v2/{name}/tags/list",
            "/v2/",
            "/v2",
            "/",
            "/readyz",
            "/livez",
            "/v2/_catalog",
            "/" + "x" * rng.choice([10, 5000]),
            "/v2/" + "".join(chr(rng.randrange(33, 127)) for _ in range(20)),
        ]
    )
    ns = rng.choice(
        ["", "?ns=", "?ns=docker.io", f"?ns={'%' * 3}", "?ns=a&ns=b", "?ns=" + "y" * 3000, "?&&="]
    )
    method = rng.choice(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW", "G T"])
    number = rng.choice(["0", "1", "-1", "9" * 30, "9" * 5000, "", "x"])
    headers = rng.sample(
        [
            f"Range: bytes={number}-",
            f"Range: bytes=-{number}",
            f"Range: bytes={number}-{number}",
            "Range: bytes=0-1,2-3",
            "Range: items=0-1",
            "Accept: " + rng.choice(["*/*", "\x7f", "a" * 2000]),
            "X-Spegel-Mirrored: " + rng.choice(["true", "false", "", "TRUE"]),
            "Content-Length: " + rng.choice(["0", "5", "-1", "x"]),
            "Transfer-Encoding: " + rng.choice(["chunked", "gzip", "x"]),
            "Connection: " + rng.choice(["close", "keep-alive", "upgrade"]),
            "Expect: 100-continue",
        ],
        rng.randrange(0, 5),
    )
    version = rng.choice(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/9.9", ""])
    head = f"{method} {path}{ns} {version}\r\nHost: node\r\n" + "".join(f"{h}\r\n" for h in headers)
    body = rng.choice([b"", b"hello", b"0\r\n\r\n", bytes(rng.randrange(256) for _ in range(64))])
    if rng.random() < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    return head.encode("latin-1", "replace") + b"\r\n" + body


def status_of(address: tuple[str, int], data: bytes) -> int | None:
    """The status the node answers ``data`` with, or None if it closed without one."""
    with socket.create_connection(address, timeout=10) as client:
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = client.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            return None
    if not answer:
        return None
    parts = answer.split(b" ", 2)
    assert parts[0].startswith(b"HTTP/1."), answer[:200]
    return int(parts[1])


def test_no_request_makes_a_5xx_a_traceback_or_a_leak(
    containerd: Containerd,
    demo_image: SyntheticImage,
    spegel_node: Callable[..., Node],
) -> None:
    host = loopback_host()
    node = spegel_node(
        containerd,
        host=host,
        static_bootstrap_peers=[f"{host}:9"],
        mirrored_registries=[],
        wait_ready=False,
    )
    address = (host, node.port)
    rng = random.Random(20261204)
    statuses: dict[int | None, int] = {}
    server_errors: list[tuple[bytes, int]] = []
    for data in (request_bytes(rng, demo_image) for _ in range(50)):
        status_of(address, data)  # warm up: imports, first containerd calls
    before = rss(node.pid)
    deadline = time.monotonic() + SECONDS
    sent = 0
    while sent < REQUESTS and time.monotonic() < deadline:
        data = request_bytes(rng, demo_image)
        status = status_of(address, data)
        sent += 1
        statuses[status] = statuses.get(status, 0) + 1
        not_ready = status == 503 and b" /readyz" in data.split(b"\r\n", 1)[0]
        if status is not None and status >= 500 and not not_ready:
            server_errors.append((data[:300], status))
    after = rss(node.pid)
    records = [
        json.loads(line) for line in node.log_path.read_text().splitlines() if line[:1] == "{"
    ]
    failures = [r for r in records if r.get("level") in ("error", "critical")]
    print(f"{sent} requests: statuses {statuses}; RSS {before >> 20} -> {after >> 20} MiB")

    assert sent >= 500, f"only {sent} requests in {SECONDS}s"
    assert not server_errors, server_errors[:5]
    assert not failures, failures[:3]
    assert "Traceback" not in node.log_path.read_text()
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew from {before} to {after} bytes"
