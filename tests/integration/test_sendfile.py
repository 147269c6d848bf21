"""The registry's zero-copy path on a real loopback socket: bytes on the wire, in order."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from spegel_tx.content import Descriptor
from spegel_tx.interfaces import IBlob
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry
from spegel_tx.testing import MemoryStore

SIZE = 24 * 1024 * 1024 + 7


@implementer(IBlob)
class OpenFile:
    """A real file on disk, so the registry takes the sendfile path."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.size = os.fstat(self._file.fileno()).st_size

    def fileno(self) -> int:
        return self._file.fileno()

    def read(self, offset: int, length: int):
        return succeed(os.pread(self._file.fileno(), min(length, 1 << 20), offset))

    def close(self) -> None:
        self._file.close()


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory) -> tuple[str, str, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path_factory.mktemp("blob") / "blob"
    path.write_bytes(data)
    return str(path), "sha256:" + hashlib.sha256(data).hexdigest(), data


@pytest.fixture
def server(blob_file) -> Iterator[tuple[int, list[OpenFile]]]:
    path, digest, data = blob_file
    opened: list[OpenFile] = []

    def open_blob(_digest: str):
        opened.append(OpenFile(path))
        return succeed(opened[-1])

    store = MemoryStore()
    store.descriptor = lambda d: succeed(Descriptor(digest, "application/octet-stream", len(data)))
    store.open = open_blob
    port = reactor.listenTCP(
        0, RegistrySite(Registry(reactor, store).resource()), interface="127.0.0.1"
    )
    yield port.getHost().port, opened
    pytest_twisted.blockon(port.stopListening())


def exchange(port: int, request: bytes, read_until: int | None = None) -> bytes:
    """Send raw request bytes and read the raw answer until close or ``read_until`` bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks, total = [], 0
        while read_until is None or total < read_until:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)


def split(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


@pytest_twisted.inlineCallbacks
def test_headers_then_every_byte(server, blob_file):
    port, opened = server
    _, digest, data = blob_file
    request = (
        b"GET /v2/a/blobs/%s HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n" % digest.encode()
    )
    head, body = split((yield deferToThread(exchange, port, request)))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: %d" % SIZE in head
    assert b"Transfer-Encoding" not in head
    assert body == data
    assert opened[0]._file.closed


@pytest_twisted.inlineCallbacks
def test_range_and_keep_alive_on_one_connection(server, blob_file):
    port, _ = server
    _, digest, data = blob_file
    path = b"/v2/a/blobs/" + digest.encode()
    request = (
        b"GET %s HTTP/1.1\r\nHost: n\r\nRange: bytes=14680064-\r\n\r\n" % path
        + b"HEAD %s HTTP/1.1\r\nHost: n\r\n\r\n" % path
        + b"GET %s HTTP/1.1\r\nHost: n\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n" % path
    )
    response = yield deferToThread(exchange, port, request)
    first_head, rest = split(response)
    assert first_head.startswith(b"HTTP/1.1 206 ")
    assert b"Content-Range: bytes 14680064-%d/%d" % (SIZE - 1, SIZE) in first_head
    tail = SIZE - 14680064
    assert rest[:tail] == data[14680064:]
    second_head, rest = split(rest[tail:])
    assert second_head.startswith(b"HTTP/1.1 200 ")
    third_head, body = split(rest)
    assert third_head.startswith(b"HTTP/1.1 206 ")
    assert body == data[:10]


@pytest_twisted.inlineCallbacks
def test_client_gone_mid_body_releases_file_and_socket(server, blob_file):
    port, opened = server
    _, digest, _ = blob_file
    before = len(os.listdir("/proc/self/fd"))
    request = b"GET /v2/a/blobs/%s HTTP/1.1\r\nHost: n\r\n\r\n" % digest.encode()
    partial = yield deferToThread(exchange, port, request, 1 << 20)
    assert partial.startswith(b"HTTP/1.1 200 OK")
    for _ in range(50):
        if opened and opened[0]._file.closed:
            break
        yield deferLater(reactor, 0.05)
    assert opened[0]._file.closed
    assert len(os.listdir("/proc/self/fd")) <= before
