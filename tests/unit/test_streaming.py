"""Moving blob bytes: what the connections that carry them are allowed to send at once."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from spegel_tx.registry.connections import enlarge_buffers
from spegel_tx.registry.streaming import PUMP_CHUNK


def test_a_blob_connection_offers_the_kernel_its_whole_write_buffer_in_one_send() -> None:
    ours, theirs = socket.socketpair()
    try:
        transport = tcp.Connection(ours, Protocol())
        assert transport.SEND_LIMIT < PUMP_CHUNK, "Twisted sends a chunk in several trips"

        enlarge_buffers(transport)

        # Full means more than bufferSize waits; the chunk that made it full came on top.
        assert transport.bufferSize + PUMP_CHUNK <= transport.SEND_LIMIT
    finally:
        ours.close()
        theirs.close()
