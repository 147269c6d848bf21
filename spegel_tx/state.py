"""Keep the DHT's view of this node equal to what its containerd holds.

Every change is handled the same way: list what containerd holds now, then
advertise the keys that appeared and withdraw those that went. A burst of
events costs one resync, and a lost event is repaired by the next one or by
the periodic resync.

During a pull, before containerd has an image to list, the first wave is
advertised from its downloads (``first-wave-sharing``): each blob being
downloaded under its in-flight key, and each blob under its own key from the
moment it is committed, until the image that holds it is listed.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from spegel_tx.containerd.ingests import Ingest
from spegel_tx.content import FirstWave, ImageEvent, ImageEventKind, in_flight_key
from spegel_tx.interfaces import IContentStore, IDownloads, IRouter
from spegel_tx.oci.filters import Filters
from spegel_tx.oci.reference import split_image_name

_log = Logger()

NOT_READY_RETRY = 2.0
"""Seconds between resync attempts while containerd does not answer."""

DEBOUNCE = 0.5
"""Seconds to gather a burst of events (an import sends several) into one resync."""

DOWNLOAD_DEBOUNCE = 0.05
"""Seconds from a download starting or ending to its advertisement: a peer pulling
the same image a few hundred milliseconds later must find it."""

DOWNLOAD_RESCAN = 0.25
"""While downloads run, they are looked at this often: a stalled one stops being
offered, and a download whose files were not all there when it was heard of, or
one that started before a directory was watched, waits at most this."""

CONFIRM_FOR = 2.0
"""Seconds a blob that arrived is asked after while containerd has not yet recorded it
(its metadata is written just after the file is renamed into place)."""

LANDED_KEEP = 600.0
"""Seconds a committed blob stays advertised without an image that holds it: a pull
in progress, not content a cancelled pull left behind for the garbage collector."""


class StateTracker(Service):
    def __init__(
        self,
        clock: Any,
        store: IContentStore,
        router: IRouter,
        mirrored_registries: Iterable[str] = (),
        registry_filters: Iterable[re.Pattern[str]] = (),
        resync_interval: float = 300.0,
        first_wave: FirstWave = FirstWave.OFF,
        wall: Any = time.time,
    ) -> None:
        """``wall`` is the clock of file times (downloads' mtimes); tests replace it."""
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
        self.first_wave = first_wave
        self._downloads = IDownloads(store, None) if first_wave is not FirstWave.OFF else None
        self._wall = wall
        self._images_due = True
        self._image_keys: set[str] = set()
        self.in_flight: dict[str, Ingest] = {}
        """Digest -> download in progress, live, as the last look found them."""
        self.landed: dict[str, float] = {}
        """Digest -> when it was seen committed, for blobs advertised before their image."""
        self._candidates: dict[str, float] = {}
        """Digest -> when it appeared on disk, until containerd confirms this namespace
        holds it (or CONFIRM_FOR has passed)."""
        self._on_disk: set[str] | None = None
        """The blob files the last look found; None before the first."""

    def startService(self) -> None:
        Service.startService(self)
        self._unsubscribe = self._store.subscribe(self._changed)
        if self._downloads is not None:
            self._downloads.watch_downloads(self._download_changed)
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
        self._images_due = True
        self._resync_within(DEBOUNCE)

    def _download_changed(self) -> None:
        self._resync_within(DOWNLOAD_DEBOUNCE)

    def _resync_within(self, delay: float) -> None:
        """A resync in ``delay`` seconds, or sooner if one is already due."""
        if self._pending is not None and self._pending.active():
            if self._pending.getTime() <= self._clock.seconds() + delay:
                return
            self._pending.cancel()
        self._pending = self._clock.callLater(delay, self.resync)

    def resync_all(self) -> Deferred[None]:
        """Walk every image's content again: only this notices content that containerd
        removed under an image that is still there (discarded layers, garbage collection)."""
        self._walk_all = True
        self._images_due = True
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

    @property
    def watching_downloads(self) -> bool:
        return self._downloads is not None and bool(self._downloads.watching)

    def first_wave_counts(self) -> dict[str, int]:
        """Blobs advertised before their image, for metrics: downloads and committed."""
        offered = self.first_wave is FirstWave.IN_FLIGHT
        in_flight = len(self.in_flight.keys() - self.landed.keys()) if offered else 0
        return {"in_flight": in_flight, "committed": len(self.landed)}

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
        listed = self._images_due
        if listed:
            self._images_due = False
            walk_all, self._walk_all = self._walk_all, False
            try:
                self._image_keys = await self._keys({} if walk_all else self._walked)
            except BaseException:
                self._walk_all = self._walk_all or walk_all
                self._images_due = True
                raise
        keys = self._image_keys | await self._first_wave_keys(recheck=listed)
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

    async def _first_wave_keys(self, recheck: bool) -> set[str]:
        """The keys of an image still being pulled: its downloads and its committed blobs.
        Blobs already advertised are asked after again only with the images (``recheck``):
        containerd is not polled for every blob while downloads run."""
        if self._downloads is None:
            return set()
        downloads = await self._downloads.downloads()
        on_disk = await self._downloads.blob_files()
        now = self._clock.seconds()
        if self._on_disk is not None:
            for digest in on_disk - self._on_disk:
                self._candidates.setdefault(digest, now)  # just committed, in some namespace
        self._on_disk = on_disk
        asked = [*self._candidates, *(self.landed if recheck else ())]
        held = await self._downloads.committed(asked) if asked else set()
        if not recheck:
            held |= self.landed.keys()
        for digest in held:
            self.landed.setdefault(digest, now)
            self._candidates.pop(digest, None)
        self._candidates = {
            d: since for d, since in self._candidates.items() if now - since < CONFIRM_FOR
        }
        self.landed = {
            d: since
            for d, since in self.landed.items()
            if d in held and now - since < LANDED_KEEP and d not in self._image_keys
        }
        wall = self._wall()
        stall = self._downloads.stall_timeout
        self.in_flight = {d: i for d, i in downloads.items() if i.live(wall, stall)}
        if (downloads or self._candidates) and self.running:
            self._resync_within(DOWNLOAD_RESCAN)
        keys = set(self.landed)
        if self.first_wave is FirstWave.IN_FLIGHT:
            keys.update(in_flight_key(d) for d in self.in_flight.keys() - self.landed.keys())
        return keys
