"""A peer that lies: it joins the DHT with spegel-tx's own router code, advertises the
keys it is given, and answers them from its own HTTP server in one of these ways:

- ``partial``: 206 with a made-up ``Content-Range`` to a GET that had no ``Range``;
- ``trickle``: the declared length, then one byte every 4 s (of ``--blob-file`` if
  given, so that what it did send is right);
- ``wrong``: for a blob, its real size (``--blob-size``) and as many random bytes;
- ``stall``: for a blob, the real ``--blob-file``'s length and first half, then silence
  with the connection open;
- ``late``: nothing for 5 s, then 404;
- ``huge``: ``Content-Length: 1000000000000`` and bytes that never end;
- ``tag``: for a tag, the digest and manifest given with ``--tag-digest`` and
  ``--tag-file``; for everything else, 404;
- ``long``: the manifest given with ``--tag-digest`` and ``--tag-file``, honestly, by
  its digest; any blob, with a ``Content-Length`` 1 MiB longer than its real size
  (``--blob-size``) and bytes to match.

Run as ``python3 -m tests.support.hostile_peer --mode M --bootstrap HOST:PORT
--host H --router-port P --registry-port Q --key K ...``; it prints ``ready`` once it
has advertised, and logs every request it answers to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from spegel_tx.config import parse_address
from spegel_tx.routing.bootstrap import StaticBootstrapper
from spegel_tx.routing.kademlia.node import random_node_id
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter

reactor: Any = _reactor


class Liar(Resource):
    isLeaf = True

    def __init__(
        self, mode: str, tag_digest: str, tag_body: bytes, blob_size: int, blob: bytes = b""
    ) -> None:
        super().__init__()
        self.mode = mode
        self.tag_digest = tag_digest
        self.tag_body = tag_body
        self.blob_size = blob_size
        self.blob = blob

    def render(self, request: Any) -> Any:
        print(f"{request.method.decode()} {request.uri.decode()}", flush=True)
        if self.mode == "tag":
            if b"/manifests/sha256:" in request.path or b"/blobs/" in request.path:
                request.setResponseCode(404)
                return b""
            request.setHeader(b"content-type", b"application/vnd.oci.image.index.v1+json")
            request.setHeader(b"docker-content-digest", self.tag_digest.encode())
            request.setHeader(b"content-length", b"%d" % len(self.tag_body))
            return b"" if request.method == b"HEAD" else self.tag_body
        if self.mode == "long":
            if b"/manifests/" in request.path:
                request.setHeader(b"content-type", b"application/vnd.oci.image.manifest.v1+json")
                request.setHeader(b"docker-content-digest", self.tag_digest.encode())
                request.setHeader(b"content-length", b"%d" % len(self.tag_body))
                return self.tag_body
            request.setHeader(b"content-length", b"%d" % (self.blob_size + (1 << 20)))
            return os.urandom(self.blob_size + (1 << 20))
        if self.mode == "wrong":
            request.setHeader(b"content-length", b"%d" % self.blob_size)
            return os.urandom(self.blob_size)
        if self.mode == "stall":
            request.setHeader(b"content-length", b"%d" % len(self.blob))
            request.write(self.blob[: len(self.blob) // 2])
            return NOT_DONE_YET
        if self.mode == "late":
            answer = reactor.callLater(5.0, self._not_found, request)
            request.notifyFinish().addErrback(lambda _: answer.cancel())
            return NOT_DONE_YET
        if self.mode == "partial":
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes 0-65535/65536")
            request.setHeader(b"content-length", b"65536")
            return os.urandom(65536)
        if self.mode == "huge":
            request.setHeader(b"content-length", b"1000000000000")
            loop = LoopingCall(request.write, b"{" * 65536)
            loop.start(0.01)
            request.notifyFinish().addBoth(lambda _: loop.stop())
            return NOT_DONE_YET
        body = iter(self.blob) if self.blob else iter(lambda: ord("x"), None)
        request.setHeader(b"content-length", b"%d" % (len(self.blob) or 100000000))
        loop = LoopingCall(lambda: request.write(bytes([next(body)])))
        loop.start(4.0)
        request.notifyFinish().addBoth(lambda _: loop.stop())
        return NOT_DONE_YET

    def _not_found(self, request: Any) -> None:
        request.setResponseCode(404)
        request.finish()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode",
        choices=["partial", "trickle", "huge", "tag", "long", "wrong", "stall", "late"],
        required=True,
    )
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--router-port", type=int, required=True)
    parser.add_argument("--registry-port", type=int, required=True)
    parser.add_argument("--key", action="append", default=[])
    parser.add_argument("--tag-digest", default="")
    parser.add_argument("--tag-file", default="")
    parser.add_argument("--blob-size", type=int, default=0)
    parser.add_argument("--blob-file", default="")
    args = parser.parse_args(argv)
    tag_body = open(args.tag_file, "rb").read() if args.tag_file else b""  # noqa: SIM115
    blob = open(args.blob_file, "rb").read() if args.blob_file else b""  # noqa: SIM115
    reactor.listenTCP(
        args.registry_port,
        Site(Liar(args.mode, args.tag_digest, tag_body, args.blob_size, blob)),
        interface=args.host,
    )
    protocol = KademliaProtocol(reactor, random_node_id(), registry_port=args.registry_port)
    reactor.listenUDP(args.router_port, protocol, interface=args.host)
    bootstrap = StaticBootstrapper(reactor, (parse_address(args.bootstrap),))
    router = KademliaRouter(reactor, protocol, bootstrap, args.router_port)
    router.startService()

    def advertise() -> None:
        if not router.ready():
            reactor.callLater(0.1, advertise)
            return
        router.advertise(args.key).addCallback(lambda _: print("ready", flush=True))

    reactor.callLater(0.1, advertise)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
