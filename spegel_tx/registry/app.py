"""The pull-only OCI distribution API over the node's content store.

containerd only falls back to the real registry on a 404 (or a refused
connection), so "not here" is always a fast 404 with the OCI error JSON,
whatever the reason: content not held, a name filtered out, a tag without ``ns``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as werkzeug_NotFound

from spegel_tx.basicauth import REALM, BasicAuth
from spegel_tx.content import Descriptor
from spegel_tx.errors import (
    Filtered,
    InvalidDigest,
    InvalidReference,
    NotFound,
    Unauthorized,
    Unavailable,
)
from spegel_tx.interfaces import IBlob, IContentStore, IDownloads
from spegel_tx.oci.digest import parse_digest
from spegel_tx.oci.errors import ErrorCode, error_body
from spegel_tx.oci.filters import Filters
from spegel_tx.oci.manifest import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE
from spegel_tx.oci.ranges import RangeNotSatisfiable, parse_range
from spegel_tx.oci.reference import Reference, parse_reference, parse_repository
from spegel_tx.readiness import Readiness
from spegel_tx.registry.access import requested_registry, set_handler
from spegel_tx.registry.mirror import IN_FLIGHT_HEADER, MIRRORED_HEADER, Mirror, MirrorBodyFailed
from spegel_tx.registry.streaming import send_blob

_log = Logger()

_READ_METHODS = b"GET, HEAD"
OCTET_STREAM = "application/octet-stream"


class Registry:
    """Klein routes for ``/v2/``, manifests, blobs and the health checks."""

    app = Klein()

    def __init__(
        self,
        reactor: Any,
        store: IContentStore,
        mirrored_registries: Iterable[str] = (),
        registry_filters: Iterable[re.Pattern[str]] = (),
        mirror: Mirror | None = None,
        readiness: Readiness | None = None,
        auth: BasicAuth | None = None,
        serve_downloads: bool = False,
    ) -> None:
        """``readiness`` is the node's; by default, the store's and the mirror's. With
        ``auth``, every ``/v2/`` request must carry its credentials; the health checks
        need none. ``serve_downloads``: peers get blobs the store is still downloading."""
        self._reactor = reactor
        self._store = store
        self._mirror = mirror
        self._readiness = readiness or Readiness(store, mirror)
        self._filters = Filters.of(mirrored_registries, registry_filters)
        self._auth = auth
        self._downloads = IDownloads(store, None) if serve_downloads else None

    def resource(self) -> Resource:
        return _Utf8Only(self.app.resource())

    @app.route("/livez", methods=["GET"])
    def livez(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: Request) -> bytes:
        """200 ``ok``, or 503 with each reason the node is not ready on a line."""
        request.setHeader(b"content-type", b"text/plain")
        reasons = self._readiness.reasons()
        if reasons:
            request.setResponseCode(503)
        return "".join(f"{line}\n" for line in reasons or ["ok"]).encode()

    @app.route("/v2/", methods=["GET"])
    def base(self, request: Request) -> bytes:
        self._authorize(request)
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET"])
    async def manifest(self, request: Request, name: str, reference: str) -> bytes | None:
        self._authorize(request)
        ref = parse_reference(requested_registry(request), name, reference)
        self._check_filters(ref.registry, ref.repository, ref.tag)
        if ref.digest is None and ref.registry is None:
            # Which image a bare tag names depends on the images a node happens to hold:
            # as in Spegel, only ns (which containerd sends a mirror) makes it one name,
            # the same here and on every peer.
            raise NotFound(f"tag {reference} without ns=<registry>: ask by digest, or pass ns")
        try:
            digest, descriptor = await self._local_manifest(ref, reference)
        except (NotFound, Unavailable):
            if not self._forwards(request):
                raise
            await self._forward(request, ref.digest or ref.name, ref.digest, manifest=True)
            return None
        if descriptor.media_type not in MANIFEST_MEDIA_TYPES:
            raise NotFound(f"{digest} is not a manifest")
        set_handler(request, "local")
        _set_content_headers(request, descriptor, ref.registry)
        request.setHeader(b"content-length", b"%d" % descriptor.size)
        if request.method == b"HEAD":
            return b""
        blob = await self._store.open(digest)
        try:
            return await _read_all(blob)
        finally:
            blob.close()

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["GET"])
    async def blob(self, request: Request, name: str, digest: str) -> None:
        self._authorize(request)
        parse_repository(name)
        parse_digest(digest)
        registry = requested_registry(request)
        self._check_filters(registry, name)
        try:
            descriptor = await self._store.descriptor(digest)
        except (NotFound, Unavailable):
            if self._forwards(request):
                await self._forward(request, digest, digest, manifest=False)
            elif self._downloads is not None:
                await self._send_download(request, digest, registry)
            else:
                raise
            return
        set_handler(request, "local")
        offset, length = _blob_headers(request, descriptor, registry)
        if request.method == b"HEAD":
            return
        blob = await self._store.open(digest)
        await self._send(request, digest, blob, offset, length)

    async def _send_download(self, request: Request, digest: str, registry: str | None) -> None:
        """A peer asks for a blob this node's containerd is still downloading: it gets the
        bytes as they arrive, and a cut connection if the download stops (it then
        resumes elsewhere). Only peers: our own containerd is the one downloading."""
        assert self._downloads is not None
        blob = await self._downloads.open_download(digest)
        client = request.getClientAddress()
        set_handler(request, "in-flight", getattr(client, "host", "-"))
        request.setHeader(IN_FLIGHT_HEADER, b"true")
        try:
            descriptor = Descriptor(digest, OCTET_STREAM, blob.size)
            offset, length = _blob_headers(request, descriptor, registry)
        except BaseException:
            blob.close()
            raise
        if request.method == b"HEAD":
            blob.close()
            return
        await self._send(request, digest, blob, offset, length)

    async def _send(
        self, request: Request, digest: str, blob: IBlob, offset: int, length: int
    ) -> None:
        try:
            await send_blob(self._reactor, request, blob, offset, length)
        except CancelledError:
            raise
        except Exception as e:
            _log.info("body of {digest} aborted: {error}", digest=digest, error=str(e))
            await _cut(self._reactor, request)
        finally:
            blob.close()

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    def other(self, request: Request, rest: str) -> None:
        """Pushes, deletes, tag lists and catalogues are not a mirror's job."""
        self._authorize(request)
        if request.method in (b"GET", b"HEAD"):
            raise werkzeug_NotFound()
        raise MethodNotAllowed()

    async def _local_manifest(self, ref: Reference, reference: str) -> tuple[str, Descriptor]:
        digest = ref.digest or await self._resolve_tag(ref)
        try:
            return digest, await self._store.descriptor(digest)
        except NotFound as e:
            raise NotFound(f"manifest {reference} is not held here") from e

    def _forwards(self, request: Request) -> bool:
        """A request a peer forwarded here is never forwarded again: no loops."""
        return self._mirror is not None and request.getHeader(MIRRORED_HEADER) != b"true"

    async def _forward(
        self, request: Request, key: str, digest: str | None, manifest: bool
    ) -> None:
        assert self._mirror is not None
        try:
            await self._mirror.forward(request, key, digest, manifest)
        except MirrorBodyFailed as e:
            _log.info("forwarded body of {key} aborted: {error}", key=key, error=str(e))
            await _cut(self._reactor, request)

    async def _resolve_tag(self, ref: Reference) -> str:
        try:
            return str(await self._store.resolve(ref.name))
        except NotFound as e:
            raise NotFound(f"no image {ref.name} here") from e

    def _authorize(self, request: Request) -> None:
        if self._auth is not None and not self._auth.admits(request.getHeader(b"authorization")):
            raise Unauthorized("this registry asks for Basic authentication")

    def _check_filters(self, registry: str | None, repository: str, tag: str | None = None) -> None:
        """Before anything is looked up, here or on a peer: a filtered name is neither
        served nor forwarded, whether asked for by tag or by digest."""
        if not self._filters:
            return
        if registry is None:
            raise Filtered("without ns=<registry> a request cannot be checked against filters")
        reason = self._filters.excluded(registry, repository, tag)
        if reason is not None:
            raise Filtered(reason)

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        found = _error_for(request, failure)
        if found is None:
            # The spec's codes are for what a client got wrong or cannot have; a fault of
            # ours gets a plain 500.
            _log.failure("unexpected error serving {path}", failure, path=request.path)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            body = b"internal error\n"
        else:
            code, message = found
            request.setResponseCode(code.status)
            request.setHeader(b"content-type", b"application/json")
            body = error_body(code, message)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


