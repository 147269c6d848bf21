"""Operator endpoints on the metrics address: "who are my peers?" and "who has this image?"."""

from __future__ import annotations

import json
import time
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from spegel_tx.routing.kademlia.router import KademliaRouter

LOOKUP_BUDGET = 3.0
"""Seconds a debug lookup may take before it answers with what it found."""


class DebugPages:
    app = Klein()

    def __init__(self, clock: Any, router: KademliaRouter) -> None:
        self._clock = clock
        self._router = router

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/peers", methods=["GET"])
    def peers(self, request: IRequest) -> bytes:
        protocol = self._router.protocol
        page = {
            "node_id": protocol.node_id.hex(),
            "ready": self._router.ready(),
            "peers": [
                {"node_id": c.node_id.hex(), "host": c.host, "port": c.port}
                for c in protocol.table.contacts()
            ],
            "records_stored": sum(len(holders) for holders in protocol.records.values()),
            "counters": dict(protocol.counters),
        }
        return _json(request, page)

    @app.route("/lookup", methods=["GET"])
    async def lookup(self, request: IRequest) -> bytes:
        keys = request.args.get(b"key")
        if not keys:
            request.setResponseCode(400)
            return _json(request, {"error": "pass ?key=sha256:<hex> or ?key=registry/repo:tag"})
        key = keys[0].decode("utf-8", "replace")
        started = time.monotonic()
        search = self._router.lookup(key, 20)
        deadline = self._clock.callLater(LOOKUP_BUDGET, search.cancel)
        providers = []
        try:
            while (provider := await search.next_provider()) is not None:
                providers.append({"host": provider[0], "registry_port": provider[1]})
        finally:
            if deadline.active():
                deadline.cancel()
        elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        return _json(request, {"key": key, "providers": providers, "elapsed_ms": elapsed_ms})


def _json(request: IRequest, document: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document, indent=1).encode()
