"""Keeps one containerd event subscription open and hands image events to the reactor.

containerd's Subscribe is a blocking gRPC stream, so it is read in a thread of
its own; everything else (backoff, logging, delivery) happens in the reactor
thread, so a ``task.Clock`` can drive it in tests. A stream that breaks, as it
does whenever containerd restarts, is opened again with capped exponential
backoff until ``stop``. Events published while no stream is open are lost:
whoever keeps state from these events should also resync from ``images()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel

from spegel_tx.containerd.client import CHECK_CONTAINERD, ContainerdClient, Stream
from spegel_tx.content import ImageEvent, ImageEventKind

log = Logger()

IMAGE_TOPICS = {
    "/images/create": ImageEventKind.CREATE,
    "/images/update": ImageEventKind.UPDATE,
    "/images/delete": ImageEventKind.DELETE,
}
CONTENT_DELETE_TOPIC = "/content/delete"

# A stream that lived this long was healthy: the next break starts the backoff over.
HEALTHY_AFTER = 10.0

RunInThread = Callable[[Callable[[], None]], "threading.Thread | None"]


def event_filters(namespace: str) -> list[str]:
    """Subscribe filters (any may match) for our namespace's image and content-delete events.

    containerd sends every namespace's events unless a filter names one.
    Content deletes are asked for now so a later withdraw-on-delete needs no
    protocol change; containerd only sends them for explicit deletes.
    """
    scope = f'namespace=="{namespace}"'
    return [f'topic~="^/images/",{scope}', f'topic=="{CONTENT_DELETE_TOPIC}",{scope}']


def to_image_event(topic: str, payload: Message | None) -> ImageEvent | None:
    """The ``ImageEvent`` an envelope carries, or None for any other event."""
    kind = IMAGE_TOPICS.get(topic)
    name = getattr(payload, "name", None)
    if kind is None or not isinstance(name, str):
        return None
    return ImageEvent(kind, name)


def start_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="spegel-containerd-events", daemon=True)
    thread.start()
    return thread


class EventWatcher:
    """One Subscribe stream at a time, re-opened with backoff until stopped.

    ``deliver`` is called in the reactor thread with each ``ImageEvent``, and
    ``broken`` each time a stream ends, since that is often the first sign
    that containerd went away. ``run_in_thread`` starts the blocking stream
    reader; tests pass one that runs it inline.
    """

    def __init__(
        self,
        reactor: Any,
        client: ContainerdClient,
        namespace: str,
        deliver: Callable[[ImageEvent], None],
        broken: Callable[[], None] = lambda: None,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        run_in_thread: RunInThread = start_thread,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._namespace = namespace
        self._filters = event_filters(namespace)
        self._deliver = deliver
        self._broken = broken
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._delay = min_delay
        self._run_in_thread = run_in_thread
        self._running = False
        self._stream: Stream[Any] | None = None
        self._stream_started = 0.0
        self._delivered = False
        self._thread: threading.Thread | None = None
        self._retry: IDelayedCall | None = None
        self.subscriptions = 0
        """How many streams were opened; lets tests see a re-subscribe."""

    def start(self) -> None:
        self._running = True
        self._subscribe()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the stream and wait for its reader thread to finish."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _subscribe(self) -> None:
        self._retry = None
        if not self._running:
            return
        self._stream_started = self._reactor.seconds()
        self._delivered = False
        try:
            stream = self._client.subscribe(self._filters)
        except Exception as e:
            self._ended(None, e)
            return
        self._stream = stream
        self.subscriptions += 1
        if self.subscriptions > 1:
            # Whatever happened while no stream was open is known only by asking again.
            self._deliver(ImageEvent(ImageEventKind.RESYNC, ""))
        self._thread = self._run_in_thread(lambda: self._consume(stream))

    def _consume(self, stream: Stream[Any]) -> None:
        """Runs in the reader thread: only ``callFromThread`` touches shared state."""
        error: BaseException | None = None
        try:
            for topic, namespace, payload in stream:
                event = to_image_event(topic, payload)
                if event is not None and namespace == self._namespace:
                    self._reactor.callFromThread(self._received, stream, event)
        except Exception as e:
            error = e
        self._reactor.callFromThread(self._ended, stream, error)

    def _received(self, stream: Stream[Any], event: ImageEvent) -> None:
        if not self._running or stream is not self._stream:
            return
        self._delay = self._min_delay
        self._delivered = True
        try:
            self._deliver(event)
        except Exception:
            log.failure("Handling containerd event {event} failed", event=event)

    def _ended(self, stream: Stream[Any] | None, error: BaseException | None) -> None:
        if not self._running or stream is not self._stream:
            return
        self._stream = None
        self._thread = None
        healthy = self._delivered or (
            self._reactor.seconds() - self._stream_started >= HEALTHY_AFTER
        )
        if healthy:
            self._delay = self._min_delay
        delay = self._delay
        self._delay = min(self._delay * 2, self._max_delay)
        # Only a stream that worked is news: while containerd stays down, every retry
        # fails again, and the store says once that containerd is not reachable.
        log.emit(
            LogLevel.warn if healthy else LogLevel.debug,
            "containerd event stream ended ({error}); re-subscribing in {delay}s. "
            + CHECK_CONTAINERD,
            error=error or "closed by containerd",
            delay=delay,
        )
        self._retry = self._reactor.callLater(delay, self._subscribe)
        self._broken()
