"""A small blocking client for the parts of containerd's gRPC API a mirror reads.

Every method blocks, so callers in the reactor thread must run it in a thread
pool (``ContainerdStore`` does). gRPC failures come out as our own errors:
``NotFound`` for NOT_FOUND, ``Unavailable`` when containerd cannot be reached,
``ContainerdError`` for anything else, so nothing above this module sees grpc.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from spegel_tx.containerd.api import (
    content_events_pb2,
    content_pb2,
    content_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    image_events_pb2,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
    version_pb2,
    version_pb2_grpc,
)
from spegel_tx.errors import NotFound, SpegelError, Unavailable

T = TypeVar("T")

NAMESPACE_KEY = "containerd-namespace"

CHECK_CONTAINERD = "Check containerd-sock, or run `spegel-tx doctor`."
"""What an operator should do when containerd does not answer, for the log lines saying so."""

# Event payloads we can decode, by the full message name their Any type URL ends with.
EVENT_TYPES: dict[str, type[Message]] = {
    message.DESCRIPTOR.full_name: message
    for message in (
        image_events_pb2.ImageCreate,
        image_events_pb2.ImageUpdate,
        image_events_pb2.ImageDelete,
        content_events_pb2.ContentDelete,
    )
}

# grpc retries a broken connection on its own schedule (up to 120 s by default);
# keep that short so our own backoff decides how soon containerd is seen again.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

_UNAVAILABLE_CODES = frozenset(
    (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
)


class ContainerdError(SpegelError):
    """containerd answered with an error other than not-found or unavailable."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"containerd: {code}: {details}")
        self.code = code
        self.details = details


def translate_error(error: grpc.RpcError) -> SpegelError:
    """The spegel-tx error for a failed gRPC call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code in _UNAVAILABLE_CODES:
        return Unavailable(f"containerd: {details}")
    return ContainerdError(code.name, details)


class Stream(Generic[T]):
    """The answers of one server-streaming call; ``cancel`` may come from any thread.

    Iterating raises the translated error when the call fails, and simply
    stops once the call was cancelled here.
    """

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._cancelled.is_set():
            raise StopIteration
        try:
            response = next(self._call)
        except grpc.RpcError as e:
            if self._cancelled.is_set():
                raise StopIteration from None
            raise translate_error(e) from None
        return self._convert(response)

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()


def decode_envelope(envelope: events_pb2.Envelope) -> tuple[str, str, Message | None]:
    """``(topic, namespace, payload)``; the payload is None for event types we do not know."""
    name = envelope.event.type_url.rsplit("/", 1)[-1]
    message_type = EVENT_TYPES.get(name)
    payload = message_type.FromString(envelope.event.value) if message_type else None
    return envelope.topic, envelope.namespace, payload


class ContainerdClient:
    """containerd's read-only API for one namespace, over one gRPC channel.

    ``address`` is the socket path (or a full gRPC target such as
    ``unix:///run/containerd/containerd.sock``). The channel connects lazily,
    so creating a client never blocks nor fails.
    """

    def __init__(self, address: str, namespace: str, timeout: float = 30.0) -> None:
        self.address = address
        self.namespace = namespace
        self._timeout = timeout
        self._metadata = ((NAMESPACE_KEY, namespace),)
        target = address if "://" in address else "unix://" + address
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._version = version_pb2_grpc.VersionStub(self._channel)
        self._introspection = introspection_pb2_grpc.IntrospectionStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._events = events_pb2_grpc.EventsStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls still running fail with ``Unavailable``."""
        self._channel.close()

    def _unary(self, method: Any, request: Message) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as e:
            raise translate_error(e) from None
        except ValueError as e:  # "Cannot invoke RPC on closed channel!"
            raise Unavailable(f"containerd: {e}") from None

    def _stream(self, method: Any, request: Message, timeout: float | None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except ValueError as e:
            raise Unavailable(f"containerd: {e}") from None

    def version(self) -> version_pb2.VersionResponse:
        return self._unary(self._version.Version, empty_pb2.Empty())

    def plugins(self, filters: Sequence[str] = ()) -> list[introspection_pb2.Plugin]:
        """Plugins matching any of ``filters`` (containerd filter syntax), or all."""
        request = introspection_pb2.PluginsRequest(filters=filters)
        return list(self._unary(self._introspection.Plugins, request).plugins)

    def get_image(self, name: str) -> images_pb2.Image:
        request = images_pb2.GetImageRequest(name=name)
        return self._unary(self._images.Get, request).image

    def list_images(self, filters: Sequence[str] = ()) -> list[images_pb2.Image]:
        request = images_pb2.ListImagesRequest(filters=filters)
        return list(self._unary(self._images.List, request).images)

    def content_info(self, digest: str) -> content_pb2.Info:
        request = content_pb2.InfoRequest(digest=digest)
        return self._unary(self._content.Info, request).info

    def list_content(self, filters: Sequence[str] = ()) -> list[content_pb2.Info]:
        """Every content info of the namespace, gathered from the List stream."""
        request = content_pb2.ListContentRequest(filters=filters)
        call = self._stream(self._content.List, request, self._timeout)
        stream = Stream(call, lambda response: list(response.info))
        return [info for infos in stream for info in infos]

    def read_content(self, digest: str, offset: int = 0, size: int = 0) -> Stream[bytes]:
        """Chunks of the content from ``offset``; ``size`` 0 reads to the end."""
        request = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        call = self._stream(self._content.Read, request, None)
        return Stream(call, lambda response: bytes(response.data))

    def subscribe(self, filters: Sequence[str] = ()) -> Stream[tuple[str, str, Message | None]]:
        """Events matching any of ``filters``, as ``(topic, namespace, payload)``.

        containerd sends events of every namespace unless a filter names one.
        """
        request = events_pb2.SubscribeRequest(filters=filters)
        call = self._stream(self._events.Subscribe, request, None)
        return Stream(call, decode_envelope)