def _error_for(request: IRequest, failure: Failure) -> tuple[ErrorCode, str] | None:
    """Map an exception to the OCI error a client should see, with the headers the spec
    asks for beside it; None for an error of ours."""
    is_blob = b"/blobs/" in request.path
    unknown = ErrorCode.BLOB_UNKNOWN if is_blob else ErrorCode.MANIFEST_UNKNOWN
    error = failure.value
    if isinstance(error, InvalidDigest):
        return ErrorCode.DIGEST_INVALID, str(error)
    if isinstance(error, InvalidReference):
        return ErrorCode.NAME_INVALID, str(error)
    if isinstance(error, (NotFound, Filtered)):
        return unknown, str(error) or "not found"
    if isinstance(error, Unavailable):
        return unknown, f"containerd is unavailable: {error}"
    if isinstance(error, Unauthorized):
        request.setHeader(b"www-authenticate", b'Basic realm="%s"' % REALM)
        return ErrorCode.UNAUTHORIZED, str(error)
    if isinstance(error, RangeNotSatisfiable):
        request.setHeader(b"content-range", b"bytes */%d" % error.size)
        return ErrorCode.SIZE_INVALID, str(error)
    if isinstance(error, MethodNotAllowed):
        # Every path here, /v2/ and the health checks alike, is read-only.
        request.setHeader(b"allow", _READ_METHODS)
        method = request.method.decode("ascii", "replace")
        return ErrorCode.UNSUPPORTED, f"{method} is not supported: this registry is pull-only"
    if isinstance(error, HTTPException):
        return ErrorCode.NAME_UNKNOWN, "no such endpoint: this registry serves only pulls"
    return None


