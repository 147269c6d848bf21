"""Keep the DHT's view of this node equal to what its containerd holds.

Every change is handled the same way: list what containerd holds now, then
advertise the keys that appeared and withdraw those that went. A burst of
events costs one resync, and a lost event is repaired by the next one or by
the periodic resync.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from spegel_tx.content import ImageEvent, ImageEventKind
from spegel_tx.interfaces import IContentStore, IRouter
from spegel_tx.oci.filters import Filters
from spegel_tx.oci.reference import split_image_name

_log = Logger()

NOT_READY_RETRY = 2.0
"""Seconds between resync attempts while containerd does not answer."""

DEBOUNCE = 0.5
"""Seconds to gather a burst of events (an import sends several) into one resync."""


class StateTracker(Service):
    def __init__(
        self,
        clock: Any,
        store: IContentStore,
        router: IRouter,
        mirrored_registries: Iterable[str] = (),
        registry_filters: Iterable[re.Pattern[str]] = (),
        resync_interval: float = 300.0,
    ) -> None:
        self._clock = clock
        self._store = store
        self._router = router
        self._filters = Filters.of(mirrored_registries, registry_filters)
        self._resync_interval = resync_interval
        self.advertised: set[str] = set()
        self.images: dict[str, str] = {}
        """Advertised image name -> the digest it names, as of the last resync."""
        self._walked: dict[str, list[str]] = {}
        """Image digest -> the present digests under it, as the last walk found them."""
        self._walk_all = True
        self._pending: Any = None
        self._running_sync: Deferred[None] | None = None
        self._again = False
        self._loop: LoopingCall | None = None
        self._unsubscribe: Any = None

    def startService(self) -> None:
        Service.startService(self)
        self._unsubscribe = self._store.subscribe(self._changed)
        self._loop = LoopingCall(self.resync_all)
        self._loop.clock = self._clock
        self._loop.start(self._resync_interval, now=True)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()

    def _changed(self, event: ImageEvent) -> None:
        if event.kind is ImageEventKind.RESYNC:
            self._walk_all = True
        if self._pending is None or not self._pending.active():
            self._pending = self._clock.callLater(DEBOUNCE, self.resync)

    def resync_all(self) -> Deferred[None]:
        """Walk every image's content again: only this notices content that containerd
        removed under an image that is still there (discarded layers, garbage collection)."""
        self._walk_all = True
        return self.resync()

    def resync(self) -> Deferred[None]:
        """List the images; walk the content only of those not walked before, since an
        image digest names immutable content. One resync at a time; a request during
        one runs once more after it."""
        if self._running_sync is not None:
            self._again = True
            return self._running_sync
        self._running_sync = Deferred.fromCoroutine(self._sync())
        self._running_sync.addErrback(lambda f: _log.failure("resync with containerd failed", f))
        self._running_sync.addBoth(self._synced)
        return self._running_sync

    def _synced(self, _: object) -> None:
        self._running_sync = None
        if self._again and self.running:
            self._again = False
            self.resync()

    def wanted(self, name: str) -> bool:
        """Names worth advertising: real references, in a mirrored registry, not filtered."""
        parts = split_image_name(name)
        if parts is None or parts.tag is None:
            return False
        return self._filters.excluded(parts.registry, parts.repository, parts.tag) is None

    async def _keys(self, known: dict[str, list[str]]) -> set[str]:
        """Every wanted name and the digests under it; walks only images not in ``known``."""
        walked: dict[str, list[str]] = {}
        images: dict[str, str] = {}
        keys: set[str] = set()
        for image in await self._store.images():
            if not self.wanted(image.name):
                continue
            keys.add(image.name)
            images[image.name] = image.digest
            if image.digest not in walked:
                found = known.get(image.digest)
                walked[image.digest] = (
                    found if found is not None else await self._store.digests(image)
                )
            keys.update(walked[image.digest])
        self._walked = walked
        self.images = images
        return keys

    def advertised_by_registry(self) -> dict[str, tuple[int, int, int]]:
        """Registry -> (tags, image digests, content digests) advertised, for metrics."""
        tags: dict[str, set[str]] = defaultdict(set)
        images: dict[str, set[str]] = defaultdict(set)
        contents: dict[str, set[str]] = defaultdict(set)
        for name, digest in self.images.items():
            parts = split_image_name(name)
            registry = parts.registry if parts is not None and parts.registry else ""
            tags[registry].add(name)
            images[registry].add(digest)
            contents[registry].update(self._walked.get(digest, ()))
        return {
            registry: (len(tags[registry]), len(images[registry]), len(contents[registry]))
            for registry in tags
        }

    async def _sync(self) -> None:
        if not self._store.ready():
            if self.running and (self._pending is None or not self._pending.active()):
                self._pending = self._clock.callLater(NOT_READY_RETRY, self.resync)
            return
        walk_all, self._walk_all = self._walk_all, False
        try:
            keys = await self._keys({} if walk_all else self._walked)
        except BaseException:
            self._walk_all = self._walk_all or walk_all
            raise
        gone = self.advertised - keys
        new = keys - self.advertised
        if gone:
            await self._router.withdraw(sorted(gone))
        if new:
            await self._router.advertise(sorted(new))
        self.advertised = keys
        if gone or new:
            _log.info(
                "advertised {new} new keys, withdrew {gone}; {total} in all",
                new=len(new),
                gone=len(gone),
                total=len(keys),
            )
