"""The seams of spegel-tx: what the registry needs from a store, a router and a bootstrapper.

Every implementation is checked by the conformance suite under tests/conformance/,
so the registry can be tested on memory implementations and run on real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from spegel_tx.content import Descriptor, Image, ImageEvent


class IBlob(Interface):
    """One open piece of content; ``close`` releases whatever holds it open."""

    size = Attribute("The content's length in bytes.")

    def fileno() -> int | None:
        """A readable OS file descriptor for the whole content, or None.

        Lets the registry hand the file to the kernel (sendfile) instead of
        copying it through Python; None when the content is not on local disk.
        """

    def read(offset: int, length: int) -> Deferred[bytes]:
        """Deferred firing with 1 to ``length`` bytes starting at ``offset``.

        Fires with ``b""`` only when ``offset`` is at or past the end. Reads
        are expected to be sequential; an implementation may restart its
        stream when they are not.
        """

    def close() -> None:
        """Release the content; safe to call twice."""


class IContentStore(Interface):
    """What the node's container runtime holds, seen as an OCI registry would.

    Every method returns a Deferred and never blocks the reactor. Lookups of
    absent things fail with ``spegel_tx.errors.NotFound``; an unreachable
    backend fails with ``spegel_tx.errors.Unavailable``.
    """

    def ready() -> bool:
        """True while the backend answers."""

    def images() -> Deferred[list[Image]]:
        """Deferred list of every ``content.Image`` the store holds."""

    def resolve(name: str) -> Deferred[str]:
        """Deferred digest of the image named ``registry/repository:tag``."""

    def descriptor(digest: str) -> Deferred[Descriptor]:
        """Deferred ``content.Descriptor`` of content present in the store.

        Manifests and indexes carry their real media type, told from the
        content itself when the backend does not record it; everything else
        is ``application/octet-stream``.
        """

    def open(digest: str) -> Deferred[IBlob]:
        """Deferred ``IBlob`` for content present in the store."""

    def digests(image: Image) -> Deferred[list[str]]:
        """Deferred list of every digest reachable from a ``content.Image``
        (index, manifests, configs, layers) that is present in the store."""

    def subscribe(handler: Callable[[ImageEvent], None]) -> Callable[[], None]:
        """Call ``handler(content.ImageEvent)`` in the reactor thread for each
        image change; returns a no-argument callable that unsubscribes."""


class IDownloads(Interface):
    """What the node's containerd is downloading now: lets a first wave of pulls share
    a new image while its blobs are still arriving (see containerd/ingests.py)."""

    stall_timeout = Attribute("Seconds without growth after which a download is not offered.")

    def downloads() -> Deferred[dict[str, Any]]:
        """Deferred dict of digest to ``Ingest`` for each download of this namespace
        whose size is known."""

    def blob_files() -> Deferred[set[str]]:
        """Deferred set of the digests whose files are in the content directory now,
        whichever namespace holds them: what appears there between two looks has
        just been committed."""

    def committed(digests: Iterable[str]) -> Deferred[set[str]]:
        """Deferred set of those ``digests`` this namespace holds as complete blobs."""

    def open_download(digest: str) -> Deferred[IBlob]:
        """Deferred ``IBlob`` whose reads wait for bytes still to come; fails with
        ``NotFound`` unless ``digest`` is being downloaded and still growing."""

    watching = Attribute(
        "Whether downloads are watched now; while not, blobs are advertised with their image."
    )

    def watch_downloads(changed: Callable[[], None]) -> None:
        """Call ``changed()`` whenever a download may have started or ended, or a blob
        been committed, from when the store can watch them."""


class IRouter(Interface):
    """Finds which peers hold a key, and tells peers which keys we hold.

    Keys are ``sha256:<hex>`` for content and ``registry/repo:tag`` for tags.
    """

    def ready() -> bool:
        """True once at least one peer is known."""

    def lookup(key: str, count: int) -> ILookup:
        """An ``ILookup`` that yields up to ``count`` providers of ``key``,
        excluding this node, as they are found."""

    def advertise(keys: Iterable[str]) -> Deferred[None]:
        """Fires once ``keys`` are announced."""

    def withdraw(keys: Iterable[str]) -> Deferred[None]:
        """Deferred that fires once peers are told we no longer hold ``keys``."""


class ILookup(Interface):
    """A running search for the providers of one key."""

    def next_provider() -> Deferred[tuple[str, int] | None]:
        """Deferred firing with the next ``(host, registry_port)`` found, or
        None once the search is exhausted."""

    def cancel() -> None:
        """Stop searching; pending ``next_provider`` calls fire with None."""

    def answering() -> bool:
        """Whether nodes asked have yet to answer, none of them timed out: the search
        may still name providers, however long since the last one."""


class IBootstrapper(Interface):
    """Where a node finds its first peers."""

    def peers() -> Deferred[list[tuple[str, int]]]:
        """Deferred list of ``(host, port)`` router addresses to contact."""