class _Utf8Only(Resource):
    """Klein answers a URL that is not UTF-8 with plain text and logs a traceback; a
    client gets the OCI error instead, and the log stays clean."""

    isLeaf = True

    def __init__(self, routes: Resource) -> None:
        super().__init__()
        self._routes = routes

    def render(self, request: Request) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return error_body(ErrorCode.NAME_INVALID, "the URL is not UTF-8")
        return self._routes.render(request)


CUT_FLUSH_TIME = 10.0
"""Seconds a cut connection may take to deliver the bytes written before it is reset."""


async def _cut(clock: Any, request: Request) -> None:
    """Once headers are sent, the only honest error left is a connection closed before
    ``Content-Length``; wait until Twisted has seen it, so nobody finishes the request
    after. It is closed, not reset: containerd (1.6 and later) reads an early end as
    ``unexpected EOF`` and asks again from the byte it has, this mirror first and then
    the registry, where a reset would fail the pull. A client that does not read what
    was written before the close is reset after CUT_FLUSH_TIME."""
    finished = request.notifyFinish()
    finished.addErrback(lambda _: None)
    channel = request.channel
    transport = channel.transport if channel is not None else None
    if channel is not None:
        # The channel's own close: it first lets go of the transport, which would
        # otherwise wait on the channel as its producer and never close.
        channel.loseConnection()
    if ITCPTransport.providedBy(transport):
        reset = clock.callLater(CUT_FLUSH_TIME, transport.abortConnection)
        finished.addBoth(lambda _: reset.cancel() if reset.active() else None)
    await finished


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _blob_headers(
    request: Request, descriptor: Descriptor, registry: str | None
) -> tuple[int, int]:
    """Set a blob answer's status and headers; the offset and length of its body."""
    _set_content_headers(request, descriptor, registry)
    request.setHeader(b"accept-ranges", b"bytes")
    byte_range = parse_range(_header(request, b"range"), descriptor.size)
    offset, length = 0, descriptor.size
    if byte_range is not None:
        offset, length = byte_range.first, byte_range.length
        request.setResponseCode(206)
        request.setHeader(b"content-range", byte_range.content_range(descriptor.size))
    request.setHeader(b"content-length", b"%d" % length)
    return offset, length


def _set_content_headers(request: Request, descriptor: Descriptor, registry: str | None) -> None:
    """``OCI-Namespace`` names the registry the content was asked for under (ns), as
    Spegel sends it."""
    if registry is not None:
        request.setHeader(b"oci-namespace", registry.encode())
    request.setHeader(b"content-type", descriptor.media_type.encode())
    request.setHeader(b"docker-content-digest", descriptor.digest.encode())
    request.setHeader(b"etag", f'"{descriptor.digest}"'.encode())


async def _read_all(blob: IBlob) -> bytes:
    if blob.size > MAX_MANIFEST_SIZE:
        raise NotFound("content is too large to be a manifest")
    parts = []
    position = 0
    while position < blob.size:
        data = await blob.read(position, blob.size - position)
        if not data:
            raise NotFound("manifest content ended early")
        parts.append(data)
        position += len(data)
    return b"".join(parts)
