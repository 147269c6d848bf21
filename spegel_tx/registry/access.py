"""One log event per HTTP request, written when the request ends, however it ends."""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request, Site

_log = Logger(namespace="spegel_tx.access")


class AccessLogRequest(Request):
    """A request that logs itself once finished or cut off.

    Bytes sent by sendfile bypass ``write``; the sender adds them to
    ``sentLength`` so the log shows what really left the node.
    """

    handler = "-"

    def process(self) -> None:
        self._started = time.monotonic()
        self.notifyFinish().addBoth(self._log_access)
        super().process()

    def _log_access(self, result: Failure | None) -> None:
        _log.info(
            "{method} {path} {status} {bytes}B {duration_ms}ms {handler} {client}",
            method=self.method.decode("ascii", "replace"),
            path=self.uri.decode("utf-8", "replace"),
            status=self.code,
            bytes=self.sentLength,
            duration_ms=round((time.monotonic() - self._started) * 1000, 3),
            client=getattr(self.getClientAddress(), "host", "-"),
            handler=self.handler,
            completed=result is None,
        )


def set_handler(request: Any, handler: str) -> None:
    """Name what served the request (``local``, later ``mirror``) in its log line."""
    if isinstance(request, AccessLogRequest):
        request.handler = handler


class RegistrySite(Site):
    """A Site whose only request log is ``AccessLogRequest``'s structured event."""

    requestFactory = AccessLogRequest

    def log(self, request: http.Request) -> None:
        pass
