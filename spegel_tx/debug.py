"""Operator endpoints on the metrics address: "who are my peers?", "who has this image?",
and the debug web page when it is enabled."""

from __future__ import annotations

import json
import time
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource

from spegel_tx.readiness import Readiness
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter

LOOKUP_BUDGET = 3.0
"""Seconds a debug lookup may take before it answers with what it found."""


class DebugPages:
    app = Klein()

    def __init__(
        self,
        clock: Any,
        router: KademliaRouter,
        readiness: Readiness,
        web: IResource | None = None,
    ) -> None:
        """``web`` is the debug web page, None unless ``debug-web-enabled``."""
        self._clock = clock
        self._router = router
        self._readiness = readiness
        self._web = web

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/peers", methods=["GET"])
    def peers(self, request: IRequest) -> bytes:
        protocol = self._router.protocol
        page = {
            "node_id": protocol.node_id.hex(),
            **readiness_fields(self._readiness),
            "peers": routing_table(protocol),
            "records_stored": len(protocol.records),
            "counters": dict(protocol.counters),
        }
        return json_page(request, page)

    @app.route("/lookup", methods=["GET"])
    async def lookup(self, request: IRequest) -> bytes:
        keys = request.args.get(b"key")
        if not keys:
            request.setResponseCode(400)
            return json_page(request, {"error": "pass ?key=sha256:<hex> or ?key=registry/repo:tag"})
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
        return json_page(request, {"key": key, "providers": providers, "elapsed_ms": elapsed_ms})

    @app.route("/web/", branch=True)
    def web(self, request: IRequest) -> IResource:
        return self._web if self._web is not None else notFound()


def readiness_fields(readiness: Readiness) -> dict[str, Any]:
    """``ready``, and ``not_ready_because`` (empty when ready), as every page gives them."""
    reasons = readiness.reasons()
    return {"ready": not reasons, "not_ready_because": reasons}


def routing_table(protocol: KademliaProtocol) -> list[dict[str, Any]]:
    return [
        {"node_id": c.node_id.hex(), "host": c.host, "port": c.port}
        for c in protocol.table.contacts()
    ]


def json_page(request: IRequest, document: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document, indent=1).encode()
